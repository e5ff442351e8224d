//! Planning a request's safety diagnostics (DIAGNOSTICS.md): the `diagnostics` options checked
//! against the request and the served model, turned into the [`DiagnosePlan`] the engine runs and
//! the report's `meta`. It runs before anything is queued, so a bad option is a 400 and never
//! reaches the engine. The spans come from the prompt's layout (found when the prompt was
//! tokenized); nothing is tokenized again here.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use model::diagnostics::{merge_spans, Band, Modality, RefusalTokens, DEFAULT_REFUSAL_PRESET};

use crate::backend::DiagnosticsProcessor;
use crate::engine::plan::{
    AlignPlan, CaptionPlan, CaptionPooling, CaptionPrompt, DiagnosePlan, MaskPlan,
};
use crate::engine::request::{ChatTurn, Prompt, Role, TurnPart};
use crate::error::ApiError;
use crate::error::ErrorCode;
use crate::openai::diagnostics::{
    span_pairs, CaptionSource, Conventions, DiagnosticsMeta, DiagnosticsOptions, FocusMeta,
    RefusalTokensOption, ResolvedOptions, TextSpan, IMAGE_SPAN_NAME, MAX_CAPTION_BYTES,
    MAX_FOCUS_ITEMS, MAX_MASK_SPANS, MAX_SPAN_OCCURRENCES,
};

/// Default bound on a model-generated caption.
pub const DEFAULT_CAPTION_MAX_TOKENS: usize = 48;
/// Largest accepted `caption_max_tokens`.
pub const MAX_CAPTION_MAX_TOKENS: usize = 512;

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

/// Which ordinary requests get background diagnosis (`--diagnose-sample-rate`): request i is
/// taken when `floor((i+1)·r)` passes an integer, so exactly `r` of any long run is diagnosed,
/// evenly spread.
#[derive(Debug, Default)]
pub struct ShareSelector {
    seen: AtomicU64,
}

impl ShareSelector {
    pub fn take(&self, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        let i = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((i + 1.0) * rate).floor() > (i * rate).floor()
    }
}

/// `text` without images; `image` when every user message carries an image; `mixed` when the
/// conversation has user messages with and without images.
pub fn modality(turns: &[ChatTurn]) -> Modality {
    let user: Vec<bool> = turns
        .iter()
        .filter(|t| t.role == Role::User)
        .map(|t| t.images().next().is_some())
        .collect();
    if !user.iter().any(|&has| has) {
        Modality::Text
    } else if user.iter().all(|&has| has) {
        Modality::Image
    } else {
        Modality::Mixed
    }
}

/// The substrings of the user text the prompt's layout must locate for `options`: the focus
/// items, then the `mask_attention` spans other than the image, in request order (the order
/// [`plan`] reads them back in).
pub fn needles(options: &DiagnosticsOptions) -> Vec<String> {
    let focus = options.focus.iter().flatten();
    let masked = options
        .mask_attention
        .iter()
        .flat_map(|m| &m.spans)
        .filter(|s| s.as_str() != IMAGE_SPAN_NAME);
    focus.chain(masked).cloned().collect()
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

/// The summary's band: the request's `[lo, hi]` or the middle third.
fn band(options: &DiagnosticsOptions, n: usize) -> Result<Band, ApiError> {
    match &options.band {
        None => Ok(Band::middle_third(n)),
        Some(b) if b.len() == 2 => Band(b[0], b[1]).validate(n).map_err(|_| {
            invalid(
                "band",
                format!(
                    "band [{}, {}] is out of range: it needs lo <= hi <= {n} (layers are 0..={n})",
                    b[0], b[1]
                ),
            )
        }),
        Some(b) => Err(invalid(
            "band",
            format!("band must be [lo, hi], got {} numbers", b.len()),
        )),
    }
}

/// The operator's band and safety layer for the metrics and the firehose, defaulted where the
/// configured ones do not fit this model.
fn metrics_settings(config: &DiagnosticsConfig, n: usize) -> (Band, usize) {
    let metrics_band = match config.band {
        Some((lo, hi)) if lo <= hi && hi <= n => Band(lo, hi),
        _ => Band::middle_third(n),
    };
    let safety_layer = config
        .safety_layer
        .filter(|&l| l <= n)
        .unwrap_or(metrics_band.1);
    (metrics_band, safety_layer)
}

/// The caption, its source and what the caption pass will use.
struct Caption {
    text: Option<String>,
    source: CaptionSource,
    plan: CaptionPlan,
}

fn caption(options: &DiagnosticsOptions, has_image: bool) -> Result<Caption, ApiError> {
    let text = match &options.caption {
        Some(c) if c.trim().is_empty() => {
            return Err(invalid("caption", "caption must not be empty"))
        }
        Some(c) if c.len() > MAX_CAPTION_BYTES => {
            return Err(invalid(
                "caption",
                format!(
                    "caption must be at most {MAX_CAPTION_BYTES} bytes long, got {}",
                    c.len()
                ),
            ))
        }
        Some(c) if c.contains(IMAGE_SPAN_NAME) => {
            return Err(invalid(
                "caption",
                format!("caption must not contain the image placeholder {IMAGE_SPAN_NAME}"),
            ))
        }
        other => other.clone(),
    };
    let source = options.caption_source.unwrap_or(if text.is_some() {
        CaptionSource::Request
    } else {
        CaptionSource::None
    });
    if text.is_some() && !has_image {
        return Err(invalid(
            "caption",
            "a caption describes the request's image, but the request has no image",
        ));
    }
    let plan = match (source, &text) {
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
        if !matches!(plan, CaptionPlan::Model { .. }) {
            return Err(invalid(
                "caption_max_tokens",
                "caption_max_tokens only applies with caption_source \"model\"",
            ));
        }
    }
    Ok(Caption { text, source, plan })
}

fn text_span(options: &DiagnosticsOptions, caption: &CaptionPlan) -> Result<TextSpan, ApiError> {
    let text_span = options.text_span.unwrap_or_default();
    if text_span == TextSpan::AfterImage && *caption == CaptionPlan::None {
        return Err(invalid(
            "text_span",
            "text_span \"after_image\" pools the caption pass, which needs a caption (caption or caption_source \"model\")",
        ));
    }
    Ok(text_span)
}

/// The prompt's located needles, read in [`needles`]' order.
type Located = std::vec::IntoIter<Vec<Range<usize>>>;

/// Per focus item, its occurrences (each must occur).
fn focus(items: &[String], located: &mut Located) -> Result<Vec<Vec<Range<usize>>>, ApiError> {
    if items.len() > MAX_FOCUS_ITEMS {
        return Err(invalid(
            "focus",
            format!(
                "at most {MAX_FOCUS_ITEMS} focus items are allowed, got {}",
                items.len()
            ),
        ));
    }
    if let Some(i) = items.iter().position(|f| f.is_empty()) {
        return Err(invalid(
            &format!("focus[{i}]"),
            "focus spans must not be empty",
        ));
    }
    let mut focus = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let spans = located.next().unwrap_or_default();
        if spans.is_empty() {
            return Err(invalid(
                &format!("focus[{i}]"),
                format!("focus span {item:?} does not occur in the user text"),
            ));
        }
        check_occurrences(&format!("focus[{i}]"), item, &spans)?;
        focus.push(spans);
    }
    Ok(focus)
}

fn mask(
    options: &DiagnosticsOptions,
    prompt: &Prompt,
    n: usize,
    located: &mut Located,
) -> Result<Option<MaskPlan>, ApiError> {
    let Some(m) = &options.mask_attention else {
        return Ok(None);
    };
    let layers = check_blocks("mask_attention.layers", &m.layers, n)?;
    if m.spans.is_empty() {
        return Err(invalid(
            "mask_attention.spans",
            "mask_attention.spans must name at least one span",
        ));
    }
    if m.spans.len() > MAX_MASK_SPANS {
        return Err(invalid(
            "mask_attention.spans",
            format!(
                "at most {MAX_MASK_SPANS} mask_attention.spans are allowed, got {}",
                m.spans.len()
            ),
        ));
    }
    let mut spans = Vec::new();
    for (i, name) in m.spans.iter().enumerate() {
        let param = format!("mask_attention.spans[{i}]");
        if name.is_empty() {
            return Err(invalid(&param, "spans must not be empty"));
        }
        if name == IMAGE_SPAN_NAME {
            if prompt.image_spans.is_empty() {
                return Err(invalid(
                    &param,
                    format!(
                        "{IMAGE_SPAN_NAME} masks the image tokens, but the request has no image"
                    ),
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
        check_occurrences(&param, name, &found)?;
        spans.extend(found);
    }
    // Overlapping or repeated names mask each key once: one sorted, merged key mask.
    let spans = merge_spans(&spans);
    if spans.iter().any(|s| s.start == 0) {
        return Err(invalid(
            "mask_attention.spans",
            "a masked span covers the first prompt position, which would leave it no key to attend to",
        ));
    }
    Ok(Some(MaskPlan { layers, spans }))
}

/// A needle may match at most [`MAX_SPAN_OCCURRENCES`] times.
fn check_occurrences(param: &str, needle: &str, found: &[Range<usize>]) -> Result<(), ApiError> {
    if found.len() > MAX_SPAN_OCCURRENCES {
        return Err(invalid(
            param,
            format!(
                "{needle:?} occurs {} times in the user text; at most {MAX_SPAN_OCCURRENCES} occurrences are allowed",
                found.len()
            ),
        ));
    }
    Ok(())
}

fn align(
    options: &DiagnosticsOptions,
    has_image: bool,
    caption: &CaptionPlan,
    n: usize,
) -> Result<Option<AlignPlan>, ApiError> {
    let Some(a) = &options.align_image_states else {
        return Ok(None);
    };
    let layers = check_blocks("align_image_states.layers", &a.layers, n)?;
    if !has_image {
        return Err(invalid(
            "align_image_states",
            "align_image_states moves image-token states, but the request has no image",
        ));
    }
    if *caption == CaptionPlan::None {
        return Err(invalid(
            "align_image_states",
            "align_image_states needs a caption (caption or caption_source \"model\"): its vector is the caption pass's mean caption state",
        ));
    }
    let masks_image = options
        .mask_attention
        .iter()
        .flat_map(|m| &m.spans)
        .any(|s| s == IMAGE_SPAN_NAME);
    if masks_image {
        return Err(invalid(
            "align_image_states",
            "align_image_states and mask_attention on <image> contradict each other: one rewrites the image states the other hides",
        ));
    }
    Ok(Some(AlignPlan {
        layers,
        mode: a.mode.into(),
    }))
}

/// The system messages' text, joined by newlines.
fn system_prompt(turns: &[ChatTurn]) -> Option<String> {
    turns
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
        .reduce(|a, b| a + "\n" + &b)
}

/// A given caption's pass must fit the context: it is tokenized at validation (after the plan's
/// cheap checks, on the blocking pool) rather than found too long on the engine thread.
/// The prompt is kept for the engine, which runs it.
pub fn check_caption_pass(
    dx: &dyn DiagnosticsProcessor,
    turns: &[ChatTurn],
    caption: &str,
    max_model_len: usize,
) -> Result<CaptionPrompt, ApiError> {
    let prompt = dx
        .caption_prompt(turns, caption)
        .map_err(|e| ApiError::from_process(e, "diagnostics.caption".into()))?;
    let tokens = prompt.ids.len();
    if tokens >= max_model_len {
        return Err(ApiError::new(
            ErrorCode::ContextLengthExceeded,
            format!(
                "This model's maximum context length is {} tokens, but the caption pass (the \
                 conversation with the caption in place of the image) has {tokens} tokens. \
                 Please shorten the caption or the messages.",
                max_model_len
            ),
        )
        .with_param("diagnostics.caption"));
    }
    Ok(prompt)
}

/// Validates `options` against the request's prompt (built with [`needles`] of these options)
/// and the served model: the plan the engine runs and the report's meta. `deliver` is false for
/// a sampled ordinary request.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    dx: &dyn DiagnosticsProcessor,
    options: &DiagnosticsOptions,
    turns: &[ChatTurn],
    prompt: &Prompt,
    model_id: &str,
    config: &DiagnosticsConfig,
    deliver: bool,
) -> Result<(DiagnosePlan, DiagnosticsMeta), ApiError> {
    let n = dx.num_layers();
    let has_image = !prompt.image_spans.is_empty();
    let band = band(options, n)?;
    let (metrics_band, safety_layer) = metrics_settings(config, n);
    let caption = caption(options, has_image)?;
    let text_span = text_span(options, &caption.plan)?;
    let mut located = prompt.layout.needles.clone().into_iter();
    let focus_items = options.focus.clone().unwrap_or_default();
    let focus = focus(&focus_items, &mut located)?;
    let mask = mask(options, prompt, n, &mut located)?;
    let align = align(options, has_image, &caption.plan, n)?;
    let spec: RefusalTokens = options
        .refusal_tokens
        .as_ref()
        .map(RefusalTokens::from)
        .unwrap_or_default();
    let refusal = dx
        .refusal_set(&spec)
        .map_err(|message| invalid("refusal_tokens", message))?;

    let image_tokens = prompt.images.iter().map(|i| i.num_tokens).sum();
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
        prompt_tokens: prompt.len(),
        image_tokens,
        image_span,
        image_spans: span_pairs(&prompt.image_spans),
        text_spans: span_pairs(&prompt.layout.user_text),
        focus: focus_items
            .iter()
            .zip(&focus)
            .map(|(text, spans)| FocusMeta {
                text: text.clone(),
                spans: span_pairs(spans),
            })
            .collect(),
        caption: caption.text,
        caption_source: caption.source,
        caption_pass: None,
        system_prompt: system_prompt(turns),
        retrieval: None,
        options: ResolvedOptions {
            lens,
            refusal_tokens: options
                .refusal_tokens
                .clone()
                .unwrap_or_else(|| RefusalTokensOption::Preset(DEFAULT_REFUSAL_PRESET.into())),
            focus: focus_items.clone(),
            caption_source: caption.source,
            caption_max_tokens: match caption.plan {
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
    let plan = DiagnosePlan {
        lens: lens.into(),
        refusal,
        n_layers: n,
        band,
        modality: modality(turns),
        image_spans: prompt.image_spans.clone(),
        text_spans: prompt.layout.user_text.clone(),
        focus,
        caption: caption.plan,
        caption_prompt: None,
        caption_pooling: CaptionPooling::from(text_span),
        mask,
        align,
        turns: turns.to_vec(),
        deliver,
        safety_layer,
        metrics_band,
    };
    Ok((plan, meta))
}

#[cfg(test)]
// Spans are lists of ranges; a one-span list is the common case, not a mistaken `vec![0..n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use model::diagnostics::{LensMode, RefusalSet};

    use super::*;
    use crate::engine::request::{ImageInput, PromptLayout};

    /// A processor that "tokenizes" one character per token with the user text at a fixed
    /// offset, so spans are easy to predict.
    struct CharProcessor;

    const OFFSET: usize = 3;

    impl DiagnosticsProcessor for CharProcessor {
        fn num_layers(&self) -> usize {
            4
        }

        fn caption_prompt(
            &self,
            turns: &[ChatTurn],
            caption: &str,
        ) -> Result<CaptionPrompt, crate::backend::ProcessError> {
            let text: usize = turns
                .iter()
                .flat_map(|t| &t.parts)
                .map(|p| match p {
                    TurnPart::Text(s) => s.len(),
                    TurnPart::Image(_) => caption.len(),
                })
                .sum();
            Ok(CaptionPrompt {
                ids: vec![0; OFFSET + text + 2],
                caption_spans: Vec::new(),
            })
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
    }

    fn turns(text: &str, image: bool) -> Vec<ChatTurn> {
        let mut parts = Vec::new();
        if image {
            parts.push(TurnPart::Image(0));
        }
        parts.push(TurnPart::Text(text.into()));
        vec![ChatTurn {
            retrieved: None,
            role: Role::User,
            parts,
        }]
    }

    /// The prompt [`CharProcessor`] would build: one token per character of the user text at
    /// a fixed offset after the image, with the needles of `options` located in it.
    fn prompt(text: &str, image: bool, options: &DiagnosticsOptions) -> Prompt {
        let images = if image { 5 } else { 0 };
        let start = OFFSET + images;
        let needles = needles(options)
            .iter()
            .map(|n| {
                text.match_indices(n.as_str())
                    .map(|(i, m)| start + i..start + i + m.len())
                    .collect()
            })
            .collect();
        Prompt {
            token_ids: vec![0; start + text.len() + 2],
            image_spans: if image {
                vec![OFFSET..OFFSET + 5]
            } else {
                vec![]
            },
            images: if image {
                vec![ImageInput {
                    image_size: (1, 1),
                    pixel_values: vec![],
                    shape: vec![],
                    num_tokens: 5,
                }]
            } else {
                vec![]
            },
            layout: PromptLayout {
                user_text: vec![start..start + text.len()],
                needles,
            },
        }
    }

    fn run(
        text: &str,
        image: bool,
        options: serde_json::Value,
    ) -> Result<(DiagnosePlan, DiagnosticsMeta), ApiError> {
        let options: DiagnosticsOptions = serde_json::from_value(options).unwrap();
        plan(
            &CharProcessor,
            &options,
            &turns(text, image),
            &prompt(text, image, &options),
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
        let (p, meta) = run("how to use a knife", true, serde_json::json!({})).unwrap();
        assert_eq!(p.lens, LensMode::FinalNorm);
        assert_eq!(p.band, Band::middle_third(4));
        assert_eq!(p.caption, CaptionPlan::None);
        assert_eq!(meta.caption_source, CaptionSource::None);
        assert_eq!(p.modality, Modality::Image);
        assert_eq!(p.text_spans, vec![8..26]);
        assert_eq!(
            meta.options.refusal_tokens,
            RefusalTokensOption::Preset("apology".into())
        );
        assert_eq!(p.safety_layer, Band::middle_third(4).1);
        let json = serde_json::to_value(&meta).unwrap();
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
        let (p, meta) = run(
            "a knife and a knife",
            true,
            serde_json::json!({"focus": ["knife"], "caption": "a knife",
                "mask_attention": {"layers": [3, 2, 3], "spans": ["and", "<image>"]}}),
        )
        .unwrap();
        assert_eq!(p.focus, vec![vec![10..15, 22..27]]);
        let mask = p.mask.unwrap();
        assert_eq!(mask.layers, vec![2, 3]);
        // The masked names' positions, merged into one sorted key mask.
        assert_eq!(mask.spans, vec![3..8, 16..19]);
        assert_eq!(p.caption, CaptionPlan::Given("a knife".into()));
        assert_eq!(meta.caption_source, CaptionSource::Request);
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
    fn share_selector_takes_exactly_the_share() {
        let s = ShareSelector::default();
        let taken = (0..1000).filter(|_| s.take(0.25)).count();
        assert_eq!(taken, 250);
        let s = ShareSelector::default();
        assert!(!(0..100).any(|_| s.take(0.0)));
        assert!((0..100).all(|_| s.take(1.0)));
    }
}
