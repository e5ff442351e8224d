//! The seam between the server and a model: what validation needs (chat template, tokenizer,
//! image preprocessing) and what the engine thread needs (prefill, batched decode, sampling,
//! detokenisation). [`llava`] implements it with the `model` crate; tests implement it with a
//! scripted fake. The data crossing it are the engine's request types ([`crate::engine::request`])
//! and diagnostics plan ([`crate::engine::plan`]).
//!
//! The split follows transformers' `LlavaNextProcessor` / `LlavaNextForConditionalGeneration`: the
//! processor turns messages and images into `input_ids` (image positions expanded) plus
//! `pixel_values` and `image_sizes`; the model only ever sees those.

pub mod builtin;
pub mod llava;
pub mod retrieval;

use std::fmt;

use model::diagnostics::{RefusalSet, RefusalTokens};
use model::kv::{BlockTable, KvBlocks};
use model::sampling::{DrawSpec, SampledToken, SamplingParams};

use crate::engine::plan::{CaptionPrompt, DiagnosePlan, Diagnosis};
use crate::engine::request::{ChatTurn, ImageInput, Prompt};

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

    /// What [`Self::prepare_image`] would give, without its pixels: size and token count from
    /// the image's header, so the context and the pixel budget are checked before any pixel is
    /// decoded. The default decodes (for processors with no cheaper way).
    fn probe_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError> {
        let mut image = self.prepare_image(bytes)?;
        image.pixel_values = Vec::new();
        Ok(image)
    }

    /// Renders the chat template (with the generation prompt) and tokenizes it, expanding every
    /// [`crate::engine::request::TurnPart::Image`] to `images[i].num_tokens` positions; the
    /// prompt's layout locates the user text and every occurrence of each of `needles` in it.
    fn build_prompt(
        &self,
        turns: &[ChatTurn],
        images: Vec<ImageInput>,
        needles: &[String],
    ) -> Result<Prompt, ProcessError>;

    /// The most bytes of text one token of the vocabulary stands for: text longer than this
    /// times the context length cannot fit, and is refused before it is tokenized.
    fn max_token_bytes(&self) -> usize;

    /// Rows of the model's logits (the ids `logit_bias` and `stop_token_ids` may name); `None`
    /// when unknown (the ids are then not checked).
    fn vocab_size(&self) -> Option<usize> {
        None
    }

    /// TGA retrieval: the nearest caption of the image in `bytes`; `None` when the model is
    /// served without a retrieval corpus.
    fn retrieve(&self, bytes: &[u8]) -> Result<Option<retrieval::Retrieved>, ProcessError> {
        let _ = bytes;
        Ok(None)
    }

    /// What safety diagnostics need from the processor; `None` when this model cannot be
    /// diagnosed (requests asking for diagnostics then get a 400).
    fn diagnostics(&self) -> Option<&dyn DiagnosticsProcessor> {
        None
    }

    // Raw text, for `/v1/completions` (no chat template) and `/tokenize`, `/detokenize`.

    /// transformers' `tokenizer(text, add_special_tokens=...)["input_ids"]`: with special tokens,
    /// what the tokenizer's post-processor adds (BOS for Llama/Mistral tokenizers).
    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ProcessError>;

    /// transformers' `decode(ids)` with special tokens kept (vLLM's `/detokenize`, and the echo of
    /// a token-id prompt). Every id is below [`Self::tokenizer_vocab_size`].
    fn detokenize(&self, ids: &[u32]) -> Result<String, ProcessError>;

    /// transformers' `convert_ids_to_tokens`: each id's vocabulary entry (`▁the`, `<0x0A>`).
    fn token_strings(&self, ids: &[u32]) -> Vec<String>;

    /// The tokenizer's ids are `0..tokenizer_vocab_size()` (added tokens included).
    fn tokenizer_vocab_size(&self) -> usize;

    /// The id the image placeholder tokenizes to, if the vocabulary has one: a raw prompt that
    /// holds it would put an image position in the prompt with no image behind it.
    fn image_token_id(&self) -> Option<u32>;
    /// Compiles structured-output grammars against the served vocabulary; `None` when this
    /// model cannot constrain its output (requests asking for it then get a 400).
    fn constraints(&self) -> Option<&model::constraint::ConstraintCompiler> {
        None
    }
}

/// The model knowledge that validating a `diagnostics` request needs (DIAGNOSTICS.md).
pub trait DiagnosticsProcessor: Send + Sync {
    /// Decoder blocks N (layer records run 0..=N).
    fn num_layers(&self) -> usize;

    /// The refusal set K, resolved through the served tokenizer; `Err` is the client's message.
    fn refusal_set(&self, spec: &RefusalTokens) -> Result<RefusalSet, String>;

    /// The caption pass's prompt (DIAGNOSTICS.md §3) of `turns` with `caption`.
    fn caption_prompt(
        &self,
        turns: &[ChatTurn],
        caption: &str,
    ) -> Result<CaptionPrompt, ProcessError>;
}

/// A per-sequence sampler: it owns the sequence's RNG, so a seed gives the same output whatever
/// else shares the batch.
pub trait TokenSampler: Send {
    /// Samples the sequence's next token (and counts it, for the penalties).
    fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError>;

    /// The request's settings, which also say how the sequence stops and is detokenized.
    fn params(&self) -> &SamplingParams;

    /// The draw a backend may make on its device for this step
    /// ([`model::sampling::Sampler::device_draw`]); it takes the draw's random number from the
    /// sequence's stream. `None` (the default, and whenever a logit processor is active) keeps
    /// the step on the host.
    fn device_draw(&mut self) -> Option<DrawSpec> {
        None
    }

    /// Counts a token the backend drew with a spec from [`Self::device_draw`].
    fn accept(&mut self, token: &SampledToken) {
        let _ = token;
    }

    /// Samples on the host with a spec already taken from [`Self::device_draw`] (the backend
    /// returned the row's logits instead of a token).
    fn sample_with(
        &mut self,
        logits: &[f32],
        spec: &DrawSpec,
    ) -> Result<SampledToken, BackendError>;
}

/// One sequence's result of [`ModelBackend::decode_batch_sampled`].
#[derive(Debug, Clone, PartialEq)]
pub enum StepRow {
    /// Drawn on the backend's device with the sequence's spec.
    Sampled(SampledToken),
    /// The logits, for the host to sample.
    Logits(Vec<f32>),
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

/// What a prefill runs: the prompt and, for a sequence recomputed after a preemption, the tokens
/// it had generated (positions `prompt.len()..`) before it lost its cache.
#[derive(Debug, Clone, Copy)]
pub struct PrefillInput<'a> {
    pub prompt: &'a Prompt,
    pub generated: &'a [u32],
}

impl PrefillInput<'_> {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token id at `pos` (image positions hold the prompt's placeholder ids).
    pub fn token(&self, pos: usize) -> u32 {
        match pos.checked_sub(self.prompt.len()) {
            None => self.prompt.token_ids[pos],
            Some(i) => self.generated[i],
        }
    }
}

/// One sequence's model state as the scheduler sees it: its block table in the backend's KV
/// pool and the positions computed.
pub trait SequenceCache: Send {
    fn table(&self) -> &BlockTable;
    /// To reserve blocks ahead of a forward.
    fn table_mut(&mut self) -> &mut BlockTable;
    /// Positions computed (the next position to fill).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// For an empty cache: takes the leading full blocks with these content hashes from the
    /// prefix cache; returns the positions reused.
    fn reuse_prefix(&mut self, hashes: &[u64]) -> usize;
    /// Another cache continuing from the same positions (a completed prefill), sharing every
    /// block: the choices of one request. A shared block is copied when one of them writes to
    /// it, so the engine keeps a free block for each such write.
    fn fork(&self) -> Self
    where
        Self: Sized;
}

/// The model as the engine thread drives it. The engine owns it on one OS thread, so it needs
/// `Send` but not `Sync`; every call may take as long as the model takes.
///
/// Its KV cache is a pool of blocks ([`Self::kv_blocks`]) that the engine plans with: it
/// reserves every block a forward will write before calling it, so a forward never runs out of
/// room halfway.
pub trait ModelBackend: Send + 'static {
    /// One sequence's KV cache (its block table) and any other per-sequence model state.
    type Cache: SequenceCache;
    type Sampler: TokenSampler;

    /// The KV pool's allocator, shared with every cache of this backend.
    fn kv_blocks(&self) -> KvBlocks;

    /// An empty cache for a new sequence.
    fn new_cache(&self) -> Self::Cache;

    /// Runs positions `cache.len()..end` of `input` (text and images) into `cache`: the whole
    /// input, or one chunk of it under the step's token budget. Returns the logits of its last
    /// position (length = vocabulary size) when `end == input.len()`, else `None`.
    fn prefill(
        &mut self,
        input: &PrefillInput,
        end: usize,
        cache: &mut Self::Cache,
    ) -> Result<Option<Vec<f32>>, BackendError>;

    /// [`Self::prefill`] of the prompt (positions `cache.len()..end`, from 0, in chunks like
    /// any prompt) with the safety diagnostics of `plan`: the caption pass (and the model's own
    /// caption) at the first chunk when the plan has a caption, the layer taps and
    /// interventions of the prompt pass over every chunk, and at the last chunk the per-layer
    /// records. The returned logits are those of the (possibly intervened) prompt pass, and
    /// `cache` continues from it. The caption passes draw on the same pool, beyond the prompt's
    /// blocks.
    fn prefill_diagnosed(
        &mut self,
        prompt: &Prompt,
        plan: &DiagnosePlan,
        end: usize,
        cache: &mut Self::Cache,
    ) -> Result<Option<(Vec<f32>, Diagnosis)>, BackendError> {
        let _ = (prompt, plan, end, cache);
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

    /// [`Self::decode_batch`], with the draws made on the model's device where `draws[i]` is
    /// `Some` and the backend can: then only the tokens cross to the host. Rows it returns as
    /// logits are sampled on the host, with the spec when there is one. The default samples
    /// nothing on the device.
    fn decode_batch_sampled(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
        draws: &[Option<DrawSpec>],
    ) -> Result<Vec<StepRow>, BackendError> {
        let _ = draws;
        Ok(self
            .decode_batch(tokens, caches)?
            .into_iter()
            .map(StepRow::Logits)
            .collect())
    }

    /// A fresh sampler for one sequence whose prompt is `prompt` (the repetition penalty counts
    /// it); its `min_tokens` mask covers [`Self::stop_token_ids`].
    fn sampler(&self, params: &SamplingParams, prompt: &[u32]) -> Self::Sampler;

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

    /// [`Self::decode_text`] with special tokens kept (`skip_special_tokens: false`); the
    /// default is for a backend without special tokens.
    fn decode_text_with_special(&self, ids: &[u32]) -> String {
        self.decode_text(ids)
    }
}
