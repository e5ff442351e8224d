//! One step from a raw request to a [`ValidRequest`], as TGI's `validation.rs` does it: every
//! limit is checked, images are fetched, decoded and preprocessed, and the prompt is tokenized
//! before anything is queued, so the engine only ever sees requests it can run.
//!
//! - [`diagnostics`]: the `diagnostics` options planned into what the engine runs.
//! - [`completions`]: raw prompts (`/v1/completions`, `/tokenize`, `/detokenize`).
//! - [`refused`]: documented fields whose effect the server cannot give.
//! - [`structured`]: `response_format` / `guided_*` compiled into a grammar constraint.

pub mod completions;
pub mod diagnostics;
mod refused;
pub mod structured;

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::try_join_all;
use model::sampling::{SamplingParams, MAX_TOP_LOGPROBS};

use crate::backend::retrieval::Retrieved;
use crate::backend::PromptProcessor;
use crate::engine::plan::{CaptionPlan, DiagnosePlan};
use crate::engine::request::{image_order, ChatTurn, ImageInput, Prompt, Role, TurnPart};
use crate::engine::{StoppingCriteria, ValidRequest};
use crate::error::{ApiError, ErrorCode};
use crate::media::MediaFetcher;
use crate::openai::diagnostics::{DiagnosticsMeta, DiagnosticsOptions, RetrievalMeta};
use crate::openai::{self, ChatCompletionRequest, ContentPart, MessageContent};
use diagnostics::{DiagnosticsConfig, ShareSelector};

/// Images one request may carry unless the operator says otherwise (`--max-images-per-request`).
pub const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 8;
/// Pixels (width × height, summed over its images) one request may carry: eight 2048×2048
/// images.
pub const DEFAULT_MAX_REQUEST_PIXELS: u64 = 8 * 2048 * 2048;
/// OpenAI's bound on `stop` strings, and our bound on each one's length: the stop matcher then
/// costs O(longest stop) per generated token.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Choices per request (`n`), at most; never more than the engine's `max_num_seqs`, since a
/// request's choices decode together.
pub const MAX_CHOICES: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// Request limits (besides the body size, which the HTTP layer enforces).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Prompt + completion tokens.
    pub max_model_len: usize,
    /// Tokens the paged KV cache holds: no sequence can grow beyond them.
    pub kv_cache_tokens: usize,
    pub max_images_per_request: usize,
    pub max_stop_sequences: usize,
    /// Pixels summed over the request's images, checked from their headers.
    pub max_request_pixels: u64,
    /// `n`: [`MAX_CHOICES`], or `max_num_seqs` when that is smaller.
    pub max_choices: usize,
}

impl Limits {
    pub fn new(max_model_len: usize) -> Self {
        Self {
            max_model_len,
            kv_cache_tokens: usize::MAX,
            max_images_per_request: DEFAULT_MAX_IMAGES_PER_REQUEST,
            max_stop_sequences: MAX_STOP_SEQUENCES,
            max_request_pixels: DEFAULT_MAX_REQUEST_PIXELS,
            max_choices: MAX_CHOICES,
        }
    }
}

/// How the HTTP layer should shape the answer; the engine does not need these.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseOptions {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// The diagnostics report's meta, for a request that asked for diagnostics; the HTTP layer
    /// completes it with the engine's [`crate::engine::plan::Diagnosis`].
    pub diagnostics: Option<Box<DiagnosticsMeta>>,
    /// TGA retrieval's caption for each user turn with an image, in order.
    pub retrieved: Vec<Retrieved>,
}

pub struct Validator {
    processor: Arc<dyn PromptProcessor>,
    media: MediaFetcher,
    limits: Limits,
    model_id: String,
    supports_images: bool,
    diagnostics: DiagnosticsConfig,
    background: ShareSelector,
}

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `/v1/chat/completions`: diagnosed if it asks to be, or sampled.
    Chat,
    /// `/v1/safety/diagnose`: always diagnosed; `max_tokens: 0` skips generation.
    Diagnose,
}

/// An image part found in the messages, with where it was.
struct ImageRef {
    url: String,
    param: String,
}

impl Validator {
    pub fn new(
        processor: Arc<dyn PromptProcessor>,
        media: MediaFetcher,
        limits: Limits,
        model_id: String,
        supports_images: bool,
    ) -> Self {
        Self {
            processor,
            media,
            limits,
            model_id,
            supports_images,
            diagnostics: DiagnosticsConfig::default(),
            background: ShareSelector::default(),
        }
    }

    /// Decoder blocks N of the served model, if it supports diagnostics.
    pub fn diagnostics_layers(&self) -> Option<usize> {
        self.processor.diagnostics().map(|d| d.num_layers())
    }

    /// The operator's diagnostics settings (sample rate, safety band and layer).
    pub fn with_diagnostics(mut self, config: DiagnosticsConfig) -> Self {
        self.diagnostics = config;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn validate_for(
        &self,
        mut request: ChatCompletionRequest,
        request_id: String,
        arrived: Instant,
        purpose: Purpose,
    ) -> Result<(ValidRequest, ResponseOptions), ApiError> {
        let diagnostics = request.diagnostics.take();
        self.check_model(request.model.as_deref())?;
        refused::refuse_unsupported(&request)?;
        let n = self.choices(request.n)?;
        if n > 1 && (diagnostics.is_some() || purpose == Purpose::Diagnose) {
            return Err(ApiError::invalid(
                "n",
                "diagnostics describe one answer: n must be 1 when diagnostics are asked for",
            ));
        }
        let stream = request.stream.unwrap_or(false);
        if request.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let sampling = self.sampling_params(&request)?;
        let stop = self.stop_sequences(request.stop.clone())?;
        let grammar = structured::grammar_spec(&request)?;
        let max_tokens = match request.max_completion_tokens.or(request.max_tokens) {
            None => None,
            Some(n) if n >= 1 => Some(n as usize),
            Some(0) if purpose == Purpose::Diagnose => Some(0),
            Some(n) => {
                let param = if request.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                let least = if purpose == Purpose::Diagnose { 0 } else { 1 };
                return Err(ApiError::invalid(
                    param,
                    format!("{param} must be at least {least}, got {n}"),
                ));
            }
        };
        // vLLM's rule; without max_tokens the context's end may still come first (`length`).
        if let Some(max) = max_tokens.filter(|&max| sampling.min_tokens > max) {
            return Err(ApiError::invalid(
                "min_tokens",
                format!(
                    "min_tokens must be at most max_tokens ({max}), got {}",
                    sampling.min_tokens
                ),
            ));
        }

        let (turns, image_refs) = self.conversation(&request.messages)?;
        let diagnose = match (purpose, diagnostics) {
            (Purpose::Diagnose, options) => Some((options.unwrap_or_default(), true)),
            (Purpose::Chat, Some(options)) => Some((options, true)),
            (Purpose::Chat, None) if self.background.take(self.diagnostics.sample_rate) => {
                // Sampled: caption-free, lens and attention only, never shown to the client.
                Some((DiagnosticsOptions::default(), false))
            }
            (Purpose::Chat, None) => None,
        };
        let needles = diagnose
            .as_ref()
            .map(|(options, _)| diagnostics::needles(options))
            .unwrap_or_default();
        let images = try_join_all(image_refs.iter().map(|image| async move {
            self.media
                .load(&image.url)
                .await
                .map_err(|err| ApiError::from_media(err, image.param.clone()))
        }))
        .await?;
        let (images, image_refs) = (Arc::new(images), Arc::new(image_refs));
        let retrieve = request.retrieval.unwrap_or_default() == openai::RetrievalMode::Auto;
        let (prompt, turns, retrieved) = self
            .build_prompt(turns, images.clone(), image_refs.clone(), needles, retrieve)
            .await?;
        // The context is checked before any pixel is decoded for the model.
        let max_new_tokens = self.check_context(prompt.len(), max_tokens)?;
        let prompt = self
            .decode_images(prompt, &turns, images, image_refs)
            .await?;
        let constraint = match grammar {
            Some((spec, param)) => Some(structured::compile(&self.processor, spec, param).await?),
            None => None,
        };
        let (diagnose, meta) = match diagnose {
            Some((options, deliver)) => {
                self.plan_diagnostics(&options, &turns, &prompt, deliver)
                    .await?
            }
            None => (None, None),
        };

        let options = ResponseOptions {
            model: self.model_id.clone(),
            stream,
            include_usage: request
                .stream_options
                .as_ref()
                .is_some_and(|options| options.include_usage),
            logprobs: sampling.logprobs,
            diagnostics: meta.map(|mut meta| {
                meta.retrieval = retrieved.last().map(RetrievalMeta::from);
                meta
            }),
            retrieved,
        };
        if let Some(user) = &request.user {
            tracing::debug!(user = %user, "request user");
        }
        let valid = ValidRequest {
            request_id,
            prompt,
            sampling,
            stopping: StoppingCriteria {
                max_new_tokens,
                stop,
            },
            arrived,
            diagnose,
            constraint,
            n,
        };
        Ok((valid, options))
    }

    /// `n`: 1 to [`Limits::max_choices`].
    pub(crate) fn choices(&self, n: Option<i64>) -> Result<usize, ApiError> {
        let max = self.limits.max_choices;
        match n {
            None => Ok(1),
            Some(n) if n >= 1 && n as u64 <= max as u64 => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {max}, got {n}"),
            )),
        }
    }

    /// Validates the diagnostics options against the prompt; the plan, and the meta when the
    /// client asked for the report. A sampled request on a model without diagnostics is simply
    /// not diagnosed; one that asked gets a 400.
    #[allow(clippy::type_complexity)]
    async fn plan_diagnostics(
        &self,
        options: &DiagnosticsOptions,
        turns: &[ChatTurn],
        prompt: &Prompt,
        deliver: bool,
    ) -> Result<(Option<Arc<DiagnosePlan>>, Option<Box<DiagnosticsMeta>>), ApiError> {
        let Some(dx) = self.processor.diagnostics() else {
            return if deliver {
                Err(ApiError::invalid(
                    "diagnostics",
                    "the served model does not support safety diagnostics",
                ))
            } else {
                Ok((None, None))
            };
        };
        let (plan, meta) = diagnostics::plan(
            dx,
            options,
            turns,
            prompt,
            &self.model_id,
            &self.diagnostics,
            deliver,
        )?;
        let mut plan = plan;
        if let CaptionPlan::Given(caption) = &plan.caption {
            let processor = self.processor.clone();
            let (turns, caption) = (turns.to_vec(), caption.clone());
            let max_model_len = self.limits.max_model_len;
            let prompt = tokio::task::spawn_blocking(move || {
                let dx = processor
                    .diagnostics()
                    .expect("checked above: the processor supports diagnostics");
                diagnostics::check_caption_pass(dx, &turns, &caption, max_model_len)
            })
            .await
            .map_err(|err| ApiError::internal(format!("caption pass check failed: {err}")))??;
            plan.caption_prompt = Some(prompt);
        }
        Ok((Some(Arc::new(plan)), deliver.then(|| Box::new(meta))))
    }

    /// The request's sampling fields mapped to the sampler's settings, checked against their one
    /// set of limits ([`SamplingParams::validate`]).
    fn sampling_params(&self, request: &ChatCompletionRequest) -> Result<SamplingParams, ApiError> {
        // vLLM's convention: -1 (or 0) means no top-k.
        let top_k = match request.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1, 0 or positive, got {k}"),
                ))
            }
        };
        let top_logprobs = match request.top_logprobs {
            Some(n) if n < 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
                ))
            }
            n => n.unwrap_or(0) as usize,
        };
        let min_tokens = match request.min_tokens {
            Some(n) if n < 0 => {
                return Err(ApiError::invalid(
                    "min_tokens",
                    format!("min_tokens must be at least 0, got {n}"),
                ))
            }
            n => n.unwrap_or(0) as usize,
        };
        let token_id = |param: &'static str, id: i64| {
            u32::try_from(id).map_err(|_| {
                ApiError::invalid(param, format!("{param} must hold token ids, got {id}"))
            })
        };
        let mut logit_bias = Vec::new();
        for (key, &bias) in request.logit_bias.iter().flatten() {
            let id = key.trim().parse::<i64>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys must be token ids, got {key:?}"),
                )
            })?;
            logit_bias.push((token_id("logit_bias", id)?, bias as f32));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
        if let Some(w) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias names token {} twice", w[0].0),
            ));
        }
        let mut stop_token_ids = request
            .stop_token_ids
            .iter()
            .flatten()
            .map(|&id| token_id("stop_token_ids", id))
            .collect::<Result<Vec<u32>, ApiError>>()?;
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let params = SamplingParams {
            temperature: request.temperature.unwrap_or(1.0) as f32,
            top_p: request.top_p.unwrap_or(1.0) as f32,
            top_k,
            min_p: request.min_p.unwrap_or(0.0) as f32,
            presence_penalty: request.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: request.frequency_penalty.unwrap_or(0.0) as f32,
            repetition_penalty: request.repetition_penalty.unwrap_or(1.0) as f32,
            logit_bias,
            min_tokens,
            ignore_eos: request.ignore_eos.unwrap_or(false),
            stop_token_ids,
            include_stop_str_in_output: request.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: request.skip_special_tokens.unwrap_or(true),
            // Any 64-bit pattern is a valid seed; negative ones just reinterpret.
            seed: request.seed.map(|seed| seed as u64),
            logprobs: request.logprobs.unwrap_or(false),
            top_logprobs,
        };
        params
            .validate(self.processor.vocab_size())
            .map_err(|e| ApiError::invalid(e.param, e.message))?;
        // `top_logprobs` without `logprobs` is refused even when it is 0 (OpenAI's rule).
        if request.top_logprobs.is_some() && !params.logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ));
        }
        Ok(params)
    }

    fn stop_sequences(&self, stop: Option<openai::StopSequences>) -> Result<Vec<String>, ApiError> {
        let stop = stop
            .map(openai::StopSequences::into_vec)
            .unwrap_or_default();
        if stop.len() > self.limits.max_stop_sequences {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {} stop sequences are allowed, got {}",
                    self.limits.max_stop_sequences,
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop sequences must not be empty",
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop sequences must be at most {MAX_STOP_BYTES} bytes long, got one of {}",
                    long.len()
                ),
            ));
        }
        Ok(stop)
    }

    /// The messages as turns for the processor, and the image parts to fetch.
    fn conversation(
        &self,
        messages: &[openai::ChatMessage],
    ) -> Result<(Vec<ChatTurn>, Vec<ImageRef>), ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut turns = Vec::with_capacity(messages.len());
        let mut images = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let role = match message.role {
                openai::Role::System => Role::System,
                openai::Role::User => Role::User,
                openai::Role::Assistant => Role::Assistant,
            };
            let parts = match &message.content {
                MessageContent::Text(text) => vec![TurnPart::Text(text.clone())],
                MessageContent::Parts(parts) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        match part {
                            ContentPart::Text { text } => out.push(TurnPart::Text(text.clone())),
                            ContentPart::ImageUrl { image_url } => {
                                let param = format!("messages[{i}].content[{j}].image_url");
                                if !self.supports_images {
                                    return Err(ApiError::invalid(
                                        param,
                                        "this model does not accept images",
                                    ));
                                }
                                if role != Role::User {
                                    return Err(ApiError::invalid(
                                        param,
                                        "images are only accepted in user messages",
                                    ));
                                }
                                out.push(TurnPart::Image(images.len()));
                                images.push(ImageRef {
                                    url: image_url.url.clone(),
                                    param,
                                });
                            }
                        }
                    }
                    out
                }
            };
            turns.push(ChatTurn {
                role,
                parts,
                retrieved: None,
            });
        }
        // Refused before tokenizing: no token of the served vocabulary covers more than
        // `max_token_bytes` bytes of text, so longer text cannot fit the context.
        let text_bytes: usize = turns
            .iter()
            .flat_map(|t: &ChatTurn| &t.parts)
            .map(|p| match p {
                TurnPart::Text(text) => text.len(),
                TurnPart::Image(_) => 0,
            })
            .sum();
        let max_text_bytes = self
            .limits
            .max_model_len
            .saturating_mul(self.processor.max_token_bytes().max(1));
        if text_bytes > max_text_bytes {
            return Err(ApiError::new(
                ErrorCode::ContextLengthExceeded,
                format!(
                    "This model's maximum context length is {} tokens, and no token covers more \
                     than {} bytes of text; your messages hold {text_bytes} bytes of text (at \
                     most {max_text_bytes}). Please reduce the length of the messages.",
                    self.limits.max_model_len,
                    self.processor.max_token_bytes()
                ),
            )
            .with_param("messages"));
        }
        if images.len() > self.limits.max_images_per_request {
            return Err(ApiError::new(
                ErrorCode::TooManyImages,
                format!(
                    "at most {} images per request are allowed, got {}",
                    self.limits.max_images_per_request,
                    images.len()
                ),
            )
            .with_param("messages"));
        }
        Ok((turns, images))
    }

    /// Decoding, preprocessing and tokenizing are CPU work: they run on the blocking pool.
    /// Builds the prompt with every image's token count from its header (nothing decoded yet),
    /// after the request's pixel budget; with `retrieve`, each user turn with an image first gets
    /// the caption its first image retrieves (when the model is served with a corpus). The
    /// prompt's images carry no pixels until [`Self::decode_images`]; the turns are as the
    /// prompt renders them.
    #[allow(clippy::type_complexity)]
    async fn build_prompt(
        &self,
        mut turns: Vec<ChatTurn>,
        images: Arc<Vec<Vec<u8>>>,
        refs: Arc<Vec<ImageRef>>,
        needles: Vec<String>,
        retrieve: bool,
    ) -> Result<(Prompt, Vec<ChatTurn>, Vec<Retrieved>), ApiError> {
        let processor = self.processor.clone();
        let max_pixels = self.limits.max_request_pixels;
        let built = tokio::task::spawn_blocking(move || {
            let shapes = images
                .iter()
                .zip(refs.iter())
                .map(|(bytes, image)| {
                    processor
                        .probe_image(bytes)
                        .map_err(|err| ApiError::from_process(err, image.param.clone()))
                })
                .collect::<Result<Vec<ImageInput>, ApiError>>()?;
            let pixels: u64 = shapes
                .iter()
                .map(|s| u64::from(s.image_size.0) * u64::from(s.image_size.1))
                .sum();
            if pixels > max_pixels {
                return Err(ApiError::new(
                    ErrorCode::InvalidImage,
                    format!(
                        "the request's images hold {pixels} pixels together; at most {max_pixels} are allowed per request"
                    ),
                )
                .with_param("messages"));
            }
            let mut retrieved = Vec::new();
            if retrieve {
                for turn in turns.iter_mut().filter(|t| t.role == Role::User) {
                    let Some(i) = turn.images().next() else {
                        continue;
                    };
                    let found = processor
                        .retrieve(&images[i])
                        .map_err(|err| ApiError::from_process(err, refs[i].param.clone()))?;
                    if let Some(found) = found {
                        turn.retrieved = Some(found.text.clone());
                        retrieved.push(found);
                    }
                }
            }
            let prompt = processor
                .build_prompt(&turns, shapes, &needles)
                .map_err(|err| ApiError::from_process(err, "messages".into()))?;
            Ok::<_, ApiError>((prompt, turns, retrieved))
        })
        .await
        .map_err(|err| ApiError::internal(format!("prompt processing failed: {err}")))??;
        if built.0.is_empty() {
            return Err(ApiError::invalid("messages", "the prompt is empty"));
        }
        Ok(built)
    }

    /// Decodes and preprocesses the images into `prompt`, which holds them in the order their
    /// placeholders appear in `turns` (the [`PromptProcessor::build_prompt`] contract).
    async fn decode_images(
        &self,
        mut prompt: Prompt,
        turns: &[ChatTurn],
        images: Arc<Vec<Vec<u8>>>,
        refs: Arc<Vec<ImageRef>>,
    ) -> Result<Prompt, ApiError> {
        if images.is_empty() {
            return Ok(prompt);
        }
        let order = image_order(turns);
        let processor = self.processor.clone();
        tokio::task::spawn_blocking(move || {
            for (slot, &i) in prompt.images.iter_mut().zip(&order) {
                let decoded = processor
                    .prepare_image(&images[i])
                    .map_err(|err| ApiError::from_process(err, refs[i].param.clone()))?;
                if decoded.num_tokens != slot.num_tokens {
                    return Err(ApiError::internal(format!(
                        "image {i}: {} tokens from its header but {} once decoded",
                        slot.num_tokens, decoded.num_tokens
                    )));
                }
                *slot = decoded;
            }
            Ok(prompt)
        })
        .await
        .map_err(|err| ApiError::internal(format!("image processing failed: {err}")))?
    }

    /// A request naming a model must name the served one (404 otherwise).
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(model) if model != self.model_id => Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!(
                    "The model `{model}` does not exist; this server serves `{}`.",
                    self.model_id
                ),
            )
            .with_param("model")),
            _ => Ok(()),
        }
    }

    /// OpenAI's context check and message; without `max_tokens`, the rest of the context (vLLM).
    fn check_context(
        &self,
        prompt_tokens: usize,
        max_tokens: Option<usize>,
    ) -> Result<usize, ApiError> {
        self.check_context_of("messages", prompt_tokens, max_tokens)
    }

    /// [`Self::check_context`] for a prompt sent as `what` (`messages`, `prompt`).
    fn check_context_of(
        &self,
        what: &str,
        prompt_tokens: usize,
        max_tokens: Option<usize>,
    ) -> Result<usize, ApiError> {
        let max = self.limits.max_model_len.min(self.limits.kv_cache_tokens);
        let overflow = |message: String| {
            ApiError::new(ErrorCode::ContextLengthExceeded, message).with_param(what)
        };
        // Which limit binds: the model's context, or the KV cache's room for one sequence.
        let limit = if self.limits.kv_cache_tokens < self.limits.max_model_len {
            format!(
                "This server's KV cache holds at most {max} tokens (the model's context is {})",
                self.limits.max_model_len
            )
        } else {
            format!("This model's maximum context length is {max} tokens")
        };
        match max_tokens {
            Some(completion) if prompt_tokens + completion > max => Err(overflow(format!(
                "{limit}. However, you requested {} tokens ({prompt_tokens} in the {what}, \
                 {completion} in the completion). Please reduce the length of the {what} or \
                 completion.",
                prompt_tokens + completion
            ))),
            Some(completion) => Ok(completion),
            None if prompt_tokens >= max => Err(overflow(format!(
                "{limit}. However, your {what} resulted in {prompt_tokens} tokens. Please \
                 reduce the length of the {what}."
            ))),
            None => Ok(max - prompt_tokens),
        }
    }
}
