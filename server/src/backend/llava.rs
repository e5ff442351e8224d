//! The `model` crate behind the seam: [`LlavaProcessor`] (template, tokenizer, images; runs
//! on the blocking pool) and [`LlavaBackend`] (prefill, batched decode, sampling; runs on the
//! engine thread). Both share one [`LlavaModel`]; the processor only reads its configuration.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use model::config::CheckpointFormat;
use model::constraint::ConstraintCompiler;
use model::diagnostics::{
    after_image_span, cosine_per_layer, layer_records, merge_spans, span_mean, AttentionShares,
    LogitLens, RefusalSet, RefusalTokens, Summary,
};
use model::image::{decode_image, preprocess, probe_image, ImageLimits};
use model::kv::{BlockTable, KvBlocks};
use model::llava::{LinearWeights, LlavaModel, LoadOptions};
use model::mistral::{KeyMask, KvCache, LayerTaps, PrefillOutput, StateEdit, TapAccumulator};
use model::random::RandomModelSpec;
use model::template::{
    build_prompt, ChatMessage, ChatTemplate, ContentPart, PromptMode, PromptTokens,
    IMAGE_PLACEHOLDER,
};
use model::tokenizer::Tokenizer;
use model::ModelError;

use model::sampling::{argmax, DrawSpec, SampledToken, Sampler, SamplingParams};

use super::retrieval::{Retrieved, Retriever};
use super::{
    BackendError, DiagnosticsProcessor, ModelBackend, PrefillInput, ProcessError, PromptProcessor,
    SequenceCache, StepRow, TokenSampler,
};
use crate::engine::plan::{
    CaptionPass, CaptionPlan, CaptionPooling, CaptionPrompt, DiagnosePlan, Diagnosis,
    DESCRIBE_PROMPT,
};
use crate::engine::request::{
    image_order, ChatTurn, ImageInput, Prompt, PromptLayout, Role, TurnPart,
};

/// Everything loaded from a checkpoint directory (or drawn at random).
pub struct LoadedModel {
    pub model: Arc<LlavaModel>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// Logit rows at or past this id are never sampled: a random-weight model's rows past its
    /// borrowed tokenizer's ids stand for no text (`None`: every row may be, as transformers
    /// samples a checkpoint's padded vocabulary).
    pub sampled_vocab: Option<usize>,
}

/// Loads model, tokenizer and chat template. `template` names a built-in template or overrides
/// the checkpoint's; original-format checkpoints default to `mistral_instruct` (LLaVA-1.6's
/// conversation mode; TGA checkpoints were trained with `llava_llama_2`).
pub fn load(
    dir: &Path,
    vision_tower: Option<PathBuf>,
    dtype: Option<DType>,
    linear_weights: LinearWeights,
    template: Option<&str>,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let model = LlavaModel::load(
        dir,
        &LoadOptions {
            vision_tower,
            dtype,
            linear_weights,
        },
        device,
    )?;
    let (tokenizer, template) = load_text(dir, template, model.config().format)?;
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
        template,
        sampled_vocab: None,
    })
}

/// The tokenizer and chat template of `dir` (a checkpoint of `format`), or the named template.
fn load_text(
    dir: &Path,
    template: Option<&str>,
    format: CheckpointFormat,
) -> Result<(Tokenizer, ChatTemplate), ModelError> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    let template = match template {
        Some(name) => ChatTemplate::by_name(name)?,
        None => match ChatTemplate::from_dir(dir)? {
            // The tokenizer's special tokens also become template variables (bos_token, ...).
            Some(ChatTemplate::Jinja(t)) => {
                let mut specials = tokenizer.template_special_tokens();
                specials.extend(t.special_tokens().clone());
                ChatTemplate::Jinja(t.with_special_tokens(specials))
            }
            Some(t) => t,
            None if format == CheckpointFormat::Original => {
                tracing::info!("no chat template in the checkpoint: using mistral_instruct (pass --template llava_llama_2 for TGA checkpoints)");
                ChatTemplate::MistralInstruct
            }
            None => {
                return Err(ModelError::Template(format!(
                    "{} has no chat template; pass --template mistral_instruct or llava_llama_2",
                    dir.display()
                )))
            }
        },
    };
    Ok((tokenizer, template))
}

/// A random-weight model of `spec` (`--random-weights`) drawn from `seed`, with the tokenizer
/// and chat template of the built-in tiny model (`fixtures/tiny-llava-next`: a 1000-piece
/// SentencePiece BPE with Mistral's special ids, `<image>` = 1000, the llava-hf Mistral
/// template): there is no hub to fetch Mistral's. The model's vocabulary rows must cover the
/// tokenizer's ids; the rows past them are never sampled. The weights' bytes are estimated
/// first and a model that would not fit in the memory available is refused.
pub fn load_random(
    spec: &RandomModelSpec,
    seed: u64,
    dtype: Option<DType>,
    linear_weights: LinearWeights,
    template: Option<&str>,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let opts = LoadOptions {
        vision_tower: None,
        dtype,
        linear_weights,
    };
    let footprint = spec.footprint(&opts, device)?;
    let (compute, linear) = spec.dtypes(&opts, device)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let needed = footprint.bytes();
    tracing::info!(
        model = %spec.name,
        parameters = footprint.parameters(),
        checkpoint_parameters = footprint.checkpoint_parameters(),
        bytes = needed,
        gib = format!("{:.2}", gib(needed)),
        dtype = ?compute,
        linear_weights = ?linear,
        "drawing random weights"
    );
    if let Some(available) = crate::kv_budget::available_memory(device) {
        if needed > available {
            let hint = if device.is_cpu() && linear != DType::BF16 && linear != DType::F16 {
                " (--weights bf16 stores the decoder's linear weights in half the bytes)"
            } else {
                ""
            };
            return Err(ModelError::InsufficientMemory(format!(
                "random weights for {} ({} parameters in {compute:?}, linear weights in \
                 {linear:?}) need {needed} bytes ({:.1} GiB), more than the {available} bytes \
                 ({:.1} GiB) available on {}{hint}",
                spec.name,
                footprint.parameters(),
                gib(needed),
                gib(available),
                if device.is_cpu() {
                    "the host"
                } else {
                    "the device"
                },
            )));
        }
    }
    let tiny = super::builtin::Builtin::Tiny
        .materialize()
        .map_err(|source| ModelError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let text = load_text(&tiny.dir, template, CheckpointFormat::HfLlavaNext);
    if let Err(err) = tiny.remove() {
        tracing::debug!(error = %err, "cannot remove the built-in tokenizer's temp dir");
    }
    let (tokenizer, template) = text?;
    let ids = tokenizer.vocab_size();
    if ids > spec.config.text.vocab_size {
        return Err(ModelError::Config {
            path: spec.name.clone().into(),
            msg: format!(
                "vocab_size {} is smaller than the random-weight tokenizer's {ids} ids",
                spec.config.text.vocab_size
            ),
        });
    }
    // Prompts hold the tokenizer's `<image>` id at image positions (their rows are overwritten
    // by the image features, so the model never reads the config's id).
    let mut spec = spec.clone();
    let image_id = tokenizer.token_to_id(IMAGE_PLACEHOLDER);
    if image_id != spec.config.image_token_index {
        tracing::info!(
            config = ?spec.config.image_token_index,
            tokenizer = ?image_id,
            "image_token_index follows the random-weight tokenizer's <image>"
        );
        spec.config.image_token_index = image_id;
    }
    let model = LlavaModel::random(&spec, seed, &opts, device)?;
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
        template,
        sampled_vocab: Some(ids),
    })
}

/// Validation-side half: images → pixel values and token counts, messages → prompt ids.
pub struct LlavaProcessor {
    model: Arc<LlavaModel>,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    limits: ImageLimits,
    /// The longest vocabulary entry in bytes (`▁` and `<0x..>` spellings included, so it bounds
    /// the text any token covers from above).
    max_token_bytes: usize,
    /// TGA retrieval over a caption corpus, when the model is served with one.
    retriever: Option<Arc<Retriever>>,
    /// Structured outputs' grammars over this vocabulary (`None`: a tokenizer llguidance
    /// cannot read).
    constraints: Option<ConstraintCompiler>,
}

impl LlavaProcessor {
    pub fn new(loaded: &LoadedModel, limits: ImageLimits) -> Self {
        let tokenizer = &loaded.tokenizer;
        let max_token_bytes = (0..tokenizer.vocab_size() as u32)
            .filter_map(|id| tokenizer.id_to_token(id))
            .map(|piece| piece.len())
            .max()
            .unwrap_or(1);
        // The backend's stop tokens ([`LlavaBackend`]'s `stop_ids`): EOS.
        let end_ids: Vec<u32> = tokenizer.eos_id().into_iter().collect();
        let constraints = ConstraintCompiler::new(tokenizer, &end_ids)
            .inspect_err(|err| tracing::warn!(%err, "structured outputs disabled"))
            .ok();
        Self {
            model: loaded.model.clone(),
            tokenizer: loaded.tokenizer.clone(),
            template: loaded.template.clone(),
            limits,
            max_token_bytes,
            retriever: None,
            constraints,
        }
    }

    /// Serves the model with TGA retrieval over `retriever`'s corpus.
    pub fn with_retriever(mut self, retriever: Arc<Retriever>) -> Self {
        self.retriever = Some(retriever);
        self
    }
}

impl LlavaProcessor {
    fn mode(&self) -> PromptMode {
        match self.model.config().format {
            CheckpointFormat::Original => PromptMode::Original,
            _ => PromptMode::Hf,
        }
    }

    /// The chat template's rendering of `turns` (with the generation prompt), one
    /// [`IMAGE_PLACEHOLDER`] per image part.
    fn render(&self, turns: &[ChatTurn]) -> Result<String, ProcessError> {
        let messages: Vec<ChatMessage> = turns
            .iter()
            .map(|t| {
                let role = match t.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                let content = t
                    .parts
                    .iter()
                    .map(|p| match p {
                        TurnPart::Text(s) => ContentPart::Text(s.clone()),
                        TurnPart::Image(_) => ContentPart::Image,
                    })
                    .collect();
                let mut message = ChatMessage::new(role, content);
                message.retrieved = t.retrieved.clone();
                message
            })
            .collect();
        self.template
            .render(&messages, true)
            .map_err(|e| ProcessError::InvalidPrompt(e.to_string()))
    }

    /// Rendered prompt and its tokens, image `k` (in order of appearance) expanded to
    /// `image_token_counts[k]` positions.
    fn tokens(
        &self,
        turns: &[ChatTurn],
        image_token_counts: &[usize],
    ) -> Result<(String, PromptTokens), ProcessError> {
        let rendered = self.render(turns)?;
        let tokens = build_prompt(&self.tokenizer, &rendered, image_token_counts, self.mode())
            .map_err(|e| ProcessError::InvalidPrompt(e.to_string()))?;
        Ok((rendered, tokens))
    }

    /// The caption pass of DIAGNOSTICS.md §3: the request's rendered template with every image
    /// placeholder replaced by `caption`, tokenized as a text-only prompt; returns its ids and
    /// the token spans of the inserted captions.
    fn build_caption_prompt(
        &self,
        turns: &[ChatTurn],
        caption: &str,
    ) -> Result<CaptionPrompt, ProcessError> {
        let rendered = self.render(turns)?;
        let mut text = String::with_capacity(rendered.len());
        let mut chars = 0;
        let mut inserted = Vec::new();
        for (k, piece) in rendered.split(IMAGE_PLACEHOLDER).enumerate() {
            if k > 0 {
                let len = caption.chars().count();
                inserted.push(chars..chars + len);
                text.push_str(caption);
                chars += len;
            }
            text.push_str(piece);
            chars += piece.chars().count();
        }
        let tokens = build_prompt(&self.tokenizer, &text, &[], self.mode())
            .map_err(|e| ProcessError::InvalidPrompt(e.to_string()))?;
        let spans: Vec<Range<usize>> = inserted
            .into_iter()
            .filter_map(|r| tokens.token_span_of_chars(r))
            .collect();
        if spans.is_empty() {
            return Err(ProcessError::InvalidPrompt(
                "the caption pass has no caption tokens (the request has no image placeholder)"
                    .into(),
            ));
        }
        Ok(CaptionPrompt {
            ids: tokens.ids,
            caption_spans: merge_spans(&spans),
        })
    }
}

/// Character ranges of the user messages' text parts in `rendered`, found in conversation order
/// (the templates render parts verbatim, some trimmed).
fn user_text_ranges(rendered: &str, turns: &[ChatTurn]) -> Vec<Range<usize>> {
    let mut cursor = 0;
    let mut ranges = Vec::new();
    for turn in turns {
        for part in &turn.parts {
            let TurnPart::Text(text) = part else {
                continue;
            };
            let found = [text.as_str(), text.trim()]
                .into_iter()
                .filter(|t| !t.is_empty())
                .find_map(|t| rendered[cursor..].find(t).map(|at| (cursor + at, t.len())));
            let Some((start, len)) = found else {
                continue;
            };
            cursor = start + len;
            if turn.role == Role::User {
                let c0 = rendered[..start].chars().count();
                ranges.push(c0..c0 + rendered[start..cursor].chars().count());
            }
        }
    }
    ranges
}

/// Where the user text and every occurrence of each needle are in the tokens of `rendered`.
fn layout(
    rendered: &str,
    tokens: &PromptTokens,
    turns: &[ChatTurn],
    needles: &[String],
) -> PromptLayout {
    let ranges = user_text_ranges(rendered, turns);
    let chars: Vec<(usize, char)> = rendered.char_indices().collect();
    let char_at = |byte: usize| chars.partition_point(|&(b, _)| b < byte);
    let user_text = ranges
        .iter()
        .filter_map(|r| tokens.token_span_of_chars(r.clone()))
        .collect();
    let needles = needles
        .iter()
        .map(|needle| {
            let mut spans = Vec::new();
            for r in &ranges {
                let (b0, b1) = (
                    chars[r.start].0,
                    chars.get(r.end).map_or(rendered.len(), |c| c.0),
                );
                for (at, m) in rendered[b0..b1].match_indices(needle.as_str()) {
                    let c0 = char_at(b0 + at);
                    let c1 = char_at(b0 + at + m.len());
                    spans.extend(tokens.token_span_of_chars(c0..c1));
                }
            }
            spans
        })
        .collect();
    PromptLayout { user_text, needles }
}

impl DiagnosticsProcessor for LlavaProcessor {
    fn num_layers(&self) -> usize {
        self.model.config().text.num_hidden_layers
    }

    fn caption_prompt(
        &self,
        turns: &[ChatTurn],
        caption: &str,
    ) -> Result<CaptionPrompt, ProcessError> {
        self.build_caption_prompt(turns, caption)
    }

    fn refusal_set(&self, spec: &RefusalTokens) -> Result<RefusalSet, String> {
        RefusalSet::resolve(spec, self.tokenizer.inner()).map_err(|e| match e {
            ModelError::InvalidInput(message) => message,
            other => other.to_string(),
        })
    }
}

impl PromptProcessor for LlavaProcessor {
    fn diagnostics(&self) -> Option<&dyn DiagnosticsProcessor> {
        Some(self)
    }

    fn constraints(&self) -> Option<&ConstraintCompiler> {
        self.constraints.as_ref()
    }

    fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.config().text.vocab_size)
    }

    fn retrieve(&self, bytes: &[u8]) -> Result<Option<Retrieved>, ProcessError> {
        let Some(retriever) = &self.retriever else {
            return Ok(None);
        };
        retriever
            .retrieve(bytes, &self.limits)
            .map(Some)
            .map_err(image_error)
    }

    fn probe_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError> {
        let (h, w) = probe_image(bytes, &self.limits).map_err(image_error)?;
        Ok(ImageInput {
            image_size: (h, w),
            num_tokens: self.model.image_token_count(h, w),
            shape: Vec::new(),
            pixel_values: Vec::new(),
        })
    }

    fn prepare_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError> {
        let img = decode_image(bytes, &self.limits).map_err(image_error)?;
        let p = preprocess(&img, self.model.preprocess_config()).map_err(image_error)?;
        let (h, w) = p.original_hw;
        let (vh, vw) = p.size;
        Ok(ImageInput {
            image_size: (h, w),
            num_tokens: self.model.image_token_count(h, w),
            shape: vec![p.n_views, 3, vh as usize, vw as usize],
            pixel_values: p.pixel_values,
        })
    }

    fn build_prompt(
        &self,
        turns: &[ChatTurn],
        images: Vec<ImageInput>,
        needles: &[String],
    ) -> Result<Prompt, ProcessError> {
        // Images appear in the prompt in the order of their parts; the parts index `images`.
        let order = image_order(turns);
        let mut slots: Vec<Option<ImageInput>> = images.into_iter().map(Some).collect();
        let mut ordered = Vec::with_capacity(order.len());
        for i in order {
            let img = slots.get_mut(i).and_then(Option::take).ok_or_else(|| {
                ProcessError::Internal(format!("image part {i} has no (or a reused) image"))
            })?;
            ordered.push(img);
        }
        let counts: Vec<usize> = ordered.iter().map(|i| i.num_tokens).collect();
        let (rendered, tokens) = self.tokens(turns, &counts)?;
        let layout = layout(&rendered, &tokens, turns, needles);
        Ok(Prompt {
            token_ids: tokens.ids,
            image_spans: tokens.image_spans,
            images: ordered,
            layout,
        })
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ProcessError> {
        self.tokenizer
            .encode_hf(text, add_special_tokens)
            .map(|encoded| encoded.ids)
            .map_err(|e| ProcessError::Internal(e.to_string()))
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, ProcessError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ProcessError::Internal(e.to_string()))
    }

    fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| self.tokenizer.id_to_token(id).unwrap_or_default())
            .collect()
    }

    fn tokenizer_vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    fn image_token_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(IMAGE_PLACEHOLDER)
    }
}

fn image_error(e: ModelError) -> ProcessError {
    match e {
        ModelError::UnsupportedImageFormat(_)
        | ModelError::ImageBytesTooLarge { .. }
        | ModelError::ImageTooLarge { .. }
        | ModelError::ImageDecode(_)
        | ModelError::InvalidInput(_) => ProcessError::InvalidImage(e.to_string()),
        other => ProcessError::Internal(other.to_string()),
    }
}

/// Engine-side half.
pub struct LlavaBackend {
    model: Arc<LlavaModel>,
    tokenizer: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
    /// Template and tokenizer for the prompts the diagnostics build on the engine thread (the
    /// caption pass, the model's own caption).
    prompts: LlavaProcessor,
    /// The logit lens over this model's final norm and unembedding (DIAGNOSTICS.md §1).
    lens: Option<LogitLens>,
    /// Per vocabulary id, the byte of a byte-fallback piece (`<0x41>` → 0x41).
    byte_tokens: Vec<Option<u8>>,
    /// [`LoadedModel::sampled_vocab`].
    sampled_vocab: Option<usize>,
    /// Whether decode steps sample on the model's device.
    device_sampling: DeviceSampling,
}

/// Where a decode step's draws are made ([`LlavaBackend::decode_batch_sampled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSampling {
    /// On the host, from the logits copied back.
    Off,
    /// On the device, once its start-up check passes ([`model::device_sampling::self_check`]).
    Unchecked,
    /// On the device (the check passed).
    On,
}

impl DeviceSampling {
    /// The default for a model on `device`: on CUDA, on; on the CPU (where the logits already
    /// are on the host), off. `TGA_DEVICE_SAMPLING=0` turns it off, `=1` on anywhere (on the CPU
    /// the op is the kernel's Rust model: for tests).
    pub fn for_device(device: &Device) -> Self {
        match std::env::var("TGA_DEVICE_SAMPLING").as_deref() {
            Ok("0" | "off" | "false") => Self::Off,
            Ok("1" | "on" | "true") => Self::Unchecked,
            _ if device.is_cuda() => Self::Unchecked,
            _ => Self::Off,
        }
    }
}

impl LlavaBackend {
    pub fn new(loaded: &LoadedModel) -> Self {
        let decoder = loaded.model.decoder();
        let norm = decoder.final_norm();
        let lens = LogitLens::new(
            norm.weight().clone(),
            norm.eps(),
            decoder.lm_head_weight().clone(),
        )
        .map_err(|e| tracing::warn!(error = %e, "no logit lens: diagnostics are unavailable"))
        .ok();
        Self {
            model: loaded.model.clone(),
            tokenizer: loaded.tokenizer.clone(),
            stop_ids: loaded.tokenizer.eos_id().into_iter().collect(),
            prompts: LlavaProcessor::new(loaded, ImageLimits::default()),
            lens,
            byte_tokens: byte_tokens(&loaded.tokenizer),
            sampled_vocab: loaded.sampled_vocab,
            device_sampling: DeviceSampling::for_device(loaded.model.device()),
        }
    }

    /// Overrides where decode steps sample ([`DeviceSampling::for_device`] by default).
    pub fn with_device_sampling(mut self, mode: DeviceSampling) -> Self {
        self.device_sampling = mode;
        self
    }

    /// Whether this step samples on the device, running the start-up check first.
    fn samples_on_device(&mut self) -> bool {
        if self.device_sampling == DeviceSampling::Unchecked {
            let vocab = self.model.config().text.vocab_size;
            self.device_sampling = match model::device_sampling::self_check(
                self.model.device(),
                DType::F32,
                vocab,
            ) {
                Ok(rows) => {
                    tracing::info!(rows, vocab, "device sampling: start-up check passed");
                    DeviceSampling::On
                }
                Err(e) => {
                    tracing::error!(error = %e, "device sampling failed its start-up check; sampling on the host");
                    DeviceSampling::Off
                }
            };
        }
        self.device_sampling == DeviceSampling::On
    }

    /// One short text and image request through the whole path, so the first user does not pay
    /// for lazy initialisation; with CUDA graphs on, the decode graphs of every batch size up to
    /// `max_batch` (the engine's `--max-num-seqs`).
    pub fn warm_up(&mut self, max_batch: usize) -> Result<(), BackendError> {
        let mut cache = self.new_cache();
        let bos = self.tokenizer.bos_id().unwrap_or(1);
        let prompt = Prompt {
            token_ids: vec![bos, bos],
            image_spans: vec![],
            images: vec![],
            layout: PromptLayout::default(),
        };
        let input = PrefillInput {
            prompt: &prompt,
            generated: &[],
        };
        let logits = self
            .prefill(&input, input.len(), &mut cache)?
            .ok_or_else(|| BackendError::new("warm-up prefill gave no logits"))?;
        let tok = argmax(&logits) as u32;
        self.decode_batch(&[tok], &mut [&mut cache])?;
        // The device sampler's start-up check, and with TGA_CUDA_GRAPHS=1 every bucket's decode
        // graph, here rather than in the first requests' steps.
        self.samples_on_device();
        let buckets = self
            .model
            .decoder()
            .warm_decode_graphs(max_batch)
            .map_err(internal)?;
        if !buckets.is_empty() {
            let (mode, _) = self.model.decoder().decode_graphs();
            tracing::info!(?buckets, ?mode, "static decode steps ready");
        }
        Ok(())
    }

    /// Each image's features (projector output, anyres-packed) with the span it fills.
    fn encode_images(&self, prompt: &Prompt) -> Result<Vec<(Range<usize>, Tensor)>, BackendError> {
        self.encode_images_from(prompt, 0)
    }

    /// [`Self::encode_images`] for the images that reach past position `start` (a prefill
    /// resuming there, after a reused prefix, needs no other).
    fn encode_images_from(
        &self,
        prompt: &Prompt,
        start: usize,
    ) -> Result<Vec<(Range<usize>, Tensor)>, BackendError> {
        let mut images = Vec::with_capacity(prompt.images.len());
        for (img, span) in prompt.images.iter().zip(&prompt.image_spans) {
            if span.end <= start {
                continue;
            }
            let pv = Tensor::from_slice(&img.pixel_values, img.shape.as_slice(), &Device::Cpu)
                .map_err(internal)?;
            let feats = self
                .model
                .encode_image(&model::llava::ImageInput {
                    pixel_values: pv,
                    original_hw: img.image_size,
                })
                .map_err(internal)?;
            images.push((span.clone(), feats));
        }
        Ok(images)
    }

    /// The model's own caption of the request's images (DIAGNOSTICS.md §3): one user turn with
    /// the images and "Describe this image.", greedy (lowest id on ties, as `torch.argmax`),
    /// at most `max_tokens` tokens, stopped at EOS, special tokens skipped, trimmed.
    fn model_caption(
        &self,
        prompt: &Prompt,
        images: &[(Range<usize>, Tensor)],
        max_tokens: usize,
    ) -> Result<String, BackendError> {
        let mut parts: Vec<TurnPart> = (0..images.len()).map(TurnPart::Image).collect();
        parts.push(TurnPart::Text(DESCRIBE_PROMPT.into()));
        let turns = [ChatTurn {
            retrieved: None,
            role: Role::User,
            parts,
        }];
        let counts: Vec<usize> = prompt.images.iter().map(|i| i.num_tokens).collect();
        let (_, tokens) = self.prompts.tokens(&turns, &counts).map_err(internal)?;
        let feats: Vec<(Range<usize>, Tensor)> = tokens
            .image_spans
            .iter()
            .zip(images)
            .map(|(span, (_, feats))| (span.clone(), feats.clone()))
            .collect();
        let mut cache = self.model.new_cache();
        let out = self
            .model
            .prefill(&tokens.ids, &feats, &mut cache, &LayerTaps::default())
            .map_err(internal)?;
        let mut logits = row(&out.logits)?;
        let mut ids = Vec::new();
        while ids.len() < max_tokens {
            let next = argmax(&logits) as u32;
            if self.stop_ids.contains(&next) {
                break;
            }
            ids.push(next);
            if ids.len() == max_tokens {
                break;
            }
            let step = self
                .model
                .decode_step(&[next], &mut [&mut cache])
                .map_err(internal)?;
            logits = row(&step)?;
        }
        let text = self.tokenizer.decode(&ids, true).map_err(internal)?;
        Ok(text.trim().to_string())
    }

    /// The caption pass: pooled states `[N+1, H]` of the caption tokens (the alignment vector)
    /// and of the `text_span` pooling (the cosine's text side).
    /// `prepared`: the prompt validation already built for this caption, if any.
    fn caption_pass(
        &self,
        turns: &[ChatTurn],
        caption: &str,
        pooling: CaptionPooling,
        prepared: Option<&CaptionPrompt>,
    ) -> Result<CaptionStates, BackendError> {
        let built;
        let CaptionPrompt { ids, caption_spans } = match prepared {
            Some(prompt) => prompt,
            None => {
                built = self
                    .prompts
                    .build_caption_prompt(turns, caption)
                    .map_err(internal)?;
                &built
            }
        };
        let caption_spans = caption_spans.clone();
        let pooled_text = match pooling {
            CaptionPooling::Caption => caption_spans.clone(),
            CaptionPooling::AfterImage => {
                let start = caption_spans[0].start;
                // The caption stands where the image stood: "after the image" starts there.
                let span = after_image_span(std::slice::from_ref(&(start..start)), ids.len());
                if span.is_empty() {
                    return Err(BackendError::new(
                        "the caption pass has no tokens after the caption start",
                    ));
                }
                vec![span]
            }
        };
        let mut spans = caption_spans.clone();
        spans.extend(pooled_text.iter().cloned());
        let taps = LayerTaps {
            pooled_spans: spans,
            ..Default::default()
        };
        let mut cache = self.model.new_cache();
        let out = self
            .model
            .prefill(ids, &[], &mut cache, &taps)
            .map_err(internal)?;
        let pooled = out
            .taps
            .pooled
            .ok_or_else(|| BackendError::new("the caption pass recorded no pooled states"))?;
        let k = caption_spans.len();
        let caption_states = span_mean(&pooled.narrow(1, 0, k).map_err(internal)?, &caption_spans)
            .map_err(internal)?;
        let text_states = match pooling {
            CaptionPooling::Caption => caption_states.clone(),
            CaptionPooling::AfterImage => {
                span_mean(&pooled.narrow(1, k, 1).map_err(internal)?, &pooled_text)
                    .map_err(internal)?
            }
        };
        Ok(CaptionStates {
            pass: CaptionPass {
                prompt_tokens: ids.len(),
                caption_spans,
                pooled_spans: pooled_text,
            },
            caption_states,
            text_states,
        })
    }
}

/// What the caption pass gives the request pass.
struct CaptionStates {
    pass: CaptionPass,
    /// `[N+1, H]`: mean caption-token state per layer (the alignment vector T).
    caption_states: Tensor,
    /// `[N+1, H]`: mean state of the `text_span` tokens per layer.
    text_states: Tensor,
}

/// SentencePiece's byte-fallback pieces `<0x00>`..`<0xFF>`: their byte, by id.
fn byte_tokens(tokenizer: &Tokenizer) -> Vec<Option<u8>> {
    let mut bytes = vec![None; tokenizer.vocab_size()];
    for b in 0..=255u8 {
        if let Some(id) = tokenizer.token_to_id(&format!("<0x{b:02X}>")) {
            if let Some(slot) = bytes.get_mut(id as usize) {
                *slot = Some(b);
            }
        }
    }
    bytes
}

/// The only row of `[1, V]` logits.
fn row(logits: &Tensor) -> Result<Vec<f32>, BackendError> {
    logits
        .i(0)
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(e)
}

/// One sequence's state in [`LlavaBackend`]: its KV cache and, while its prompt is prefilled in
/// chunks, the input embeddings of the positions still to run (images encoded once).
pub struct LlavaCache {
    kv: KvCache,
    /// Embeddings of positions `from..` of the input being prefilled.
    pending: Option<(usize, Tensor)>,
    /// A diagnosed prefill between its chunks.
    diagnosed: Option<Box<DiagnosedPrefill>>,
}

impl SequenceCache for LlavaCache {
    fn table(&self) -> &BlockTable {
        self.kv.table()
    }
    fn table_mut(&mut self) -> &mut BlockTable {
        self.kv.table_mut()
    }
    fn len(&self) -> usize {
        self.kv.len()
    }
    fn reuse_prefix(&mut self, hashes: &[u64]) -> usize {
        self.kv.reuse_prefix(hashes)
    }
    fn fork(&self) -> Self {
        debug_assert!(
            self.pending.is_none() && self.diagnosed.is_none(),
            "a prefill in progress is not forked"
        );
        Self {
            kv: self.kv.fork(),
            pending: None,
            diagnosed: None,
        }
    }
}

impl LlavaBackend {
    /// Input embeddings of positions `start..` of `input`; only the images that reach into
    /// them are encoded (a reused prefix's are not).
    fn embed_from(&self, input: &PrefillInput, start: usize) -> Result<Tensor, BackendError> {
        let prompt = input.prompt;
        let mut ids: Vec<u32> = (0..input.len()).map(|p| input.token(p)).collect();
        for span in prompt.image_spans.iter().filter(|s| s.end <= start) {
            // Not run: any id will do under the span (its embedding is sliced off).
            ids[span.clone()].fill(0);
        }
        let images = self.encode_images_from(prompt, start)?;
        let embeds = self.model.embed_prompt(&ids, &images).map_err(internal)?;
        embeds
            .narrow(0, start, input.len() - start)
            .map_err(internal)
    }
}

/// A diagnosed prefill in progress: what its first chunk prepared for the others.
struct DiagnosedPrefill {
    taps: LayerTaps,
    acc: TapAccumulator,
    caption: Option<String>,
    caption_pass: Option<CaptionStates>,
    warnings: Vec<String>,
    /// The whole prompt's input embeddings.
    embeds: Tensor,
}

impl LlavaBackend {
    /// The first chunk's work: the images encoded, the caption (given, or the model's own), the
    /// caption pass, and the taps and interventions of the request pass.
    fn begin_diagnosed(
        &self,
        prompt: &Prompt,
        plan: &DiagnosePlan,
    ) -> Result<DiagnosedPrefill, BackendError> {
        let images = self.encode_images(prompt)?;
        let mut warnings = Vec::new();

        let caption = match &plan.caption {
            CaptionPlan::None => None,
            CaptionPlan::Given(caption) => Some(caption.clone()),
            CaptionPlan::Model { max_tokens } => {
                let caption = self.model_caption(prompt, &images, *max_tokens)?;
                if caption.is_empty() {
                    warnings.push(
                        "the model's own caption came out empty: no caption pass, cosines and alignment omitted"
                            .to_string(),
                    );
                    None
                } else {
                    Some(caption)
                }
            }
        };
        let caption_pass = caption
            .as_deref()
            .map(|c| {
                // Only a given caption's prompt was built at validation.
                let prepared = match &plan.caption {
                    CaptionPlan::Given(_) => plan.caption_prompt.as_ref(),
                    _ => None,
                };
                self.caption_pass(&plan.turns, c, plan.caption_pooling, prepared)
            })
            .transpose()?;

        // The request pass: the lens position's states, its attention rows, the pooled image
        // states, and the interventions.
        let last = prompt.len() - 1;
        let mut taps = LayerTaps {
            hidden_positions: vec![last],
            attention_queries: vec![last],
            pooled_spans: prompt.image_spans.clone(),
            ..Default::default()
        };
        if let Some(mask) = &plan.mask {
            taps.mask_keys = Some(KeyMask {
                layers: mask.layers.clone(),
                spans: mask.spans.clone(),
            });
        }
        if let (Some(align), Some(pass)) = (&plan.align, &caption_pass) {
            for &layer in &align.layers {
                taps.state_edits.push(StateEdit {
                    after_layer: layer,
                    positions: prompt.image_spans.clone(),
                    vector: pass.caption_states.get(layer).map_err(internal)?,
                    mode: align.mode,
                });
            }
        }
        let embeds = self
            .model
            .embed_prompt(&prompt.token_ids, &images)
            .map_err(internal)?;
        Ok(DiagnosedPrefill {
            acc: TapAccumulator::new(&taps),
            taps,
            caption,
            caption_pass,
            warnings,
            embeds,
        })
    }

    /// The diagnosis of a finished diagnosed prefill: the logit lens at the last position, the
    /// attention shares, the image–caption cosines, the per-layer records and the summary.
    fn finish_diagnosed(
        &self,
        prompt: &Prompt,
        plan: &DiagnosePlan,
        out: PrefillOutput,
        caption: Option<String>,
        caption_pass: Option<CaptionStates>,
        warnings: Vec<String>,
    ) -> Result<(Vec<f32>, Diagnosis), BackendError> {
        let lens = self
            .lens
            .as_ref()
            .ok_or_else(|| BackendError::new("this model has no logit lens"))?;
        let n = plan.n_layers;
        let hidden = out
            .taps
            .hidden
            .as_ref()
            .ok_or_else(|| BackendError::new("no hidden states recorded"))?
            .squeeze(1)
            .map_err(internal)?;
        let lens_report = lens
            .report(&hidden, plan.lens, &plan.refusal)
            .map_err(internal)?;
        let rows = out
            .taps
            .attention
            .iter()
            .map(|a| a.squeeze(1))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(internal)?;
        let attention = Tensor::stack(&rows, 0).map_err(internal)?; // [N, heads, keys]
        let shares =
            AttentionShares::compute(&attention, &plan.image_spans, &plan.text_spans, &plan.focus)
                .map_err(internal)?;
        let cosines = match (&caption_pass, &out.taps.pooled) {
            (Some(pass), Some(pooled)) => Some(
                cosine_per_layer(
                    &span_mean(pooled, &prompt.image_spans).map_err(internal)?,
                    &pass.text_states,
                )
                .map_err(internal)?,
            ),
            _ => None,
        };
        let mut layers = layer_records(
            n,
            Some(&lens_report),
            Some(&shares),
            cosines.as_deref(),
            self.tokenizer.inner(),
        );
        // Shares of spans a request does not have do not apply (null, not 0).
        for record in &mut layers {
            if plan.image_spans.is_empty() {
                record.attn_image = None;
            }
            if plan.text_spans.is_empty() {
                record.attn_text = None;
            }
        }
        let summary = Summary::new(&layers, Some(&lens_report), plan.band, plan.modality);
        let logits = row(&out.logits)?;
        Ok((
            logits,
            Diagnosis {
                layers,
                summary,
                caption,
                caption_pass: caption_pass.map(|p| p.pass),
                warnings,
            },
        ))
    }
}

impl ModelBackend for LlavaBackend {
    type Cache = LlavaCache;
    type Sampler = LlavaSampler;

    fn kv_blocks(&self) -> KvBlocks {
        self.model.decoder().kv_blocks().clone()
    }

    fn new_cache(&self) -> LlavaCache {
        LlavaCache {
            kv: self.model.new_cache(),
            pending: None,
            diagnosed: None,
        }
    }

    fn prefill(
        &mut self,
        input: &PrefillInput,
        end: usize,
        cache: &mut LlavaCache,
    ) -> Result<Option<Vec<f32>>, BackendError> {
        let start = cache.kv.len();
        if start >= end || end > input.len() {
            return Err(BackendError::new(format!(
                "prefill of positions {start}..{end} of a {}-position input",
                input.len()
            )));
        }
        let (from, embeds) = match cache.pending.take() {
            Some((from, e)) if from <= start => (from, e),
            _ => (start, self.embed_from(input, start)?),
        };
        let chunk = embeds
            .narrow(0, start - from, end - start)
            .map_err(internal)?;
        let out = self
            .model
            .decoder()
            .prefill(&chunk, &mut cache.kv, &LayerTaps::default())
            .map_err(internal)?;
        if end < input.len() {
            cache.pending = Some((from, embeds));
            return Ok(None);
        }
        Ok(Some(row(&out.logits)?))
    }

    fn prefill_diagnosed(
        &mut self,
        prompt: &Prompt,
        plan: &DiagnosePlan,
        end: usize,
        cache: &mut LlavaCache,
    ) -> Result<Option<(Vec<f32>, Diagnosis)>, BackendError> {
        let start = cache.kv.len();
        if start >= end || end > prompt.len() {
            return Err(BackendError::new(format!(
                "diagnosed prefill of positions {start}..{end} of a {}-position prompt",
                prompt.len()
            )));
        }
        let mut progress = match cache.diagnosed.take() {
            Some(progress) => progress,
            None if start == 0 => Box::new(self.begin_diagnosed(prompt, plan)?),
            None => {
                return Err(BackendError::new(
                    "a diagnosed prefill must start at position 0",
                ))
            }
        };
        let chunk = progress
            .embeds
            .narrow(0, start, end - start)
            .map_err(internal)?;
        let last = end == prompt.len();
        let logits = self
            .model
            .decoder()
            .prefill_chunk(
                &chunk,
                &mut cache.kv,
                &progress.taps,
                &mut progress.acc,
                last,
            )
            .map_err(internal)?;
        if !last {
            cache.diagnosed = Some(progress);
            return Ok(None);
        }
        let DiagnosedPrefill {
            taps,
            acc,
            caption,
            caption_pass,
            warnings,
            ..
        } = *progress;
        let out = PrefillOutput {
            logits: logits.ok_or_else(|| BackendError::new("the last chunk gave no logits"))?,
            taps: acc.finish(&taps, prompt.len()).map_err(internal)?,
        };
        self.finish_diagnosed(prompt, plan, out, caption, caption_pass, warnings)
            .map(Some)
    }
    fn decode_batch(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut LlavaCache],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut kvs: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c.kv).collect();
        self.model
            .decode_step(tokens, &mut kvs)
            .map_err(internal)?
            .to_vec2::<f32>()
            .map_err(internal)
    }

    fn decode_batch_sampled(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut LlavaCache],
        draws: &[Option<DrawSpec>],
    ) -> Result<Vec<StepRow>, BackendError> {
        let mut kvs: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c.kv).collect();
        let logits = self.model.decode_step(tokens, &mut kvs).map_err(internal)?;
        let on_device: Vec<u32> = (0..draws.len() as u32)
            .filter(|&i| draws[i as usize].is_some())
            .collect();
        if on_device.is_empty() || !self.samples_on_device() {
            let rows = logits.to_vec2::<f32>().map_err(internal)?;
            return Ok(rows.into_iter().map(StepRow::Logits).collect());
        }
        let rows_of = |ids: &[u32]| -> Result<Tensor, BackendError> {
            if ids.len() == draws.len() {
                return Ok(logits.clone());
            }
            let ids = Tensor::new(ids, logits.device()).map_err(internal)?;
            logits.index_select(&ids, 0).map_err(internal)
        };
        let specs: Vec<DrawSpec> = draws.iter().flatten().copied().collect();
        let limit = self.sampled_vocab.unwrap_or(usize::MAX);
        let sampled = model::device_sampling::sample_rows(&rows_of(&on_device)?, &specs, limit)
            .map_err(internal)?;
        // A row the device could not sample (a NaN) goes back as logits: its sequence fails on
        // the host with the host's error, alone.
        let mut out: Vec<Option<StepRow>> = vec![None; draws.len()];
        let mut host: Vec<u32> = Vec::new();
        for (&i, token) in on_device.iter().zip(sampled) {
            match token {
                Ok(token) => out[i as usize] = Some(StepRow::Sampled(token)),
                Err(_) => host.push(i),
            }
        }
        host.extend((0..draws.len() as u32).filter(|&i| draws[i as usize].is_none()));
        host.sort_unstable();
        if !host.is_empty() {
            let rows = rows_of(&host)?.to_vec2::<f32>().map_err(internal)?;
            for (&i, row) in host.iter().zip(rows) {
                out[i as usize] = Some(StepRow::Logits(row));
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every row placed"))
            .collect())
    }

    fn sampler(&self, params: &SamplingParams, prompt: &[u32]) -> LlavaSampler {
        LlavaSampler {
            sampler: Sampler::for_sequence(params.clone(), prompt, &self.stop_ids),
            sampled_vocab: self.sampled_vocab,
        }
    }

    fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    fn is_byte_token(&self, id: u32) -> bool {
        self.byte_tokens
            .get(id as usize)
            .is_some_and(|b| b.is_some())
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.byte_tokens.get(id as usize) {
            Some(&Some(b)) => vec![b],
            _ => self.decode_text(&[id]).into_bytes(),
        }
    }

    fn decode_text(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    fn decode_text_with_special(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}

pub struct LlavaSampler {
    sampler: Sampler,
    sampled_vocab: Option<usize>,
}

impl LlavaSampler {
    /// `logits` with the rows past the sampled vocabulary at −inf (rather than a shorter row, so
    /// that ids past it, a logit_bias, stay in range and the logprobs are normalised over the
    /// ids that can be drawn).
    fn masked<'a>(&self, logits: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.sampled_vocab {
            Some(n) if n < logits.len() => {
                let mut row = logits.to_vec();
                row[n..].fill(f32::NEG_INFINITY);
                row.into()
            }
            _ => logits.into(),
        }
    }
}

impl TokenSampler for LlavaSampler {
    fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError> {
        let row = self.masked(logits);
        self.sampler.sample_logits(&row).map_err(internal)
    }

    fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    fn device_draw(&mut self) -> Option<DrawSpec> {
        self.sampler.device_draw()
    }

    fn accept(&mut self, token: &SampledToken) {
        self.sampler.accept(token)
    }

    fn sample_with(
        &mut self,
        logits: &[f32],
        spec: &DrawSpec,
    ) -> Result<SampledToken, BackendError> {
        let row = self.masked(logits);
        self.sampler
            .sample_logits_with(&row, spec)
            .map_err(internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_past_the_sampled_vocabulary_are_never_drawn() {
        // Row 5 is the largest, but only ids 0..3 stand for text.
        let logits = [0.0, 1.0, 0.5, 0.0, 0.0, 9.0];
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (2.0, 3)] {
            let mut sampler = LlavaSampler {
                sampler: Sampler::new(SamplingParams {
                    temperature,
                    seed: Some(seed),
                    ..SamplingParams::default()
                }),
                sampled_vocab: Some(3),
            };
            for _ in 0..20 {
                let token = sampler.sample(&logits).unwrap();
                assert!(token.id < 3, "drew row {}", token.id);
                assert!(token.logprob.is_finite());
            }
        }
        let mut unmasked = LlavaSampler {
            sampler: Sampler::new(SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            }),
            sampled_vocab: None,
        };
        assert_eq!(unmasked.sample(&logits).unwrap().id, 5);
    }

    /// The built-in tiny model's shapes with random weights, f32 on the CPU.
    fn tiny_random() -> LoadedModel {
        let spec = RandomModelSpec::parse("tiny").unwrap();
        load_random(
            &spec,
            1,
            Some(DType::F32),
            Default::default(),
            None,
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Decode steps sampled on the "device" (the op's Rust model on the CPU) give the tokens
    /// and logprobs of the host sampler with the same seeds, for rows drawn on the device and
    /// rows that stay on the host (a penalty) in one batch.
    #[test]
    fn device_sampling_draws_the_host_samplers_tokens() {
        let loaded = tiny_random();
        let params = [
            SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: 50,
                seed: Some(5),
                logprobs: true,
                top_logprobs: 3,
                ..SamplingParams::default()
            },
            SamplingParams {
                seed: Some(6),
                ..SamplingParams::default()
            },
            SamplingParams::greedy(),
            SamplingParams {
                presence_penalty: 1.5,
                seed: Some(7),
                ..SamplingParams::default()
            },
        ];
        let run = |mode: DeviceSampling| {
            let mut backend = LlavaBackend::new(&loaded).with_device_sampling(mode);
            let prompt = Prompt {
                token_ids: vec![1, 5, 9, 13, 21],
                image_spans: vec![],
                images: vec![],
                layout: PromptLayout::default(),
            };
            let input = PrefillInput {
                prompt: &prompt,
                generated: &[],
            };
            let mut caches: Vec<LlavaCache> = params.iter().map(|_| backend.new_cache()).collect();
            let mut samplers: Vec<LlavaSampler> = params
                .iter()
                .map(|p| backend.sampler(p, &prompt.token_ids))
                .collect();
            let mut last = Vec::new();
            for (cache, sampler) in caches.iter_mut().zip(&mut samplers) {
                let logits = backend
                    .prefill(&input, input.len(), cache)
                    .unwrap()
                    .unwrap();
                last.push(sampler.sample(&logits).unwrap().id);
            }
            let (mut tokens, mut on_device) = (Vec::new(), 0);
            for _ in 0..8 {
                let draws: Vec<_> = samplers.iter_mut().map(|s| s.device_draw()).collect();
                let mut refs: Vec<&mut LlavaCache> = caches.iter_mut().collect();
                let rows = backend
                    .decode_batch_sampled(&last, &mut refs, &draws)
                    .unwrap();
                last.clear();
                for ((row, draw), sampler) in rows.into_iter().zip(&draws).zip(&mut samplers) {
                    let token = match (row, draw) {
                        (StepRow::Sampled(t), _) => {
                            on_device += 1;
                            sampler.accept(&t);
                            t
                        }
                        (StepRow::Logits(l), Some(d)) => sampler.sample_with(&l, d).unwrap(),
                        (StepRow::Logits(l), None) => sampler.sample(&l).unwrap(),
                    };
                    last.push(token.id);
                    tokens.push(token);
                }
            }
            (tokens, on_device)
        };
        let (host, none) = run(DeviceSampling::Off);
        let (device, some) = run(DeviceSampling::Unchecked);
        assert_eq!(
            (none, some),
            (0, 8 * 3),
            "the penalised row stays on the host"
        );
        assert_eq!(host.len(), device.len());
        for (h, d) in host.iter().zip(&device) {
            assert_eq!(h.id, d.id);
            assert!((h.logprob - d.logprob).abs() < 1e-5, "{h:?} {d:?}");
            let ids = |t: &SampledToken| t.top_logprobs.iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(ids(h), ids(d));
        }
    }

    #[test]
    fn a_random_model_uses_the_builtin_tokenizer_and_masks_the_rows_it_lacks() {
        let loaded = tiny_random();
        assert_eq!(loaded.sampled_vocab, Some(loaded.tokenizer.vocab_size()));
        assert_eq!(loaded.tokenizer.vocab_size(), 1001);
        assert_eq!(loaded.model.config().text.vocab_size, 1024);
        assert_eq!(
            loaded.model.config().image_token_index,
            loaded.tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        );
        // The 7B preset's config says 32000; prompts carry the tokenizer's <image> id.
        let big = RandomModelSpec::parse("llava-v1.6-mistral-7b").unwrap();
        assert_eq!(big.config.image_token_index, Some(32000));
    }

    #[test]
    fn logprob_bytes_of_byte_fallback_pieces_are_the_raw_byte() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next");
        let loaded = load(
            &dir,
            None,
            Some(DType::F32),
            Default::default(),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let backend = LlavaBackend::new(&loaded);
        // "é" is <0xC3><0xA9> in byte fallback: each piece alone decodes to U+FFFD, but OpenAI's
        // `bytes` must carry the raw byte so that clients can join them.
        for b in [0xC3u8, 0xA9, 0x41] {
            let id = loaded
                .tokenizer
                .token_to_id(&format!("<0x{b:02X}>"))
                .unwrap();
            assert!(backend.is_byte_token(id));
            assert_eq!(backend.token_bytes(id), vec![b]);
        }
        // Ordinary pieces: the UTF-8 of their text.
        let id = loaded.tokenizer.token_to_id("</s>").unwrap_or(2);
        let piece = (0..loaded.tokenizer.vocab_size() as u32)
            .find(|&i| {
                !backend.is_byte_token(i) && i != id && !backend.decode_text(&[i]).is_empty()
            })
            .unwrap();
        assert!(!backend.is_byte_token(piece));
        assert_eq!(
            backend.token_bytes(piece),
            backend.decode_text(&[piece]).into_bytes()
        );
    }
}
