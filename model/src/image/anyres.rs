//! Anyres geometry (transformers image_processing_utils / modeling_llava_next): the best canvas,
//! the tile grid, unpadding and image token counts.

use super::config::{AspectMode, PreprocessConfig, UnpadRounding};

/// transformers' `select_best_resolution`: the (h, w) pinpoint that keeps the most of the image's
/// resolution when it is fitted inside, ties broken by the least wasted canvas, then list order.
///
/// An image so thin that it keeps no whole pixel row on any canvas (e.g. 1x8000) makes
/// transformers fail (`best_fit` stays None); here it gets the smallest canvas (first on ties),
/// so preprocessing, token counting and the model's unpadding still agree. `pinpoints` must not be
/// empty (the config constructors check it); an empty list gives (0, 0).
pub fn select_best_resolution(orig_h: u32, orig_w: u32, pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (f64::from(orig_h), f64::from(orig_w));
    let orig_area = u64::from(orig_h) * u64::from(orig_w);
    let mut best = None;
    let mut max_effective = 0u64;
    let mut min_wasted = u64::MAX;
    for &(h, w) in pinpoints {
        let scale = (f64::from(w) / ow).min(f64::from(h) / oh);
        // int() truncation; `as` saturates NaN/inf from a zero-sized image to 0 / u64::MAX.
        let (dw, dh) = ((ow * scale) as u64, (oh * scale) as u64);
        let effective = dw.saturating_mul(dh).min(orig_area);
        let wasted = (u64::from(w) * u64::from(h)).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best.unwrap_or_else(|| {
        let smallest = pinpoints
            .iter()
            .copied()
            .min_by_key(|&(h, w)| u64::from(h) * u64::from(w));
        tracing::warn!(
            orig_h,
            orig_w,
            ?smallest,
            "image too thin for every anyres canvas"
        );
        smallest.unwrap_or((0, 0))
    })
}

/// `get_anyres_image_grid_shape`: (rows, cols) of `tile`-sized tiles on the best canvas.
pub fn anyres_grid_shape(
    orig_h: u32,
    orig_w: u32,
    pinpoints: &[(u32, u32)],
    tile: u32,
) -> (u32, u32) {
    let (bh, bw) = select_best_resolution(orig_h, orig_w, pinpoints);
    (bh / tile.max(1), bw / tile.max(1))
}

/// Python's `round(x, 7)` (correctly rounded to 7 decimals): via Rust's exact decimal formatting.
fn py_round7(x: f64) -> f64 {
    format!("{x:.7}").parse().unwrap_or(x)
}

/// transformers' `unpad_image` on a (cur_h, cur_w) feature grid of an (orig_h, orig_w) image:
/// the rows (or columns) covering the canvas padding go, `padding = (cur - new) // 2` on each
/// side, with `new = int(round(orig * scale, 7))`. Returns the kept (height, width); the kept
/// block starts at ((cur_h - h) / 2, (cur_w - w) / 2).
pub fn unpadded_feature_shape(orig_h: u32, orig_w: u32, cur_h: u32, cur_w: u32) -> (u32, u32) {
    unpadded_feature_shape_with(orig_h, orig_w, cur_h, cur_w, UnpadRounding::Round7)
}

/// [`unpadded_feature_shape`] with the rounding of either codebase (original-format checkpoints
/// were trained with LLaVA's truncating `int(orig * scale)`; see `AspectMode::Anyres::unpad`).
pub fn unpadded_feature_shape_with(
    orig_h: u32,
    orig_w: u32,
    cur_h: u32,
    cur_w: u32,
    rounding: UnpadRounding,
) -> (u32, u32) {
    let (oh, ow) = (f64::from(orig_h), f64::from(orig_w));
    let (ch, cw) = (f64::from(cur_h), f64::from(cur_w));
    let fit = |x: f64| -> i64 {
        match rounding {
            UnpadRounding::Round7 => py_round7(x) as i64,
            UnpadRounding::Truncate => x as i64,
        }
    };
    let keep = |cur: u32, new: i64| -> u32 {
        let padding = (i64::from(cur) - new).div_euclid(2);
        (i64::from(cur) - 2 * padding).clamp(0, i64::from(cur)) as u32
    };
    if ow / oh > cw / ch {
        (keep(cur_h, fit(oh * (cw / ow))), cur_w)
    } else {
        (cur_h, keep(cur_w, fit(ow * (ch / oh))))
    }
}

/// Image tokens for an (orig_h, orig_w) image: `patches_per_side²` for pad / resize-crop; for
/// anyres the base view, the unpadded tile features and one `image_newline` per row (what
/// `LlavaNextProcessor` expands `<image>` to with the "default" feature strategy, or the original
/// LLaVA's count with `UnpadRounding::Truncate`).
pub fn image_token_count(
    orig_h: u32,
    orig_w: u32,
    cfg: &PreprocessConfig,
    patches_per_side: usize,
) -> usize {
    let base = patches_per_side * patches_per_side;
    match &cfg.aspect {
        AspectMode::ResizeCrop | AspectMode::PadToSquare => base,
        AspectMode::Anyres { pinpoints, unpad } => {
            let (vh, vw) = cfg.view_size();
            let (bh, bw) = select_best_resolution(orig_h, orig_w, pinpoints);
            let pps = patches_per_side as u32;
            let (uh, uw) = unpadded_feature_shape_with(
                orig_h,
                orig_w,
                (bh / vh) * pps,
                (bw / vw) * pps,
                *unpad,
            );
            base + (uh as usize) * (uw as usize + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::config::LLAVA_NEXT_PINPOINTS;
    use crate::image::test_support::hf_next;

    #[test]
    fn token_counts_of_the_documented_examples() {
        let cfg = hf_next();
        assert_eq!(image_token_count(640, 640, &cfg, 24), 2928);
        assert_eq!(image_token_count(480, 640, &cfg, 24), 2340);
        assert_eq!(image_token_count(20, 20, &cfg, 24), 1176);
        let pad = PreprocessConfig {
            aspect: AspectMode::PadToSquare,
            ..PreprocessConfig::clip_defaults(336)
        };
        assert_eq!(image_token_count(480, 640, &pad, 24), 576);
        assert_eq!(
            anyres_grid_shape(480, 640, &LLAVA_NEXT_PINPOINTS, 336),
            (2, 2)
        );
        // Both sides fit in 336: the first of the tied canvases, 336x672 (h, w) in transformers.
        assert_eq!(
            select_best_resolution(20, 20, &LLAVA_NEXT_PINPOINTS),
            (336, 672)
        );
    }

    #[test]
    fn unpad_rounding_of_both_codebases() {
        // 47x1128 on a 24x72 grid: 47 * (72 / 1128) = 2.9999999999999996.
        assert_eq!(unpadded_feature_shape(47, 1128, 24, 72), (4, 72));
        assert_eq!(
            unpadded_feature_shape_with(47, 1128, 24, 72, UnpadRounding::Truncate),
            (2, 72)
        );
        // 480x640 on 48x48: 36 rows kept, 6 padding rows each side.
        assert_eq!(unpadded_feature_shape(480, 640, 48, 48), (36, 48));
        assert_eq!(unpadded_feature_shape(20, 20, 24, 48), (24, 24));
        assert_eq!(py_round7(2.9999999999999996), 3.0);
        assert_eq!(py_round7(2.99999994), 2.9999999);
    }
}
