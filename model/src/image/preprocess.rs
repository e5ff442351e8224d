//! Preprocessing: resize, centre crop, pad to square and anyres tiling into the vision tower's
//! views, then rescale and normalise.

use std::borrow::Cow;

use image::RgbImage;

use super::anyres::select_best_resolution;
use super::config::{AspectMode, PreprocessConfig, SizeSpec};
use super::resample::{resize_pil, resize_pil_window};
use crate::error::{ModelError, Result};

/// The vision tower's input for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// [n_views, 3, size.0, size.1], channel-first f32 (what `pixel_values[i]` holds).
    pub pixel_values: Vec<f32>,
    pub n_views: usize,
    /// (height, width) of every view.
    pub size: (u32, u32),
    /// (height, width) of the decoded image (after EXIF orientation): `image_sizes` in HF.
    pub original_hw: (u32, u32),
    /// Anyres only: (rows, cols) of tiles after the base view, row-major.
    pub grid: Option<(u32, u32)>,
}

/// `get_resize_output_image_size(default_to_square=False)`: (h, w) with the short side at `s`.
fn shortest_edge_size(h: u32, w: u32, s: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    // int(s * long / short): Python true division of ints below 2**53 is the f64 division.
    let new_long = (f64::from(s) * f64::from(long) / f64::from(short)) as u32;
    if w <= h {
        (new_long, s)
    } else {
        (s, new_long)
    }
}

/// `get_patch_output_size`: the size the image is resized to inside the (th, tw) canvas.
fn patch_output_size(h: u32, w: u32, th: u32, tw: u32) -> (u32, u32) {
    let scale_w = f64::from(tw) / f64::from(w);
    let scale_h = f64::from(th) / f64::from(h);
    if scale_w < scale_h {
        (
            (f64::from(h) * scale_w).ceil().min(f64::from(th)) as u32,
            tw,
        )
    } else {
        (
            th,
            (f64::from(w) * scale_h).ceil().min(f64::from(tw)) as u32,
        )
    }
}

/// Copies `src` into a new (out_h, out_w) canvas filled with `fill`, with src's top-left corner at
/// (top, left) in the canvas (negative offsets crop).
pub(super) fn place(
    src: &RgbImage,
    out_h: u32,
    out_w: u32,
    top: i64,
    left: i64,
    fill: [u8; 3],
) -> RgbImage {
    let mut out = RgbImage::from_pixel(out_w, out_h, image::Rgb(fill));
    let (sw, sh) = (i64::from(src.width()), i64::from(src.height()));
    let x0 = left.max(0);
    let x1 = (left + sw).min(i64::from(out_w));
    if x1 <= x0 {
        return out;
    }
    let (ow, sws) = (out_w as usize * 3, sw as usize * 3);
    let n = (x1 - x0) as usize * 3;
    let dst = out.as_mut();
    let raw = src.as_raw();
    for y in top.max(0)..(top + sh).min(i64::from(out_h)) {
        let sy = (y - top) as usize;
        let sx = (x0 - left) as usize * 3;
        let d = y as usize * ow + x0 as usize * 3;
        dst[d..d + n].copy_from_slice(&raw[sy * sws + sx..sy * sws + sx + n]);
    }
    out
}

/// The (height, width) the processors' resize step produces for an (h, w) image.
fn resize_target(h: u32, w: u32, cfg: &PreprocessConfig) -> (u32, u32) {
    match cfg.size {
        SizeSpec::ShortestEdge(s) => shortest_edge_size(h, w, s),
        SizeSpec::Exact { height, width } => (height, width),
    }
}

/// The processors' resize: shortest edge or exact size; the identity is a copy (borrow here).
fn resize_step<'a>(img: &'a RgbImage, cfg: &PreprocessConfig) -> Cow<'a, RgbImage> {
    let (h, w) = (img.height(), img.width());
    let (nh, nw) = resize_target(h, w, cfg);
    if (nh, nw) == (h, w) {
        Cow::Borrowed(img)
    } else {
        Cow::Owned(resize_pil(img, nw, nh, cfg.resample))
    }
}

/// `image_transforms.center_crop`: top = (h - ch) // 2 (floor), zero padding where the image is
/// smaller than the crop.
fn center_crop<'a>(img: &'a RgbImage, ch: u32, cw: u32) -> Cow<'a, RgbImage> {
    let (h, w) = (img.height(), img.width());
    if (h, w) == (ch, cw) {
        return Cow::Borrowed(img);
    }
    let top = (i64::from(h) - i64::from(ch)).div_euclid(2);
    let left = (i64::from(w) - i64::from(cw)).div_euclid(2);
    Cow::Owned(place(img, ch, cw, -top, -left, [0, 0, 0]))
}

/// `center_crop(resize_step(img))` computing only the resized pixels the crop keeps
/// (bit-identical: see [`resize_pil_window`]). A shortest-edge resize of a thin strip is huge
/// (1x8192 → 336x2752512, 2.8 GB) while its crop is one view.
fn resize_then_crop<'a>(img: &'a RgbImage, cfg: &PreprocessConfig) -> Cow<'a, RgbImage> {
    let (h, w) = (img.height(), img.width());
    let (nh, nw) = resize_target(h, w, cfg);
    let (ch, cw) = cfg.crop_size;
    if (nh, nw) == (h, w) {
        return center_crop(img, ch, cw);
    }
    // `center_crop`'s window in the resized image, clipped to it (the rest is zero padding).
    let top = (i64::from(nh) - i64::from(ch)).div_euclid(2);
    let left = (i64::from(nw) - i64::from(cw)).div_euclid(2);
    let (y0, y1) = (top.max(0), (top + i64::from(ch)).min(i64::from(nh)));
    let (x0, x1) = (left.max(0), (left + i64::from(cw)).min(i64::from(nw)));
    let window = (x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32);
    let part = resize_pil_window(img, nw, nh, window, cfg.resample);
    if part.dimensions() == (cw, ch) {
        return Cow::Owned(part);
    }
    Cow::Owned(place(&part, ch, cw, y0 - top, x0 - left, [0, 0, 0]))
}

/// resize → centre crop → rescale → normalise for one view, appended channel-first to `out`.
fn finish_view(view: &RgbImage, cfg: &PreprocessConfig, out: &mut Vec<f32>) -> (u32, u32) {
    let cropped = match (cfg.do_resize, cfg.do_center_crop) {
        (true, true) => resize_then_crop(view, cfg),
        (true, false) => resize_step(view, cfg),
        (false, true) => center_crop(view, cfg.crop_size.0, cfg.crop_size.1),
        (false, false) => Cow::Borrowed(view),
    };
    let raw = cropped.as_raw();
    let n = raw.len() / 3;
    out.reserve(raw.len());
    for c in 0..3 {
        // transformers: rescale = (uint8 as float64 * factor) as float32; normalise in float32
        // with mean/std cast to float32: (x - mean) / std.
        let mean = cfg.image_mean[c] as f32;
        let std = cfg.image_std[c] as f32;
        out.extend(raw.iter().skip(c).step_by(3).take(n).map(|&v| {
            let x = if cfg.do_rescale {
                (f64::from(v) * cfg.rescale_factor) as f32
            } else {
                f32::from(v)
            };
            if cfg.do_normalize {
                (x - mean) / std
            } else {
                x
            }
        }));
    }
    (cropped.height(), cropped.width())
}

/// Preprocesses a decoded RGB image into the vision tower's views, matching transformers 5.23's
/// PIL processors bit for bit:
/// - `ResizeCrop`: CLIP resize (shortest edge) + centre crop;
/// - `PadToSquare`: `LlavaImageProcessor.pad_to_square` (mean colour, centred) first;
/// - `Anyres`: `LlavaNextImageProcessor.get_image_patches`: best canvas, aspect-preserving resize
///   (`get_patch_output_size`), zero padding centred, row-major tiles of the crop height, and the
///   whole image resized to the base size as view 0; then every view gets resize + crop.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<ProcessedImage> {
    let (h, w) = (img.height(), img.width());
    if h == 0 || w == 0 {
        return Err(ModelError::InvalidInput("image has no pixels".into()));
    }
    let mut pixel_values = Vec::new();
    let mut sizes = Vec::new();
    let mut grid = None;
    match &cfg.aspect {
        AspectMode::ResizeCrop => sizes.push(finish_view(img, cfg, &mut pixel_values)),
        AspectMode::PadToSquare => {
            let square = if h == w {
                Cow::Borrowed(img)
            } else {
                let side = h.max(w);
                let top = i64::from((side - h) / 2);
                let left = i64::from((side - w) / 2);
                Cow::Owned(place(img, side, side, top, left, cfg.pad_colour()))
            };
            sizes.push(finish_view(&square, cfg, &mut pixel_values));
        }
        AspectMode::Anyres { pinpoints, .. } => {
            let (bh, bw) = select_best_resolution(h, w, pinpoints);
            let (nh, nw) = patch_output_size(h, w, bh, bw);
            let resized = resize_pil(img, nw, nh, cfg.resample);
            let canvas = place(
                &resized,
                bh,
                bw,
                i64::from((bh - nh) / 2),
                i64::from((bw - nw) / 2),
                [0, 0, 0],
            );
            drop(resized);
            let (base_h, base_w) = cfg.base_size();
            let base = resize_pil(img, base_w, base_h, cfg.resample);
            sizes.push(finish_view(&base, cfg, &mut pixel_values));
            let t = cfg.tile_size();
            let (rows, cols) = (bh.div_ceil(t), bw.div_ceil(t));
            for r in 0..rows {
                for c in 0..cols {
                    let (th, tw) = (t.min(bh - r * t), t.min(bw - c * t));
                    let tile = place(
                        &canvas,
                        th,
                        tw,
                        -i64::from(r * t),
                        -i64::from(c * t),
                        [0, 0, 0],
                    );
                    sizes.push(finish_view(&tile, cfg, &mut pixel_values));
                }
            }
            grid = Some((rows, cols));
        }
    }
    let size = sizes[0];
    if sizes.iter().any(|&s| s != size) {
        return Err(ModelError::InvalidInput(format!(
            "preprocessing produced views of different sizes {sizes:?} (enable do_center_crop)"
        )));
    }
    Ok(ProcessedImage {
        pixel_values,
        n_views: sizes.len(),
        size,
        original_hw: (h, w),
        grid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::config::{CLIP_MEAN, CLIP_STD, LLAVA_NEXT_PINPOINTS};
    use crate::image::test_support::{hf_next, pattern};
    use sha2::{Digest, Sha256};

    #[test]
    fn a_too_thin_image_still_gets_a_canvas() {
        // transformers' select_best_resolution returns None here (every canvas keeps 0 rows).
        let best = select_best_resolution(1, 8000, &LLAVA_NEXT_PINPOINTS);
        assert_eq!(best, (336, 672));
        let img = RgbImage::from_pixel(8000, 1, image::Rgb([200, 10, 10]));
        let p = preprocess(&img, &hf_next()).unwrap();
        assert_eq!((p.n_views, p.grid), (3, Some((1, 2))));
    }

    #[test]
    fn centre_crop_pads_like_transformers_when_the_image_is_small() {
        // CLIPImageProcessorPil(size={"shortest_edge": 5}, crop_size={"height": 7, "width": 6})
        // on pattern(4, 9): resized to 5x11, cropped to 7x6 with a zero row above and below.
        let cfg = PreprocessConfig {
            size: SizeSpec::ShortestEdge(5),
            crop_size: (7, 6),
            ..PreprocessConfig::clip_defaults(5)
        };
        let p = preprocess(&pattern(4, 9), &cfg).unwrap();
        assert_eq!((p.n_views, p.size, p.grid), (1, (7, 6), None));
        let mut h = Sha256::new();
        for x in &p.pixel_values {
            h.update(x.to_le_bytes());
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "e30bd3b370e9b2cebc60cd939fca840dc7ee54179a88b3248ddaa9ddf3403a07",
            "first row {:?}",
            &p.pixel_values[..6]
        );
    }

    #[test]
    fn pad_to_square_uses_the_mean_colour_centred() {
        let cfg = PreprocessConfig {
            aspect: AspectMode::PadToSquare,
            do_resize: false,
            do_center_crop: false,
            do_rescale: false,
            do_normalize: false,
            ..PreprocessConfig::clip_defaults(4)
        };
        assert_eq!(cfg.pad_colour(), [122, 116, 104]);
        let img = RgbImage::from_pixel(4, 1, image::Rgb([1, 2, 3]));
        let p = preprocess(&img, &cfg).unwrap();
        assert_eq!(p.size, (4, 4));
        // Channel 0, rows 0..4: (4 - 1) // 2 = 1 padding row above the image.
        let red: Vec<f32> = p.pixel_values[..16].iter().step_by(4).copied().collect();
        assert_eq!(red, vec![122.0, 1.0, 122.0, 122.0]);
    }

    #[test]
    fn anyres_views_and_grid() {
        let cfg = hf_next();
        let p = preprocess(&pattern(480, 640), &cfg).unwrap();
        assert_eq!((p.n_views, p.size, p.grid), (5, (336, 336), Some((2, 2))));
        assert_eq!(p.original_hw, (480, 640));
        assert_eq!(p.pixel_values.len(), 5 * 3 * 336 * 336);
        // The 672x672 canvas holds the image resized to 504x672 with 84 black rows above: the
        // top-left tile's first row is padding, i.e. 0 normalised.
        let tile1 = &p.pixel_values[3 * 336 * 336..];
        let black = ((0.0f32 - CLIP_MEAN[0] as f32) / CLIP_STD[0] as f32, 0);
        assert_eq!((tile1[0], 0), black);
    }

    #[test]
    fn resize_then_crop_is_centre_crop_of_resize() {
        // Shortest-edge sizes below, at and above the crop, odd and even margins, and crops
        // larger than the resized image (zero padding).
        for (h, w) in [
            (480, 640),
            (640, 480),
            (335, 337),
            (336, 336),
            (1, 64),
            (64, 1),
            (20, 20),
        ] {
            for (size, crop) in [(336, (336, 336)), (300, (320, 310)), (50, (17, 90))] {
                let cfg = PreprocessConfig {
                    size: SizeSpec::ShortestEdge(size),
                    crop_size: crop,
                    ..PreprocessConfig::clip_defaults(336)
                };
                let img = pattern(h, w);
                let expected = center_crop(&resize_step(&img, &cfg), crop.0, crop.1).into_owned();
                assert_eq!(
                    resize_then_crop(&img, &cfg).into_owned(),
                    expected,
                    "{h}x{w} size {size} crop {crop:?}"
                );
            }
        }
    }
}
