//! The engine's results in OpenAI's shapes: the one place each engine type becomes a wire type.

use super::{FinishReason, TokenLogprob, TopLogprob, Usage};
use crate::engine;

impl From<engine::FinishReason> for FinishReason {
    fn from(reason: engine::FinishReason) -> Self {
        match reason {
            engine::FinishReason::Stop => Self::Stop,
            engine::FinishReason::Length => Self::Length,
        }
    }
}

impl From<engine::Usage> for Usage {
    fn from(usage: engine::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details: super::PromptTokensDetails {
                image_tokens: usage.image_tokens,
            },
        }
    }
}

impl From<engine::TokenLogprob> for TokenLogprob {
    fn from(logprob: engine::TokenLogprob) -> Self {
        Self {
            bytes: logprob.bytes,
            token: logprob.token,
            logprob: logprob.logprob,
            top_logprobs: logprob
                .top
                .into_iter()
                .map(|(token, bytes, logprob)| TopLogprob {
                    bytes,
                    token,
                    logprob,
                })
                .collect(),
        }
    }
}
