//! Sampling on the model's device: a decode step's rows of logits `[B, V]` go in, and only the
//! chosen ids, their logprobs and the requested top alternatives come back (`B × 42` floats
//! instead of `B × V`). One launch on CUDA (model/cuda/sample.cu, one block per row); on the CPU
//! the op is the Rust model of that kernel ([`reference_row`]), which the tests hold to
//! [`crate::sampling::Sampler`]'s semantics.
//!
//! The draw is [`crate::sampling::choose`]'s: greedy is the argmax (lowest id on ties); otherwise
//! temperature, top-k, top-p and min-p pick the kept tokens and the token is the first, in id
//! order, where the kept weights' running sum passes `u` × their total. `u` comes from the
//! sequence's own seeded stream on the host ([`crate::sampling::Sampler::device_draw`]), so a
//! seed gives the same tokens whatever shares the batch, and the same tokens as the host sampler
//! up to rounding at a boundary (the device sums in f32, in another order).
//!
//! The kernel needs no sort: a threshold is the largest 32-bit key (the logit's bits, mapped so
//! that the integer order is the float order) at which a count or a mass still holds, found one
//! bit at a time with 32 block reductions:
//! - top-k: the largest key with at least k logits at or above it (the k-th largest logit);
//! - top-p: the largest key τ whose tokens at or above it carry at least `top_p` × the kept
//!   mass; every token above τ is in the nucleus, and of the tokens tied at τ the lowest ids,
//!   as many as the mass still needs (the host sorts ties by id too);
//! - the top logprobs: `top_logprobs` rounds of "the next token after the last one, in the
//!   order logit descending, id ascending".
//!
//! Every reduction has a fixed order, so a row gives the same bits on every run.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
#[cfg(any(test, feature = "cuda"))]
use candle_core::DType;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::{ModelError, Result};
use crate::sampling::{argmax, DrawSpec, SampledToken, MAX_TOP_LOGPROBS};

/// Columns of a row's result: id, logprob, then `MAX_TOP_LOGPROBS` (id, logprob) pairs.
pub const OUT_COLS: usize = 2 + 2 * MAX_TOP_LOGPROBS;
/// Columns of a row's settings: temperature, top_k, top_p, min_p, top_logprobs, u (f64 each).
pub const PARAM_COLS: usize = 6;
/// The id column's codes for a row that cannot be sampled.
const BAD_LOGIT: f32 = -1.0;
const NO_FINITE_LOGIT: f32 = -2.0;

/// Samples row `b` of `logits [B, V]` (f32, bf16 or f16, on any device) with `specs[b]`, among
/// the ids below `limit` (the rest of each row is never drawn and not in the logprobs'
/// normaliser). One launch and one copy of `B × OUT_COLS` floats on CUDA. A row whose logits
/// cannot be sampled (NaN, +inf, none finite) is that row's error, as on the host.
pub fn sample_rows(
    logits: &Tensor,
    specs: &[DrawSpec],
    limit: usize,
) -> Result<Vec<Result<SampledToken>>> {
    let (rows, vocab) = logits.dims2()?;
    if rows != specs.len() {
        return Err(ModelError::Sampling(format!(
            "{} draws for {rows} rows of logits",
            specs.len()
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let limit = limit.min(vocab);
    if limit == 0 || vocab >= 1 << 24 {
        // Ids travel as f32: exact below 2^24.
        return Err(ModelError::Sampling(format!(
            "cannot sample ids below {limit} of a {vocab}-token vocabulary on the device"
        )));
    }
    let params: Vec<f64> = specs.iter().flat_map(kernel_params).collect();
    let params = Tensor::from_vec(params, (rows, PARAM_COLS), logits.device())?;
    let out = logits
        .contiguous()?
        .apply_op2_no_bwd(&params, &SampleRows { rows, vocab, limit })?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(tokens_of(&out, specs, limit))
}

/// The op on `device` against [`reference_row`] on the host, at `vocab` columns in `dtype`: 48
/// rows of random logits (bf16-rounded, so with ties; a few −inf) under greedy, temperature,
/// top-k, top-p and min-p draws with top logprobs. Ids must be equal, except where the host's
/// draw with `u` moved by 1e-4 gives the device's id (a rounding at a boundary of the kept
/// mass, which the device sums in f32); logprobs within 1e-4. Returns the number of draws
/// compared. The backend runs it once before sampling on a device, and samples on the host when
/// it fails, so a kernel fault costs speed, not answers.
pub fn self_check(
    device: &candle_core::Device,
    dtype: candle_core::DType,
    vocab: usize,
) -> Result<usize> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let specs = test_draws(&mut rng, 48);
    let rows: Vec<f32> = (0..specs.len())
        .flat_map(|_| test_logits(&mut rng, vocab))
        .collect();
    let host =
        Tensor::from_vec(rows, (specs.len(), vocab), &candle_core::Device::Cpu)?.to_dtype(dtype)?;
    let widened = host.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let got = sample_rows(&host.to_device(device)?, &specs, vocab)?;
    for (b, (got, spec)) in got.into_iter().zip(&specs).enumerate() {
        check_against_reference(&widened[b], spec, &got?)
            .map_err(|e| ModelError::Sampling(format!("device sampler row {b}: {e}")))?;
    }
    Ok(specs.len())
}

/// Whether `got`, a device's token for logits `x` (the ids below the limit) under `spec`,
/// is [`reference_row`]'s: the same id, or the reference's with `u` moved by 1e-4 (a rounding at
/// a boundary of the kept mass, which the device sums in f32); logprobs within 1e-4; the same
/// top alternatives.
pub fn check_against_reference(
    x: &[f32],
    spec: &DrawSpec,
    got: &SampledToken,
) -> std::result::Result<(), String> {
    let want = token(&reference_row(x, spec), spec, x.len()).map_err(|e| e.to_string())?;
    let nudged = |du: f64| {
        let spec = DrawSpec {
            u: (spec.u + du).clamp(0.0, 1.0 - f64::EPSILON),
            ..*spec
        };
        reference_row(x, &spec)[0] as u32
    };
    let same_id = got.id == want.id || got.id == nudged(1e-4) || got.id == nudged(-1e-4);
    let close = |a: f32, b: f32| a == b || (a - b).abs() <= 1e-4;
    let same_top = got.top_logprobs.len() == want.top_logprobs.len()
        && got
            .top_logprobs
            .iter()
            .zip(&want.top_logprobs)
            .all(|(g, w)| g.0 == w.0 && close(g.1, w.1));
    let logprob_ok = got.id != want.id || close(got.logprob, want.logprob);
    if same_id && same_top && logprob_ok {
        Ok(())
    } else {
        Err(format!("{spec:?}: got {got:?}, the reference {want:?}"))
    }
}

/// The op's result rows (`[rows, OUT_COLS]`, as the kernel writes them) as tokens.
pub fn tokens_of(out: &[f32], specs: &[DrawSpec], limit: usize) -> Vec<Result<SampledToken>> {
    out.chunks_exact(OUT_COLS)
        .zip(specs)
        .map(|(row, spec)| token(row, spec, limit))
        .collect()
}

/// A draw's settings as the kernel reads them, one row of `[rows, PARAM_COLS]` f64 (the inverse
/// of `SampleRows::spec`); `top_logprobs` capped at [`MAX_TOP_LOGPROBS`].
pub fn kernel_params(spec: &DrawSpec) -> [f64; PARAM_COLS] {
    [
        f64::from(spec.temperature),
        spec.top_k as f64,
        f64::from(spec.top_p),
        f64::from(spec.min_p),
        spec.top_logprobs.min(MAX_TOP_LOGPROBS) as f64,
        spec.u,
    ]
}

/// The kinds of draw [`test_draws`] cycles through: (temperature, top_k, top_p, min_p).
pub const TEST_DRAW_KINDS: [(f32, usize, f32, f32); 8] = [
    (0.0, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.7, 1, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 40, 0.5, 0.05),
    (0.8, 0, 0.0, 0.0),
    (1.0, 0, 0.3, 0.1),
];

/// `n` draws for the sampler's checks: greedy, temperature, top-k (1 and more), top-p (0 to
/// 0.9) and min-p in turn ([`TEST_DRAW_KINDS`]), with 0, 1, 7 or 20 top logprobs and a random
/// `u` each.
pub fn test_draws(rng: &mut impl rand::Rng, n: usize) -> Vec<DrawSpec> {
    let kinds = TEST_DRAW_KINDS.len();
    (0..n)
        .map(|i| {
            let (temperature, top_k, top_p, min_p) = TEST_DRAW_KINDS[i % kinds];
            DrawSpec {
                temperature,
                top_k,
                top_p,
                min_p,
                top_logprobs: [0, 1, 7, 20][(i / kinds + i) % 4],
                u: rng.random(),
            }
        })
        .collect()
}

/// A row of `n` test logits for the sampler's checks: uniform at a random scale in [0.5, 8),
/// rounded to bf16 (so with ties), about 2 % of them −inf but never the first (a row with no
/// finite logit is an error, not a draw).
pub fn test_logits(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    let scale = rng.random_range(0.5f32..8.0);
    (0..n)
        .map(|i| {
            if i > 0 && rng.random::<f32>() < 0.02 {
                f32::NEG_INFINITY
            } else {
                half::bf16::from_f32(rng.random_range(-1.0f32..1.0) * scale).to_f32()
            }
        })
        .collect()
}

/// One row of the op's result as a token, or the host sampler's error for that row.
fn token(row: &[f32], spec: &DrawSpec, limit: usize) -> Result<SampledToken> {
    if row[0] == BAD_LOGIT {
        return Err(ModelError::Sampling(
            "a logit is NaN or +inf (model fault)".into(),
        ));
    }
    if row[0] == NO_FINITE_LOGIT {
        return Err(ModelError::Sampling("every logit is -inf".into()));
    }
    let n = spec.top_logprobs.min(MAX_TOP_LOGPROBS).min(limit);
    Ok(SampledToken {
        id: row[0] as u32,
        logprob: row[1],
        top_logprobs: row[2..2 + 2 * n]
            .chunks_exact(2)
            .map(|p| (p[0] as u32, p[1]))
            .collect(),
    })
}

/// The logit's bits as an unsigned key whose integer order is `f32::total_cmp`'s order.
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The logit of a key ([`key`]'s inverse).
fn from_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// The largest `t` for which `holds(t)`, where `holds` is true at 0 and stays true up to some
/// value and false above it: built one bit at a time, most significant first (the kernel's 32
/// block reductions).
fn largest_where(holds: impl Fn(u32) -> bool) -> u32 {
    let mut t = 0u32;
    for bit in (0..32).rev() {
        let candidate = t | (1 << bit);
        if holds(candidate) {
            t = candidate;
        }
    }
    t
}

/// The kernel's algorithm for one row, `x` its logits below the limit, in f64 (the kernel sums
/// in f32): `[id, logprob, (id, logprob) × MAX_TOP_LOGPROBS]`, or an error code in the id.
pub fn reference_row(x: &[f32], spec: &DrawSpec) -> [f32; OUT_COLS] {
    let mut out = [0f32; OUT_COLS];
    if x.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
        out[0] = BAD_LOGIT;
        return out;
    }
    let best = argmax(x);
    let max = x[best];
    if max == f32::NEG_INFINITY {
        out[0] = NO_FINITE_LOGIT;
        return out;
    }
    let sum: f64 = x
        .iter()
        .map(|&v| (f64::from(v) - f64::from(max)).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |i: usize| (f64::from(x[i]) - log_z) as f32;
    // Top alternatives: the kernel's rounds ("the first token after the previous one, logit
    // descending, id ascending") give the host's order (`top_n`: total_cmp, lower id first).
    let top = crate::sampling::top_n(x, spec.top_logprobs.min(MAX_TOP_LOGPROBS));
    for (j, &i) in top.iter().enumerate() {
        out[2 + 2 * j] = i as f32;
        out[3 + 2 * j] = logprob(i);
    }
    let id = if spec.is_greedy() {
        best
    } else {
        draw(x, spec, max)
    };
    out[0] = id as f32;
    out[1] = logprob(id);
    out
}

/// The non-greedy draw of [`reference_row`] (module docs).
fn draw(x: &[f32], spec: &DrawSpec, max: f32) -> usize {
    let (max, temperature) = (f64::from(max), f64::from(spec.temperature));
    let weight = |v: f32| ((f64::from(v) - max) / temperature).exp();
    let k = spec.top_k;
    let k_key = if k > 0 && k < x.len() {
        largest_where(|c| x.iter().filter(|&&v| key(v) >= c).count() >= k)
    } else {
        0
    };
    let in_k = |i: usize| x[i] > f32::NEG_INFINITY && key(x[i]) >= k_key;
    let mass = |pred: &dyn Fn(usize) -> bool| -> (f64, usize) {
        (0..x.len())
            .filter(|&i| in_k(i) && pred(i))
            .fold((0.0, 0), |(m, n), i| (m + weight(x[i]), n + 1))
    };
    let (tau, id_bound) = if spec.top_p < 1.0 {
        let target = f64::from(spec.top_p) * mass(&|_| true).0;
        let tau = largest_where(|c| {
            let (m, n) = mass(&|i| key(x[i]) >= c);
            m >= target && n >= 1
        });
        let above = mass(&|i| key(x[i]) > tau).0;
        let (_, ties) = mass(&|i| key(x[i]) == tau);
        let need = ((target - above) / weight(from_key(tau))).ceil();
        let need = if need.is_finite() {
            (need.max(1.0) as usize).min(ties)
        } else {
            ties
        };
        let bound = if need < ties {
            largest_where(|c| mass(&|i| key(x[i]) == tau && (i as u32) < c).1 < need)
        } else {
            u32::MAX
        };
        (tau, bound)
    } else {
        (0, u32::MAX)
    };
    let min_p = f64::from(spec.min_p);
    let kept = |i: usize| {
        in_k(i)
            && (key(x[i]) > tau || (key(x[i]) == tau && i as u32 <= id_bound))
            && (min_p <= 0.0 || weight(x[i]) >= min_p)
    };
    let total: f64 = (0..x.len())
        .filter(|&i| kept(i))
        .map(|i| weight(x[i]))
        .sum();
    let target = spec.u * total;
    let mut cumulative = 0.0;
    let mut last = 0;
    for i in (0..x.len()).filter(|&i| kept(i)) {
        cumulative += weight(x[i]);
        if target < cumulative {
            return i;
        }
        last = i;
    }
    // Rounding can leave the target at the very top: the last kept token owns it.
    last
}

/// The op: logits `[rows, vocab]` and the settings `[rows, PARAM_COLS]` (f64) to
/// `[rows, OUT_COLS]` f32.
struct SampleRows {
    rows: usize,
    vocab: usize,
    limit: usize,
}

impl SampleRows {
    fn spec(p: &[f64]) -> DrawSpec {
        DrawSpec {
            temperature: p[0] as f32,
            top_k: p[1] as usize,
            top_p: p[2] as f32,
            min_p: p[3] as f32,
            top_logprobs: p[4] as usize,
            u: p[5],
        }
    }
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = crate::kernel_io::widen_storage(ls, ll, "sample_rows", "logits")?;
        let params = match ps {
            CpuStorage::F64(p) => crate::kernel_io::contiguous(p, pl, "sample_rows", "params")?,
            _ => candle_core::bail!("sample_rows: params must be f64"),
        };
        let mut out = Vec::with_capacity(self.rows * OUT_COLS);
        for (row, p) in logits
            .chunks_exact(self.vocab)
            .zip(params.chunks_exact(PARAM_COLS))
        {
            out.extend(reference_row(&row[..self.limit], &Self::spec(p)));
        }
        Ok((CpuStorage::F32(out), Shape::from((self.rows, OUT_COLS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let storage = match ls.dtype() {
            DType::F32 => cuda::launch::<f32>(self, ls, ll, ps, pl, "f32")?,
            DType::BF16 => cuda::launch::<half::bf16>(self, ls, ll, ps, pl, "bf16")?,
            DType::F16 => cuda::launch::<half::f16>(self, ls, ll, ps, pl, "f16")?,
            d => candle_core::bail!("sample_rows kernel: logits {d:?}"),
        };
        Ok((storage, Shape::from((self.rows, OUT_COLS))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{SampleRows, OUT_COLS};
    use crate::kernel_io::device_range;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"));
    const MODULE: &str = "tga_sample";
    /// Threads per row (THREADS in sample.cu).
    const THREADS: u32 = 512;

    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &SampleRows,
        ls: &CudaStorage,
        ll: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = ls.device.clone();
        let (a, b) = device_range(ll, "sample_rows", "logits")?;
        let logits = ls.as_cuda_slice::<T>()?.slice(a..b);
        let (a, b) = device_range(pl, "sample_rows", "params")?;
        let params = ps.as_cuda_slice::<f64>()?.slice(a..b);
        // SAFETY: the kernel writes every element of its row's OUT_COLS.
        let out = unsafe { dev.alloc::<f32>(op.rows * OUT_COLS)? };
        let func = dev.get_or_load_custom_func(&format!("sample_rows_{name}"), MODULE, PTX)?;
        let (vocab, limit) = (op.vocab as i32, op.limit as i32);
        let mut b = func.builder();
        b.arg(&logits);
        b.arg(&params);
        b.arg(&out);
        b.arg(&vocab);
        b.arg(&limit);
        let cfg = LaunchConfig {
            grid_dim: (op.rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match sample_rows_* in sample.cu; logits hold rows × vocab
        // elements, params rows × 6, out rows × OUT_COLS.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{Sampler, SamplingParams};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn specs() -> Vec<DrawSpec> {
        let mut out = Vec::new();
        for temperature in [0.0f32, 0.7, 1.3] {
            for top_k in [0usize, 1, 5, 50] {
                for top_p in [1.0f32, 0.9, 0.3, 0.0] {
                    for min_p in [0.0f32, 0.05] {
                        out.push(DrawSpec {
                            temperature,
                            top_k,
                            top_p,
                            min_p,
                            top_logprobs: [0, 3, 20][out.len() % 3],
                            u: 0.0,
                        });
                    }
                }
            }
        }
        out
    }

    /// The op's tokens against the host sampler's, drawn with the same spec and `u`, for every
    /// spec over rows of awkward lengths; logprobs to 1e-5 (the op reads bf16 logits widened).
    #[test]
    fn the_op_draws_what_the_host_sampler_draws() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut draws = 0;
        for n in [1usize, 2, 15, 16, 17, 511, 512, 513, 3000] {
            for dtype in [DType::F32, DType::BF16] {
                let specs: Vec<DrawSpec> = specs()
                    .into_iter()
                    .map(|s| DrawSpec {
                        u: rng.random(),
                        ..s
                    })
                    .collect();
                let rows: Vec<Vec<f32>> = specs.iter().map(|_| test_logits(&mut rng, n)).collect();
                let flat: Vec<f32> = rows.concat();
                let logits = Tensor::from_vec(flat, (rows.len(), n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got = sample_rows(&logits, &specs, n);
                for ((row, spec), got) in rows.iter().zip(&specs).zip(got.unwrap()) {
                    let got = got.unwrap();
                    let mut host = Sampler::new(SamplingParams::default());
                    let want = host.sample_logits_with(row, spec).unwrap();
                    let what = format!("n {n} {dtype:?} {spec:?}");
                    assert_eq!(got.id, want.id, "{what}");
                    assert!((got.logprob - want.logprob).abs() <= 1e-5, "{what}");
                    assert_eq!(got.top_logprobs.len(), want.top_logprobs.len(), "{what}");
                    for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                        assert_eq!(g.0, w.0, "{what}");
                        // −inf logits (masked ids) have −inf logprobs on both sides.
                        assert!(g.1 == w.1 || (g.1 - w.1).abs() <= 1e-5, "{what}");
                    }
                    draws += 1;
                }
            }
        }
        assert_eq!(draws, 9 * 2 * 96);
    }

    /// A seeded sequence sampled through `device_draw`, the op and `accept` gives the tokens of
    /// the same seed sampled on the host.
    #[test]
    fn a_seed_gives_the_same_tokens_on_the_device_path() {
        let mut rng = StdRng::seed_from_u64(3);
        let params = SamplingParams {
            temperature: 0.9,
            top_p: 0.8,
            top_k: 40,
            seed: Some(11),
            logprobs: true,
            top_logprobs: 2,
            ..SamplingParams::default()
        };
        let (mut host, mut device) = (Sampler::new(params.clone()), Sampler::new(params));
        let mut differ = 0;
        for _ in 0..200 {
            let x = test_logits(&mut rng, 700);
            let want = host.sample_logits(&x).unwrap();
            let spec = device.device_draw().expect("no logit processors");
            let logits = Tensor::from_slice(&x, (1, x.len()), &Device::Cpu).unwrap();
            let got = sample_rows(&logits, &[spec], x.len())
                .unwrap()
                .remove(0)
                .unwrap();
            device.accept(&got);
            assert_eq!(got.id, want.id);
            differ += usize::from(got.id as usize != argmax(&x));
        }
        assert!(differ > 20, "only {differ} of 200 draws left the argmax");
    }

    #[test]
    fn processed_logits_stay_on_the_host() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::default()
        });
        assert_eq!(s.device_draw(), None);
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.device_draw().map(|d| d.u), Some(0.0));
    }

    #[test]
    fn ids_past_the_limit_are_never_drawn_or_reported() {
        let x = [0.0f32, 1.0, 0.5, 9.0, 8.0];
        let logits = Tensor::from_slice(&x, (1, 5), &Device::Cpu).unwrap();
        for u in [0.0, 0.3, 0.999] {
            let spec = DrawSpec {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                top_logprobs: 5,
                u,
            };
            let t = sample_rows(&logits, &[spec], 3).unwrap().remove(0).unwrap();
            assert!(t.id < 3);
            let ids: Vec<u32> = t.top_logprobs.iter().map(|p| p.0).collect();
            assert_eq!(ids, [1, 2, 0]);
            let z: f32 = t.top_logprobs.iter().map(|p| p.1.exp()).sum();
            assert!(
                (z - 1.0).abs() < 1e-6,
                "normalised over the ids below the limit: {z}"
            );
        }
    }

    #[test]
    fn bad_rows_are_errors_and_do_not_touch_the_others() {
        let x = [
            0.0f32,
            f32::NAN,
            1.0,
            2.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        let logits = Tensor::from_slice(&x, (3, 2), &Device::Cpu).unwrap();
        let spec = DrawSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            top_logprobs: 0,
            u: 0.0,
        };
        let rows = sample_rows(&logits, &[spec; 3], 2).unwrap();
        assert!(rows[0].is_err(), "NaN");
        assert_eq!(rows[1].as_ref().unwrap().id, 1);
        assert!(rows[2].is_err(), "no finite logit");
    }

    #[test]
    fn self_check_runs_on_the_cpu() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(self_check(&Device::Cpu, dtype, 1001).unwrap(), 48);
        }
    }

    #[test]
    fn keys_order_as_total_cmp() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{w:?}");
        }
        for x in xs {
            assert_eq!(from_key(key(x)).to_bits(), x.to_bits());
        }
    }
}
