//! Vectorisable element-wise pieces (compiled per ISA through `multiversion!`): dot products,
//! sums, exp, softmax and the log-softmax normaliser.

use super::linear::WeightElem;
use super::{isa, Isa};

const LANES: usize = 16;

#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_w(a, b)
}

/// `a · b` with `a` widened to f32 element by element.
#[inline(always)]
pub(super) fn dot_w<W: WeightElem>(a: &[W], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l].to_f32() * y[l];
        }
    }
    let mut s = hsum(&acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x.to_f32() * y;
    }
    s
}

#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    // Pairwise, so the order does not depend on the ISA.
    let mut v = *acc;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] += v[l + w];
        }
    }
    v[0]
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let c = xs.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    hsum(&acc) + r.iter().sum::<f32>()
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = xs.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] = acc[l].max(x[l]);
        }
    }
    acc.iter()
        .chain(r)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// e^x for x ≤ 88 (Cephes' expf: range reduction by ln 2, degree-6 polynomial); relative error
/// ~1e-7. Branch-free so loops over it vectorise. Inputs below −87 give ~1e-38 instead of 0.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in any vector unit.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.500_000_06;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[inline(always)]
pub(super) fn softmax_in_place(xs: &mut [f32]) {
    let m = max(xs);
    for x in xs.iter_mut() {
        *x = exp(*x - m);
    }
    let inv = 1.0 / sum(xs);
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

/// `out = softmax(input · scale)` over one row.
#[inline(always)]
fn softmax_row_body(input: &[f32], out: &mut [f32], scale: f32) {
    for (o, &s) in out.iter_mut().zip(input) {
        *o = s * scale;
    }
    softmax_in_place(out);
}

multiversion!(pub(super) fn softmax_row(input: &[f32], out: &mut [f32], scale: f32) => softmax_row_body);

#[inline(always)]
fn exp_sum_body(xs: &[f32], shift: f32) -> f64 {
    // f32 terms (vectorised exp), summed per lane in f64 so 32k-token vocabularies keep ~1e-9
    // relative accuracy.
    let mut acc = [0f64; LANES];
    let c = xs.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] += f64::from(exp(x[l] - shift));
        }
    }
    acc.iter().sum::<f64>() + r.iter().map(|&x| f64::from(exp(x - shift))).sum::<f64>()
}

multiversion!(
    /// `Σ exp(x − shift)` for `x ≤ shift + 88` (log-softmax normalisers over a vocabulary).
    pub(crate) fn exp_sum(xs: &[f32], shift: f32) -> f64 => exp_sum_body
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }
}
