//! vLLM's `POST /tokenize` and `POST /detokenize` (its `protocol.py`'s `TokenizeRequest`,
//! `TokenizeResponse`, `DetokenizeRequest`, `DetokenizeResponse`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ChatMessage, RetrievalMode};

/// `POST /tokenize` body: exactly one of `prompt` (raw text) or `messages` (a chat, rendered
/// with the served template as `/v1/chat/completions` renders it, images expanded to their
/// prompt positions).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct TokenizeRequest {
    /// The served model's id; may be omitted.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// At most as many images as `/v1/chat/completions` accepts.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// With `prompt`: add the tokenizer's special tokens (BOS), default true. With `messages`
    /// only `false` (the default) is accepted: the template writes the special tokens.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the assistant's turn opening, default true (what
    /// `/v1/chat/completions` feeds the model); `false` is refused (the prompt builder always
    /// opens the assistant's turn).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Refused when true (the templates cannot continue a final assistant message).
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// Also return each token's vocabulary entry (`token_strs`).
    #[serde(default)]
    pub return_token_strs: Option<bool>,
    /// tga-serve extension, as on `/v1/chat/completions`: with a retrieval corpus, each user
    /// turn's image gets its retrieved caption before it (`auto`, the default) or not (`off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<RetrievalMode>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// `tokens.len()`.
    pub count: usize,
    /// The served context length, in tokens (prompt + completion).
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's vocabulary entry, with `return_token_strs: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// Token ids, each below the vocabulary size.
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text of `tokens`, special tokens kept (transformers' `decode`).
    pub prompt: String,
}
