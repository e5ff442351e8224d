//! OpenAI's chat-completions wire types, as the handlers (and so `/openapi.json`) use them.
//! Unknown request fields are ignored, as OpenAI-compatible servers do; semantic checks live in
//! `validation`, not here.
//!
//! - [`diagnostics`]: the safety-diagnostics options, report and diagnose-endpoint types.
//! - [`convert`]: the one set of engine → wire conversions.
//! - [`structured`]: structured outputs (`response_format`).

mod convert;
pub mod diagnostics;
pub mod structured;

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
    pub messages: Vec<ChatMessage>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are accepted.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy. Default 1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// In (0, 1]. Default 1.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// vLLM's extension: keep the k most likely tokens; 0 or -1 disables it.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Same seed, same request: same output.
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0 to 20; needs `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Recorded in the logs only.
    #[serde(default)]
    pub user: Option<String>,
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

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

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
