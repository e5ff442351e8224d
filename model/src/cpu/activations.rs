//! The fused SwiGLU and QuickGELU activations.

use candle_core::Tensor;
use rayon::prelude::*;

use super::elementwise::exp;
use super::{isa, with_f32, Isa};

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

multiversion!(fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_body);

#[inline(always)]
fn quick_gelu_body(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = x / (1.0 + exp(-1.702 * x));
    }
}

multiversion!(fn quick_gelu_chunk(xs: &[f32], out: &mut [f32]) => quick_gelu_body);

/// Splits an element-wise map over the threads in chunks that keep each task's data in L2.
fn par_map2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) {
    const CHUNK: usize = 16 * 1024;
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| f(a, b, o));
}

/// `silu(gate) · up` in one pass (Mistral's MLP), for same-shaped f32 CPU tensors.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if gate.dims() != up.dims() {
        return Ok(None);
    }
    let out = with_f32(gate, |g| {
        with_f32(up, |u| {
            let mut out = vec![0f32; g.len()];
            par_map2(g, u, &mut out, silu_mul_chunk);
            out
        })
    })
    .flatten();
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, gate.shape(), gate.device())?)),
        None => Ok(None),
    }
}

/// `x · sigmoid(1.702 x)` in one pass (CLIP's QuickGELU).
pub(crate) fn quick_gelu(xs: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let out = with_f32(xs, |x| {
        let mut out = vec![0f32; x.len()];
        par_map2(x, x, &mut out, |a, _, o| quick_gelu_chunk(a, o));
        out
    });
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, xs.shape(), xs.device())?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{max_diff, rand};

    #[test]
    fn fused_activations_match_candle() {
        let (g, u) = (rand(&[7, 33], 6), rand(&[7, 33], 7));
        let g = (g * 8.0).unwrap();
        let want = (g.silu().unwrap() * &u).unwrap();
        assert!(max_diff(&silu_mul(&g, &u).unwrap().unwrap(), &want) < 1e-5);
        let want = (&g * candle_nn::ops::sigmoid(&(&g * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&quick_gelu(&g).unwrap().unwrap(), &want) < 1e-5);
    }
}
