//! The seam between the server and a model: what validation needs (chat template, tokenizer,
//! image preprocessing) and what the engine thread needs (prefill, batched decode, sampling,
//! detokenisation). The `model` crate implements these; tests implement them with a scripted fake.
//!
//! The split follows transformers' `LlavaNextProcessor` / `LlavaNextForConditionalGeneration`: the
//! processor turns messages and images into `input_ids` (image positions expanded) plus
//! `pixel_values` and `image_sizes`; the model only ever sees those.

use std::fmt;
use std::ops::Range;

use model::diagnostics::{RefusalSet, RefusalTokens};

use crate::diagnose::{DiagnosePlan, Diagnosis};

/// Who said a turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One piece of a turn, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnPart {
    Text(String),
    /// The image at this index of the images passed to [`PromptProcessor::build_prompt`].
    Image(usize),
}

/// One message of the conversation, already checked against the wire schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub parts: Vec<TurnPart>,
}

/// One preprocessed image, as the processor hands it to the model.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// Original `(height, width)`, which anyres packing needs (transformers' `image_sizes`).
    pub image_size: (u32, u32),
    /// Preprocessed pixel values, row-major, laid out as `shape` (e.g. `[views, 3, 336, 336]`).
    pub pixel_values: Vec<f32>,
    pub shape: Vec<usize>,
    /// How many prompt positions this image occupies once expanded.
    pub num_tokens: usize,
}

/// A tokenized prompt, ready for prefill.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Token ids as fed to the model, with each image placeholder expanded to its positions.
    pub token_ids: Vec<u32>,
    /// The positions each image's features occupy, in order (one per entry of `images`).
    pub image_spans: Vec<std::ops::Range<usize>>,
    /// The images, in the order their placeholders appear in `token_ids`.
    pub images: Vec<ImageInput>,
}

impl Prompt {
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Prompt positions taken by images (part of [`Prompt::len`]).
    pub fn image_tokens(&self) -> usize {
        self.images.iter().map(|image| image.num_tokens).sum()
    }
}

/// Why the processor refused a request. Bad input is the client's fault (400); `Internal` is ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// Undecodable, unsupported or oversized image (the decoder's own limits).
    #[error("{0}")]
    InvalidImage(String),
    /// The conversation cannot be rendered by the chat template (e.g. roles out of order).
    #[error("{0}")]
    InvalidPrompt(String),
    #[error("{0}")]
    Internal(String),
}

/// The validation half of the model: pure CPU work with no access to the weights. It runs on
/// tokio's blocking pool, several requests at once, so it must be `Sync`.
pub trait PromptProcessor: Send + Sync + 'static {
    /// Decodes one image (with the decoder's limits on dimensions and memory) and preprocesses it.
    fn prepare_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError>;

    /// Renders the chat template (with the generation prompt) and tokenizes it, expanding every
    /// [`TurnPart::Image`] to `images[i].num_tokens` positions.
    fn build_prompt(
        &self,
        turns: &[ChatTurn],
        images: Vec<ImageInput>,
    ) -> Result<Prompt, ProcessError>;

    /// What safety diagnostics need from the processor; `None` when this model cannot be
    /// diagnosed (requests asking for diagnostics then get a 400).
    fn diagnostics(&self) -> Option<&dyn DiagnosticsProcessor> {
        None
    }
}

/// Where things are in a prompt, for the diagnostics' attention shares and interventions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptLayout {
    /// Token spans of the user messages' text parts.
    pub user_text: Vec<Range<usize>>,
    /// Per needle, the token spans of its occurrences inside the user text (empty: not found).
    pub needles: Vec<Vec<Range<usize>>>,
    /// Length of the prompt the spans refer to (the same as [`PromptProcessor::build_prompt`]'s).
    pub token_count: usize,
}

/// The model knowledge that validating a `diagnostics` request needs (DIAGNOSTICS.md).
pub trait DiagnosticsProcessor: Send + Sync {
    /// Decoder blocks N (layer records run 0..=N).
    fn num_layers(&self) -> usize;

    /// The refusal set K, resolved through the served tokenizer; `Err` is the client's message.
    fn refusal_set(&self, spec: &RefusalTokens) -> Result<RefusalSet, String>;

    /// Locates the user text and `needles` (substrings of it) in the prompt that
    /// [`PromptProcessor::build_prompt`] makes of `turns` with images of these token counts.
    fn locate(
        &self,
        turns: &[ChatTurn],
        image_token_counts: &[usize],
        needles: &[String],
    ) -> Result<PromptLayout, ProcessError>;
}

/// How to pick the next token; built from the request by validation.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// `None` disables top-k.
    pub top_k: Option<usize>,
    /// `None`: the sampler seeds itself from entropy.
    pub seed: Option<u64>,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

/// One sampled token, with its log-probability under the (temperature-free) model distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    /// The `n` most likely tokens with their log-probabilities, most likely first; empty unless
    /// [`SamplingParams::logprobs`] asked for them.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A per-sequence sampler: it owns the sequence's RNG, so a seed gives the same output whatever
/// else shares the batch.
pub trait TokenSampler: Send {
    fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError>;
}

/// A failure inside the model (a real internal fault: the request gets a 500).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

impl BackendError {
    pub fn new(message: impl fmt::Display) -> Self {
        Self(message.to_string())
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

/// The model as the engine thread drives it. The engine owns it on one OS thread, so it needs
/// `Send` but not `Sync`; every call may take as long as the model takes.
pub trait ModelBackend: Send + 'static {
    /// One sequence's KV cache (and any other per-sequence model state).
    type Cache: Send;
    type Sampler: TokenSampler;

    /// An empty cache for a new sequence.
    fn new_cache(&self) -> Self::Cache;

    /// Runs the whole prompt (text and images) into `cache`; returns the logits of its last
    /// position (length = vocabulary size).
    fn prefill(
        &mut self,
        prompt: &Prompt,
        cache: &mut Self::Cache,
    ) -> Result<Vec<f32>, BackendError>;

    /// [`Self::prefill`] with the safety diagnostics of `plan`: the caption pass (and the model's
    /// own caption) when the plan has a caption, the layer taps and interventions of the prompt
    /// pass, and the per-layer records. The returned logits are those of the (possibly
    /// intervened) prompt pass, and `cache` continues from it.
    fn prefill_diagnosed(
        &mut self,
        prompt: &Prompt,
        plan: &DiagnosePlan,
        cache: &mut Self::Cache,
    ) -> Result<(Vec<f32>, Diagnosis), BackendError> {
        let _ = (prompt, plan, cache);
        Err(BackendError::new("this model does not support diagnostics"))
    }

    /// One decode step for the running batch: `tokens[i]` is appended to `caches[i]`; returns one
    /// logits vector per sequence, in the same order. Sequences in one batch may have different
    /// lengths.
    fn decode_batch(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<Vec<f32>>, BackendError>;

    /// A fresh sampler for one sequence.
    fn sampler(&self, params: &SamplingParams) -> Self::Sampler;

    /// Tokens that end generation (EOS and the template's end-of-turn tokens); never shown.
    fn stop_token_ids(&self) -> &[u32];

    /// Whether `id` is a byte-fallback piece (`<0x41>`), whose text depends on the bytes after
    /// it; the detokenizer holds such runs back until they are complete.
    fn is_byte_token(&self, id: u32) -> bool {
        let _ = id;
        false
    }

    /// The bytes one token stands for, as OpenAI's logprobs `bytes` report them: a byte-fallback
    /// piece's single raw byte (its text alone is U+FFFD), else the UTF-8 of its text.
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.decode_text(&[id]).into_bytes()
    }

    /// Text of `ids`, special tokens skipped (transformers' `decode(ids, skip_special_tokens=True)`).
    /// A trailing incomplete UTF-8 sequence comes out as U+FFFD, as the tokenizers crate does.
    fn decode_text(&self, ids: &[u32]) -> String;
}
