//! The checkpoint's tokenizer: `tokenizer.json` or a SentencePiece `tokenizer.model`, with the
//! special tokens and added tokens of `tokenizer_config.json` / `special_tokens_map.json`, set up
//! the way transformers 5.23 (the version the reference outputs come from) sets it up:
//!
//! - `AutoTokenizer` picks the class from `config.json`'s `model_type` before the config's
//!   `tokenizer_class`: `llava`, `llava_next` (and `mistral` without mistral-common) load
//!   `TokenizersBackend`, i.e. `tokenizer.json` as it is. Model types transformers does not know
//!   (`llava_mistral`, a directory without config.json) keep `tokenizer_class`.
//! - `LlamaTokenizer(Fast)` no longer uses `tokenizer.json` verbatim: `LlamaTokenizer.__init__`
//!   rebuilds the backend from the file's vocabulary and merges (or the `.model`'s) with no
//!   normalizer, a `Metaspace` pre-tokenizer whose prepend scheme is `"always"` with
//!   `legacy: true` and `"first"` otherwise (no `▁` after a special token), the Llama decoder
//!   chain, and the added tokens of the config's `added_tokens_decoder`.
//! - With a `tokenizer.json`, `add_bos_token` / `add_eos_token` are ignored (`from_pretrained`
//!   pops them) and the file's post-processor decides whether BOS is added; without one they
//!   set the post-processor (default: nothing added).
//!
//! A `tokenizer.model` without a Llama `tokenizer_class` is converted to the exact
//! sentencepiece behaviour (see [`crate::sentencepiece`]), BOS included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, ModelWrapper, PostProcessorWrapper};

use crate::error::{ModelError, Result};
use crate::sentencepiece::{self, SpmModel};

fn tok_err(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(msg.to_string())
}

/// `config::read_json` of a file that may be absent.
fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    crate::config::read_json(path).map(Some)
}

/// A token as `tokenizer_config.json` / `tokenizer.json` describe it (`AddedToken` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct AddedTokenSpec {
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub special: bool,
}

impl AddedTokenSpec {
    /// A plain string or an `AddedToken` dict; `special` is the default for the flag when the
    /// dict does not say (transformers treats named special tokens as special).
    fn from_value(v: &Value, special_default: bool) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self {
                content: s.clone(),
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: !special_default,
                special: special_default,
            }),
            Value::Object(o) => {
                let content = o.get("content")?.as_str()?.to_string();
                let flag = |k: &str, d: bool| o.get(k).and_then(Value::as_bool).unwrap_or(d);
                let special = flag("special", special_default);
                Some(Self {
                    content,
                    single_word: flag("single_word", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    normalized: flag("normalized", !special),
                    special,
                })
            }
            _ => None,
        }
    }

    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// What `tokenizer_config.json` (+ `special_tokens_map.json`, `added_tokens.json`) say.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub tokenizer_class: Option<String>,
    /// `config.json`'s `model_type` (transformers picks the tokenizer class with it).
    pub model_type: Option<String>,
    pub legacy: Option<bool>,
    pub add_prefix_space: Option<bool>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub clean_up_tokenization_spaces: bool,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` and model-specific `*_token` entries
    /// such as `image_token`, by key.
    pub special_tokens: BTreeMap<String, AddedTokenSpec>,
    /// `additional_special_tokens` / `extra_special_tokens` (list form).
    pub extra_special_tokens: Vec<AddedTokenSpec>,
    /// `added_tokens_decoder` (id → token); `None` when the config has none (old checkpoints).
    pub added_tokens_decoder: Option<BTreeMap<u32, AddedTokenSpec>>,
    /// `added_tokens.json` (legacy), content → id.
    pub added_tokens_file: BTreeMap<String, u32>,
}

const NAMED_SPECIAL: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl TokenizerConfig {
    /// Reads the config files of `dir`; missing files give defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = Self::default();
        let main = read_json(&dir.join("tokenizer_config.json"))?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        if let Some(Value::Object(added)) = read_json(&dir.join("added_tokens.json"))? {
            for (k, v) in added {
                if let Some(id) = v.as_u64() {
                    cfg.added_tokens_file.insert(k, id as u32);
                }
            }
        }
        // special_tokens_map.json first, tokenizer_config.json overrides it.
        for v in [map.as_ref(), main.as_ref()].into_iter().flatten() {
            let Value::Object(o) = v else { continue };
            for (k, val) in o {
                if k.ends_with("_token")
                    && (NAMED_SPECIAL.contains(&k.as_str()) || val.is_string() || val.is_object())
                {
                    match AddedTokenSpec::from_value(val, true) {
                        Some(t) => {
                            cfg.special_tokens.insert(k.clone(), t);
                        }
                        None if val.is_null() => {
                            cfg.special_tokens.remove(k);
                        }
                        None => {}
                    }
                }
                if k == "additional_special_tokens" || k == "extra_special_tokens" {
                    match val {
                        Value::Array(items) => {
                            for it in items {
                                if let Some(t) = AddedTokenSpec::from_value(it, true) {
                                    if !cfg
                                        .extra_special_tokens
                                        .iter()
                                        .any(|e| e.content == t.content)
                                    {
                                        cfg.extra_special_tokens.push(t);
                                    }
                                }
                            }
                        }
                        // transformers 5 writes model-specific tokens as a dict ({"image_token": "<image>"}).
                        Value::Object(named) => {
                            for (nk, nv) in named {
                                if let Some(t) = AddedTokenSpec::from_value(nv, true) {
                                    cfg.special_tokens.insert(nk.clone(), t);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        // A config.json that is not JSON is the model loader's problem to report.
        if let Ok(Some(model_cfg)) = read_json(&dir.join("config.json")) {
            cfg.model_type = model_cfg
                .get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if let Some(Value::Object(o)) = main.as_ref() {
            let b = |k: &str| o.get(k).and_then(Value::as_bool);
            cfg.tokenizer_class = o
                .get("tokenizer_class")
                .and_then(Value::as_str)
                .map(str::to_string);
            cfg.legacy = b("legacy");
            cfg.add_prefix_space = b("add_prefix_space");
            cfg.add_bos_token = b("add_bos_token");
            cfg.add_eos_token = b("add_eos_token");
            cfg.clean_up_tokenization_spaces = b("clean_up_tokenization_spaces").unwrap_or(false);
            if let Some(Value::Object(dec)) = o.get("added_tokens_decoder") {
                let mut m = BTreeMap::new();
                for (id, v) in dec {
                    let id: u32 = id.parse().map_err(|_| {
                        ModelError::config(
                            dir.join("tokenizer_config.json"),
                            format!("added_tokens_decoder key {id:?} is not an id"),
                        )
                    })?;
                    if let Some(t) = AddedTokenSpec::from_value(v, false) {
                        m.insert(id, t);
                    }
                }
                cfg.added_tokens_decoder = Some(m);
            }
        }
        Ok(cfg)
    }

    /// Whether transformers 5.23's `AutoTokenizer` ends up in `LlamaTokenizer` (which rebuilds
    /// the backend) rather than `TokenizersBackend` (which uses `tokenizer.json` as it is).
    /// `tokenizer_class` alone does not decide it: for model types whose registered tokenizer
    /// is `TokenizersBackend` (`llava`, `llava_next` are in `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`;
    /// `mistral` maps to it without mistral-common) the hub class is overridden. Model types
    /// transformers does not know (`llava_mistral`, or no config.json) and `llama` keep it.
    pub fn uses_llama_tokenizer_class(&self) -> bool {
        let llama_class = matches!(
            self.tokenizer_class.as_deref(),
            Some("LlamaTokenizer" | "LlamaTokenizerFast")
        );
        let backend_model_type = matches!(
            self.model_type.as_deref(),
            Some(
                "llava"
                    | "llava_next"
                    | "vipllava"
                    | "mistral"
                    | "mixtral"
                    | "mistral3"
                    | "ministral"
            )
        );
        llama_class && !backend_model_type
    }

    /// The token string of a named special token (`"bos_token"` …).
    pub fn token(&self, key: &str) -> Option<&str> {
        self.special_tokens.get(key).map(|t| t.content.as_str())
    }
}

/// Where the tokenizer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    Json(PathBuf),
    SentencePiece(PathBuf),
}

/// Ids plus, per token, its `[start, end)` range in characters (not bytes) of the input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// The checkpoint tokenizer. See the module docs for how it is assembled.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    source: TokenizerSource,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    add_bos_token: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos_token", &self.add_bos_token)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, else `dir/tokenizer.model`, with the dir's config files.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = TokenizerConfig::from_dir(dir)?;
        let json_path = dir.join("tokenizer.json");
        let spm_path = dir.join("tokenizer.model");
        let (inner, source) = if json_path.is_file() {
            (
                load_json(&json_path, &config)?,
                TokenizerSource::Json(json_path),
            )
        } else if spm_path.is_file() {
            (
                load_spm(&spm_path, &config)?,
                TokenizerSource::SentencePiece(spm_path),
            )
        } else {
            return Err(tok_err(format!(
                "{} holds neither tokenizer.json nor tokenizer.model; copy the tokenizer files of \
                 the base model (e.g. mistralai/Mistral-7B-Instruct-v0.2) into it",
                dir.display()
            )));
        };
        let tok = Self::from_parts(inner, config, source)?;
        tracing::debug!(?tok, "loaded tokenizer");
        Ok(tok)
    }

    /// Wraps an already built `tokenizers::Tokenizer` (special tokens looked up from `config`,
    /// falling back to `<s>` / `</s>` when they are in the vocabulary).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        source: TokenizerSource,
    ) -> Result<Self> {
        let lookup = |key: &str, default: Option<&str>| -> Option<(String, u32)> {
            let s = config.token(key).or(default)?;
            inner.token_to_id(s).map(|id| (s.to_string(), id))
        };
        let bos = lookup("bos_token", Some("<s>"));
        let eos = lookup("eos_token", Some("</s>"));
        let pad = lookup("pad_token", None);
        // Whether plain `encode` adds BOS, as the post-processor (set up like transformers) does.
        let add_bos_token = match &bos {
            Some((_, id)) => {
                inner.encode("a", true).map_err(tok_err)?.get_ids().first() == Some(id)
            }
            None => false,
        };
        Ok(Self {
            inner,
            config,
            source,
            bos,
            eos,
            pad,
            add_bos_token,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// Ids of `text`; with `add_bos`, the BOS id first. No other special tokens are added, but
    /// special tokens written in the text (`</s>`, `<image>`) are recognised.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.push(
                self.bos_id()
                    .ok_or_else(|| tok_err("the tokenizer has no BOS token"))?,
            );
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// [`Tokenizer::encode`] with per-token character offsets (BOS gets `(0, 0)`).
    pub fn encode_with_offsets(&self, text: &str, add_bos: bool) -> Result<Encoded> {
        let enc = self
            .inner
            .encode_char_offsets(text, false)
            .map_err(tok_err)?;
        let mut out = Encoded::default();
        if add_bos {
            out.ids.push(
                self.bos_id()
                    .ok_or_else(|| tok_err("the tokenizer has no BOS token"))?,
            );
            out.offsets.push((0, 0));
        }
        out.ids.extend_from_slice(enc.get_ids());
        out.offsets.extend_from_slice(enc.get_offsets());
        Ok(out)
    }

    /// Encodes as transformers' `tokenizer(text, add_special_tokens=...)` does: the
    /// post-processor decides what is added (BOS for Llama when `add_bos_token`).
    pub fn encode_hf(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let enc = self
            .inner
            .encode_char_offsets(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Text of `ids`, as transformers' `decode` (including `clean_up_tokenization_spaces` when
    /// the config asks for it).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.decode_raw(ids, skip_special_tokens)?;
        Ok(if self.config.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// Vocabulary size including added tokens (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|b| b.1)
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|b| b.1)
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.0.as_str())
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|b| b.0.as_str())
    }
    /// Whether transformers' `tokenizer(text)` (special tokens on) starts with BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }
    /// Whether `id` is a special added token (skipped by `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The variables transformers passes to chat templates from the tokenizer
    /// (`special_tokens_map`: `bos_token`, `eos_token`, `unk_token`, `pad_token`,
    /// `image_token` …), as strings.
    pub fn template_special_tokens(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self
            .config
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), v.content.clone()))
            .collect();
        if let Some(b) = self.bos_token() {
            m.entry("bos_token".into()).or_insert_with(|| b.to_string());
        }
        if let Some(e) = self.eos_token() {
            m.entry("eos_token".into()).or_insert_with(|| e.to_string());
        }
        m
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

// ---------------------------------------------------------------------------------------------
// Loading.

fn load_json(path: &Path, config: &TokenizerConfig) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_err = |e: &dyn std::fmt::Display| tok_err(format!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).map_err(|e| file_err(&e))?;
    let is_bpe = json.pointer("/model/type").and_then(Value::as_str) == Some("BPE");
    if config.uses_llama_tokenizer_class() && is_bpe {
        let (vocab, merges) = bpe_parts_from_json(&json).map_err(|e| file_err(&e))?;
        let post = match json.get("post_processor") {
            Some(Value::Null) | None => None,
            Some(v) => Some(
                serde_json::from_value::<PostProcessorWrapper>(v.clone())
                    .map_err(|e| file_err(&e))?,
            ),
        };
        let file_added: Vec<(u32, AddedTokenSpec)> = match json.get("added_tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|it| {
                    let id = it.get("id")?.as_u64()? as u32;
                    Some((id, AddedTokenSpec::from_value(it, false)?))
                })
                .collect(),
            _ => Vec::new(),
        };
        return llama_v5(vocab, merges, post, file_added, Vec::new(), config, false);
    }
    let mut tok: tokenizers::Tokenizer = text.parse().map_err(|e| file_err(&e))?;
    add_config_tokens(&mut tok, config, &[])?;
    // transformers ignores `add_bos_token` / `add_eos_token` when a tokenizer.json exists
    // (`from_pretrained` pops them): the file's post-processor decides.
    Ok(tok)
}

fn load_spm(path: &Path, config: &TokenizerConfig) -> Result<tokenizers::Tokenizer> {
    let spm = SpmModel::from_file(path)?;
    if config.uses_llama_tokenizer_class() {
        // transformers 5.23: `SentencePieceExtractor.extract` gives vocab + merges, the control
        // and user-defined pieces become extra special tokens, then `LlamaTokenizer.__init__`.
        let pieces_added: Vec<AddedTokenSpec> = spm
            .pieces
            .iter()
            .filter(|p| {
                matches!(
                    p.kind,
                    sentencepiece::PieceType::Control | sentencepiece::PieceType::UserDefined
                )
            })
            .map(|p| {
                let special = p.kind == sentencepiece::PieceType::Control;
                AddedTokenSpec {
                    content: p.piece.clone(),
                    single_word: false,
                    lstrip: false,
                    rstrip: false,
                    normalized: false,
                    special,
                }
            })
            .collect();
        return llama_v5(
            spm.vocab(),
            spm.merges(),
            None,
            Vec::new(),
            pieces_added,
            config,
            true,
        );
    }
    let mut tok = spm.to_tokenizer()?;
    add_config_tokens(&mut tok, config, &[])?;
    update_post_processor_if_asked(&mut tok, config)?;
    Ok(tok)
}

fn bpe_parts_from_json(json: &Value) -> std::result::Result<(Vocab, Merges), String> {
    let model = json.get("model").ok_or("no model")?;
    let vocab_obj = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("BPE model without a vocab object")?;
    let mut vocab = Vocab::default();
    for (k, v) in vocab_obj {
        let id = v
            .as_u64()
            .ok_or_else(|| format!("vocab entry {k:?} is not an id"))?;
        vocab.insert(k.clone(), id as u32);
    }
    let mut merges = Merges::new();
    for m in model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or("BPE model without merges")?
    {
        match m {
            Value::String(s) => {
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| format!("merge {s:?} is not `a b`"))?;
                merges.push((a.to_string(), b.to_string()));
            }
            Value::Array(p) if p.len() == 2 => {
                let a = p[0].as_str().ok_or("merge part is not a string")?;
                let b = p[1].as_str().ok_or("merge part is not a string")?;
                merges.push((a.to_string(), b.to_string()));
            }
            other => return Err(format!("bad merge {other}")),
        }
    }
    Ok((vocab, merges))
}

/// The backend transformers 5.23's `LlamaTokenizer.__init__` builds, plus the added tokens and
/// post-processor `TokenizersBackend.__init__` sets afterwards.
///
/// `bos_eos_from_config`: whether `add_bos_token` / `add_eos_token` are honoured (only without
/// a tokenizer.json; with one, its post-processor is kept). `file_added`: the `tokenizer.json`
/// added tokens, used only when the config has no
/// `added_tokens_decoder` (transformers' legacy path); `extra_special`: sentencepiece control /
/// user-defined pieces (the extractor's `additional_special_tokens`).
fn llama_v5(
    vocab: Vocab,
    merges: Merges,
    file_post_processor: Option<PostProcessorWrapper>,
    file_added: Vec<(u32, AddedTokenSpec)>,
    extra_special: Vec<AddedTokenSpec>,
    config: &TokenizerConfig,
    bos_eos_from_config: bool,
) -> Result<tokenizers::Tokenizer> {
    let add_prefix_space = config.add_prefix_space.unwrap_or(true);
    let scheme = match (add_prefix_space, config.legacy.unwrap_or(false)) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| tok_err(format!("building BPE: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
    tok.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
    tok.with_decoder(Some(sentencepiece::llama_decoder(add_prefix_space)));
    tok.with_post_processor(file_post_processor);

    // Added tokens: `added_tokens_decoder` (or, without it, added_tokens.json and the
    // tokenizer.json list), in id order.
    let ordered: Vec<(u32, AddedTokenSpec)> = match &config.added_tokens_decoder {
        Some(d) => d.iter().map(|(id, t)| (*id, t.clone())).collect(),
        None => {
            let named: Vec<&str> = config
                .special_tokens
                .values()
                .map(|t| t.content.as_str())
                .chain(
                    config
                        .extra_special_tokens
                        .iter()
                        .map(|t| t.content.as_str()),
                )
                .collect();
            let mut d = BTreeMap::new();
            for (content, id) in &config.added_tokens_file {
                let special = named.contains(&content.as_str());
                d.insert(
                    *id,
                    AddedTokenSpec {
                        content: content.clone(),
                        single_word: false,
                        lstrip: false,
                        rstrip: false,
                        normalized: !special,
                        special,
                    },
                );
            }
            d.extend(file_added);
            d.into_iter().collect()
        }
    };
    add_tokens_checked(&mut tok, &ordered)?;
    // `LlamaTokenizer`'s defaults for the named tokens it is constructed with.
    let mut config = config.clone();
    for (key, default) in [
        ("unk_token", "<unk>"),
        ("bos_token", "<s>"),
        ("eos_token", "</s>"),
    ] {
        config
            .special_tokens
            .entry(key.to_string())
            .or_insert_with(|| AddedTokenSpec {
                content: default.to_string(),
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special: true,
            });
    }
    add_config_tokens(&mut tok, &config, &extra_special)?;
    if bos_eos_from_config {
        update_post_processor_if_asked(&mut tok, &config)?;
    }
    Ok(tok)
}

/// Adds `(id, token)` in order and checks each landed on its id (a gap would shift them).
fn add_tokens_checked(
    tok: &mut tokenizers::Tokenizer,
    tokens: &[(u32, AddedTokenSpec)],
) -> Result<()> {
    for (id, t) in tokens {
        tok.add_tokens([t.to_added_token()]).map_err(tok_err)?;
        let got = tok.token_to_id(&t.content);
        if got != Some(*id) {
            return Err(tok_err(format!(
                "added token {:?} should have id {id} but got {got:?} (vocabulary size {})",
                t.content,
                tok.get_vocab_size(false)
            )));
        }
    }
    Ok(())
}

/// Adds the config's named and extra special tokens that the tokenizer lacks, as special
/// tokens (transformers `TokenizersBackend.__init__`, "if some of the special tokens are not
/// already in the tokenizer, add them").
fn add_config_tokens(
    tok: &mut tokenizers::Tokenizer,
    config: &TokenizerConfig,
    extra: &[AddedTokenSpec],
) -> Result<()> {
    if let Some(dec) = &config.added_tokens_decoder {
        let present = tok.get_added_tokens_decoder();
        let missing: Vec<(u32, AddedTokenSpec)> = dec
            .iter()
            .filter(|(id, t)| {
                present.get(id).map(|p| p.content.as_str()) != Some(t.content.as_str())
            })
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        add_tokens_checked(tok, &missing)?;
    }
    let present: Vec<String> = tok
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    // Named and extra special tokens are special; the extra pieces keep their own flag.
    let named = config
        .special_tokens
        .values()
        .chain(config.extra_special_tokens.iter())
        .map(|t| AddedTokenSpec {
            special: true,
            ..t.clone()
        });
    let mut to_add: Vec<AddedToken> = Vec::new();
    for t in named.chain(extra.iter().cloned()) {
        if !present.contains(&t.content) && !to_add.iter().any(|a| a.content == t.content) {
            to_add.push(t.to_added_token());
        }
    }
    if !to_add.is_empty() {
        tok.add_tokens(to_add).map_err(tok_err)?;
    }
    Ok(())
}

/// transformers `update_post_processor`, run when the config sets `add_bos_token` /
/// `add_eos_token` explicitly (and there is no tokenizer.json).
fn update_post_processor_if_asked(
    tok: &mut tokenizers::Tokenizer,
    config: &TokenizerConfig,
) -> Result<()> {
    if config.add_bos_token.is_none() && config.add_eos_token.is_none() {
        return Ok(());
    }
    let find = |key: &str| -> Option<(String, u32)> {
        let s = config.token(key).or(match key {
            "bos_token" => Some("<s>"),
            _ => Some("</s>"),
        })?;
        tok.token_to_id(s).map(|id| (s.to_string(), id))
    };
    let bos = config
        .add_bos_token
        .unwrap_or(false)
        .then(|| find("bos_token"))
        .flatten();
    let eos = config
        .add_eos_token
        .unwrap_or(false)
        .then(|| find("eos_token"))
        .flatten();
    set_template(tok, bos, eos)
}

fn set_template(
    tok: &mut tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<()> {
    use tokenizers::processors::template::TemplateProcessing;
    let mut single = String::new();
    let mut pair = String::new();
    let mut specials = Vec::new();
    if let Some((b, id)) = &bos {
        specials.push((b.clone(), *id));
    }
    if let Some((e, id)) = &eos {
        if !specials.iter().any(|(s, _)| s == e) {
            specials.push((e.clone(), *id));
        }
    }
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let mut part = String::new();
        if let Some((b, _)) = &bos {
            part += &format!("{b}:{type_id} ");
        }
        part += &format!("${seq}:{type_id}");
        if let Some((e, _)) = &eos {
            part += &format!(" {e}:{type_id}");
        }
        if seq == "A" {
            single = part.clone();
            pair = part;
        } else {
            pair = format!("{pair} {part}");
        }
    }
    let tp = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map_err(tok_err)?;
    tok.with_post_processor(Some(tp));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streaming.

/// Incremental detokenisation with a prefix window, as TGI's `decode_token` and transformers'
/// `TextStreamer` do it (the one detokenizer: the engine drives it through its backend's
/// `decode_text` and `is_byte_token`): decoding a token alone loses SentencePiece's leading-space handling and
/// splits multi-byte characters, so each step decodes the window `ids[prefix_offset..]` and emits
/// only what it adds to `ids[prefix_offset..read_offset]`, and only once it no longer ends in
/// U+FFFD (an incomplete UTF-8 sequence that the next token will finish).
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (often empty while a character is pending).
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> String) -> String {
        self.push_token(id, false, decode)
    }

    /// [`Self::push`] for a token that may be a byte-fallback piece (`<0x46>`). tokenizers'
    /// `ByteFallback` decoder turns a run of byte pieces that is not valid UTF-8 into one U+FFFD
    /// per byte, so a byte that decodes to "F" alone becomes U+FFFD once an invalid byte follows:
    /// the text of a byte run is held back until a non-byte token (or the end) completes it, and
    /// the streamed text then equals the decode of all ids.
    pub fn push_token(
        &mut self,
        id: u32,
        is_byte: bool,
        decode: impl Fn(&[u32]) -> String,
    ) -> String {
        self.ids.push(id);
        if is_byte {
            return String::new();
        }
        self.advance(decode, false)
    }

    /// The text each of `ids` would add if it came next, in the context of the tokens pushed so
    /// far: a SentencePiece `▁help` after a word adds `" help"` with its space (decoded alone it
    /// would lose it, as transformers strips a leading space). This is what logprobs report as a
    /// token's text; for the token that is pushed next, the texts of all tokens pushed
    /// concatenate to the decode of all of them (byte-fallback pieces, whose text depends on
    /// the bytes after them, are the caller's: their own byte).
    pub fn next_texts(&self, ids: &[u32], decode: impl Fn(&[u32]) -> String) -> Vec<String> {
        let mut window = self.ids[self.prefix_offset..].to_vec();
        let before = decode(&window);
        ids.iter()
            .map(|&id| {
                window.push(id);
                let after = decode(&window);
                window.pop();
                let start = common_prefix_len(&before, &after);
                after[start..].to_string()
            })
            .collect()
    }

    /// Whatever is still pending (a trailing incomplete character comes out as U+FFFD).
    pub fn flush(&mut self, decode: impl Fn(&[u32]) -> String) -> String {
        self.advance(decode, true)
    }

    fn advance(&mut self, decode: impl Fn(&[u32]) -> String, at_end: bool) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix_text = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new_text = decode(&self.ids[self.prefix_offset..]);
        if new_text.len() <= prefix_text.len() || (!at_end && new_text.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let start = common_prefix_len(&prefix_text, &new_text);
        let delta = new_text[start..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        delta
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a character boundary.
/// Normally `a` is a prefix of `b`; a tokenizer that rewrites earlier text must not make us panic.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentencepiece::test_support::{model_bytes, PIECES};

    fn tiny_dir(name: &str, config: Option<&str>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tga-tok-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.model"), model_bytes(PIECES, 2, &[])).unwrap();
        if let Some(c) = config {
            std::fs::write(dir.join("tokenizer_config.json"), c).unwrap();
        }
        dir
    }

    fn tiny(name: &str, config: Option<&str>) -> Tokenizer {
        let dir = tiny_dir(name, config);
        let t = Tokenizer::from_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        t
    }

    /// Each push's text (`None` when it completes nothing), then the flush's.
    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> Vec<Option<String>> {
        let decode = |ids: &[u32]| tok.decode(ids, skip).unwrap();
        let some = |s: String| (!s.is_empty()).then_some(s);
        let mut d = IncrementalDetokenizer::new();
        let mut out: Vec<Option<String>> = ids.iter().map(|&id| some(d.push(id, decode))).collect();
        out.push(some(d.flush(decode)));
        out
    }

    #[test]
    fn incremental_decoding_holds_back_partial_utf8() {
        let tok = tiny("utf8", None);
        // "a😀" → ▁a, then the four byte-fallback pieces of F0 9F 98 80.
        let ids = tok.encode("a😀", false).unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!(
            stream(&tok, &ids, false),
            vec![Some("a".into()), None, None, None, Some("😀".into()), None]
        );
        // Cut off inside the character: flush gives the replacement character, once.
        assert_eq!(
            stream(&tok, &ids[..3], false),
            vec![
                Some("a".into()),
                None,
                None,
                Some("\u{FFFD}\u{FFFD}".into())
            ]
        );
    }

    #[test]
    fn incremental_decoding_keeps_spaces_between_words() {
        let tok = tiny("spaces", None);
        let ids = tok.encode("ab ab c", false).unwrap();
        let pieces: Vec<String> = stream(&tok, &ids, false).into_iter().flatten().collect();
        // The first word loses its dummy-prefix space (as `decode` does), later ones keep it.
        assert_eq!(pieces[0], "ab");
        assert_eq!(pieces.concat(), "ab ab c");
        assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn incremental_decoding_skips_special_tokens() {
        let tok = tiny("special", None);
        let eos = tok.eos_id().unwrap();
        let mut ids = tok.encode("ab", false).unwrap();
        ids.push(eos);
        assert_eq!(
            stream(&tok, &ids, true),
            vec![Some("ab".into()), None, None]
        );
        assert_eq!(
            stream(&tok, &ids, false),
            vec![Some("ab".into()), Some("</s>".into()), None]
        );
    }

    #[test]
    fn special_tokens_and_bos_from_config() {
        // No config: sentencepiece behaviour, BOS added by default.
        let t = tiny("noconf", None);
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
        assert!(t.add_bos_token());
        assert_eq!(t.encode("a", true).unwrap()[0], 1);
        assert_eq!(t.encode_hf("a", true).unwrap().ids[0], 1);
        // transformers 5.23 LlamaTokenizer without add_bos_token: nothing is added.
        let t = tiny("llama", Some(r#"{"tokenizer_class": "LlamaTokenizer"}"#));
        assert!(!t.add_bos_token());
        assert_eq!(
            t.encode_hf("a", true).unwrap().ids,
            t.encode_hf("a", false).unwrap().ids
        );
        // ... and with it, BOS; an image token from added_tokens_decoder lands on its id.
        let cfg = r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "legacy": true,
            "pad_token": "<pad>",
            "added_tokens_decoder": {"267": {"content": "<image>", "special": true, "normalized": false},
                                     "268": {"content": "<pad>", "special": true, "normalized": false}}}"#;
        let t = tiny("image", Some(cfg));
        assert!(t.add_bos_token());
        assert_eq!(t.token_to_id("<image>"), Some(267));
        assert_eq!(t.pad_id(), Some(268));
        assert_eq!(t.vocab_size(), 269);
        let enc = t.encode_hf("a<image>b", true).unwrap();
        assert_eq!(enc.ids[0], 1);
        assert!(enc.ids.contains(&267));
        assert!(t.is_special(267));
        assert_eq!(
            t.template_special_tokens()
                .get("pad_token")
                .map(String::as_str),
            Some("<pad>")
        );
        // A gap in added ids is an error, not a silent shift.
        let bad = r#"{"tokenizer_class": "LlamaTokenizer",
            "added_tokens_decoder": {"300": {"content": "<image>", "special": true}}}"#;
        let dir = tiny_dir("gap", Some(bad));
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("should have id 300"), "{err}");
    }

    #[test]
    fn offsets_are_in_characters() {
        let t = tiny("offsets", None);
        let enc = t.encode_with_offsets("é ab", true).unwrap();
        assert_eq!(enc.offsets[0], (0, 0)); // BOS
        let ab = t.token_to_id("▁ab").unwrap();
        let i = enc.ids.iter().position(|&id| id == ab).unwrap();
        // "▁ab" covers " ab": characters 1..4 (bytes would be 2..5).
        assert_eq!(enc.offsets[i], (1, 4));
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("tga-tok-unit-{}-empty", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("tokenizer.json") && err.contains("tokenizer.model"),
            "{err}"
        );
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("Hi , I 'm here . Do n't !"),
            "Hi, I'm here. Don't!"
        );
    }

    /// Byte-level "tokenizer": token id = byte, decoded lossily like tokenizers' byte fallback.
    fn decode(ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn byte_runs_are_held_until_they_are_complete() {
        // Pieces: 0 "▁has", 1 <0x46>, 2 <0xA3>, 3 "▁smok"; decoded like ByteFallback: a byte
        // run that is not valid UTF-8 gives one U+FFFD per byte.
        let decode = |ids: &[u32]| {
            let mut out = String::new();
            let mut bytes = Vec::new();
            let flush = |bytes: &mut Vec<u8>, out: &mut String| {
                match String::from_utf8(bytes.clone()) {
                    Ok(s) => out.push_str(&s),
                    Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
                }
                bytes.clear();
            };
            for &id in ids {
                match id {
                    1 => bytes.push(0x46),
                    2 => bytes.push(0xA3),
                    _ => {
                        flush(&mut bytes, &mut out);
                        out.push_str(if id == 0 { " has" } else { " smok" });
                    }
                }
            }
            flush(&mut bytes, &mut out);
            out.trim_start().to_string()
        };
        let all = decode(&[0, 1, 2, 3]);
        assert_eq!(all, "has\u{FFFD}\u{FFFD} smok");
        let mut detok = IncrementalDetokenizer::new();
        let mut streamed: String = [(0, false), (1, true), (2, true), (3, false)]
            .iter()
            .map(|&(id, byte)| detok.push_token(id, byte, decode))
            .collect();
        streamed.push_str(&detok.flush(decode));
        assert_eq!(streamed, all);
        // Without the hint the "F" escapes before the invalid byte rewrites it.
        let mut naive = IncrementalDetokenizer::new();
        let streamed: String = [0, 1, 2, 3]
            .iter()
            .map(|&id| naive.push(id, decode))
            .collect();
        assert_ne!(streamed, all);
        // A run at the very end comes out with the flush.
        let mut detok = IncrementalDetokenizer::new();
        assert_eq!(detok.push_token(0, false, decode), "has");
        assert_eq!(detok.push_token(1, true, decode), "");
        assert_eq!(detok.flush(decode), "F");
    }

    fn detokenize_all(text: &str) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new();
        let mut deltas: Vec<String> = text.bytes().map(|b| detok.push(b as u32, decode)).collect();
        deltas.push(detok.flush(decode));
        deltas
    }

    #[test]
    fn detokenizer_never_splits_a_multibyte_character() {
        let text = "héllo wörld 😀 ok";
        let deltas = detokenize_all(text);
        assert_eq!(deltas.concat(), text);
        for delta in &deltas {
            assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
        }
        // The 4-byte emoji arrives in one delta, on the token that completes it.
        assert!(deltas.iter().any(|d| d == "😀"));
    }

    #[test]
    fn detokenizer_flushes_an_incomplete_character_at_the_end() {
        let mut detok = IncrementalDetokenizer::new();
        assert_eq!(detok.push(b'a' as u32, decode), "a");
        assert_eq!(detok.push(0xF0, decode), "");
        assert_eq!(detok.flush(decode), "\u{FFFD}");
        assert_eq!(detok.flush(decode), "");
    }

    fn fixture_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next");
        Tokenizer::from_dir(dir).unwrap()
    }

    fn byte_id(tok: &Tokenizer, b: u8) -> u32 {
        tok.token_to_id(&format!("<0x{b:02X}>")).unwrap()
    }

    #[test]
    fn invalid_byte_runs_decode_as_transformers_does() {
        // transformers 5.23's `decode` (tokenizers' `ByteFallback`) turns each byte of a run of
        // byte-fallback pieces that is not valid UTF-8 into U+FFFD, valid bytes after it
        // included: the committed reference (tools/diagnose_reference.py) decodes
        // [▁has, <0xA9>, ▁asked, ▁An, <0xA6>, <0x6B>] to "has\u{FFFD} asked An\u{FFFD}\u{FFFD}".
        let tok = fixture_tokenizer();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/reference/diagnostics/cases.json");
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut invalid = 0;
        for case in reference["cases"].as_array().unwrap() {
            let case = &case["expected"];
            let ids: Vec<u32> = case["answer_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect();
            let answer = case["answer"].as_str().unwrap();
            assert_eq!(tok.decode(&ids, true).unwrap(), answer, "{ids:?}");
            invalid += usize::from(answer.contains('\u{FFFD}'));
        }
        assert!(invalid >= 2, "the reference holds invalid byte runs");
        let ids = [byte_id(&tok, 0xD6), byte_id(&tok, 0x70)];
        assert_eq!(tok.decode(&ids, true).unwrap(), "\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn next_texts_are_what_each_token_adds_in_context() {
        let tok = fixture_tokenizer();
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap();
        let text = "Sorry, I cannot help with that. I apologize: café 😀!";
        let ids = tok.encode(text, false).unwrap();
        let byte_piece = |t: &str| {
            (t.len() == 6 && t.starts_with("<0x"))
                .then(|| u8::from_str_radix(&t[3..5], 16).unwrap())
        };
        let is_byte = |id: u32| {
            tok.id_to_token(id)
                .is_some_and(|t| byte_piece(&t).is_some())
        };
        let mut detok = IncrementalDetokenizer::new();
        let mut bytes = Vec::new();
        let mut streamed = String::new();
        let help = tok.token_to_id("▁help").unwrap();
        for &id in &ids {
            let added = if is_byte(id) {
                vec![byte_piece(&tok.id_to_token(id).unwrap()).unwrap()]
            } else {
                let texts = detok.next_texts(&[id, help], decode);
                if !detok.ids.is_empty() {
                    // An alternative keeps its space too.
                    assert_eq!(texts[1], " help");
                }
                texts[0].clone().into_bytes()
            };
            if id == help {
                assert_eq!(added, b" help");
            }
            bytes.extend(added);
            streamed.push_str(&detok.push_token(id, is_byte(id), decode));
        }
        streamed.push_str(&detok.flush(decode));
        assert_eq!(streamed, decode(&ids));
        assert_eq!(String::from_utf8(bytes).unwrap(), decode(&ids));
    }

    #[test]
    fn detokenizer_keeps_the_window_context_for_leading_spaces() {
        // A SentencePiece-like decoder that drops the leading space of the first piece, as
        // transformers does for "▁word" at the start of a decode.
        let vocab = ["▁Hello", "▁world", "!"];
        let sp_decode = |ids: &[u32]| {
            let joined: String = ids.iter().map(|&i| vocab[i as usize]).collect();
            joined.replace('▁', " ").trim_start().to_string()
        };
        let mut detok = IncrementalDetokenizer::new();
        let out: String = [0u32, 1, 2]
            .iter()
            .map(|&id| detok.push(id, sp_decode))
            .collect();
        assert_eq!(out, "Hello world!");
    }
}
