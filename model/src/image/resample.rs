//! Pillow resampling (libImaging/Resample.c), bit-exact for 8-bit images.

use image::RgbImage;

use super::preprocess::place;

/// PIL resampling filters this port implements (`resample` in preprocessor configs: 2, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    pub(super) fn from_pil(code: i64) -> Option<Self> {
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
pub(super) fn resize_pil_window(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_support::pattern;

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
}
