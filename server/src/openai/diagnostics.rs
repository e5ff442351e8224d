//! Safety diagnostics of a request (DIAGNOSTICS.md): the `diagnostics` request object, its
//! validation into a [`DiagnosePlan`] the engine can run, and the report the engine sends back.
//!
//! The math lives in `model::diagnostics`; the engine's backend runs the taps and applies it
//! (`ModelBackend::prefill_diagnosed`). This module only decides *what* to measure (token spans,
//! refusal set, band, interventions) from the request, before anything is queued, so a bad option
//! is a 400 and never reaches the engine.

use std::ops::Range;

use model::diagnostics::{
    Band, LayerRecord, LensMode, Modality, RefusalSet, RefusalTokens, Summary, TokenRef,
    DEFAULT_REFUSAL_PRESET,
};
use model::mistral::EditMode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::backend::{ChatTurn, DiagnosticsProcessor, Role, TurnPart};
use crate::error::ApiError;

/// The name that masks the image tokens in `mask_attention.spans` (the chat templates' own
/// placeholder, so it cannot be confused with user text).
pub const IMAGE_SPAN_NAME: &str = "<image>";
/// Prompt of the model's own caption (`caption_source: "model"`), DIAGNOSTICS.md §3.
pub const DESCRIBE_PROMPT: &str = "Describe this image.";
/// Default bound on a model-generated caption.
pub const DEFAULT_CAPTION_MAX_TOKENS: usize = 48;
/// Largest accepted `caption_max_tokens`.
pub const MAX_CAPTION_MAX_TOKENS: usize = 512;

/// What the output says about its own conventions (DIAGNOSTICS.md: "name every convention").
pub const LAYER_INDEXING: &str = "hf_output_hidden_states: layer 0 = input embeddings (image \
positions hold projector outputs), layer j = output of decoder block j; layer N is taken before \
the final RMSNorm";
const ATTENTION_CONVENTION: &str =
    "softmax row of the last prompt position per block, summed over \
the keys of a span and averaged over heads (the reference code sums over heads: multiply by the \
head count); layer 0 has none";
const LENS_POSITION_CONVENTION: &str = "last prompt position (its prediction is the first answer \
token)";
const COSINE_CONVENTION: &str = "cosine of the mean image-token state of the request pass and the \
mean text-span state of the caption pass, per layer; after interventions when they are on";
const CAPTION_PASS_CONVENTION: &str = "the request's rendered chat template with each <image> \
placeholder replaced by the caption text, tokenized text-only; caption tokens = the tokens \
overlapping the inserted caption; text_span after_image = from the first caption token to the end, \
the last prompt token excluded";
const INTERVENTION_CONVENTION: &str = "mask_attention holds for every query at its layers, the \
generated tokens' included; align_image_states edits the image states of the prompt pass (the \
generated tokens read the edited states' keys and values) and uses the mean caption-token state \
of the caption pass at the same layer";
const TEXT_SPAN_CONVENTION: &str = "attn_text: tokens of the user messages' text; focus and \
mask_attention spans: every occurrence of the substring in that text";

// ---------------------------------------------------------------------------------------------
// The request object (DIAGNOSTICS.md §7)

/// `diagnostics.lens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lens {
    /// `softmax(W_U · RMSNorm_final(h))`: what the TGA code runs for LLaVA-Mistral.
    #[default]
    FinalNorm,
    /// `softmax(W_U · h)`.
    Raw,
}

impl From<Lens> for LensMode {
    fn from(lens: Lens) -> Self {
        match lens {
            Lens::FinalNorm => LensMode::FinalNorm,
            Lens::Raw => LensMode::Raw,
        }
    }
}

/// `diagnostics.refusal_tokens`: a preset name (`apology`, `tga`) or explicit words.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RefusalTokensOption {
    Preset(String),
    Words(Vec<String>),
}

impl From<&RefusalTokensOption> for RefusalTokens {
    fn from(option: &RefusalTokensOption) -> Self {
        match option {
            RefusalTokensOption::Preset(name) => RefusalTokens::Preset(name.clone()),
            RefusalTokensOption::Words(words) => RefusalTokens::Words(words.clone()),
        }
    }
}

/// `diagnostics.caption_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CaptionSource {
    /// The request's `caption`.
    Request,
    /// The served model captions the image itself ("Describe this image.", greedy).
    Model,
    /// No caption: cosines are omitted.
    None,
}

/// `diagnostics.text_span`: which caption-pass tokens are pooled for the cosine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TextSpan {
    /// The caption's tokens (the TGA loss's pooling).
    #[default]
    Caption,
    /// Every token from the caption on except the last (the reference analysis' pooling).
    AfterImage,
}

/// `diagnostics.align_image_states.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlignMode {
    /// `I_k + mean(T)` (the paper's reconstruction experiment).
    #[default]
    Add,
    /// `mean(T)` (the reference code's variant).
    Replace,
}

impl From<AlignMode> for EditMode {
    fn from(mode: AlignMode) -> Self {
        match mode {
            AlignMode::Add => EditMode::Add,
            AlignMode::Replace => EditMode::Replace,
        }
    }
}

/// `diagnostics.mask_attention`: at these blocks no query of the prompt pass attends to the
/// named spans' keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskAttentionOptions {
    /// Decoder blocks 1..=N.
    pub layers: Vec<usize>,
    /// Substrings of the user text (every occurrence), or `"<image>"` for the image tokens.
    pub spans: Vec<String>,
}

/// `diagnostics.align_image_states`: after these blocks every image-token state is moved to (or
/// by) the mean caption-token state of the caption pass at that layer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlignImageStatesOptions {
    /// Decoder blocks 1..=N.
    pub layers: Vec<usize>,
    #[serde(default)]
    pub mode: AlignMode,
}

/// The `diagnostics` object of `/v1/safety/diagnose` and (optionally) chat completions
/// (DIAGNOSTICS.md §7). Unknown fields are refused here, unlike in the OpenAI part of the body,
/// so that a misspelt research option is not silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsOptions {
    /// `final_norm` (default) or `raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lens: Option<Lens>,
    /// `"apology"` (default), `"tga"`, or a list of words resolved through the served tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_tokens: Option<RefusalTokensOption>,
    /// Substrings of the user text whose attention share is reported (`attn_focus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub focus: Option<Vec<String>>,
    /// A caption of the request's image(s); enables the caption pass and the cosines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Default: `request` with a caption, else `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_source: Option<CaptionSource>,
    /// Bound on a model-generated caption, in tokens (default 48).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_max_tokens: Option<usize>,
    /// `caption` (default) or `after_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_span: Option<TextSpan>,
    /// `[lo, hi]`, inclusive layers averaged in the summary (default: the middle third).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub band: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_attention: Option<MaskAttentionOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align_image_states: Option<AlignImageStatesOptions>,
}

// ---------------------------------------------------------------------------------------------
// Server settings

/// The operator's diagnostics settings (`--diagnose-sample-rate`, `--safety-band`,
/// `--safety-layer`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiagnosticsConfig {
    /// Share of ordinary chat requests diagnosed in the background (lens and attention only).
    pub sample_rate: f64,
    /// Layers whose mean cosine feeds `tga_safety_image_text_cosine` and the firehose (default:
    /// the middle third).
    pub band: Option<(usize, usize)>,
    /// The layer whose `p_refusal` feeds `tga_safety_refusal_probability` and the firehose
    /// (default: the band's upper end).
    pub safety_layer: Option<usize>,
}

/// Deterministic sampling of a share of requests: request i is taken when `floor((i+1)·r)`
/// passes an integer, so exactly `r` of any long run is diagnosed, evenly spread.
#[derive(Debug, Default)]
pub struct Sampler {
    seen: std::sync::atomic::AtomicU64,
}

impl Sampler {
    pub fn take(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        let i = self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
        ((i + 1.0) * rate).floor() > (i * rate).floor()
    }
}

// ---------------------------------------------------------------------------------------------
// The plan the engine runs

/// Where the caption of the caption pass comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionPlan {
    None,
    Given(String),
    /// The model captions the image(s) itself, greedy, at most `max_tokens` tokens.
    Model {
        max_tokens: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskPlan {
    /// Blocks 1..=N.
    pub layers: Vec<usize>,
    /// Key positions of the prompt pass.
    pub spans: Vec<Range<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlignPlan {
    /// Blocks 1..=N.
    pub layers: Vec<usize>,
    pub mode: EditMode,
}

/// A validated diagnostics request: every span located, every layer checked.
#[derive(Debug, Clone)]
pub struct DiagnosePlan {
    pub lens: LensMode,
    pub refusal: RefusalSet,
    pub n_layers: usize,
    pub band: Band,
    pub modality: Modality,
    /// Prompt positions of the images (all of them, anyres newlines included).
    pub image_spans: Vec<Range<usize>>,
    /// Prompt positions of the user messages' text.
    pub text_spans: Vec<Range<usize>>,
    /// Per focus item, the prompt positions of its occurrences.
    pub focus: Vec<Vec<Range<usize>>>,
    pub caption: CaptionPlan,
    pub text_span: TextSpan,
    pub mask: Option<MaskPlan>,
    pub align: Option<AlignPlan>,
    /// The conversation, for the caption pass and the model's own caption.
    pub turns: Vec<ChatTurn>,
    /// Whether the client asked for the report (false: a sampled ordinary request, whose report
    /// only feeds the metrics and the firehose).
    pub deliver: bool,
    /// Where the metrics and the firehose read `p_refusal` and the cosine band mean.
    pub safety_layer: usize,
    pub metrics_band: Band,
    /// Everything of the report's meta that is known before the engine runs.
    pub meta: DiagnosticsMeta,
}

/// What the backend measured for one request (records assembled, answer not yet judged).
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub layers: Vec<LayerRecord>,
    pub summary: Summary,
    /// The caption the caption pass used (given or generated); `None` without a caption pass.
    pub caption: Option<String>,
    pub caption_pass: Option<CaptionPassMeta>,
    /// Things the client should know (e.g. an empty model caption disabled the cosines).
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The report (DIAGNOSTICS.md §7)

/// One focus item and where it was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FocusMeta {
    pub text: String,
    /// `[start, end)` prompt positions of its occurrences.
    pub spans: Vec<[usize; 2]>,
}

/// The caption pass: its length and the positions pooled for the cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaptionPassMeta {
    pub prompt_tokens: usize,
    /// `[start, end)` positions of the caption in the caption pass.
    pub caption_spans: Vec<[usize; 2]>,
    /// `[start, end)` positions pooled for the cosine (`text_span`).
    pub pooled_spans: Vec<[usize; 2]>,
}

/// The conventions the numbers follow, spelled out in every report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Conventions {
    pub layer_indexing: String,
    pub lens_position: String,
    pub attention: String,
    pub text_spans: String,
    pub cosine: String,
    pub caption_pass: String,
    pub interventions: String,
    pub arithmetic: String,
}

impl Default for Conventions {
    fn default() -> Self {
        Self {
            layer_indexing: LAYER_INDEXING.into(),
            lens_position: LENS_POSITION_CONVENTION.into(),
            attention: ATTENTION_CONVENTION.into(),
            text_spans: TEXT_SPAN_CONVENTION.into(),
            cosine: COSINE_CONVENTION.into(),
            caption_pass: CAPTION_PASS_CONVENTION.into(),
            interventions: INTERVENTION_CONVENTION.into(),
            arithmetic: "f32 (log-odds and reductions in f64)".into(),
        }
    }
}

/// The options as the server understood them, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResolvedOptions {
    pub lens: Lens,
    pub refusal_tokens: RefusalTokensOption,
    pub focus: Vec<String>,
    pub caption_source: CaptionSource,
    pub caption_max_tokens: Option<usize>,
    pub text_span: TextSpan,
    /// `[lo, hi]`.
    pub band: [usize; 2],
    pub mask_attention: Option<MaskAttentionOptions>,
    pub align_image_states: Option<AlignImageStatesOptions>,
    /// True for an ordinary request diagnosed by `--diagnose-sample-rate`.
    pub sampled: bool,
}

/// The `meta` event / object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiagnosticsMeta {
    pub model: String,
    /// Decoder blocks N; layer records run 0..=N.
    pub n_layers: usize,
    pub lens: Lens,
    /// The resolved refusal set K (`id`, vocabulary entry).
    #[schema(value_type = Vec<TokenRefSchema>)]
    pub refusal_tokens: Vec<TokenRef>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    /// `[start, end)` from the first to the last image position; null without images.
    pub image_span: Option<[usize; 2]>,
    /// Each image's `[start, end)`.
    pub image_spans: Vec<[usize; 2]>,
    /// The user text's `[start, end)` spans (`attn_text`).
    pub text_spans: Vec<[usize; 2]>,
    pub focus: Vec<FocusMeta>,
    pub caption: Option<String>,
    pub caption_source: CaptionSource,
    pub caption_pass: Option<CaptionPassMeta>,
    /// The system message, if the conversation has one.
    pub system_prompt: Option<String>,
    pub options: ResolvedOptions,
    pub conventions: Conventions,
    pub warnings: Vec<String>,
}

/// The diagnostics of one request: `meta`, one record per layer 0..=N, and the summary. Chat
/// completions carry it under `"diagnostics"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiagnosticsReport {
    pub meta: DiagnosticsMeta,
    #[schema(value_type = Vec<LayerRecordSchema>)]
    pub layers: Vec<LayerRecord>,
    #[schema(value_type = SummarySchema)]
    pub summary: Summary,
}

impl DiagnosticsReport {
    /// The plan's meta completed with what the engine found.
    pub fn new(plan: &DiagnosePlan, diagnosis: Diagnosis) -> Self {
        let mut meta = plan.meta.clone();
        meta.caption = diagnosis.caption;
        meta.caption_pass = diagnosis.caption_pass;
        meta.warnings.extend(diagnosis.warnings);
        if meta.caption.is_none() && plan.caption == CaptionPlan::None {
            meta.caption_source = CaptionSource::None;
        }
        Self {
            meta,
            layers: diagnosis.layers,
            summary: diagnosis.summary,
        }
    }

    /// `p_refusal` at `layer`, if the lens ran.
    pub fn p_refusal_at(&self, layer: usize) -> Option<f64> {
        self.layers.get(layer).and_then(|r| r.p_refusal)
    }

    /// Mean cosine over `band`.
    pub fn band_mean_cos(&self, band: Band) -> Option<f64> {
        let cos: Vec<Option<f64>> = self.layers.iter().map(|r| r.cos_image_text).collect();
        band.mean(&cos)
    }
}

// OpenAPI mirrors of the model crate's records (which know nothing of utoipa).

/// A token: `{"id", "text"}` (text = the vocabulary entry, with its `▁`/`Ġ` marker).
#[derive(ToSchema)]
#[schema(as = TokenRef)]
#[allow(dead_code)]
pub struct TokenRefSchema {
    id: u32,
    text: String,
}

/// One layer's record (DIAGNOSTICS.md §7); fields that do not apply are null.
#[derive(ToSchema)]
#[schema(as = LayerRecord)]
#[allow(dead_code)]
pub struct LayerRecordSchema {
    /// 0..=N (HF `output_hidden_states` indexing).
    layer: usize,
    /// `Σ_{x∈K} P_j(x)` under the logit lens.
    p_refusal: Option<f64>,
    /// `log p − log(1−p)`.
    refusal_log_odds: Option<f64>,
    /// `log p_refusal_j − log p_refusal_{j−1}`; null at layer 0.
    d_refusal: Option<f64>,
    top_token: Option<TokenRefSchema>,
    /// `argmax_x log P_j(x) − log P_{j−1}(x)`; null at layer 0.
    top_delta_token: Option<TokenRefSchema>,
    /// Attention share of the image tokens (mean over heads); null at layer 0.
    attn_image: Option<f64>,
    /// Attention share of the user text tokens.
    attn_text: Option<f64>,
    /// Attention share of each focus item, in request order.
    attn_focus: Option<Vec<f64>>,
    /// Image–caption hidden-state cosine.
    cos_image_text: Option<f64>,
}

/// The summary (DIAGNOSTICS.md §7).
#[derive(ToSchema)]
#[schema(as = Summary)]
#[allow(dead_code)]
pub struct SummarySchema {
    /// First j ≥ 2 whose `top_delta_token` is in K (the paper's Algorithm 1).
    activation_layer: Option<usize>,
    /// First j > 1 whose top-5 probability increase holds a token of K (reference code).
    start_layer: Option<usize>,
    /// Last j whose top token is in K (reference code).
    end_layer: Option<usize>,
    /// `[lo, hi]`.
    band: Vec<usize>,
    band_mean_p_refusal: Option<f64>,
    band_mean_cos: Option<f64>,
    /// The judge's verdict on the generated answer; null without one.
    refused: Option<bool>,
    /// The judge used (`jailbreakbench_prefix`).
    judge: Option<String>,
    /// `text`, `image` or `mixed`.
    modality: String,
}

// ---------------------------------------------------------------------------------------------
// Planning

/// The parts of a built prompt the plan needs (not its pixels).
#[derive(Debug, Clone)]
pub struct PromptShape {
    pub len: usize,
    pub image_spans: Vec<Range<usize>>,
    pub image_token_counts: Vec<usize>,
}

fn span_pair(r: &Range<usize>) -> [usize; 2] {
    [r.start, r.end]
}

/// `text` without images; `image` when every user message carries an image; `mixed` when the
/// conversation has user messages with and without images.
pub fn modality(turns: &[ChatTurn]) -> Modality {
    let user: Vec<bool> = turns
        .iter()
        .filter(|t| t.role == Role::User)
        .map(|t| t.parts.iter().any(|p| matches!(p, TurnPart::Image(_))))
        .collect();
    if !user.iter().any(|&has| has) {
        Modality::Text
    } else if user.iter().all(|&has| has) {
        Modality::Image
    } else {
        Modality::Mixed
    }
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(format!("diagnostics.{param}"), message)
}

/// Checks that every layer of `layers` is a block index 1..=N.
fn check_blocks(param: &str, layers: &[usize], n: usize) -> Result<Vec<usize>, ApiError> {
    if layers.is_empty() {
        return Err(invalid(
            param,
            format!("{param} must name at least one layer"),
        ));
    }
    if let Some((i, &bad)) = layers.iter().enumerate().find(|(_, &l)| l == 0 || l > n) {
        return Err(invalid(
            &format!("{param}[{i}]"),
            format!("layer {bad} is out of range: this model's blocks are 1..={n}"),
        ));
    }
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Ok(sorted)
}

/// Validates `options` against the request and the served model, resolving every span and
/// layer. `deliver` is false for a sampled ordinary request.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    dx: &dyn DiagnosticsProcessor,
    options: &DiagnosticsOptions,
    turns: &[ChatTurn],
    prompt: &PromptShape,
    model_id: &str,
    config: &DiagnosticsConfig,
    deliver: bool,
) -> Result<DiagnosePlan, ApiError> {
    let n = dx.num_layers();
    let has_image = !prompt.image_spans.is_empty();

    let band = match &options.band {
        None => Band::middle_third(n),
        Some(b) if b.len() == 2 => Band(b[0], b[1]).validate(n).map_err(|_| {
            invalid(
                "band",
                format!(
                    "band [{}, {}] is out of range: it needs lo <= hi <= {n} (layers are 0..={n})",
                    b[0], b[1]
                ),
            )
        })?,
        Some(b) => {
            return Err(invalid(
                "band",
                format!("band must be [lo, hi], got {} numbers", b.len()),
            ))
        }
    };
    let metrics_band = match config.band {
        Some((lo, hi)) if lo <= hi && hi <= n => Band(lo, hi),
        _ => Band::middle_third(n),
    };
    let safety_layer = config
        .safety_layer
        .filter(|&l| l <= n)
        .unwrap_or(metrics_band.1);

    // Caption and its source.
    let caption_text = match &options.caption {
        Some(c) if c.trim().is_empty() => {
            return Err(invalid("caption", "caption must not be empty"))
        }
        Some(c) if c.contains(IMAGE_SPAN_NAME) => {
            return Err(invalid(
                "caption",
                format!("caption must not contain the image placeholder {IMAGE_SPAN_NAME}"),
            ))
        }
        other => other.clone(),
    };
    let source = options.caption_source.unwrap_or(if caption_text.is_some() {
        CaptionSource::Request
    } else {
        CaptionSource::None
    });
    if caption_text.is_some() && !has_image {
        return Err(invalid(
            "caption",
            "a caption describes the request's image, but the request has no image",
        ));
    }
    let caption = match (source, &caption_text) {
        (CaptionSource::Request, Some(c)) => CaptionPlan::Given(c.clone()),
        (CaptionSource::Request, None) => {
            return Err(invalid(
                "caption_source",
                "caption_source \"request\" needs a caption",
            ))
        }
        (CaptionSource::Model, Some(_)) | (CaptionSource::None, Some(_)) => {
            return Err(invalid(
                "caption_source",
                format!(
                    "caption_source \"{}\" contradicts the given caption (use \"request\" or drop the caption)",
                    if source == CaptionSource::Model { "model" } else { "none" }
                ),
            ))
        }
        (CaptionSource::Model, None) if !has_image => {
            return Err(invalid(
                "caption_source",
                "caption_source \"model\" captions the request's image, but the request has no image",
            ))
        }
        (CaptionSource::Model, None) => CaptionPlan::Model {
            max_tokens: options
                .caption_max_tokens
                .unwrap_or(DEFAULT_CAPTION_MAX_TOKENS),
        },
        (CaptionSource::None, None) => CaptionPlan::None,
    };
    if let Some(m) = options.caption_max_tokens {
        if !(1..=MAX_CAPTION_MAX_TOKENS).contains(&m) {
            return Err(invalid(
                "caption_max_tokens",
                format!(
                    "caption_max_tokens must be between 1 and {MAX_CAPTION_MAX_TOKENS}, got {m}"
                ),
            ));
        }
        if !matches!(caption, CaptionPlan::Model { .. }) {
            return Err(invalid(
                "caption_max_tokens",
                "caption_max_tokens only applies with caption_source \"model\"",
            ));
        }
    }
    let text_span = options.text_span.unwrap_or_default();
    if text_span == TextSpan::AfterImage && caption == CaptionPlan::None {
        return Err(invalid(
            "text_span",
            "text_span \"after_image\" pools the caption pass, which needs a caption (caption or caption_source \"model\")",
        ));
    }

    // Spans of the user text.
    let focus_items = options.focus.clone().unwrap_or_default();
    if let Some(i) = focus_items.iter().position(|f| f.is_empty()) {
        return Err(invalid(
            &format!("focus[{i}]"),
            "focus spans must not be empty",
        ));
    }
    let mask_names: Vec<String> = options
        .mask_attention
        .as_ref()
        .map(|m| m.spans.clone())
        .unwrap_or_default();
    let needles: Vec<String> = focus_items
        .iter()
        .chain(mask_names.iter().filter(|s| s.as_str() != IMAGE_SPAN_NAME))
        .cloned()
        .collect();
    let layout = dx
        .locate(turns, &prompt.image_token_counts, &needles)
        .map_err(|e| ApiError::from_process(e, "messages".into()))?;
    if layout.token_count != prompt.len {
        return Err(ApiError::internal(format!(
            "diagnostics located spans in {} tokens but the prompt has {}",
            layout.token_count, prompt.len
        )));
    }
    let mut located = layout.needles.into_iter();
    let mut focus = Vec::with_capacity(focus_items.len());
    for (i, item) in focus_items.iter().enumerate() {
        let spans = located.next().unwrap_or_default();
        if spans.is_empty() {
            return Err(invalid(
                &format!("focus[{i}]"),
                format!("focus span {item:?} does not occur in the user text"),
            ));
        }
        focus.push(spans);
    }

    // Interventions.
    let mask = match &options.mask_attention {
        None => None,
        Some(m) => {
            let layers = check_blocks("mask_attention.layers", &m.layers, n)?;
            if m.spans.is_empty() {
                return Err(invalid(
                    "mask_attention.spans",
                    "mask_attention.spans must name at least one span",
                ));
            }
            let mut spans = Vec::new();
            for (i, name) in m.spans.iter().enumerate() {
                let param = format!("mask_attention.spans[{i}]");
                if name.is_empty() {
                    return Err(invalid(&param, "spans must not be empty"));
                }
                if name == IMAGE_SPAN_NAME {
                    if !has_image {
                        return Err(invalid(
                            &param,
                            format!("{IMAGE_SPAN_NAME} masks the image tokens, but the request has no image"),
                        ));
                    }
                    spans.extend(prompt.image_spans.iter().cloned());
                    continue;
                }
                let found = located.next().unwrap_or_default();
                if found.is_empty() {
                    return Err(invalid(
                        &param,
                        format!("span {name:?} does not occur in the user text"),
                    ));
                }
                spans.extend(found);
            }
            if spans.iter().any(|s| s.start == 0) {
                return Err(invalid(
                    "mask_attention.spans",
                    "a masked span covers the first prompt position, which would leave it no key to attend to",
                ));
            }
            Some(MaskPlan { layers, spans })
        }
    };
    let align = match &options.align_image_states {
        None => None,
        Some(a) => {
            let layers = check_blocks("align_image_states.layers", &a.layers, n)?;
            if !has_image {
                return Err(invalid(
                    "align_image_states",
                    "align_image_states moves image-token states, but the request has no image",
                ));
            }
            if caption == CaptionPlan::None {
                return Err(invalid(
                    "align_image_states",
                    "align_image_states needs a caption (caption or caption_source \"model\"): its vector is the caption pass's mean caption state",
                ));
            }
            if mask_names.iter().any(|s| s == IMAGE_SPAN_NAME) {
                return Err(invalid(
                    "align_image_states",
                    "align_image_states and mask_attention on <image> contradict each other: one rewrites the image states the other hides",
                ));
            }
            Some(AlignPlan {
                layers,
                mode: a.mode.into(),
            })
        }
    };

    let spec: RefusalTokens = options
        .refusal_tokens
        .as_ref()
        .map(RefusalTokens::from)
        .unwrap_or_default();
    let refusal = dx
        .refusal_set(&spec)
        .map_err(|message| invalid("refusal_tokens", message))?;

    let system_prompt = turns
        .iter()
        .filter(|t| t.role == Role::System)
        .map(|t| {
            t.parts
                .iter()
                .filter_map(|p| match p {
                    TurnPart::Text(s) => Some(s.as_str()),
                    TurnPart::Image(_) => None,
                })
                .collect::<String>()
        })
        .reduce(|a, b| a + "\n" + &b);
    let image_tokens = prompt.image_token_counts.iter().sum();
    let image_span = match (prompt.image_spans.first(), prompt.image_spans.last()) {
        (Some(first), Some(last)) => Some([first.start, last.end]),
        _ => None,
    };
    let lens = options.lens.unwrap_or_default();
    let meta = DiagnosticsMeta {
        model: model_id.to_string(),
        n_layers: n,
        lens,
        refusal_tokens: refusal.tokens(),
        prompt_tokens: prompt.len,
        image_tokens,
        image_span,
        image_spans: prompt.image_spans.iter().map(span_pair).collect(),
        text_spans: layout.user_text.iter().map(span_pair).collect(),
        focus: focus_items
            .iter()
            .zip(&focus)
            .map(|(text, spans)| FocusMeta {
                text: text.clone(),
                spans: spans.iter().map(span_pair).collect(),
            })
            .collect(),
        caption: caption_text,
        caption_source: source,
        caption_pass: None,
        system_prompt,
        options: ResolvedOptions {
            lens,
            refusal_tokens: options
                .refusal_tokens
                .clone()
                .unwrap_or_else(|| RefusalTokensOption::Preset(DEFAULT_REFUSAL_PRESET.into())),
            focus: focus_items.clone(),
            caption_source: source,
            caption_max_tokens: match caption {
                CaptionPlan::Model { max_tokens } => Some(max_tokens),
                _ => None,
            },
            text_span,
            band: [band.0, band.1],
            mask_attention: options.mask_attention.clone(),
            align_image_states: options.align_image_states.clone(),
            sampled: !deliver,
        },
        conventions: Conventions::default(),
        warnings: Vec::new(),
    };
    Ok(DiagnosePlan {
        lens: lens.into(),
        refusal,
        n_layers: n,
        band,
        modality: modality(turns),
        image_spans: prompt.image_spans.clone(),
        text_spans: layout.user_text,
        focus,
        caption,
        text_span,
        mask,
        align,
        turns: turns.to_vec(),
        deliver,
        safety_layer,
        metrics_band,
        meta,
    })
}

#[cfg(test)]
// Spans are lists of ranges; a one-span list is the common case, not a mistaken `vec![0..n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::engine::backend::{ProcessError, PromptLayout};

    /// A processor that "tokenizes" one character per token with the user text at a fixed
    /// offset, so spans are easy to predict.
    struct CharProcessor;

    const OFFSET: usize = 3;

    impl DiagnosticsProcessor for CharProcessor {
        fn num_layers(&self) -> usize {
            4
        }

        fn refusal_set(&self, spec: &RefusalTokens) -> Result<RefusalSet, String> {
            match spec {
                RefusalTokens::Preset(p) if p == "apology" || p == "tga" => Ok(RefusalSet {
                    ids: vec![7],
                    strings: vec!["▁sorry".into()],
                }),
                RefusalTokens::Preset(p) => Err(format!("unknown refusal_tokens preset `{p}`")),
                RefusalTokens::Words(w) => Ok(RefusalSet {
                    ids: (0..w.len() as u32).collect(),
                    strings: w.clone(),
                }),
            }
        }

        fn locate(
            &self,
            turns: &[ChatTurn],
            image_token_counts: &[usize],
            needles: &[String],
        ) -> Result<PromptLayout, ProcessError> {
            let text: String = turns
                .iter()
                .flat_map(|t| &t.parts)
                .filter_map(|p| match p {
                    TurnPart::Text(s) => Some(s.as_str()),
                    TurnPart::Image(_) => None,
                })
                .collect();
            let images: usize = image_token_counts.iter().sum();
            let start = OFFSET + images;
            Ok(PromptLayout {
                user_text: vec![start..start + text.len()],
                needles: needles
                    .iter()
                    .map(|n| {
                        text.match_indices(n.as_str())
                            .map(|(i, m)| start + i..start + i + m.len())
                            .collect()
                    })
                    .collect(),
                token_count: start + text.len() + 2,
            })
        }
    }

    fn turns(text: &str, image: bool) -> Vec<ChatTurn> {
        let mut parts = Vec::new();
        if image {
            parts.push(TurnPart::Image(0));
        }
        parts.push(TurnPart::Text(text.into()));
        vec![ChatTurn {
            role: Role::User,
            parts,
        }]
    }

    fn shape(text: &str, image: bool) -> PromptShape {
        let images = if image { 5 } else { 0 };
        PromptShape {
            len: OFFSET + images + text.len() + 2,
            image_spans: if image {
                vec![OFFSET..OFFSET + 5]
            } else {
                vec![]
            },
            image_token_counts: if image { vec![5] } else { vec![] },
        }
    }

    fn run(text: &str, image: bool, options: serde_json::Value) -> Result<DiagnosePlan, ApiError> {
        let options: DiagnosticsOptions = serde_json::from_value(options).unwrap();
        plan(
            &CharProcessor,
            &options,
            &turns(text, image),
            &shape(text, image),
            "m",
            &DiagnosticsConfig::default(),
            true,
        )
    }

    fn err(text: &str, image: bool, options: serde_json::Value) -> (String, String) {
        let e = run(text, image, options).unwrap_err();
        assert_eq!(e.status().as_u16(), 400, "{e:?}");
        (e.param.unwrap_or_default(), e.message)
    }

    #[test]
    fn defaults_resolve_to_the_documented_values() {
        let p = run("how to use a knife", true, serde_json::json!({})).unwrap();
        assert_eq!(p.lens, LensMode::FinalNorm);
        assert_eq!(p.band, Band::middle_third(4));
        assert_eq!(p.caption, CaptionPlan::None);
        assert_eq!(p.meta.caption_source, CaptionSource::None);
        assert_eq!(p.modality, Modality::Image);
        assert_eq!(p.text_spans, vec![8..26]);
        assert_eq!(
            p.meta.options.refusal_tokens,
            RefusalTokensOption::Preset("apology".into())
        );
        assert_eq!(p.safety_layer, Band::middle_third(4).1);
        let json = serde_json::to_value(&p.meta).unwrap();
        for key in [
            "model",
            "n_layers",
            "lens",
            "refusal_tokens",
            "prompt_tokens",
            "image_tokens",
            "image_span",
            "caption",
            "caption_source",
            "system_prompt",
            "options",
        ] {
            assert!(json.get(key).is_some(), "meta lacks {key}");
        }
        assert_eq!(json["lens"], "final_norm");
        assert_eq!(json["image_span"], serde_json::json!([3, 8]));
    }

    #[test]
    fn focus_and_mask_spans_are_located_in_the_user_text() {
        let p = run(
            "a knife and a knife",
            true,
            serde_json::json!({"focus": ["knife"], "caption": "a knife",
                "mask_attention": {"layers": [3, 2, 3], "spans": ["and", "<image>"]},
                "align_image_states": {"layers": [1], "mode": "replace"}}),
        );
        // <image> masked together with alignment contradicts.
        assert!(p.is_err());
        let p = run(
            "a knife and a knife",
            true,
            serde_json::json!({"focus": ["knife"], "caption": "a knife",
                "mask_attention": {"layers": [3, 2, 3], "spans": ["and", "<image>"]}}),
        )
        .unwrap();
        assert_eq!(p.focus, vec![vec![10..15, 22..27]]);
        let mask = p.mask.unwrap();
        assert_eq!(mask.layers, vec![2, 3]);
        assert_eq!(mask.spans, vec![16..19, 3..8]);
        assert_eq!(p.caption, CaptionPlan::Given("a knife".into()));
        assert_eq!(p.meta.caption_source, CaptionSource::Request);
    }

    #[test]
    fn bad_options_are_400_with_precise_messages() {
        let (param, msg) = err("hi", false, serde_json::json!({"refusal_tokens": "polite"}));
        assert_eq!(param, "diagnostics.refusal_tokens");
        assert!(msg.contains("polite"), "{msg}");
        let (param, msg) = err("hi there", false, serde_json::json!({"focus": ["gun"]}));
        assert_eq!(param, "diagnostics.focus[0]");
        assert!(
            msg.contains("\"gun\"") && msg.contains("does not occur"),
            "{msg}"
        );
        let (param, msg) = err("hi", false, serde_json::json!({"band": [2, 9]}));
        assert_eq!(param, "diagnostics.band");
        assert!(msg.contains("<= 4"), "{msg}");
        let (param, _) = err("hi", false, serde_json::json!({"band": [3, 2]}));
        assert_eq!(param, "diagnostics.band");
        let (param, msg) = err(
            "hi",
            false,
            serde_json::json!({"mask_attention": {"layers": [1, 5], "spans": ["hi"]}}),
        );
        assert_eq!(param, "diagnostics.mask_attention.layers[1]");
        assert!(msg.contains("1..=4"), "{msg}");
        let (param, msg) = err("hi", false, serde_json::json!({"caption": "a cat"}));
        assert_eq!(param, "diagnostics.caption");
        assert!(msg.contains("no image"), "{msg}");
        let (param, _) = err("hi", false, serde_json::json!({"caption_source": "model"}));
        assert_eq!(param, "diagnostics.caption_source");
        let (param, _) = err("hi", true, serde_json::json!({"caption_source": "request"}));
        assert_eq!(param, "diagnostics.caption_source");
        let (param, msg) = err(
            "hi",
            true,
            serde_json::json!({"caption": "x", "caption_source": "none"}),
        );
        assert_eq!(param, "diagnostics.caption_source");
        assert!(msg.contains("contradicts"), "{msg}");
        let (param, msg) = err(
            "hi",
            true,
            serde_json::json!({"align_image_states": {"layers": [1]}}),
        );
        assert_eq!(param, "diagnostics.align_image_states");
        assert!(msg.contains("needs a caption"), "{msg}");
        let (param, msg) = err(
            "hi",
            true,
            serde_json::json!({"caption": "x", "align_image_states": {"layers": [1]},
                "mask_attention": {"layers": [2], "spans": ["<image>"]}}),
        );
        assert_eq!(param, "diagnostics.align_image_states");
        assert!(msg.contains("contradict"), "{msg}");
        let (param, _) = err("hi", true, serde_json::json!({"text_span": "after_image"}));
        assert_eq!(param, "diagnostics.text_span");
        let (param, _) = err(
            "hi",
            false,
            serde_json::json!({"mask_attention": {"layers": [1], "spans": ["<image>"]}}),
        );
        assert_eq!(param, "diagnostics.mask_attention.spans[0]");
        assert!(
            serde_json::from_value::<DiagnosticsOptions>(serde_json::json!({"lense": "raw"}))
                .is_err()
        );
    }

    #[test]
    fn modality_follows_the_user_messages() {
        let text = turns("a", false);
        let image = turns("a", true);
        assert_eq!(modality(&text), Modality::Text);
        assert_eq!(modality(&image), Modality::Image);
        let mixed: Vec<ChatTurn> = image.into_iter().chain(text).collect();
        assert_eq!(modality(&mixed), Modality::Mixed);
    }

    #[test]
    fn sampler_takes_exactly_the_share() {
        let s = Sampler::default();
        let taken = (0..1000).filter(|_| s.take(0.25)).count();
        assert_eq!(taken, 250);
        let s = Sampler::default();
        assert!(!(0..100).any(|_| s.take(0.0)));
        assert!((0..100).all(|_| s.take(1.0)));
    }
}
