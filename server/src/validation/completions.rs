//! Raw prompts: `/v1/completions` (the prompt tokenized as it is, as transformers'
//! `tokenizer(prompt)` does, with no chat template; then the chat route's limits and the same
//! engine), and vLLM's `/tokenize` and `/detokenize`.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::try_join_all;
use model::sampling::MAX_TOP_LOGPROBS;

use super::{ImageRef, Validator};
use crate::engine::request::{Prompt, PromptLayout};
use crate::engine::{StoppingCriteria, ValidRequest};
use crate::error::{ApiError, ErrorCode};
use crate::openai::completions::{CompletionPrompt, CompletionRequest};
use crate::openai::tokenize::{DetokenizeRequest, TokenizeRequest};
use crate::openai::{self, ChatCompletionRequest};

/// OpenAI's default `max_tokens` on `/v1/completions`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// How the HTTP layer should shape a completion; the engine does not need these.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionOptions {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// With `logprobs: k`: the k alternatives reported per token.
    pub logprobs: Option<usize>,
    /// With `echo`: the prompt's text, put before the completion.
    pub echo: Option<String>,
}

/// A tokenized `/tokenize` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub tokens: Vec<u32>,
    /// Each token's vocabulary entry, when asked for.
    pub token_strs: Option<Vec<String>>,
}

/// One prompt of a completions request.
enum RawPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Validator {
    /// `/v1/completions`: every field checked, the prompt tokenized.
    pub async fn validate_completion(
        &self,
        request: CompletionRequest,
        request_id: String,
        arrived: Instant,
    ) -> Result<(ValidRequest, CompletionOptions), ApiError> {
        self.check_model(request.model.as_deref())?;
        refuse_unsupported_completion_fields(&request)?;
        let stream = request.stream.unwrap_or(false);
        if request.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let n = self.choices(request.n)?;
        let echo = request.echo.unwrap_or(false);
        let logprobs = match request.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
        };
        if echo && logprobs.is_some() {
            // The prompt tokens' logprobs would need every prompt position's logits, which the
            // prefill does not keep; no numbers rather than made-up ones.
            return Err(ApiError::invalid(
                "echo",
                "echo with logprobs is not supported: the prompt tokens' logprobs are not \
                 computed (send echo or logprobs, not both)",
            ));
        }
        let max_tokens = match request.max_tokens {
            None => DEFAULT_COMPLETION_MAX_TOKENS,
            Some(0) if echo => 0,
            Some(n) if n >= 1 => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens must be at least 1 (or 0 with echo), got {n}"),
                ))
            }
        };
        // The chat route's sampling checks, on the fields both routes share.
        let sampling = self.sampling_params(&ChatCompletionRequest {
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: request.top_k,
            seed: request.seed,
            logprobs: Some(logprobs.is_some()),
            top_logprobs: logprobs.map(|k| k as i64),
            ..Default::default()
        })?;
        let stop = self.stop_sequences(request.stop)?;

        let raw = single_prompt(request.prompt)?;
        let (token_ids, echo_text) = self.tokenize_completion_prompt(raw, echo).await?;
        let max_new_tokens = self.check_context_of("prompt", token_ids.len(), Some(max_tokens))?;
        if let Some(user) = &request.user {
            tracing::debug!(user = %user, "request user");
        }
        let valid = ValidRequest {
            request_id,
            prompt: Prompt {
                token_ids,
                image_spans: Vec::new(),
                images: Vec::new(),
                layout: PromptLayout::default(),
            },
            sampling,
            stopping: StoppingCriteria {
                max_new_tokens,
                stop,
            },
            arrived,
            diagnose: None,
            constraint: None,
            n,
        };
        let options = CompletionOptions {
            model: self.model_id.clone(),
            stream,
            include_usage: request
                .stream_options
                .as_ref()
                .is_some_and(|options| options.include_usage),
            logprobs,
            echo: echo_text,
        };
        Ok((valid, options))
    }

    /// The prompt's ids (BOS added to text, as transformers' tokenizer does by default) and,
    /// with `echo`, its text: as sent, or a token-id prompt decoded.
    async fn tokenize_completion_prompt(
        &self,
        prompt: RawPrompt,
        echo: bool,
    ) -> Result<(Vec<u32>, Option<String>), ApiError> {
        let (ids, echo_text) = match prompt {
            RawPrompt::Text(text) => {
                self.check_text_bytes("prompt", text.len())?;
                let ids = self.tokenize_text(text.clone(), true).await?;
                if ids.is_empty() {
                    return Err(ApiError::invalid("prompt", "the prompt is empty"));
                }
                (ids, echo.then_some(text))
            }
            RawPrompt::Tokens(ids) => {
                if ids.is_empty() {
                    return Err(ApiError::invalid("prompt", "the prompt is empty"));
                }
                self.check_token_ids("prompt", &ids)?;
                let text = if echo {
                    Some(self.detokenize_ids(ids.clone()).await?)
                } else {
                    None
                };
                (ids, text)
            }
        };
        if let Some(image) = self.processor.image_token_id() {
            if let Some(at) = ids.iter().position(|&id| id == image) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "the prompt holds the image placeholder token (id {image}, at position \
                         {at}): /v1/completions takes no images; send images as image_url parts \
                         to /v1/chat/completions"
                    ),
                ));
            }
        }
        Ok((ids, echo_text))
    }

    /// `/tokenize`: the ids of a raw prompt, or those `/v1/chat/completions` would feed the
    /// model for `messages` (template applied, images fetched and expanded to their positions
    /// from their headers). The count is not held to the context: telling it is the point.
    pub async fn tokenize(&self, request: TokenizeRequest) -> Result<Tokenized, ApiError> {
        self.check_model(request.model.as_deref())?;
        let tokens = match (request.prompt, request.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "send either prompt or messages, not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "prompt (text) or messages (a chat) is required",
                ))
            }
            (Some(text), None) => {
                self.check_text_bytes("prompt", text.len())?;
                self.tokenize_text(text, request.add_special_tokens.unwrap_or(true))
                    .await?
            }
            (None, Some(messages)) => {
                if request.add_special_tokens == Some(true) {
                    return Err(ApiError::invalid(
                        "add_special_tokens",
                        "add_special_tokens must be false with messages: the chat template \
                         writes the special tokens",
                    ));
                }
                if request.add_generation_prompt == Some(false) {
                    return Err(ApiError::invalid(
                        "add_generation_prompt",
                        "add_generation_prompt: false is not supported: chat prompts always \
                         end with the assistant's turn opening",
                    ));
                }
                if request.continue_final_message == Some(true) {
                    return Err(ApiError::invalid(
                        "continue_final_message",
                        "continue_final_message is not supported by the served templates",
                    ));
                }
                let retrieve = request.retrieval.unwrap_or_default() == openai::RetrievalMode::Auto;
                self.tokenize_chat(&messages, retrieve).await?
            }
        };
        let token_strs = request
            .return_token_strs
            .unwrap_or(false)
            .then(|| self.processor.token_strings(&tokens));
        Ok(Tokenized { tokens, token_strs })
    }

    /// `/detokenize`: the text of `tokens`, special tokens kept.
    pub async fn detokenize(&self, request: DetokenizeRequest) -> Result<String, ApiError> {
        self.check_model(request.model.as_deref())?;
        self.check_token_ids("tokens", &request.tokens)?;
        self.detokenize_ids(request.tokens).await
    }

    /// The chat route's prompt for `messages`, without decoding any pixel.
    async fn tokenize_chat(
        &self,
        messages: &[openai::ChatMessage],
        retrieve: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let (turns, refs) = self.conversation(messages)?;
        let images = self.fetch_images(&refs).await?;
        let (prompt, _, _) = self
            .build_prompt(
                turns,
                Arc::new(images),
                Arc::new(refs),
                Vec::new(),
                retrieve,
            )
            .await?;
        Ok(prompt.token_ids)
    }

    async fn fetch_images(&self, refs: &[ImageRef]) -> Result<Vec<Vec<u8>>, ApiError> {
        try_join_all(refs.iter().map(|image| async move {
            self.media
                .load(&image.url)
                .await
                .map_err(|err| ApiError::from_media(err, image.param.clone()))
        }))
        .await
    }

    /// No token of the vocabulary covers more than `max_token_bytes` bytes: longer text cannot
    /// fit the context, and is refused before it is tokenized.
    fn check_text_bytes(&self, param: &str, text_bytes: usize) -> Result<(), ApiError> {
        let per_token = self.processor.max_token_bytes().max(1);
        let max_text_bytes = self.limits.max_model_len.saturating_mul(per_token);
        if text_bytes > max_text_bytes {
            return Err(ApiError::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "This model's maximum context length is {} tokens, and no token covers more \
                     than {per_token} bytes of text; your {param} holds {text_bytes} bytes of \
                     text (at most {max_text_bytes}). Please reduce the length of the {param}.",
                    self.limits.max_model_len
                ),
            )
            .with_param(param));
        }
        Ok(())
    }

    /// Every id must be in the vocabulary (an id past it has no embedding).
    fn check_token_ids(&self, param: &str, ids: &[u32]) -> Result<(), ApiError> {
        let vocab = self.processor.tokenizer_vocab_size();
        if let Some(at) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                format!("{param}[{at}]"),
                format!(
                    "token id {} is out of the vocabulary (ids are 0 to {})",
                    ids[at],
                    vocab.saturating_sub(1)
                ),
            ));
        }
        Ok(())
    }

    async fn tokenize_text(
        &self,
        text: String,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let processor = self.processor.clone();
        tokio::task::spawn_blocking(move || processor.tokenize(&text, add_special_tokens))
            .await
            .map_err(|err| ApiError::internal(format!("tokenizing failed: {err}")))?
            .map_err(|err| ApiError::from_process(err, "prompt".into()))
    }

    async fn detokenize_ids(&self, ids: Vec<u32>) -> Result<String, ApiError> {
        let processor = self.processor.clone();
        tokio::task::spawn_blocking(move || processor.detokenize(&ids))
            .await
            .map_err(|err| ApiError::internal(format!("detokenizing failed: {err}")))?
            .map_err(|err| ApiError::from_process(err, "tokens".into()))
    }
}

/// The fields of OpenAI's completions that this route cannot honour, refused by name.
fn refuse_unsupported_completion_fields(request: &CompletionRequest) -> Result<(), ApiError> {
    if request.messages.is_some() {
        return Err(ApiError::invalid(
            "messages",
            "/v1/completions takes a prompt, not messages: send chat messages (and images) to \
             /v1/chat/completions",
        ));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "suffix is not supported (the served model does not insert text)",
        ));
    }
    // best_of = n is n choices; more would need ranking them (vLLM V1 dropped it too).
    if let Some(best_of) = request.best_of.filter(|&b| b != request.n.unwrap_or(1)) {
        return Err(ApiError::invalid(
            "best_of",
            format!("best_of must equal n (ranking extra choices is not supported), got {best_of}"),
        ));
    }
    for (param, value) in [
        ("presence_penalty", request.presence_penalty),
        ("frequency_penalty", request.frequency_penalty),
    ] {
        if let Some(value) = value.filter(|&v| v != 0.0) {
            return Err(ApiError::invalid(
                param,
                format!(
                    "{param} is not supported on /v1/completions; only 0 is accepted, got {value}"
                ),
            ));
        }
    }
    if request
        .logit_bias
        .as_ref()
        .is_some_and(|bias| !bias.is_empty())
    {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported on /v1/completions",
        ));
    }
    Ok(())
}

/// The one prompt of a request: a list of one prompt is that prompt; a batch is refused.
fn single_prompt(prompt: Option<CompletionPrompt>) -> Result<RawPrompt, ApiError> {
    let batch = |n: usize| {
        ApiError::invalid(
            "prompt",
            format!(
                "prompt holds a batch of {n} prompts; this server takes one prompt per request \
                 (send them as separate requests)"
            ),
        )
    };
    match prompt {
        None => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(CompletionPrompt::Text(text)) => Ok(RawPrompt::Text(text)),
        Some(CompletionPrompt::Tokens(ids)) => Ok(RawPrompt::Tokens(ids)),
        Some(CompletionPrompt::Texts(texts)) if texts.len() == 1 => Ok(RawPrompt::Text(
            texts.into_iter().next().unwrap_or_default(),
        )),
        Some(CompletionPrompt::TokenLists(lists)) if lists.len() == 1 => Ok(RawPrompt::Tokens(
            lists.into_iter().next().unwrap_or_default(),
        )),
        Some(CompletionPrompt::Texts(texts)) => Err(batch(texts.len())),
        Some(CompletionPrompt::TokenLists(lists)) => Err(batch(lists.len())),
    }
}
