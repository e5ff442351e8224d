//! Image decoding with limits, a bit-exact port of Pillow's convolution resampling, and the
//! LLaVA / LLaVA-NeXT preprocessing of transformers 5.23's PIL image processors.
//!
//! Everything here works on 8-bit RGB until the final rescale/normalise, exactly like the PIL
//! backend of transformers (`LlavaImageProcessorPil`, `LlavaNextImageProcessorPil`,
//! `CLIPImageProcessorPil`): the pixel values this module produces are bit-identical to theirs for
//! the same decoded RGB image (see `model/tests/preprocess.rs`).
//!
//! The anyres geometry (`select_best_resolution`, `anyres_grid_shape`, `unpadded_feature_shape`,
//! `image_token_count`) is defined once here; the model uses it to unpad and pack features, the
//! server uses it to count image tokens.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// OpenAI CLIP normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `image_grid_pinpoints` of llava-v1.6 (and `LlavaNextImageProcessor`'s default), as (h, w).
pub const LLAVA_NEXT_PINPOINTS: [(u32, u32); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// What an uploaded image may cost before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded size accepted.
    pub max_bytes: usize,
    /// Largest width or height (as stored, before EXIF rotation).
    pub max_side: u32,
    /// Largest width * height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 20 MiB, 8192 px per side, 32 Mpx: a 32 Mpx RGBA decode is 128 MiB; pad-to-square of a
    /// 8192-px-long strip allocates at most 8192² * 3 bytes (192 MiB).
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_side: 8192,
            max_pixels: 1 << 25,
        }
    }
}

/// The formats the server accepts, recognised by their magic bytes (the declared MIME type or file
/// name is not trusted). Anything else is `UnsupportedImageFormat`, with the format's name when
/// `image` recognises it (TIFF, AVIF, ...).
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat> {
    let fmt = if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some(ImageFormat::Gif)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"BM") && bytes.len() >= 26 {
        Some(ImageFormat::Bmp)
    } else {
        None
    };
    fmt.ok_or_else(|| {
        let name = image::guess_format(bytes)
            .ok()
            .map(|f| format!("{f:?}").to_lowercase());
        ModelError::UnsupportedImageFormat(name)
    })
}

fn decode_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::ImageDecode(e.to_string())
}

/// Decodes an uploaded image to 8-bit RGB as transformers' `load_image` does
/// (`PIL.ImageOps.exif_transpose(image).convert("RGB")`):
/// - the format is sniffed from the bytes (JPEG, PNG, WebP, GIF first frame, BMP);
/// - the byte size and the header's dimensions are checked before any pixel is decoded, so a
///   decompression bomb costs a header parse;
/// - EXIF orientation is applied;
/// - grey is replicated to RGB and alpha is dropped, not composited (`convert("RGB")`; LLaVA's own
///   loader does the same). 16-bit samples keep their high byte, as PIL reads 16-bit RGB(A)/LA PNGs
///   (PIL saturates 16-bit grey to 255 instead; we take the high byte there too).
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    if bytes.len() > limits.max_bytes {
        return Err(ModelError::ImageBytesTooLarge {
            bytes: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = sniff_format(bytes)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Header-stage limits: no dimension limit yet (we want to report the dimensions ourselves),
    // only a cap on what the header parse may allocate (PNG text chunks and the like).
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(64 * 1024 * 1024);
    reader.limits(header_limits);
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    let too_large = width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels;
    if too_large {
        return Err(ModelError::ImageTooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ModelError::ImageDecode(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    // Decode-stage limits: the decoders enforce these too, as a second line of defence.
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8) + (64 << 20));
    decoder.set_limits(decode_limits).map_err(decode_err)?;
    let orientation = decoder.orientation().unwrap_or_else(|e| {
        tracing::debug!("ignoring unreadable EXIF orientation: {e}");
        image::metadata::Orientation::NoTransforms
    });
    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    tracing::debug!(
        ?format,
        width,
        height,
        color = ?decoded.color(),
        ?orientation,
        "decoded image"
    );
    let mut rgb = DynamicImage::ImageRgb8(to_rgb_dropping_alpha(decoded));
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// PIL `convert("RGB")`: L → (L, L, L); LA / RGBA → alpha dropped; 16-bit → high byte.
fn to_rgb_dropping_alpha(img: DynamicImage) -> RgbImage {
    fn build<const C: usize, T: Copy>(
        w: u32,
        h: u32,
        raw: &[T],
        px: impl Fn(&[T]) -> [u8; 3],
    ) -> RgbImage {
        let mut out = Vec::with_capacity(w as usize * h as usize * 3);
        for p in raw.chunks_exact(C) {
            out.extend_from_slice(&px(p));
        }
        RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
    }
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma8(i) => build::<1, u8>(w, h, i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(i) => build::<2, u8>(w, h, i.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageRgba8(i) => build::<4, u8>(w, h, i.as_raw(), |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma16(i) => build::<1, u16>(w, h, i.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageLumaA16(i) => build::<2, u16>(w, h, i.as_raw(), |p| [hi(p[0]); 3]),
        DynamicImage::ImageRgb16(i) => {
            build::<3, u16>(w, h, i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        DynamicImage::ImageRgba16(i) => {
            build::<4, u16>(w, h, i.as_raw(), |p| [hi(p[0]), hi(p[1]), hi(p[2])])
        }
        other => other.to_rgb8(),
    }
}

// ---------------------------------------------------------------------------------------------
// Pillow resampling (libImaging/Resample.c), bit-exact for 8-bit images
// ---------------------------------------------------------------------------------------------

/// PIL resampling filters this port implements (`resample` in preprocessor configs: 2, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    fn from_pil(code: i64) -> Option<Self> {
        match code {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    /// Pillow's filter kernels, with its exact operation order (a = -0.5 for bicubic).
    fn eval(self, x: f64) -> f64 {
        let x = if x < 0.0 { -x } else { x };
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's fixed-point precision: 32 bits - 8 bits of result - 2 bits of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output sample: the first input index, the tap count, and `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole-image box (0, 0, in_size), for
/// the output samples `outputs` of `0..out_size` only (each sample's coefficients depend on its
/// own index alone, so a sub-range is exactly the corresponding rows of the full table).
fn precompute_coeffs(
    in_size: u32,
    out_size: u32,
    outputs: std::ops::Range<u32>,
    filter: Resample,
) -> Coeffs {
    // Pillow keeps the box in C floats; (in1 - in0) is computed in float, then widened.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / f64::from(out_size);
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let count = outputs.len();
    let mut bounds = Vec::with_capacity(count);
    let mut weights = vec![0i32; count * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in outputs.map(|xx| xx as usize).enumerate() {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let n = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[i * ksize..i * ksize + n];
        for (dst, &kx) in row.iter_mut().zip(&k[..n]) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let fixed = kx * f64::from(1u32 << PRECISION_BITS);
            *dst = if kx < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin as usize, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// `clip8`: the accumulator's integer part, clamped to a byte.
#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `y0..y1` of `src` (w x h, 3 channels) into an `out_w`-wide image.
fn resample_horizontal(src: &[u8], w: usize, y0: usize, y1: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * (y1 - y0) * 3];
    for (row_out, y) in out.chunks_exact_mut(out_w * 3).zip(y0..y1) {
        let row_in = &src[y * w * 3..(y + 1) * w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (x, &kx) in k.iter().enumerate() {
                let p = &row_in[(xmin + x) * 3..(xmin + x) * 3 + 3];
                s0 = s0.wrapping_add(i32::from(p[0]).wrapping_mul(kx));
                s1 = s1.wrapping_add(i32::from(p[1]).wrapping_mul(kx));
                s2 = s2.wrapping_add(i32::from(p[2]).wrapping_mul(kx));
            }
            row_out[xx * 3] = clip8(s0);
            row_out[xx * 3 + 1] = clip8(s1);
            row_out[xx * 3 + 2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass: `src` is w x (rows) with 3 channels, row indices in `c` offset by `row_offset`.
fn resample_vertical(src: &[u8], w: usize, row_offset: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let stride = w * 3;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(HALF);
        // Integer sums (wrapping, like C's int) do not depend on the summation order, so the
        // taps can be the outer loop for cache-friendly row access.
        for (y, &ky) in k.iter().enumerate() {
            let r = ymin + y - row_offset;
            let row = &src[r * stride..(r + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(ky));
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `PIL.Image.resize((out_w, out_h), filter)` of an RGB image, bit-exact: two separable
/// fixed-point passes with the intermediate rounded and clamped to u8, the filter support scaled
/// by the downscale factor, and Pillow 13's pass order (vertical first when the height shrinks
/// more than twice as much as the width, horizontal first otherwise).
pub fn resize_pil(src: &RgbImage, out_w: u32, out_h: u32, filter: Resample) -> RgbImage {
    resize_pil_window(src, out_w, out_h, (0, 0, out_w, out_h), filter)
}

/// The `(x, y, width, height)` window of `resize_pil(src, out_w, out_h, filter)`, computed
/// without the rest of the resized image. Every output pixel of the two passes depends only on
/// its own row's and column's coefficients, so the window is bit-identical to cropping the full
/// resize; it is what keeps a resize whose crop discards most of it (CLIP's shortest-edge resize
/// of a 1x8192 strip is 336x2752512 before its 336x336 centre crop) from allocating gigabytes.
fn resize_pil_window(
    src: &RgbImage,
    out_w: u32,
    out_h: u32,
    window: (u32, u32, u32, u32),
    filter: Resample,
) -> RgbImage {
    let (x0, y0, win_w, win_h) = window;
    debug_assert!(
        x0 + win_w <= out_w && y0 + win_h <= out_h,
        "window outside the output"
    );
    let (in_w, in_h) = src.dimensions();
    if (in_w, in_h) == (out_w, out_h) {
        // Pillow returns a copy for the identity resize.
        return crop_window(src, window);
    }
    if win_w == 0 || win_h == 0 {
        return RgbImage::new(win_w, win_h);
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    // Pillow's pass order depends on the full sizes, not on the window.
    let dh = i64::from(in_h) - i64::from(out_h);
    let dw = i64::from(in_w) - i64::from(out_w);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let raw = src.as_raw();
    let w = in_w as usize;
    let (cols, rows) = (x0..x0 + win_w, y0..y0 + win_h);
    let vert = need_v.then(|| precompute_coeffs(in_h, out_h, rows.clone(), filter));
    let horiz = need_h.then(|| precompute_coeffs(in_w, out_w, cols, filter));
    let out = match (horiz, vert) {
        (Some(hc), Some(vc)) if horizontal_first => {
            // Only the rows the vertical pass reads are resampled horizontally.
            let first = vc.bounds[0].0;
            let last = vc.bounds[vc.bounds.len() - 1];
            let tmp = resample_horizontal(raw, w, first, last.0 + last.1, &hc);
            resample_vertical(&tmp, win_w as usize, first, &vc)
        }
        (Some(hc), Some(vc)) => {
            let tmp = resample_vertical(raw, w, 0, &vc);
            resample_horizontal(&tmp, w, 0, win_h as usize, &hc)
        }
        // Same height: the window's rows of the source, resampled horizontally.
        (Some(hc), None) => resample_horizontal(raw, w, y0 as usize, (y0 + win_h) as usize, &hc),
        // Same width: the window's columns of the source, resampled vertically.
        (None, Some(vc)) => {
            let columns = crop_window(src, (x0, 0, win_w, in_h));
            resample_vertical(columns.as_raw(), win_w as usize, 0, &vc)
        }
        (None, None) => unreachable!("the identity resize returned above"),
    };
    RgbImage::from_raw(win_w, win_h, out).expect("buffer size matches dimensions")
}

/// The `(x, y, width, height)` window of `src` (inside it) as a new image.
fn crop_window(src: &RgbImage, (x0, y0, w, h): (u32, u32, u32, u32)) -> RgbImage {
    if (x0, y0, w, h) == (0, 0, src.width(), src.height()) {
        return src.clone();
    }
    place(src, h, w, -i64::from(y0), -i64::from(x0), [0, 0, 0])
}

// ---------------------------------------------------------------------------------------------
// Preprocessing configuration
// ---------------------------------------------------------------------------------------------

/// The processor's `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// `{"shortest_edge": n}`: shorter side to n, longer side `int(n * long / short)`.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`.
    Exact { height: u32, width: u32 },
}

/// How unpad rounds `original * scale` (the only place the two codebases' anyres arithmetic
/// differs besides the pinpoint order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpadRounding {
    /// transformers: `int(round(x, 7))`.
    Round7,
    /// original LLaVA (`llava_arch.unpad_image`): `int(x)`.
    Truncate,
}

/// How an image becomes views of the vision tower's input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AspectMode {
    /// CLIP: resize the shortest edge, centre crop (HF `llava` without `do_pad`).
    ResizeCrop,
    /// LLaVA-1.5 `expand2square` with the mean colour, then resize + centre crop.
    PadToSquare,
    /// LLaVA-NeXT: a base view of the whole image plus the tiles of the best pinpoint canvas.
    /// `pinpoints` are (height, width) in the order the checkpoint lists them (ties go to the
    /// first); original-format (width, height) lists are swapped on load.
    Anyres {
        pinpoints: Vec<(u32, u32)>,
        unpad: UnpadRounding,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub size: SizeSpec,
    /// (height, width).
    pub crop_size: (u32, u32),
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// Kept in f64 as transformers multiplies in float64 before casting to float32.
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub resample: Resample,
    pub aspect: AspectMode,
}

impl PreprocessConfig {
    /// `CLIPImageProcessor` defaults for a vision tower of `image_size` (what an original-format
    /// checkpoint gets when its CLIP directory has no preprocessor_config.json).
    pub fn clip_defaults(image_size: u32) -> Self {
        Self {
            size: SizeSpec::ShortestEdge(image_size),
            crop_size: (image_size, image_size),
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: 1.0 / 255.0,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            resample: Resample::Bicubic,
            aspect: AspectMode::ResizeCrop,
        }
    }

    /// From an HF image-processor dict (`preprocessor_config.json`, or the `image_processor`
    /// entry of a transformers 5 `processor_config.json`). The mode follows the processor class:
    /// `LlavaNextImageProcessor` (or any dict with `image_grid_pinpoints`) → anyres;
    /// `LlavaImageProcessor` with `do_pad: true` → pad to square; otherwise resize + crop.
    /// `source` names the file in error messages.
    pub fn from_hf_preprocessor(json: &Value, source: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::config(source, msg);
        let obj = json
            .as_object()
            .ok_or_else(|| bad("image processor config is not an object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let flag = |k: &str, default: bool| -> Result<bool> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(format!("`{k}` is not a bool"))),
            }
        };
        let kind = get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("CLIPImageProcessor");
        let is_next = kind.starts_with("LlavaNext") || get("image_grid_pinpoints").is_some();
        let default_side = 224; // the processors' class defaults
        let size = match get("size") {
            None => SizeSpec::ShortestEdge(default_side),
            // get_size_dict(int, default_to_square=False) → shortest_edge
            Some(v) => parse_size(v, false).map_err(|m| bad(format!("`size`: {m}")))?,
        };
        let crop_size = match get("crop_size") {
            None => (default_side, default_side),
            Some(v) => match parse_size(v, true).map_err(|m| bad(format!("`crop_size`: {m}")))? {
                SizeSpec::Exact { height, width } => (height, width),
                SizeSpec::ShortestEdge(_) => {
                    return Err(bad("`crop_size` needs height and width".into()))
                }
            },
        };
        let triple = |k: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match get(k) {
                None => Ok(default),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    Ok([x; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, v) in out.iter_mut().zip(a) {
                        *o = v
                            .as_f64()
                            .ok_or_else(|| bad(format!("`{k}` has a non-number")))?;
                    }
                    Ok(out)
                }
                Some(_) => Err(bad(format!("`{k}` must be a number or 3 numbers"))),
            }
        };
        let resample = match get("resample") {
            None => Resample::Bicubic,
            Some(v) => v.as_i64().and_then(Resample::from_pil).ok_or_else(|| {
                bad(format!(
                    "unsupported `resample` {v} (2 bilinear, 3 bicubic)"
                ))
            })?,
        };
        let rescale_factor = match get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("`rescale_factor` is not a number".into()))?,
        };
        let aspect = if is_next {
            let pinpoints = match get("image_grid_pinpoints") {
                None => LLAVA_NEXT_PINPOINTS.to_vec(),
                Some(v) => {
                    parse_pinpoints(v).map_err(|m| bad(format!("`image_grid_pinpoints`: {m}")))?
                }
            };
            AspectMode::Anyres {
                pinpoints,
                unpad: UnpadRounding::Round7,
            }
        } else if kind.starts_with("LlavaImageProcessor") && flag("do_pad", false)? {
            AspectMode::PadToSquare
        } else {
            AspectMode::ResizeCrop
        };
        let cfg = Self {
            size,
            crop_size,
            do_resize: flag("do_resize", true)?,
            do_center_crop: flag("do_center_crop", true)?,
            do_rescale: flag("do_rescale", true)?,
            do_normalize: flag("do_normalize", true)?,
            rescale_factor,
            image_mean: triple("image_mean", CLIP_MEAN)?,
            image_std: triple("image_std", CLIP_STD)?,
            resample,
            aspect,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Reads `dir/preprocessor_config.json`, else the `image_processor` entry of
    /// `dir/processor_config.json` (what transformers 5 `save_pretrained` writes).
    /// `Ok(None)` when neither holds an image processor.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v = read_json(&pre)?;
            return Self::from_hf_preprocessor(&v, &pre).map(Some);
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let v = read_json(&proc)?;
            if let Some(ip) = v.get("image_processor") {
                return Self::from_hf_preprocessor(ip, &proc).map(Some);
            }
        }
        Ok(None)
    }

    /// An original-format (LLaVA codebase) checkpoint: `clip` is the vision tower's CLIP
    /// processor (from its preprocessor_config.json or [`Self::clip_defaults`]); the model
    /// config's `image_aspect_ratio` picks the mode as `llava.mm_utils.process_images` does:
    /// "pad" → pad to square, "anyres" → anyres with `image_grid_pinpoints` (read as (w, h) there,
    /// swapped to (h, w) here, order kept) and LLaVA's truncating unpad; anything else (absent,
    /// "square") → the plain CLIP processor.
    pub fn for_original_llava(model_config: &Value, mut clip: Self, source: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::config(source, msg);
        let ratio = model_config
            .get("image_aspect_ratio")
            .and_then(Value::as_str)
            .unwrap_or("square");
        clip.aspect = match ratio {
            "pad" => AspectMode::PadToSquare,
            "anyres" => {
                let v = model_config
                    .get("image_grid_pinpoints")
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| {
                        bad("image_aspect_ratio \"anyres\" needs image_grid_pinpoints".into())
                    })?;
                let wh =
                    parse_pinpoints(v).map_err(|m| bad(format!("`image_grid_pinpoints`: {m}")))?;
                AspectMode::Anyres {
                    pinpoints: wh.into_iter().map(|(w, h)| (h, w)).collect(),
                    unpad: UnpadRounding::Truncate,
                }
            }
            r if r.starts_with("anyres") => {
                return Err(bad(format!(
                    "image_aspect_ratio {r:?} is not supported (only \"anyres\", \"pad\")"
                )))
            }
            _ => AspectMode::ResizeCrop,
        };
        clip.validate().map_err(bad)?;
        Ok(clip)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (ch, cw) = self.crop_size;
        if ch == 0 || cw == 0 {
            return Err("crop_size must be positive".into());
        }
        match self.size {
            SizeSpec::ShortestEdge(0) => return Err("size must be positive".into()),
            SizeSpec::Exact { height, width } if height == 0 || width == 0 => {
                return Err("size must be positive".into())
            }
            _ => {}
        }
        if let AspectMode::Anyres { pinpoints, .. } = &self.aspect {
            if pinpoints.is_empty() || pinpoints.iter().any(|&(h, w)| h == 0 || w == 0) {
                return Err(
                    "image_grid_pinpoints must be a non-empty list of positive sizes".into(),
                );
            }
        }
        if self.image_std.contains(&0.0) {
            return Err("image_std must be non-zero".into());
        }
        Ok(())
    }

    /// (height, width) of every view [`preprocess`] produces.
    pub fn view_size(&self) -> (u32, u32) {
        if self.do_center_crop {
            self.crop_size
        } else {
            match self.size {
                SizeSpec::ShortestEdge(s) => (s, s),
                SizeSpec::Exact { height, width } => (height, width),
            }
        }
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)` = (122, 116, 104) for CLIP.
    pub fn pad_colour(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// transformers' llava_next `patch_size`: the crop height (crop_size is always set here).
    fn tile_size(&self) -> u32 {
        self.crop_size.0
    }

    /// The base view's size: (size.height, size.width), or (shortest_edge, shortest_edge).
    fn base_size(&self) -> (u32, u32) {
        match self.size {
            SizeSpec::ShortestEdge(s) => (s, s),
            SizeSpec::Exact { height, width } => (height, width),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(path, e))
}

fn as_u32(v: &Value) -> std::result::Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{v} is not a positive integer"))
}

/// transformers' `get_size_dict`: an int is a shortest edge (size) or a square (crop_size); a
/// dict holds `shortest_edge` or `height`/`width`; a 2-list is (height, width).
fn parse_size(v: &Value, int_is_square: bool) -> std::result::Result<SizeSpec, String> {
    match v {
        Value::Number(_) => {
            let n = as_u32(v)?;
            Ok(if int_is_square {
                SizeSpec::Exact {
                    height: n,
                    width: n,
                }
            } else {
                SizeSpec::ShortestEdge(n)
            })
        }
        Value::Array(a) if a.len() == 2 => Ok(SizeSpec::Exact {
            height: as_u32(&a[0])?,
            width: as_u32(&a[1])?,
        }),
        Value::Object(o) => {
            let field = |k: &str| o.get(k).filter(|v| !v.is_null());
            if let (Some(h), Some(w)) = (field("height"), field("width")) {
                Ok(SizeSpec::Exact {
                    height: as_u32(h)?,
                    width: as_u32(w)?,
                })
            } else if let Some(s) = field("shortest_edge") {
                if field("longest_edge").is_some() {
                    return Err("shortest_edge with longest_edge is not supported".into());
                }
                Ok(SizeSpec::ShortestEdge(as_u32(s)?))
            } else {
                Err(format!("unsupported size {v}"))
            }
        }
        _ => Err(format!("unsupported size {v}")),
    }
}

/// A list of 2-lists, or the LLaVA codebase's string form "[(336, 672), (672, 336)]"
/// (it runs `ast.literal_eval` on strings). Pairs are returned as written.
fn parse_pinpoints(v: &Value) -> std::result::Result<Vec<(u32, u32)>, String> {
    let pairs: Vec<(u32, u32)> = match v {
        Value::Array(items) => items
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([a, b]) => Ok((as_u32(a)?, as_u32(b)?)),
                _ => Err(format!("{p} is not a pair")),
            })
            .collect::<std::result::Result<_, _>>()?,
        Value::String(s) => {
            if s.contains('x') {
                return Err(format!("grid-range form {s:?} is not supported"));
            }
            let nums: Vec<u32> = s
                .split(|c: char| !c.is_ascii_digit())
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<u32>().map_err(|e| e.to_string()))
                .collect::<std::result::Result<_, _>>()?;
            let pairs = nums.chunks_exact(2);
            if !pairs.remainder().is_empty() {
                return Err(format!("{s:?} does not hold pairs"));
            }
            pairs.map(|p| (p[0], p[1])).collect()
        }
        _ => return Err(format!("unsupported value {v}")),
    };
    if pairs.is_empty() || pairs.iter().any(|&(a, b)| a == 0 || b == 0) {
        return Err("needs at least one pair of positive sizes".into());
    }
    Ok(pairs)
}

// ---------------------------------------------------------------------------------------------
// Anyres geometry (transformers image_processing_utils / modeling_llava_next)
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------------------------

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
fn place(src: &RgbImage, out_h: u32, out_w: u32, top: i64, left: i64, fill: [u8; 3]) -> RgbImage {
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
    use image::codecs::png::PngEncoder;
    use image::{ExtendedColorType, ImageEncoder};
    use sha2::{Digest, Sha256};

    fn hf_next() -> PreprocessConfig {
        let json = serde_json::json!({
            "image_processor_type": "LlavaNextImageProcessor",
            "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336},
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "do_pad": true,
            "resample": 3
        });
        PreprocessConfig::from_hf_preprocessor(&json, Path::new("test")).unwrap()
    }

    /// The same deterministic pattern tools on the Python side used for the goldens below.
    fn pattern(h: u32, w: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 37 + y * 11) % 256) as u8,
                ((y * 53 + x * 3) % 256) as u8,
                ((x * y * 29 + 7) % 256) as u8,
            ])
        })
    }

    fn png_bytes(w: u32, h: u32, data: &[u8], color: ExtendedColorType) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, w, h, color)
            .unwrap();
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut crc_in = kind.to_vec();
        crc_in.extend_from_slice(data);
        c.extend_from_slice(&crc32(&crc_in).to_be_bytes());
        c
    }

    /// A big-endian TIFF block holding only the Orientation tag.
    fn exif_orientation(o: u16) -> Vec<u8> {
        let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
        t.extend_from_slice(&1u16.to_be_bytes());
        t.extend_from_slice(&0x0112u16.to_be_bytes());
        t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&o.to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&0u32.to_be_bytes());
        t
    }

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
    fn resize_matches_pillow_goldens() {
        // np.asarray(Image.fromarray(pattern).resize((w, h), Image.BICUBIC)), Pillow 13.0.0.
        let a = resize_pil(&pattern(4, 5), 3, 7, Resample::Bicubic);
        let want_a: [u8; 63] = [
            12, 0, 6, 73, 2, 2, 134, 7, 0, 16, 15, 10, 77, 20, 22, 138, 25, 35, 23, 50, 16, 84, 55,
            61, 145, 60, 105, 30, 81, 22, 91, 86, 97, 152, 91, 182, 36, 111, 29, 97, 116, 125, 158,
            121, 214, 43, 146, 41, 104, 151, 128, 165, 156, 112, 47, 164, 47, 108, 169, 127, 169,
            174, 47,
        ];
        assert_eq!(a.as_raw().as_slice(), want_a.as_slice());
        // 13 rows -> 2 shrinks the height more than twice the width (9 -> 4): vertical first.
        let b = resize_pil(&pattern(13, 9), 4, 2, Resample::Bicubic);
        let want_b: [u8; 24] = [
            58, 101, 67, 144, 107, 115, 179, 115, 119, 66, 121, 137, 127, 116, 76, 184, 122, 113,
            80, 130, 125, 107, 136, 132,
        ];
        assert_eq!(b.as_raw().as_slice(), want_b.as_slice());
        let same = pattern(6, 7);
        assert_eq!(resize_pil(&same, 7, 6, Resample::Bicubic), same);
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
    fn sniffs_the_five_formats_and_refuses_others() {
        let png = png_bytes(1, 1, &[1, 2, 3], ExtendedColorType::Rgb8);
        assert_eq!(sniff_format(&png).unwrap(), ImageFormat::Png);
        assert_eq!(
            sniff_format(&[0xFF, 0xD8, 0xFF, 0xE0]).unwrap(),
            ImageFormat::Jpeg
        );
        assert_eq!(sniff_format(b"GIF89a......").unwrap(), ImageFormat::Gif);
        assert_eq!(
            sniff_format(b"RIFF\0\0\0\0WEBPVP8 ").unwrap(),
            ImageFormat::WebP
        );
        let mut bmp = b"BM".to_vec();
        bmp.resize(54, 0);
        assert_eq!(sniff_format(&bmp).unwrap(), ImageFormat::Bmp);
        match sniff_format(b"II*\0\x08\0\0\0") {
            Err(ModelError::UnsupportedImageFormat(Some(name))) => assert_eq!(name, "tiff"),
            other => panic!("{other:?}"),
        }
        for junk in [&b""[..], b"hello world", b"<svg xmlns='...'>"] {
            assert!(matches!(
                decode_image(junk, &ImageLimits::default()),
                Err(ModelError::UnsupportedImageFormat(None))
            ));
        }
    }

    #[test]
    fn limits_are_checked_before_decoding() {
        let data = vec![7u8; 100 * 50 * 3];
        let png = png_bytes(100, 50, &data, ExtendedColorType::Rgb8);
        let ok = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(ok.dimensions(), (100, 50));
        let small_bytes = ImageLimits {
            max_bytes: png.len() - 1,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &small_bytes),
            Err(ModelError::ImageBytesTooLarge { .. })
        ));
        let narrow = ImageLimits {
            max_side: 99,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &narrow),
            Err(ModelError::ImageTooLarge {
                width: 100,
                height: 50,
                ..
            })
        ));
        let few = ImageLimits {
            max_pixels: 4999,
            ..Default::default()
        };
        assert!(matches!(
            decode_image(&png, &few),
            Err(ModelError::ImageTooLarge { .. })
        ));
    }

    #[test]
    fn a_png_bomb_header_is_refused_without_decoding() {
        // A valid signature and IHDR claiming 100000 x 100000 RGB (30 GB decoded), a token IDAT.
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        png.extend(png_chunk(b"IHDR", &ihdr));
        png.extend(png_chunk(
            b"IDAT",
            &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(png_chunk(b"IEND", &[]));
        let lenient = ImageLimits {
            max_side: u32::MAX,
            ..Default::default()
        };
        for limits in [ImageLimits::default(), lenient] {
            match decode_image(&png, &limits) {
                Err(ModelError::ImageTooLarge { width, height, .. }) => {
                    assert_eq!((width, height), (100_000, 100_000))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 3 wide x 2 tall, stored; orientation 6 = rotate 90 degrees clockwise to display.
        let stored: Vec<u8> = (0..6u8).flat_map(|i| [i * 40, 0, 0]).collect();
        let plain = png_bytes(3, 2, &stored, ExtendedColorType::Rgb8);
        // eXIf goes before IDAT: after the 8-byte signature and the 25-byte IHDR chunk.
        let mut png = plain[..33].to_vec();
        png.extend(png_chunk(b"eXIf", &exif_orientation(6)));
        png.extend_from_slice(&plain[33..]);
        let img = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (2, 3));
        // Rotating clockwise puts the stored bottom-left pixel (index 3) at the top-left.
        let reds: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        assert_eq!(reds, vec![120, 0, 160, 40, 200, 80]);

        // JPEG: APP1 "Exif\0\0" right after SOI.
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
            .write_image(&vec![128u8; 16 * 8 * 3], 16, 8, ExtendedColorType::Rgb8)
            .unwrap();
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(exif_orientation(6));
        let mut with_exif = jpg[..2].to_vec();
        with_exif.extend_from_slice(&[0xFF, 0xE1]);
        with_exif.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        with_exif.extend(app1);
        with_exif.extend_from_slice(&jpg[2..]);
        let img = decode_image(&with_exif, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (8, 16));
        let img = decode_image(&jpg, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (16, 8));
    }

    #[test]
    fn grey_and_alpha_become_rgb_like_pil_convert() {
        // LA: grey replicated, alpha dropped (even fully transparent pixels keep their value).
        let la = png_bytes(2, 1, &[10, 0, 200, 255], ExtendedColorType::La8);
        let img = decode_image(&la, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![10, 10, 10, 200, 200, 200]);
        let rgba = png_bytes(1, 1, &[1, 2, 3, 0], ExtendedColorType::Rgba8);
        let img = decode_image(&rgba, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![1, 2, 3]);
        // 16-bit RGB keeps the high byte, as PIL's "RGB;16B" unpacker does.
        let rgb16: Vec<u8> = [0x1234u16, 0xFF00, 0x00FF]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let png = png_bytes(1, 1, &rgb16, ExtendedColorType::Rgb16);
        let img = decode_image(&png, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![0x12, 0xFF, 0x00]);
        let grey = png_bytes(3, 1, &[0, 128, 255], ExtendedColorType::L8);
        let img = decode_image(&grey, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &vec![0, 0, 0, 128, 128, 128, 255, 255, 255]);
    }

    #[test]
    fn configs_from_both_checkpoint_formats() {
        let src = Path::new("test");
        // Ints: size is a shortest edge, crop_size a square (transformers' get_size_dict).
        let clip = serde_json::json!({"crop_size": 336, "size": 336, "resample": 3});
        let clip = PreprocessConfig::from_hf_preprocessor(&clip, src).unwrap();
        assert_eq!(clip.size, SizeSpec::ShortestEdge(336));
        assert_eq!(clip.crop_size, (336, 336));
        assert_eq!(clip.aspect, AspectMode::ResizeCrop);
        assert_eq!(clip, PreprocessConfig::clip_defaults(336));
        // HF llava: pads only with do_pad.
        let llava =
            serde_json::json!({"image_processor_type": "LlavaImageProcessor", "do_pad": true});
        let llava = PreprocessConfig::from_hf_preprocessor(&llava, src).unwrap();
        assert_eq!(llava.aspect, AspectMode::PadToSquare);
        let bad = serde_json::json!({"resample": 0});
        assert!(PreprocessConfig::from_hf_preprocessor(&bad, src).is_err());

        // Original format: pinpoints are (w, h) there; a string form is accepted.
        let orig = serde_json::json!({
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": "[(336, 672), (672, 336), (672, 672)]"
        });
        let cfg = PreprocessConfig::for_original_llava(&orig, clip.clone(), src).unwrap();
        assert_eq!(
            cfg.aspect,
            AspectMode::Anyres {
                pinpoints: vec![(672, 336), (336, 672), (672, 672)],
                unpad: UnpadRounding::Truncate
            }
        );
        // Small images tie on the first two canvases: LLaVA stacks 2 tiles (672 high) where
        // transformers puts them side by side (counts from fixtures/reference/token_counts.json).
        assert_eq!(
            select_best_resolution(300, 200, &[(672, 336), (336, 672)]),
            (672, 336)
        );
        assert_eq!(image_token_count(300, 200, &cfg, 24), 1476);
        assert_eq!(image_token_count(300, 200, &hf_next(), 24), 984);
        let pad = serde_json::json!({"image_aspect_ratio": "pad", "image_grid_pinpoints": null});
        let pad = PreprocessConfig::for_original_llava(&pad, clip.clone(), src).unwrap();
        assert_eq!(pad.aspect, AspectMode::PadToSquare);
        let none = PreprocessConfig::for_original_llava(&serde_json::json!({}), clip.clone(), src);
        assert_eq!(none.unwrap().aspect, AspectMode::ResizeCrop);
        let odd = serde_json::json!({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),...,(6x6)"});
        assert!(PreprocessConfig::for_original_llava(&odd, clip, src).is_err());
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
    fn resize_window_is_the_crop_of_the_full_resize() {
        // Down, up, mixed and one-axis resizes, so that both pass orders and the single-pass
        // cases run; windows at the corners, inside, one pixel wide and the whole output.
        let cases = [
            ((40, 30), (7, 11)),
            ((9, 13), (33, 20)),
            ((50, 8), (12, 30)),
            ((8, 50), (30, 12)),
            ((30, 21), (30, 9)),
            ((21, 30), (9, 30)),
            ((64, 1), (336, 21504)),
        ];
        for ((in_w, in_h), (out_w, out_h)) in cases {
            let src = pattern(in_h, in_w);
            for filter in [Resample::Bicubic, Resample::Bilinear] {
                let full = resize_pil(&src, out_w, out_h, filter);
                let windows = [
                    (0, 0, out_w, out_h),
                    (0, 0, 1, 1),
                    (out_w - 1, out_h - 1, 1, 1),
                    (out_w / 3, out_h / 4, out_w / 2 + 1, out_h / 2 + 1),
                    (out_w / 2, 0, 1, out_h),
                    (0, out_h / 2, out_w, 1),
                ];
                for window in windows {
                    assert_eq!(
                        resize_pil_window(&src, out_w, out_h, window, filter),
                        crop_window(&full, window),
                        "{in_w}x{in_h} -> {out_w}x{out_h} {filter:?} window {window:?}"
                    );
                }
            }
        }
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
