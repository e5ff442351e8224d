//! Chat templates and prompt tokens.
//!
//! - [`ChatTemplate::Jinja`]: the checkpoint's own template, rendered with minijinja under the
//!   conventions of transformers' `render_jinja_template` (trim_blocks, lstrip_blocks, loop
//!   controls, `raise_exception`, `strftime_now`, a Python-`json.dumps` `tojson`, Python string /
//!   dict methods, the tokenizer's special tokens as variables, messages whose `content` is a
//!   list of `{"type": "text", "text": …}` / `{"type": "image"}` parts).
//! - [`ChatTemplate::MistralInstruct`] / [`ChatTemplate::LlavaLlama2`]: the LLaVA codebase's
//!   `conv_mistral_instruct` / `conv_llava_llama_2` (`SeparatorStyle.LLAMA_2`) for
//!   original-format checkpoints, which carry no template.
//! - [`build_prompt`]: rendered text + image token counts → ids with the image positions
//!   expanded, either as transformers' LLaVA processors do ([`PromptMode::Hf`]) or as LLaVA's
//!   `tokenizer_image_token` does ([`PromptMode::Original`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

use crate::error::{ModelError, Result};
use crate::tokenizer::{Tokenizer, TokenizerConfig};

/// The text that stands for an image in rendered prompts.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// `conv_llava_llama_2.system` in the LLaVA codebase (used by TGA training).
pub const LLAVA_LLAMA_2_SYSTEM: &str = "You are a helpful language and vision assistant. \
You are able to understand the visual content that the user provides, \
and assist the user with a variety of tasks using natural language.";

fn tpl_err(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Template(msg.to_string())
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    Image,
}

/// TGA's retrieval prefix of a user turn with an image (Xu et al.; tools/toy_tga trains with it):
/// `Retrieved Text: {R}. <image>\n{question}`.
pub fn retrieval_prefix(retrieved: &str) -> String {
    format!("Retrieved Text: {retrieved}. ")
}

/// A chat message (`role`: `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
    /// A retrieved text rendered before the message's images ([`retrieval_prefix`]).
    pub retrieved: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: Vec<ContentPart>) -> Self {
        Self {
            role: role.into(),
            content,
            retrieved: None,
        }
    }
    /// A message with a single text part.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self::new(role, vec![ContentPart::Text(text.into())])
    }
    pub fn image_count(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, ContentPart::Image))
            .count()
    }
    /// The text parts, concatenated (as the llava-hf templates do).
    pub fn joined_text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text(t) => Some(t.as_str()),
                ContentPart::Image => None,
            })
            .collect()
    }
    /// LLaVA's user-turn text: one `<image>\n` per image, then the text; TGA's retrieved text,
    /// if any, before the images.
    fn llava_text(&self) -> String {
        let prefix = match &self.retrieved {
            Some(r) if self.image_count() > 0 => retrieval_prefix(r),
            _ => String::new(),
        };
        prefix + &format!("{IMAGE_PLACEHOLDER}\n").repeat(self.image_count()) + &self.joined_text()
    }
}

/// A chat template.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    Jinja(JinjaTemplate),
    /// LLaVA `conv_mistral_instruct`: `[INST] {<image>\n}{question} [/INST]`, answers
    /// ` {answer} </s>`, later turns `[INST] …` (no system unless one is given, then as
    /// `llava_llama_2`'s `<<SYS>>` block).
    MistralInstruct,
    /// LLaVA `conv_llava_llama_2`: `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{<image>\n}{question}
    /// [/INST]`, answers ` {answer} </s>`, later turns `<s>[INST] …`.
    LlavaLlama2,
}

impl ChatTemplate {
    /// Names accepted by [`ChatTemplate::by_name`].
    pub const BUILTIN_NAMES: [&'static str; 2] = ["mistral_instruct", "llava_llama_2"];

    /// A built-in LLaVA conversation template by its LLaVA codebase name.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "mistral_instruct" => Ok(Self::MistralInstruct),
            "llava_llama_2" => Ok(Self::LlavaLlama2),
            other => Err(tpl_err(format!(
                "unknown built-in template {other:?} (known: {})",
                Self::BUILTIN_NAMES.join(", ")
            ))),
        }
    }

    /// A Jinja template with no special-token variables (see [`JinjaTemplate::with_special_tokens`]).
    pub fn jinja(source: impl Into<String>) -> Result<Self> {
        Ok(Self::Jinja(JinjaTemplate::new(source)?))
    }

    /// The checkpoint's template, looked up where transformers 5.23 looks for it: the
    /// processor's (`processor_config.json` key, `chat_template.json`, `chat_template.jinja`),
    /// then `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// `{name, template}` of which `default` is used). `None` when the dir has none.
    /// The special tokens of the dir's tokenizer config become template variables.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let Some((source, origin)) = find_template_source(dir)? else {
            return Ok(None);
        };
        let config = TokenizerConfig::from_dir(dir)?;
        let specials = config
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), v.content.clone()))
            .collect();
        let t = JinjaTemplate::new(source)
            .map_err(|e| tpl_err(format!("{origin}: {e}")))?
            .with_special_tokens(specials);
        tracing::debug!(%origin, "loaded chat template");
        Ok(Some(Self::Jinja(t)))
    }

    /// Replaces a Jinja template's special-token variables, e.g. with
    /// [`Tokenizer::template_special_tokens`] (which also knows the tokenizer's own BOS/EOS when
    /// the config does not name them). Built-ins need none and are returned as they are.
    pub fn with_special_tokens(self, tokens: BTreeMap<String, String>) -> Self {
        match self {
            Self::Jinja(t) => Self::Jinja(t.with_special_tokens(tokens)),
            other => other,
        }
    }

    /// A short name for logs (`jinja`, `mistral_instruct`, `llava_llama_2`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Jinja(_) => "jinja",
            Self::MistralInstruct => "mistral_instruct",
            Self::LlavaLlama2 => "llava_llama_2",
        }
    }

    /// The prompt text, with [`IMAGE_PLACEHOLDER`] where the images are.
    ///
    /// The built-ins follow LLaVA's `Conversation.get_prompt`, whose prompt always ends with the
    /// last user turn's ` [/INST]`; `add_generation_prompt` changes nothing there. They do not
    /// write the leading BOS: LLaVA strips it (`ret.lstrip(sep)`) and the tokenizer adds it.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match self {
            Self::Jinja(t) => t.render(messages, add_generation_prompt),
            Self::MistralInstruct => render_llama2_style(messages, Builtin::MistralInstruct),
            Self::LlavaLlama2 => render_llama2_style(messages, Builtin::LlavaLlama2),
        }
    }
}

/// Where the checkpoint's template text is, and a name for it.
fn find_template_source(dir: &Path) -> Result<Option<(String, String)>> {
    let read = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        std::fs::read_to_string(&p)
            .map(Some)
            .map_err(|source| ModelError::Io { path: p, source })
    };
    let json = |name: &str| -> Result<Option<Json>> {
        match read(name)? {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| ModelError::config(dir.join(name), e)),
        }
    };
    if let Some(Json::String(s)) =
        json("processor_config.json")?.and_then(|v| v.get("chat_template").cloned())
    {
        return Ok(Some((s, "processor_config.json".into())));
    }
    if let Some(v) = json("chat_template.json")? {
        let s = v
            .get("chat_template")
            .and_then(Json::as_str)
            .ok_or_else(|| {
                ModelError::config(dir.join("chat_template.json"), "no `chat_template` string")
            })?;
        return Ok(Some((s.to_string(), "chat_template.json".into())));
    }
    if let Some(s) = read("chat_template.jinja")? {
        return Ok(Some((s, "chat_template.jinja".into())));
    }
    match json("tokenizer_config.json")?.and_then(|v| v.get("chat_template").cloned()) {
        Some(Json::String(s)) => Ok(Some((s, "tokenizer_config.json".into()))),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for item in &list {
                let name = item.get("name").and_then(Json::as_str).unwrap_or("");
                if name == "default" {
                    let s = item.get("template").and_then(Json::as_str).ok_or_else(|| {
                        ModelError::config(
                            dir.join("tokenizer_config.json"),
                            "chat template `default` has no `template`",
                        )
                    })?;
                    return Ok(Some((
                        s.to_string(),
                        "tokenizer_config.json (default)".into(),
                    )));
                }
                names.push(name.to_string());
            }
            Err(ModelError::config(
                dir.join("tokenizer_config.json"),
                format!(
                    "several chat templates ({}) and none named `default`",
                    names.join(", ")
                ),
            ))
        }
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Built-in LLaVA templates.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Builtin {
    MistralInstruct,
    LlavaLlama2,
}

/// LLaVA `SeparatorStyle.LLAMA_2` (`Conversation.get_prompt`):
/// `wrap_sys(msg) = "<<SYS>>\n{msg}\n<</SYS>>\n\n"` (or nothing for an empty system),
/// user turns `sep + "[INST] {msg} [/INST]"`, assistant turns `" {msg} " + sep2`, the first
/// user message prefixed with the system part, and the result `lstrip`ped of `sep`'s
/// characters. Both templates use that style, so a system message given to `mistral_instruct`
/// (whose default system is empty) is wrapped in `<<SYS>>` too, as LLaVA does when
/// `conv.system` is set (and as the fixtures' `orig_anyres/text_system` pins).
fn render_llama2_style(messages: &[ChatMessage], style: Builtin) -> Result<String> {
    let (sep, sep2) = match style {
        Builtin::MistralInstruct => ("", "</s>"),
        Builtin::LlavaLlama2 => ("<s>", "</s>"),
    };
    let mut system: Option<String> = None;
    let mut turns: Vec<&ChatMessage> = Vec::new();
    for m in messages {
        match m.role.as_str() {
            "system" => {
                if !turns.is_empty() {
                    return Err(tpl_err(
                        "a system message must come before the conversation",
                    ));
                }
                if m.image_count() > 0 {
                    return Err(tpl_err("images are not allowed in system messages"));
                }
                let t = m.joined_text();
                system = Some(match system {
                    Some(s) => format!("{s}\n{t}"),
                    None => t,
                });
            }
            "user" | "assistant" => turns.push(m),
            other => return Err(tpl_err(format!("unsupported role {other:?}"))),
        }
    }
    if turns.is_empty() {
        return Err(tpl_err("no user message"));
    }
    let system = system.unwrap_or_else(|| match style {
        Builtin::MistralInstruct => String::new(),
        Builtin::LlavaLlama2 => LLAVA_LLAMA_2_SYSTEM.to_string(),
    });
    let mut ret = String::new();
    for (i, m) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            return Err(tpl_err(format!(
                "messages must alternate user/assistant starting with user; message {i} is {:?}",
                m.role
            )));
        }
        let mut msg = if expected == "user" {
            m.llava_text()
        } else {
            if m.image_count() > 0 {
                return Err(tpl_err("images are not allowed in assistant messages"));
            }
            m.joined_text()
        };
        if msg.is_empty() {
            // LLaVA: `if message:` … `else: ret += ""`; the first message must not be empty.
            if i == 0 {
                return Err(tpl_err("the first user message is empty"));
            }
            continue;
        }
        if i == 0 && !system.is_empty() {
            msg = format!("<<SYS>>\n{system}\n<</SYS>>\n\n{msg}");
        }
        if i % 2 == 0 {
            ret += sep;
            ret += &format!("[INST] {msg} [/INST]");
        } else {
            ret += &format!(" {msg} {sep2}");
        }
    }
    // Python `str.lstrip(sep)` strips any of sep's characters.
    Ok(ret.trim_start_matches(|c| sep.contains(c)).to_string())
}

// ---------------------------------------------------------------------------------------------
// Jinja.

/// A compiled Jinja chat template plus the special-token variables it is rendered with.
#[derive(Clone)]
pub struct JinjaTemplate {
    source: String,
    env: Arc<Environment<'static>>,
    special_tokens: BTreeMap<String, String>,
    content_as_list: bool,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("source", &self.source)
            .field("special_tokens", &self.special_tokens)
            .field("content_as_list", &self.content_as_list)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl JinjaTemplate {
    /// Compiles `source` (syntax errors are reported here, not at the first request).
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
        // extensions=[AssistantTracker, loopcontrols]).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(&source))
            .map_err(|e| tpl_err(format!("cannot compile the chat template: {e}")))?;
        let content_as_list = template_reads_content_parts(&source);
        Ok(Self {
            source,
            env: Arc::new(env),
            special_tokens: BTreeMap::new(),
            content_as_list,
        })
    }

    /// Sets the variables transformers takes from `tokenizer.special_tokens_map`
    /// (`bos_token`, `eos_token`, `unk_token`, `pad_token`, `image_token` …).
    pub fn with_special_tokens(mut self, tokens: BTreeMap<String, String>) -> Self {
        self.special_tokens = tokens;
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let content = if self.content_as_list {
                    let retrieved = m.retrieved.iter().filter(|_| m.image_count() > 0).map(|r| {
                        Value::from_iter([
                            ("type", Value::from("text")),
                            ("text", Value::from(retrieval_prefix(r))),
                        ])
                    });
                    Value::from(
                        retrieved
                            .chain(m.content.iter().map(|p| match p {
                                ContentPart::Text(t) => Value::from_iter([
                                    ("type", Value::from("text")),
                                    ("text", Value::from(t.as_str())),
                                ]),
                                ContentPart::Image => {
                                    Value::from_iter([("type", Value::from("image"))])
                                }
                            }))
                            .collect::<Vec<_>>(),
                    )
                } else {
                    // A template that only knows string content (e.g. Mistral's own): images go
                    // first, LLaVA-style.
                    Value::from(m.llava_text())
                };
                Value::from_iter([("role", Value::from(m.role.as_str())), ("content", content)])
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(tpl_err)?;
        tmpl.render(Value::from_iter(ctx)).map_err(|e| {
            // `raise_exception` messages are the template author's words: pass them on as is.
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(detail) = e.detail() {
                    return tpl_err(detail);
                }
            }
            tpl_err(format!("rendering failed: {e}"))
        })
    }
}

/// Whether the template treats `message.content` as a list of typed parts (HF processor
/// templates) rather than a string (text-only tokenizer templates).
fn template_reads_content_parts(source: &str) -> bool {
    [
        "['type']",
        "[\"type\"]",
        ".type",
        "'type'",
        "\"type\"",
        "is string",
        "is not string",
        "is iterable",
        "is sequence",
        "is mapping",
        "content[0]",
        "content'][0]",
        "content\"][0]",
        "['text']",
        "[\"text\"]",
    ]
    .iter()
    .any(|p| source.contains(p))
}

/// transformers' `{% generation %}…{% endgeneration %}` extension marks assistant text for
/// masks; it does not change the output, so the tags become a no-op block (keeping their `-`
/// whitespace control).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out += &rest[..start];
        let ws_l = if tag[2..].starts_with('-') { "-" } else { "" };
        let ws_r = if tag[..tag.len() - 2].ends_with('-') {
            "-"
        } else {
            ""
        };
        match inner {
            "generation" => out += &format!("{{%{ws_l} if true {ws_r}%}}"),
            "endgeneration" => out += &format!("{{%{ws_l} endif {ws_r}%}}"),
            _ => out += tag,
        }
        rest = &rest[start + len + 2..];
    }
    out += rest;
    out
}

fn raise_exception(message: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// transformers: `datetime.now().strftime(format)`. The clock is read in UTC.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

/// A `strftime` for the specifiers chat templates use (`%d %b %Y`, `%Y-%m-%d`, …).
pub(crate) fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (Monday = 0)
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |v: i64, w: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0w$}")
            }
        };
        match spec {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &num(y % 100, 2),
            Some('m') => out += &num(m, 2),
            Some('d') => out += &num(d, 2),
            Some('e') => out += &format!("{d:>2}"),
            Some('H') => out += &num(h, 2),
            Some('I') => out += &num(if h % 12 == 0 { 12 } else { h % 12 }, 2),
            Some('p') => out += if h < 12 { "AM" } else { "PM" },
            Some('M') => out += &num(mi, 2),
            Some('S') => out += &num(s, 2),
            Some('j') => out += &num(yday, 3),
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('b') | Some('h') => out += &MONTHS[(m - 1) as usize][..3],
            Some('A') => out += DAYS[wday as usize],
            Some('a') => out += &DAYS[wday as usize][..3],
            Some('Z') => out += "UTC",
            Some('z') => out += "+0000",
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, i.e. Python's formatting (`", "` / `": "`), no HTML escaping.
fn tojson(
    value: &Value,
    args: minijinja::value::Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, JinjaError> {
    let mut ensure_ascii = args.first().map(|v| v.is_true()).unwrap_or(false);
    if let Some(v) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        ensure_ascii = v;
    }
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn write(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), JinjaError> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    if f.is_nan() {
                        out.push_str("NaN");
                    } else if f.is_infinite() {
                        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                    } else {
                        // Python's float repr: always a decimal point or exponent.
                        out.push_str(&format!("{f:?}"));
                    }
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt tokens.

/// How the rendered prompt becomes ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptMode {
    /// transformers' LLaVA / LLaVA-NeXT processors: the whole prompt tokenized at once with the
    /// tokenizer's special tokens (BOS) unless the text already starts with the BOS string
    /// (`ProcessorMixin.apply_chat_template(tokenize=True)`), each `<image>` token (an added
    /// token) repeated to the image's token count.
    Hf,
    /// LLaVA's `tokenizer_image_token`: the prompt split on `<image>`, each chunk tokenized on
    /// its own (so each gets the SentencePiece dummy prefix), BOS only before the first chunk,
    /// the image positions spliced in where `<image>` stood.
    Original,
}

/// Prompt ids with the image positions expanded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptTokens {
    pub ids: Vec<u32>,
    /// Token positions of each image's features, in order.
    pub image_spans: Vec<Range<usize>>,
    /// Per token, its `[start, end)` character range in the rendered prompt (`(0, 0)` for an
    /// added BOS; an image's positions all carry its `<image>` placeholder's range).
    pub offsets: Vec<(usize, usize)>,
}

impl PromptTokens {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn is_image_position(&self, i: usize) -> bool {
        self.image_spans.iter().any(|s| s.contains(&i))
    }

    /// The tokens whose text overlaps the character range `chars` of the rendered prompt
    /// (image positions and zero-width tokens never count), as one range from the first to the
    /// last of them.
    pub fn token_span_of_chars(&self, chars: Range<usize>) -> Option<Range<usize>> {
        let mut first = None;
        let mut last = None;
        for (i, &(s, e)) in self.offsets.iter().enumerate() {
            if e > s && s < chars.end && e > chars.start && !self.is_image_position(i) {
                first.get_or_insert(i);
                last = Some(i);
            }
        }
        Some(first?..last? + 1)
    }

    /// The token span of the last occurrence of `needle` in `rendered` (the prompt these tokens
    /// were built from), e.g. the user's question or a caption.
    pub fn find_text(&self, rendered: &str, needle: &str) -> Option<Range<usize>> {
        if needle.is_empty() {
            return None;
        }
        let byte = rendered.rfind(needle)?;
        let start = rendered[..byte].chars().count();
        let end = start + needle.chars().count();
        self.token_span_of_chars(start..end)
    }
}

/// Ids for `rendered` (a template's output with one [`IMAGE_PLACEHOLDER`] per image), with
/// image `k` expanded to `image_token_counts[k]` positions.
///
/// In [`PromptMode::Hf`] the image positions hold the tokenizer's `<image>` id (as
/// transformers' processors do); in [`PromptMode::Original`] they hold that id if the
/// tokenizer has one and 0 otherwise (LLaVA uses -200 there; the ids are never embedded).
pub fn build_prompt(
    tokenizer: &Tokenizer,
    rendered: &str,
    image_token_counts: &[usize],
    mode: PromptMode,
) -> Result<PromptTokens> {
    let placeholders = rendered.matches(IMAGE_PLACEHOLDER).count();
    if placeholders != image_token_counts.len() {
        return Err(ModelError::InvalidInput(format!(
            "the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {} image(s) were given",
            image_token_counts.len()
        )));
    }
    let image_id = tokenizer.token_to_id(IMAGE_PLACEHOLDER);
    let mut out = PromptTokens::default();
    match mode {
        PromptMode::Hf => {
            let image_id = match image_id {
                Some(id) => id,
                None if image_token_counts.is_empty() => u32::MAX,
                None => {
                    return Err(ModelError::Tokenizer(format!(
                        "the tokenizer has no {IMAGE_PLACEHOLDER} token, which HF-format LLaVA checkpoints need"
                    )))
                }
            };
            let starts_with_bos = tokenizer
                .bos_token()
                .is_some_and(|b| rendered.starts_with(b));
            let enc = tokenizer.encode_hf(rendered, !starts_with_bos)?;
            let mut k = 0;
            for (&id, &off) in enc.ids.iter().zip(&enc.offsets) {
                if id == image_id {
                    let n = *image_token_counts.get(k).ok_or_else(|| {
                        tpl_err(format!(
                            "more {IMAGE_PLACEHOLDER} tokens than placeholders in the prompt"
                        ))
                    })?;
                    let start = out.ids.len();
                    out.ids.extend(std::iter::repeat_n(id, n));
                    out.offsets.extend(std::iter::repeat_n(off, n));
                    out.image_spans.push(start..start + n);
                    k += 1;
                } else {
                    out.ids.push(id);
                    out.offsets.push(off);
                }
            }
            if k != image_token_counts.len() {
                return Err(ModelError::Tokenizer(format!(
                    "{IMAGE_PLACEHOLDER} was not tokenized as a single token ({k} of {} found)",
                    image_token_counts.len()
                )));
            }
        }
        PromptMode::Original => {
            let image_id = image_id.unwrap_or(0);
            // LLaVA adds BOS through the tokenizer on the first chunk; a prompt that already
            // starts with the BOS text does not get a second one.
            let starts_with_bos = tokenizer
                .bos_token()
                .is_some_and(|b| rendered.starts_with(b));
            if let (Some(bos), false) = (tokenizer.bos_id(), starts_with_bos) {
                out.ids.push(bos);
                out.offsets.push((0, 0));
            }
            let mut char_pos = 0;
            let chunks: Vec<&str> = rendered.split(IMAGE_PLACEHOLDER).collect();
            let placeholder_chars = IMAGE_PLACEHOLDER.chars().count();
            for (k, chunk) in chunks.iter().enumerate() {
                let enc = tokenizer.encode_with_offsets(chunk, false)?;
                out.ids.extend_from_slice(&enc.ids);
                out.offsets.extend(
                    enc.offsets
                        .iter()
                        .map(|&(s, e)| (s + char_pos, e + char_pos)),
                );
                char_pos += chunk.chars().count();
                if k + 1 < chunks.len() {
                    let n = image_token_counts[k];
                    let off = (char_pos, char_pos + placeholder_chars);
                    let start = out.ids.len();
                    out.ids.extend(std::iter::repeat_n(image_id, n));
                    out.offsets.extend(std::iter::repeat_n(off, n));
                    out.image_spans.push(start..start + n);
                    char_pos += placeholder_chars;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str, images: usize) -> ChatMessage {
        let mut content = vec![ContentPart::Image; images];
        content.push(ContentPart::Text(text.into()));
        ChatMessage::new("user", content)
    }

    #[test]
    fn llava_llama_2_single_turn() {
        let p = ChatTemplate::LlavaLlama2
            .render(&[user("What is this?", 1)], true)
            .unwrap();
        assert_eq!(
            p,
            format!("[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]")
        );
    }

    #[test]
    fn llava_llama_2_multi_turn_and_custom_system() {
        let msgs = [
            ChatMessage::text("system", "Be brief."),
            user("Q1", 1),
            ChatMessage::text("assistant", "A1"),
            user("Q2", 0),
        ];
        let p = ChatTemplate::LlavaLlama2.render(&msgs, true).unwrap();
        assert_eq!(
            p,
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
        );
        // An empty system prompt drops the <<SYS>> block (LLaVA's wrap_sys).
        let p = ChatTemplate::LlavaLlama2
            .render(&[ChatMessage::text("system", ""), user("Q", 0)], false)
            .unwrap();
        assert_eq!(p, "[INST] Q [/INST]");
    }

    #[test]
    fn mistral_instruct_turns_and_system() {
        let msgs = [
            user("Q1", 1),
            ChatMessage::text("assistant", "A1"),
            user("Q2", 0),
        ];
        let p = ChatTemplate::MistralInstruct.render(&msgs, true).unwrap();
        assert_eq!(p, "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]");
        let p = ChatTemplate::MistralInstruct
            .render(&[ChatMessage::text("system", "Sys."), user("Q", 1)], true)
            .unwrap();
        assert_eq!(p, "[INST] <<SYS>>\nSys.\n<</SYS>>\n\n<image>\nQ [/INST]");
    }

    #[test]
    fn builtins_reject_bad_conversations() {
        let t = ChatTemplate::MistralInstruct;
        assert!(t.render(&[], true).is_err());
        assert!(t
            .render(&[ChatMessage::text("assistant", "x")], true)
            .is_err());
        assert!(t.render(&[user("a", 0), user("b", 0)], true).is_err());
        assert!(t.render(&[ChatMessage::text("tool", "x")], true).is_err());
        assert!(ChatTemplate::by_name("vicuna_v1").is_err());
        assert!(matches!(
            ChatTemplate::by_name("llava_llama_2").unwrap(),
            ChatTemplate::LlavaLlama2
        ));
    }

    /// The llava-hf/llava-v1.6-mistral-7b-hf processor template.
    const LLAVA_NEXT_MISTRAL: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn jinja_llava_next_template() {
        let t = ChatTemplate::jinja(LLAVA_NEXT_MISTRAL).unwrap();
        let msgs = [
            ChatMessage::new(
                "user",
                vec![
                    ContentPart::Text("What is shown?".into()),
                    ContentPart::Image,
                ],
            ),
            ChatMessage::text("assistant", "A cat."),
            user("And?", 0),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "[INST] <image>\nWhat is shown? [/INST] A cat.</s> [INST] And? [/INST]"
        );
        let err = t
            .render(&[ChatMessage::text("tool", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Only user and assistant roles are supported!"),
            "{err}"
        );
    }

    /// Mistral-7B-Instruct-v0.2's tokenizer template (string content, bos_token variable).
    const MISTRAL_V02: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn jinja_string_content_template_with_special_tokens() {
        let tokens = BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ]);
        let ChatTemplate::Jinja(t) = ChatTemplate::jinja(MISTRAL_V02).unwrap() else {
            unreachable!()
        };
        let t = t.with_special_tokens(tokens);
        let out = t
            .render(
                &[
                    user("Hi", 1),
                    ChatMessage::text("assistant", "Hello"),
                    user("Bye", 0),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] <image>\nHi [/INST]Hello</s>[INST] Bye [/INST]"
        );
        let err = t
            .render(&[user("a", 0), user("b", 0)], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("must alternate"), "{err}");
    }

    #[test]
    fn jinja_conventions() {
        // trim_blocks / lstrip_blocks, loop controls, pycompat methods, tojson, generation tags.
        let src = "{% for m in messages %}\n  {% if loop.index0 > 0 %}{% break %}{% endif %}\n{{ m.content[0].text.strip().upper() }}|{{ {'b': 1, 'a': [1.5, 'é\"']} | tojson }}|{{ [1,2] | tojson(indent=2) }}\n{% generation %}{{ 'G' }}{% endgeneration %}\n{% endfor %}";
        let t = ChatTemplate::jinja(src).unwrap();
        let out = t
            .render(&[user("  hi  ", 0), user("second", 0)], false)
            .unwrap();
        assert_eq!(
            out,
            "HI|{\"b\": 1, \"a\": [1.5, \"é\\\"\"]}|[\n  1,\n  2\n]\nG"
        );
        assert!(ChatTemplate::jinja("{% if %}").is_err());
    }

    #[test]
    fn from_dir_finds_the_template_like_transformers() {
        let dir = std::env::temp_dir().join(format!("tga-tpl-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let msgs = [user("q", 0)];
        assert!(ChatTemplate::from_dir(&dir).unwrap().is_none());
        // tokenizer_config.json list form: the one named `default`; bos_token from the config.
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "special": true}, "chat_template": [
                {"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&msgs, true).unwrap(), "<s>D");
        // chat_template.jinja beats tokenizer_config.json, chat_template.json beats both.
        std::fs::write(dir.join("chat_template.jinja"), "J").unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&msgs, true).unwrap(), "J");
        std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "C"}"#).unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&msgs, true).unwrap(), "C");
        // Several templates and no default: an error naming them.
        for f in ["chat_template.jinja", "chat_template.json"] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}"#,
        )
        .unwrap();
        let err = ChatTemplate::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("a, b"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime_utc("%A %B %-d %j %I%p %%", t),
            "Thursday February 29 060 01PM %"
        );
        assert_eq!(strftime_utc("%d/%m/%y", 0), "01/01/70");
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        assert_eq!(
            strip_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}"),
            "a{%- if true -%}b{% endif %}c{% if x %}"
        );
    }
}
