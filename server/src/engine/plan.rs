//! What the engine runs for a diagnosed request (DIAGNOSTICS.md) and what it gives back. Built by
//! validation from the request's `diagnostics` options ([`crate::validation::diagnostics`]); the
//! wire report is made from a [`Diagnosis`] by the HTTP layer ([`crate::openai::diagnostics`]).

use std::ops::Range;

use model::diagnostics::{Band, LayerRecord, LensMode, Modality, RefusalSet, Summary};
use model::mistral::EditMode;

use super::request::ChatTurn;

/// Prompt of the model's own caption (`caption_source: "model"`), DIAGNOSTICS.md §3.
pub const DESCRIBE_PROMPT: &str = "Describe this image.";

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

/// Which caption-pass tokens are pooled for the cosine's text side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptionPooling {
    /// The caption's tokens (the TGA loss's pooling).
    #[default]
    Caption,
    /// Every token from the caption on except the last (the reference analysis' pooling).
    AfterImage,
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

/// The caption pass's prompt (DIAGNOSTICS.md §3): its ids and where the caption stands in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionPrompt {
    pub ids: Vec<u32>,
    pub caption_spans: Vec<Range<usize>>,
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
    /// The caption pass's prompt for a given caption, built once at validation (where its length
    /// is checked); a model caption's is built on the engine thread.
    pub caption_prompt: Option<CaptionPrompt>,
    pub caption_pooling: CaptionPooling,
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
}

/// The caption pass: its length and the positions pooled for the cosine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionPass {
    pub prompt_tokens: usize,
    /// Positions of the caption in the caption pass.
    pub caption_spans: Vec<Range<usize>>,
    /// Positions pooled for the cosine (`text_span`).
    pub pooled_spans: Vec<Range<usize>>,
}

/// What the backend measured for one request (records assembled; the answer is judged into the
/// summary when generation ends).
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub layers: Vec<LayerRecord>,
    pub summary: Summary,
    /// The caption the caption pass used (given or generated); `None` without a caption pass.
    pub caption: Option<String>,
    pub caption_pass: Option<CaptionPass>,
    /// Things the client should know (e.g. an empty model caption disabled the cosines).
    pub warnings: Vec<String>,
}

impl Diagnosis {
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
