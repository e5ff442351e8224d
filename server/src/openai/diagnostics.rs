//! The wire side of the safety diagnostics (DIAGNOSTICS.md §7): the `diagnostics` request
//! object, the report (`meta`, per-layer records, summary) built from the engine's
//! [`Diagnosis`], and the diagnose endpoint's response and stream events.
//!
//! The math lives in `model::diagnostics`, the planning in [`crate::validation::diagnostics`], the
//! measuring in the backend; these types only say it on the wire.

use std::ops::Range;

use model::diagnostics::{LayerRecord, LensMode, RefusalTokens, Summary, TokenRef};
use model::mistral::EditMode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{FinishReason, Usage};
use crate::engine::plan::{self, CaptionPooling, Diagnosis};

/// The name that masks the image tokens in `mask_attention.spans` (the chat templates' own
/// placeholder, so it cannot be confused with user text).
pub const IMAGE_SPAN_NAME: &str = "<image>";

// Bounds on the diagnostics surface, so a small request cannot buy unbounded work: each is in
// the OpenAPI schema, and beyond it the request is a 400.
/// Most `focus` items.
pub const MAX_FOCUS_ITEMS: usize = 16;
/// Most `mask_attention.spans` entries.
pub const MAX_MASK_SPANS: usize = 16;
/// Most occurrences in the user text one `focus` item or masked span may match.
pub const MAX_SPAN_OCCURRENCES: usize = 64;
/// Longest `caption`, in bytes.
pub const MAX_CAPTION_BYTES: usize = 1024;

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

impl From<TextSpan> for CaptionPooling {
    fn from(span: TextSpan) -> Self {
        match span {
            TextSpan::Caption => CaptionPooling::Caption,
            TextSpan::AfterImage => CaptionPooling::AfterImage,
        }
    }
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
    /// Substrings of the user text (every occurrence, at most 64 each), or `"<image>"` for the
    /// image tokens; their positions are merged into one key mask.
    #[schema(max_items = 16)]
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
    /// Substrings of the user text whose attention share is reported (`attn_focus`; every
    /// occurrence, at most 64 each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 16)]
    pub focus: Option<Vec<String>>,
    /// A caption of the request's image(s); enables the caption pass and the cosines. The
    /// caption pass must fit the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub caption: Option<String>,
    /// Default: `request` with a caption, else `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_source: Option<CaptionSource>,
    /// Bound on a model-generated caption, in tokens (default 48).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 512)]
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
    /// TGA retrieval's caption for the last user turn's image, when the model is served with a
    /// retrieval corpus and the request did not turn it off.
    pub retrieval: Option<RetrievalMeta>,
    pub options: ResolvedOptions,
    pub conventions: Conventions,
    pub warnings: Vec<String>,
}

/// What TGA retrieval put before the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RetrievalMeta {
    /// The caption, rendered as `Retrieved Text: {text}. <image>`.
    pub text: String,
    /// Cosine of the image's and the caption's CLIP embeddings.
    pub score: f32,
}

impl From<&crate::backend::retrieval::Retrieved> for RetrievalMeta {
    fn from(r: &crate::backend::retrieval::Retrieved) -> Self {
        Self {
            text: r.text.clone(),
            score: r.score,
        }
    }
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
    /// The meta known at validation completed with what the engine found.
    pub fn new(mut meta: DiagnosticsMeta, diagnosis: Diagnosis) -> Self {
        meta.caption = diagnosis.caption;
        meta.caption_pass = diagnosis.caption_pass.map(CaptionPassMeta::from);
        meta.warnings.extend(diagnosis.warnings);
        Self {
            meta,
            layers: diagnosis.layers,
            summary: diagnosis.summary,
        }
    }
}

fn span_pair(r: &Range<usize>) -> [usize; 2] {
    [r.start, r.end]
}

/// `[start, end)` pairs of `spans`.
pub fn span_pairs(spans: &[Range<usize>]) -> Vec<[usize; 2]> {
    spans.iter().map(span_pair).collect()
}

impl From<plan::CaptionPass> for CaptionPassMeta {
    fn from(pass: plan::CaptionPass) -> Self {
        Self {
            prompt_tokens: pass.prompt_tokens,
            caption_spans: span_pairs(&pass.caption_spans),
            pooled_spans: span_pairs(&pass.pooled_spans),
        }
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
// The diagnose endpoint (`POST /v1/safety/diagnose`)

/// A piece of the answer (`token` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenEvent {
    pub text: String,
}

/// How generation ended (`finish` event, after the tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinishEvent {
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// `POST /v1/safety/diagnose` with `stream: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiagnoseResponse {
    pub meta: DiagnosticsMeta,
    #[schema(value_type = Vec<LayerRecordSchema>)]
    pub layers: Vec<LayerRecord>,
    #[schema(value_type = SummarySchema)]
    pub summary: Summary,
    /// The generated answer (empty with `max_tokens: 0`).
    pub answer: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}
