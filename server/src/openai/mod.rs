//! OpenAI's chat-completions wire types, as the handlers (and so `/openapi.json`) use them.
//! Unknown request fields are ignored, as OpenAI-compatible servers do; semantic checks live in
//! `validation`, not here.
//!
//! - [`diagnostics`]: the safety-diagnostics options, report and diagnose-endpoint types.
//! - [`convert`]: the one set of engine → wire conversions.
//! - [`completions`]: the legacy completions route's types; [`tokenize`]: vLLM's `/tokenize`
//!   and `/detokenize`.
//! - [`sse`]: the `data:` payloads of each streaming route (OpenAPI schemas only).
//! - [`structured`]: structured outputs (`response_format`).

pub mod completions;
mod convert;
pub mod diagnostics;
pub mod sse;
pub mod structured;
pub mod tokenize;

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// ---------------------------------------------------------------------------------------------
// Request

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The served model's id; may be omitted (there is one model).
    #[serde(default)]
    pub model: Option<String>,
    /// At least one message; images only in user messages, at most 8 per request (the server's
    /// `--max-images-per-request`) and 8 × 2048² pixels together (`--max-request-pixels`); text
    /// that cannot fit the context is refused before it is tokenized.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are accepted. At least 1
    /// (0 on `/v1/safety/diagnose`: the prompt pass only); prompt + it must fit the context;
    /// without it, the rest of the context.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max_tokens: Option<i64>,
    /// As `max_tokens`, which it takes precedence over.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max_completion_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy. Default 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`
    /// (at least one). In [0, 1]; 0 keeps only the most likely token. Default 1 (off).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// vLLM's extension: keep the k most likely tokens; 0 or -1 disables it.
    #[serde(default)]
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// vLLM's extension: drop the tokens whose probability is below `min_p` times that of the
    /// most likely token (after temperature, top-k and top-p). In [0, 1]; default 0 (off).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// OpenAI's: subtracted once from the logit of every token that already occurs in the
    /// completion (`logit -= presence_penalty * (count > 0)`). In [-2, 2]; default 0.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// OpenAI's: subtracted from the logit of a token once per occurrence in the completion so
    /// far (`logit -= frequency_penalty * count`). In [-2, 2]; default 0.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// vLLM's (transformers') extension: every token of the prompt or of the completion so far
    /// has its logit divided by it when positive and multiplied by it otherwise. Greater than 0;
    /// 1 (the default) is off, above 1 discourages repetition.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f64>,
    /// OpenAI's: token id (as a string) → bias in [-100, 100] added to its logit before
    /// sampling; at most 300 entries; an id outside the model's vocabulary is a 400. 100
    /// practically forces the token, -100 bans it.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM's extension: EOS and `stop_token_ids` cannot be sampled, and stop strings do not
    /// match, before this many tokens are generated. At least 0 and at most `max_tokens`;
    /// default 0.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub min_tokens: Option<i64>,
    /// vLLM's extension: do not stop at the model's EOS token (it is then generated as any
    /// other token). Default false.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: more token ids that end the completion like EOS (`finish_reason`
    /// `stop`; the token's text is not part of the content), also with `ignore_eos`. Ids outside
    /// the model's vocabulary are a 400.
    #[serde(default)]
    pub stop_token_ids: Option<Vec<i64>>,
    /// vLLM's extension: end the content with the stop string that matched (or the stop
    /// token's text) instead of cutting it. Default false.
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's extension: leave special tokens (EOS, `<image>`, ...) out of the text. Default
    /// true.
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    /// Same seed, same request: same output.
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// Choices to generate (default 1), at most 16 and at most the server's
    /// `--max-num-seqs`. They share the prompt's prefill; with a `seed`, choice `i` samples
    /// with `seed + i` (so it is the one-choice request with that seed). Not with diagnostics.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0 to 20; needs `logprobs: true`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Recorded in the logs only.
    #[serde(default)]
    pub user: Option<String>,
    // Documented OpenAI fields whose effect this server cannot give: accepted only in their
    // neutral form, refused otherwise (`validation::refused`).
    /// The served templates have no tool support: refused unless `tool_choice` is `none` (with
    /// tools present OpenAI's default is `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// Only `none` (or `auto` without tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    /// Deprecated form of `tools`: refused unless `function_call` is `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<Vec<serde_json::Value>>,
    /// Deprecated form of `tool_choice`: only `none` (or `auto` without functions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub function_call: Option<serde_json::Value>,
    /// Only `["text"]`: audio output is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modalities: Option<Vec<String>>,
    /// Audio output parameters: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub audio: Option<serde_json::Value>,
    /// tga-serve extension: safety diagnostics of this request (DIAGNOSTICS.md §7). The
    /// response then carries them under `diagnostics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<diagnostics::DiagnosticsOptions>,
    /// tga-serve extension: TGA retrieval for a model served with a retrieval corpus. `auto`
    /// (the default) puts the caption nearest to each user turn's image before it
    /// (`Retrieved Text: {caption}. <image>\n…`, as TGA trains); `off` sends the turn as it is.
    /// The text and score come back in the `x-tga-retrieved-text` (percent-encoded) and
    /// `x-tga-retrieval-score` headers and in the diagnostics meta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalMode>,
    /// Structured outputs: `{"type": "text"}` (default), `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<structured::ResponseFormat>,
    /// vLLM's extension: output valid against this JSON Schema (an object, or a JSON string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
    /// vLLM's extension: output matching this regular expression in full (Rust `regex` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_regex: Option<String>,
    /// vLLM's extension: output exactly one of these strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_choice: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `developer` is OpenAI's newer name for the system role.
    #[serde(alias = "developer")]
    System,
    User,
    Assistant,
}

// The schema of a request message's role: `Role` reads `developer` as an alias of `system`,
// which its own derived schema cannot show.
/// A request message's role: `developer` is OpenAI's newer name for `system`, and is read as it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = MessageRole)]
pub enum MessageRoleSchema {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    #[schema(value_type = MessageRoleSchema)]
    pub role: Role,
    pub content: MessageContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A string, or a list of text and image parts.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

// By hand rather than `#[serde(untagged)]`, so that an error inside a part names that part
// (`messages[0].content[1].image_url`) instead of "did not match any variant".
impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text.to_string()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageContent, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(MessageContent::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ImageUrl {
    /// A `data:image/...;base64,...` URI or an http(s) URL.
    pub url: String,
    /// Accepted for compatibility; the model's preprocessing decides the resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A stop string or a list of them; the output ends before the first one that appears, which
/// is not part of it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

// By hand, to state the limits `validation` enforces with its own constants.
impl utoipa::PartialSchema for StopSequences {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use crate::validation::{MAX_STOP_BYTES, MAX_STOP_SEQUENCES};
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        // JSON Schema counts characters; the bound is in UTF-8 bytes, which the text says.
        let stop = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_STOP_BYTES))
        };
        OneOfBuilder::new()
            .description(Some(format!(
                "A stop string or a list of at most {MAX_STOP_SEQUENCES}, each non-empty and at \
                 most {MAX_STOP_BYTES} bytes of UTF-8; the output ends before the first one that \
                 appears, which is not part of it."
            )))
            .item(stop())
            .item(
                ArrayBuilder::new()
                    .items(stop())
                    .max_items(Some(MAX_STOP_SEQUENCES)),
            )
            .into()
    }
}

impl ToSchema for StopSequences {}

impl StopSequences {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(stop) => vec![stop],
            Self::Many(stops) => stops,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the usage (and empty `choices`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `retrieval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetrievalMode {
    #[default]
    Auto,
    Off,
}

// ---------------------------------------------------------------------------------------------
// Response

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// What the prompt tokens hold besides text.
    #[serde(default)]
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details` (OpenAI's object; `image_tokens` is ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt positions taken by images (part of `prompt_tokens`).
    pub image_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    /// UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: FinishReason,
}

/// Non-streaming response.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    /// tga-serve extension, present when the request asked for `diagnostics`: meta, per-layer
    /// records and the summary (the answer judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Box<diagnostics::DiagnosticsReport>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// One `data:` frame of a streamed response: the first carries `delta.role`, the last choice
/// frame `finish_reason`; with `stream_options.include_usage` a frame with empty `choices` and
/// the usage follows, then `data: [DONE]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// tga-serve extension: on the frame with `finish_reason`, when the request asked for
    /// `diagnostics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Box<diagnostics::DiagnosticsReport>>,
}

// ---------------------------------------------------------------------------------------------
// Models, health, errors

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Longest prompt + completion, in tokens (vLLM's name).
    pub max_model_len: usize,
    /// Tokens the paged KV cache holds over all running sequences; a request longer than this
    /// (or than `max_model_len`) is refused with `context_length_exceeded`.
    pub kv_cache_tokens: usize,
    /// Whether `image_url` content parts are accepted.
    pub supports_images: bool,
    /// True for the tiny model built into the binary (served when no `--model` is given).
    pub builtin: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct HealthStatus {
    /// `ok` (liveness) or `ready`.
    pub status: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct VersionInfo {
    /// The tga-serve release.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub r#type: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Every error response, OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ChatCompletionRequest, String> {
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| format!("{} | {}", e.path(), e.inner()))
    }

    #[test]
    fn content_is_a_string_or_parts_and_unknown_fields_are_ignored() {
        let req = parse(
            r#"{"model":"m","frequency_penalty":0.5,"messages":[
                {"role":"system","content":"be nice"},
                {"role":"user","content":[{"type":"text","text":"hi"},
                  {"type":"image_url","image_url":{"url":"data:image/png;base64,AA==","detail":"low"}}]}],
                "stop":"x","stream_options":{"include_usage":true,"extra":1}}"#,
        )
        .unwrap();
        assert_eq!(
            req.messages[0].content,
            MessageContent::Text("be nice".into())
        );
        let MessageContent::Parts(parts) = &req.messages[1].content else {
            panic!("parts expected");
        };
        assert_eq!(parts.len(), 2);
        assert!(
            matches!(&parts[1], ContentPart::ImageUrl { image_url } if image_url.url.starts_with("data:"))
        );
        assert_eq!(req.stop.unwrap().into_vec(), vec!["x".to_string()]);
        assert!(req.stream_options.unwrap().include_usage);
    }

    #[test]
    fn errors_inside_parts_name_the_part() {
        let err = parse(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap_err();
        assert!(err.starts_with("messages[0].content[1]"), "{err}");
        let err = parse(r#"{"messages":[{"role":"tool","content":"a"}]}"#).unwrap_err();
        assert!(err.starts_with("messages[0].role"), "{err}");
    }

    #[test]
    fn developer_role_is_the_system_role() {
        let req = parse(r#"{"messages":[{"role":"developer","content":"a"}]}"#).unwrap();
        assert_eq!(req.messages[0].role, Role::System);
    }

    #[test]
    fn chunk_omits_absent_fields_but_keeps_null_finish_reason() {
        let chunk = ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk".into(),
            created: 1,
            model: "m".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some(Role::Assistant),
                    content: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage: None,
            diagnostics: None,
        };
        let json = serde_json::to_value(&chunk).unwrap();
        assert_eq!(
            json["choices"][0]["delta"],
            serde_json::json!({"role": "assistant"})
        );
        assert!(json["choices"][0]["finish_reason"].is_null());
        assert!(json.get("usage").is_none());
    }
}
