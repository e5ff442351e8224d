//! OpenAI's legacy completions (`POST /v1/completions`): a raw prompt, tokenized as it is (no
//! chat template), text out. Semantic checks live in `validation::completions`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{FinishReason, StopSequences, StreamOptions, Usage};

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// The served model's id; may be omitted (there is one model).
    #[serde(default)]
    pub model: Option<String>,
    /// Text (tokenized as transformers' `tokenizer(prompt)` does: BOS added, no chat template)
    /// or token ids. A list of one prompt is that prompt; batches of several are refused. No
    /// images: the image placeholder token is refused (send images to `/v1/chat/completions`).
    // An `Option` so that a body without it (a chat request sent here) gets a message saying
    // which route it belongs to.
    #[serde(default)]
    #[schema(required = true, value_type = CompletionPrompt)]
    pub prompt: Option<CompletionPrompt>,
    /// Refused (insertion is not supported); `null` or `""` is accepted.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Tokens to generate, default 16 (OpenAI's); at least 1, or 0 with `echo` (the prompt
    /// back, nothing generated). Prompt + `max_tokens` must fit the context.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy. Default 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// 0 to 1 (0 keeps the most likely token). Default 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// vLLM's extension: keep the k most likely tokens; 0 or -1 disables it.
    #[serde(default)]
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// Same seed, same request: same output.
    #[serde(default)]
    pub seed: Option<i64>,
    /// At most 16 strings of at most 256 bytes each, none empty; not part of the output.
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// Choices to generate (default 1), at most 16 and at most the server's
    /// `--max-num-seqs`. They share the prompt's prefill; with a `seed`, choice `i` samples
    /// with `seed + i` (so it is the one-choice request with that seed).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<i64>,
    /// Only equal to `n` (ranking extra choices is not supported).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub best_of: Option<i64>,
    /// Return the log-probabilities of each generated token and of this many most likely
    /// alternatives (0 to 20). Not with `echo` (the prompt's logprobs are not computed).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 20)]
    pub logprobs: Option<i64>,
    /// Put the prompt (its text as sent; a token-id prompt decoded) before the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 0 is supported on this route.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 0)]
    pub presence_penalty: Option<f64>,
    /// Only 0 is supported on this route.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 0)]
    pub frequency_penalty: Option<f64>,
    /// Only an empty map is supported on this route.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<BTreeMap<String, serde_json::Value>>,
    /// Recorded in the logs only.
    #[serde(default)]
    pub user: Option<String>,
    /// Not a completions field: chat messages (and their images) belong to
    /// `/v1/chat/completions`; a 400 says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub messages: Option<serde_json::Value>,
}

/// `prompt`: a string, a list of token ids, or a list of either (a batch; only one prompt is
/// accepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

// By hand, so that a prompt of chat content parts (or anything else) gets a message that says
// what this route takes instead of "did not match any variant".
impl<'de> Deserialize<'de> for CompletionPrompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PromptVisitor;

        const EXPECTED: &str =
            "a string, a list of token ids, or a list of strings or of token-id lists \
             (/v1/completions takes no chat content parts; send images to /v1/chat/completions)";

        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = CompletionPrompt;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<CompletionPrompt, E> {
                Ok(CompletionPrompt::Text(text.to_string()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<CompletionPrompt, E> {
                Ok(CompletionPrompt::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<CompletionPrompt, A::Error> {
                let mut items: Vec<serde_json::Value> = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                let token = |value: &serde_json::Value| {
                    value.as_u64().and_then(|id| u32::try_from(id).ok())
                };
                let tokens = |values: &[serde_json::Value]| -> Option<Vec<u32>> {
                    values.iter().map(token).collect()
                };
                let invalid = || de::Error::custom(format!("prompt must be {EXPECTED}"));
                match items.first() {
                    None => Ok(CompletionPrompt::Tokens(Vec::new())),
                    Some(serde_json::Value::String(_)) => items
                        .into_iter()
                        .map(|item| match item {
                            serde_json::Value::String(text) => Ok(text),
                            _ => Err(invalid()),
                        })
                        .collect::<Result<_, _>>()
                        .map(CompletionPrompt::Texts),
                    Some(serde_json::Value::Number(_)) => {
                        tokens(&items).map(CompletionPrompt::Tokens).ok_or_else(|| {
                            de::Error::custom(
                                "prompt token ids must be integers between 0 and 4294967295",
                            )
                        })
                    }
                    Some(serde_json::Value::Array(_)) => items
                        .iter()
                        .map(|item| item.as_array().and_then(|ids| tokens(ids)))
                        .collect::<Option<_>>()
                        .map(CompletionPrompt::TokenLists)
                        .ok_or_else(invalid),
                    Some(_) => Err(invalid()),
                }
            }
        }

        deserializer.deserialize_any(PromptVisitor)
    }
}

/// The legacy `logprobs` object: per generated token its text, its logprob, the most likely
/// alternatives (the sampled token among them) and where its text starts in `text`
/// (characters, the echoed prompt included).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// Set on the last choice frame of a stream (and always in a whole response).
    pub finish_reason: Option<FinishReason>,
}

/// The whole response; a streamed response is `data:` frames of this shape (each with part of
/// the text; the last choice frame with `finish_reason`; with `stream_options.include_usage` a
/// frame with empty `choices` and the usage), then `data: [DONE]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always in a whole response; in a stream only on the usage frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(json: &str) -> Result<CompletionPrompt, String> {
        let body = format!(r#"{{"prompt": {json}}}"#);
        let de = &mut serde_json::Deserializer::from_str(&body);
        serde_path_to_error::deserialize::<_, CompletionRequest>(de)
            .map(|r| r.prompt.unwrap())
            .map_err(|e| format!("{} | {}", e.path(), e.inner()))
    }

    #[test]
    fn a_prompt_is_text_token_ids_or_a_batch_of_either() {
        use CompletionPrompt::*;
        assert_eq!(prompt(r#""hi""#), Ok(Text("hi".into())));
        assert_eq!(prompt("[1, 2, 3]"), Ok(Tokens(vec![1, 2, 3])));
        assert_eq!(prompt("[]"), Ok(Tokens(vec![])));
        assert_eq!(
            prompt(r#"["a", "b"]"#),
            Ok(Texts(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            prompt("[[1], [2, 3]]"),
            Ok(TokenLists(vec![vec![1], vec![2, 3]]))
        );
    }

    #[test]
    fn chat_content_and_bad_token_ids_are_refused_with_the_reason() {
        let err = prompt(r#"[{"type": "image_url", "image_url": {"url": "x"}}]"#).unwrap_err();
        assert!(err.starts_with("prompt |"), "{err}");
        assert!(err.contains("/v1/chat/completions"), "{err}");
        let err = prompt("[1, -2]").unwrap_err();
        assert!(err.contains("token ids"), "{err}");
        let err = prompt(r#"["a", 1]"#).unwrap_err();
        assert!(err.contains("prompt must be"), "{err}");
        assert!(prompt("3").is_err());
    }
}
