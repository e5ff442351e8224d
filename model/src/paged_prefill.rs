//! Paged prefill attention: the query rows of one prompt chunk (positions `start..start+n` of
//! one sequence) over keys `0..start+n` read straight from the paged KV pool, causal and within
//! Mistral's sliding window, in one CUDA launch per layer (model/cuda/paged_prefill.cu:
//! flash-attention-2 style, no gather, no materialised scores) instead of a gather, a score
//! matrix per query chunk and ~10 candle ops; and a plain Rust reference that the kernel must
//! equal within [`tolerance`] (also the CPU path).
//!
//! Pool layout and GQA as in [`crate::paged`]. One sequence per call, as the decoder prefills
//! them; several (varlen) would add per-sequence starts, query offsets and table rows, the
//! kernel's grid one more dimension.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::kernel_io::{storage_of, widen_storage, with_pools, PoolReference, Widen};
use rayon::prelude::*;

/// Prefill attention of one sequence's chunk over its paged KV cache.
#[derive(Debug, Clone, Copy)]
pub struct PagedPrefill<'a> {
    /// `[slots, kv_heads, hd]`.
    pub k_pool: &'a Tensor,
    /// `[slots, kv_heads, hd]`, same dtype as `k_pool`.
    pub v_pool: &'a Tensor,
    /// `[max_blocks]` u32, on the pool's device: the sequence's block table (entries past
    /// position `start + n`: any value).
    pub block_table: &'a Tensor,
    /// Position of the first query row. Keys `0..start+n` must be in the pool already (the
    /// chunk's own written before the call).
    pub start: usize,
    pub block_size: usize,
    /// Mistral's sliding window: the query at `p` sees keys `j <= p` with `p - j < w`.
    pub window: Option<usize>,
    /// Usually `1 / sqrt(hd)`.
    pub scale: f32,
    /// On CUDA, bf16/f16 at head_dim 64 or 128: the tensor-core kernel (probabilities rounded
    /// to the input dtype for P·V) rather than the CUDA-core one (f32 throughout, slower). No
    /// effect elsewhere.
    pub tensor_cores: bool,
}

/// Largest head_dim the kernels handle.
pub const KERNEL_MAX_HEAD_DIM: usize = 128;
/// Largest GQA group (query heads per KV head) the kernels handle: a block holds at least one
/// query position's heads (32 rows in the CUDA-core kernel).
pub const KERNEL_MAX_GROUPS: usize = 16;

/// Whether the CUDA kernels handle this compute dtype (of q and the pools alike), head_dim and
/// GQA group size, so that a caller can fall back to candle ops otherwise.
pub fn kernel_supports(dtype: DType, head_dim: usize, groups: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && (1..=KERNEL_MAX_HEAD_DIM).contains(&head_dim)
        && (1..=KERNEL_MAX_GROUPS).contains(&groups)
}

/// Whether `args` would take the tensor-core kernel on CUDA for this dtype and head_dim.
pub fn uses_tensor_cores(dtype: DType, head_dim: usize, tensor_cores: bool) -> bool {
    tensor_cores && matches!(dtype, DType::BF16 | DType::F16) && matches!(head_dim, 64 | 128)
}

/// `q [n, heads, hd]` (contiguous or not) at positions `start..start+n` → `[n, heads, hd]` in
/// q's dtype. Scores in f32 from inputs widened to f32, softmax in f32 over the visible keys,
/// Σ p·v accumulated in f32 (the tensor-core kernel rounds p to q's dtype first), cast once.
/// On CUDA this is a kernel (q's dtype must equal the pools' and [`kernel_supports`] must
/// hold); on the CPU it is [`paged_prefill_attention_reference`].
pub fn paged_prefill_attention(q: &Tensor, args: &PagedPrefill) -> candle_core::Result<Tensor> {
    let op = PrefillOp::new(q, args)?;
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(args.k_pool, args.v_pool, &op)
}

/// The Rust reference: CPU, any float dtype, f32 math, straightforward loops. Tensors on another
/// device are copied to the CPU first (a test aid); the result is on the CPU.
pub fn paged_prefill_attention_reference(
    q: &Tensor,
    args: &PagedPrefill,
) -> candle_core::Result<Tensor> {
    let cpu = candle_core::Device::Cpu;
    let (k, v) = (args.k_pool.to_device(&cpu)?, args.v_pool.to_device(&cpu)?);
    let table = args.block_table.to_device(&cpu)?;
    let args = PagedPrefill {
        k_pool: &k,
        v_pool: &v,
        block_table: &table,
        ..*args
    };
    paged_prefill_attention(&q.to_device(&cpu)?, &args)
}

/// The op: q, k_pool, v_pool are its operands; the table travels in the struct.
struct PrefillOp {
    table: Tensor,
    n: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    slots: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_blocks: usize,
    block_size: usize,
    window: Option<usize>,
    scale: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tensor_cores: bool,
}

impl PrefillOp {
    fn new(q: &Tensor, a: &PagedPrefill) -> candle_core::Result<Self> {
        let (n, heads, hd) = q.dims3()?;
        let (slots, kv_heads, khd) = a.k_pool.dims3()?;
        if a.v_pool.dims() != a.k_pool.dims() || khd != hd {
            candle_core::bail!(
                "paged prefill: q {:?}, k_pool {:?}, v_pool {:?} do not match",
                q.dims(),
                a.k_pool.dims(),
                a.v_pool.dims()
            );
        }
        if a.v_pool.dtype() != a.k_pool.dtype() {
            candle_core::bail!(
                "paged prefill: k_pool is {:?}, v_pool {:?}",
                a.k_pool.dtype(),
                a.v_pool.dtype()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("paged prefill: {heads} query heads over {kv_heads} KV heads");
        }
        if n == 0 {
            candle_core::bail!("paged prefill: no query rows");
        }
        let max_blocks = a.block_table.dims1()?;
        if a.block_table.dtype() != DType::U32 {
            candle_core::bail!("paged prefill: block_table must be u32");
        }
        if a.block_size == 0 || a.window == Some(0) {
            candle_core::bail!("paged prefill: block_size and window must be positive");
        }
        if !a.block_table.device().same_device(a.k_pool.device()) {
            candle_core::bail!("paged prefill: block_table must be on the pool's device");
        }
        let total = a.start + n;
        if total > max_blocks.saturating_mul(a.block_size) {
            candle_core::bail!(
                "paged prefill: positions 0..{total} beyond the block table ({max_blocks} blocks \
                 of {})",
                a.block_size
            );
        }
        // The kernels index positions with i32.
        if max_blocks.saturating_mul(a.block_size) > i32::MAX as usize {
            candle_core::bail!("paged prefill: block table too long");
        }
        Ok(Self {
            table: a.block_table.contiguous()?,
            n,
            start: a.start,
            heads,
            kv_heads,
            hd,
            slots,
            max_blocks,
            block_size: a.block_size,
            window: a.window,
            scale: a.scale,
            tensor_cores: a.tensor_cores,
        })
    }

    /// Keys visible from position `p`: `lo..=p`.
    fn visible(&self, p: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (p + 1).saturating_sub(w));
        lo..p + 1
    }

    /// The reference over widened pool rows; `q` is `[n, heads, hd]` in f32.
    fn reference<K: Widen>(&self, q: &[f32], k: &[K], v: &[K]) -> candle_core::Result<Vec<f32>> {
        let table = self.table.to_vec1::<u32>()?;
        let (hd, groups) = (self.hd, self.heads / self.kv_heads);
        let total = self.start + self.n;
        let slots = (0..total)
            .map(|j| {
                let block = table[j / self.block_size] as usize;
                let slot = block * self.block_size + j % self.block_size;
                match slot < self.slots {
                    true => Ok(slot),
                    false => Err(candle_core::Error::Msg(format!(
                        "paged prefill: position {j} maps to slot {slot} of {}",
                        self.slots
                    ))),
                }
            })
            .collect::<candle_core::Result<Vec<usize>>>()?;
        // Query rows in parallel (a test aid at the 7B's shape runs billions of multiply-adds).
        let mut out = vec![0f32; self.n * self.heads * hd];
        out.par_chunks_mut(self.heads * hd)
            .enumerate()
            .for_each(|(i, out)| {
                let keys = &slots[self.visible(self.start + i)];
                let mut scores = Vec::with_capacity(keys.len());
                let mut acc = vec![0f32; hd];
                for h in 0..self.heads {
                    let kvh = h / groups;
                    let qrow = &q[(i * self.heads + h) * hd..][..hd];
                    let row = |slot: usize| (slot * self.kv_heads + kvh) * hd;
                    scores.clear();
                    for &slot in keys {
                        scores.push(dot(qrow, &k[row(slot)..][..hd]) * self.scale);
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    acc.fill(0.0);
                    for (&slot, &p) in keys.iter().zip(&scores) {
                        for (a, x) in acc.iter_mut().zip(&v[row(slot)..][..hd]) {
                            *a += p * x.widen();
                        }
                    }
                    for (o, a) in out[h * hd..][..hd].iter_mut().zip(&acc) {
                        *o = a / sum;
                    }
                }
            });
        Ok(out)
    }
}

/// `a · b` in f32 over 8 partial sums (so that it vectorises; any order is the reference's).
fn dot<K: Widen>(a: &[f32], b: &[K]) -> f32 {
    let mut part = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.widen())
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            part[l] += x[l] * y[l].widen();
        }
    }
    part.iter().sum::<f32>() + tail
}

impl PoolReference for PrefillOp {
    fn op_name(&self) -> &'static str {
        "paged prefill"
    }

    fn run<K: Widen>(&self, q: &[f32], k: &[K], v: &[K]) -> candle_core::Result<Vec<f32>> {
        self.reference(q, k, v)
    }
}

impl CustomOp3 for PrefillOp {
    fn name(&self) -> &'static str {
        "paged-prefill-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = widen_storage(qs, ql, "paged prefill", "q")?;
        let out = with_pools(self, &q, (ks, kl), (vs, vl))?;
        Ok((
            storage_of(qs.dtype(), out),
            Shape::from((self.n, self.heads, self.hd)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let groups = self.heads / self.kv_heads;
        let dtype = qs.dtype();
        if !kernel_supports(dtype, self.hd, groups) || ks.dtype() != dtype {
            candle_core::bail!(
                "paged prefill kernel: q {dtype:?} / pools {:?}, head_dim {}, groups {groups} \
                 not supported (see kernel_supports)",
                ks.dtype(),
                self.hd
            );
        }
        let storage = match dtype {
            DType::F32 => cuda::launch::<f32>(self, qs, ql, ks, kl, vs, vl, "f32")?,
            DType::BF16 => cuda::launch::<half::bf16>(self, qs, ql, ks, kl, vs, vl, "bf16")?,
            _ => cuda::launch::<half::f16>(self, qs, ql, ks, kl, vs, vl, "f16")?,
        };
        Ok((storage, Shape::from((self.n, self.heads, self.hd))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{uses_tensor_cores, PrefillOp};
    use crate::kernel_io::device_range;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_prefill.ptx"));
    const MODULE: &str = "tga_paged_prefill";
    /// Threads per block of either kernel (F_WARPS, M_WARPS in the .cu file).
    const THREADS: u32 = 128;
    /// Query rows per block: the CUDA-core kernel's (F_R), the tensor-core kernel's (M_R).
    const FMA_ROWS: usize = 32;
    const MMA_ROWS: usize = 64;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &PrefillOp,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = qs.device.clone();
        let (q0, q1) = device_range(ql, "paged prefill", "q")?;
        let (k0, k1) = device_range(kl, "paged prefill", "k_pool")?;
        let (v0, v1) = device_range(vl, "paged prefill", "v_pool")?;
        let q = qs.as_cuda_slice::<T>()?.slice(q0..q1);
        let k = ks.as_cuda_slice::<T>()?.slice(k0..k1);
        let v = vs.as_cuda_slice::<T>()?.slice(v0..v1);
        let (ts, tl) = op.table.storage_and_layout();
        let table = match &*ts {
            Storage::Cuda(c) => {
                let o = tl.start_offset();
                c.as_cuda_slice::<u32>()?.slice(o..o + op.max_blocks)
            }
            _ => candle_core::bail!("paged prefill: block_table must be on the CUDA device"),
        };

        let groups = op.heads / op.kv_heads;
        let mma = uses_tensor_cores(qs.dtype(), op.hd, op.tensor_cores);
        let rows = if mma { MMA_ROWS } else { FMA_ROWS };
        // Query positions per block: all `groups` heads of each.
        let bq = rows / groups;
        let tiles = op.n.div_ceil(bq);
        // SAFETY: every element is written: each row of the chunk belongs to one block.
        let out = unsafe { dev.alloc::<T>(op.n * op.heads * op.hd)? };
        let func = match mma {
            true => format!("paged_prefill_mma_{name}_h{}", op.hd),
            false => format!(
                "paged_prefill_{name}_v{}",
                op.hd.div_ceil(32).next_power_of_two()
            ),
        };
        let func = dev.get_or_load_custom_func(&func, MODULE, PTX)?;
        let (n, start) = (op.n as i32, op.start as i32);
        let (kv_heads, groups_i, hd, bq_i) =
            (op.kv_heads as i32, groups as i32, op.hd as i32, bq as i32);
        let (max_blocks, block_size) = (op.max_blocks as i32, op.block_size as i32);
        let n_slots = op.slots as u64;
        // 0 = no window; a window over i32::MAX hides nothing the kernel can index.
        let window = op.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let scale = op.scale;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&table);
        b.arg(&out);
        b.arg(&n);
        b.arg(&start);
        b.arg(&kv_heads);
        b.arg(&groups_i);
        if !mma {
            b.arg(&hd);
        }
        b.arg(&bq_i);
        b.arg(&max_blocks);
        b.arg(&block_size);
        b.arg(&n_slots);
        b.arg(&window);
        b.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, op.kv_heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches paged_prefill_* / paged_prefill_mma_* in
        // paged_prefill.cu (the mma kernel has no hd argument: its HD is the template's); the
        // views cover what the kernels read (table of max_blocks entries, pool slots
        // bounds-checked, q rows < n).
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// A random prompt chunk for checking the kernel: q `[n, kv_heads·groups, hd]` at positions
/// `start..start+n` and pools `[slots, kv_heads, hd]` holding keys `0..start+n` (and other
/// sequences' blocks), in f32 on the CPU, values uniform in [-2, 2); the sequence's blocks are
/// a shuffled subset of the pool's and `u32::MAX` fills the table past its length (never to be
/// read). Deterministic in `seed`.
#[derive(Debug)]
pub struct PrefillCase {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// `[max_blocks]` u32.
    pub table: Tensor,
    pub table_row: Vec<u32>,
    pub start: usize,
    pub block_size: usize,
}

impl PrefillCase {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seed: u64,
        start: usize,
        n: usize,
        block_size: usize,
        kv_heads: usize,
        groups: usize,
        hd: usize,
    ) -> candle_core::Result<Self> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let used = (start + n).div_ceil(block_size);
        let max_blocks = used + 1;
        // Room for other sequences: the pool holds about twice the sequence.
        let total = 2 * used + 3;
        let mut blocks: Vec<u32> = (0..total as u32).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.random_range(0..=i));
        }
        let table_row: Vec<u32> = (0..max_blocks)
            .map(|i| if i < used { blocks[i] } else { u32::MAX })
            .collect();
        let dev = candle_core::Device::Cpu;
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (heads, slots) = (kv_heads * groups, total * block_size);
        Ok(Self {
            q: Tensor::from_vec(uniform(n * heads * hd), (n, heads, hd), &dev)?,
            k: Tensor::from_vec(uniform(slots * kv_heads * hd), (slots, kv_heads, hd), &dev)?,
            v: Tensor::from_vec(uniform(slots * kv_heads * hd), (slots, kv_heads, hd), &dev)?,
            table: Tensor::from_vec(table_row.clone(), max_blocks, &dev)?,
            table_row,
            start,
            block_size,
        })
    }
}

/// How far the kernel's output may be from the reference's f32 output `reference` (computed from
/// the same inputs, rounded to `dtype`), where `reference_abs` is the reference's output with
/// every value replaced by its magnitude (Σ p·|v| / Σ p). f32: `1e-5 · (1 + |r|)` (online
/// softmax sums in another order than the reference's one pass). bf16/f16: one rounding of the
/// output, `2^-8 · |r|`, plus the probabilities' rounding to the input dtype before P·V (a
/// relative 2^-9 on each weight moves the result by at most `2^-9 · reference_abs`; twice that
/// here), plus `1e-5`.
pub fn tolerance(dtype: DType, reference: f64, reference_abs: f64) -> f64 {
    match dtype {
        DType::F32 => 1e-5 * (1.0 + reference.abs()),
        _ => (reference.abs() + reference_abs) / 256.0 + 1e-5,
    }
}

/// The kernel on `device` against the reference on the CPU, for one [`PrefillCase`] in `dtype`
/// (the tensor-core kernel where `tensor_cores` and it applies): the largest |difference|, or an
/// error naming the first element out of [`tolerance`] (or the kernel's own error). On the CPU
/// both sides are the reference.
pub fn check_against_reference(
    device: &candle_core::Device,
    case: &PrefillCase,
    window: Option<usize>,
    dtype: DType,
    tensor_cores: bool,
) -> candle_core::Result<f64> {
    let hd = case.q.dim(2)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
    let (qf, kf, vf) = (round(&case.q)?, round(&case.k)?, round(&case.v)?);
    let args = |k, v, table| PagedPrefill {
        k_pool: k,
        v_pool: v,
        block_table: table,
        start: case.start,
        block_size: case.block_size,
        window,
        scale,
        tensor_cores,
    };
    let want = paged_prefill_attention_reference(&qf, &args(&kf, &vf, &case.table))?;
    // Σ p·|v| / Σ p, for the 16-bit tolerance only.
    let vabs = vf.abs()?;
    let want_abs = match dtype {
        DType::F32 => want.clone(),
        _ => paged_prefill_attention_reference(&qf, &args(&kf, &vabs, &case.table))?,
    };
    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
    let (k, v) = (on(&case.k)?, on(&case.v)?);
    let table = case.table.to_device(device)?;
    // q as a non-contiguous view, as the decoder's may be.
    let q = on(&case.q)?
        .transpose(0, 1)?
        .contiguous()?
        .transpose(0, 1)?;
    let got = paged_prefill_attention(&q, &args(&k, &v, &table))?;
    if got.dtype() != dtype || got.dims() != want.dims() {
        candle_core::bail!(
            "paged prefill: output {:?} {:?}, expected {dtype:?} {:?}",
            got.dtype(),
            got.dims(),
            want.dims()
        );
    }
    let got = got
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (got, want, want_abs) = (flat(&got)?, flat(&want)?, flat(&want_abs)?);
    let mut max_err = 0f64;
    for (i, ((&g, &w), &wa)) in got.iter().zip(&want).zip(&want_abs).enumerate() {
        let (g, w, wa) = (g as f64, w as f64, wa as f64);
        let err = (g - w).abs();
        let tol = tolerance(dtype, w, wa);
        // NaN fails too (err is NaN when either side is).
        if err.is_nan() || err > tol {
            let (heads, hd) = (case.q.dim(1)?, hd);
            candle_core::bail!(
                "paged prefill on {device:?}, {dtype:?}: row {} head {} element {} is {g}, the \
                 reference {w} (|diff| {err:e} > {tol:e})",
                i / (heads * hd),
                i / hd % heads,
                i % hd
            );
        }
        max_err = max_err.max(err);
    }
    Ok(max_err)
}

/// A start-up check of the kernel at a model's attention shape on `device` (milliseconds):
/// chunks of awkward lengths and starts (70 rows from 0: several query tiles and two key tiles;
/// 1 row at 37; 45 rows at 23 in blocks of 5), without a window and under a 20-token one. The
/// decoder runs it once before its first paged prefill and falls back to candle ops when it
/// fails, so that a kernel fault on an untried GPU or driver costs speed, not answers.
pub fn self_check(
    device: &candle_core::Device,
    dtype: DType,
    kv_heads: usize,
    groups: usize,
    hd: usize,
    tensor_cores: bool,
) -> candle_core::Result<f64> {
    let mut max_err = 0f64;
    for (seed, start, n, bs) in [(1, 0, 70, 16), (2, 37, 1, 16), (3, 23, 45, 5)] {
        let case = PrefillCase::new(0x7ea5 + seed, start, n, bs, kv_heads, groups, hd)?;
        for window in [None, Some(20)] {
            let e = check_against_reference(device, &case, window, dtype, tensor_cores)?;
            max_err = max_err.max(e);
        }
    }
    Ok(max_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// Plain dense attention in f64 over the visible rows gathered through the table.
    fn dense(c: &PrefillCase, window: Option<usize>, scale: f32) -> Vec<f64> {
        let (n, heads, hd) = c.q.dims3().unwrap();
        let kvh = c.k.dim(1).unwrap();
        let groups = heads / kvh;
        let bs = c.block_size;
        let widen = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (q, k, v) = (widen(&c.q), widen(&c.k), widen(&c.v));
        let mut out = Vec::new();
        for i in 0..n {
            let p = c.start + i;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let slots: Vec<u32> = (lo..=p)
                .map(|j| c.table_row[j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            let idx = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
            let kg = k.index_select(&idx, 0).unwrap();
            let vg = v.index_select(&idx, 0).unwrap();
            for h in 0..heads {
                let qh = q.i((i, h)).unwrap().to_vec1::<f64>().unwrap();
                let kh = kg.i((.., h / groups)).unwrap().to_vec2::<f64>().unwrap();
                let vh = vg.i((.., h / groups)).unwrap().to_vec2::<f64>().unwrap();
                let s: Vec<f64> = kh
                    .iter()
                    .map(|kr| kr.iter().zip(&qh).map(|(a, b)| a * b).sum::<f64>() * scale as f64)
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out.push(e.iter().zip(&vh).map(|(p, vr)| p * vr[d]).sum::<f64>() / z);
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        start: usize,
        n: usize,
        bs: usize,
        kvh: usize,
        groups: usize,
        hd: usize,
        window: Option<usize>,
        dtype: DType,
    ) {
        let seed = (start * 1009 + n * 31 + bs) as u64;
        let mut c = PrefillCase::new(seed, start, n, bs, kvh, groups, hd).unwrap();
        // Round the inputs to `dtype`; the dense answer uses the same rounded values.
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (q, k, v) = (round(&c.q), round(&c.k), round(&c.v));
        let scale = 1.0 / (hd as f32).sqrt();
        let args = PagedPrefill {
            k_pool: &k,
            v_pool: &v,
            block_table: &c.table,
            start,
            block_size: bs,
            window,
            scale,
            tensor_cores: true,
        };
        let got = paged_prefill_attention_reference(&q, &args).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_eq!(got.dims(), [n, kvh * groups, hd]);
        let got = got
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        (c.q, c.k, c.v) = (q, k, v);
        let want = dense(&c, window, scale);
        // f32 math: ~1e-6 of the values' scale (|v| < 2); bf16 output: half an ulp (2^-8 relative).
        let rel = if dtype == DType::BF16 {
            1.0 / 256.0
        } else {
            0.0
        };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-5 + rel * w.abs(),
                "start {start} n {n} bs {bs} groups {groups} window {window:?} {dtype:?}: \
                 [{i}] {g} vs {w}"
            );
        }
    }

    #[test]
    fn reference_matches_dense_attention() {
        for dtype in [DType::F32, DType::BF16] {
            for window in [None, Some(7)] {
                for groups in [1, 4] {
                    for bs in [1, 5, 16] {
                        for (start, n) in [(0, 1), (0, 17), (5, 12), (16, 16), (30, 3), (9, 1)] {
                            check(start, n, bs, 2, groups, 8, window, dtype);
                        }
                    }
                    check(0, 70, 16, 2, groups, 64, window, dtype);
                    check(33, 40, 16, 2, groups, 64, window, dtype);
                }
            }
        }
    }

    /// A chunk's row i is the decode of position start + i: the two references agree (to f32
    /// rounding: their dot products sum in different orders).
    #[test]
    fn each_row_is_the_decode_of_its_position() {
        let (start, n, bs, kvh, groups, hd) = (13, 9, 5, 2, 2, 16);
        let c = PrefillCase::new(7, start, n, bs, kvh, groups, hd).unwrap();
        for window in [None, Some(4)] {
            let args = PagedPrefill {
                k_pool: &c.k,
                v_pool: &c.v,
                block_table: &c.table,
                start,
                block_size: bs,
                window,
                scale: 0.3,
                tensor_cores: false,
            };
            let got = paged_prefill_attention(&c.q, &args).unwrap();
            // Decode: every row as its own sequence with the same table, of length position + 1.
            let tables = Tensor::stack(&vec![c.table.clone(); n], 0).unwrap();
            let lens: Vec<u32> = (0..n as u32).map(|i| start as u32 + i + 1).collect();
            let lens = Tensor::new(lens.as_slice(), &Device::Cpu).unwrap();
            let dec = crate::paged::PagedDecode {
                k_pool: &c.k,
                v_pool: &c.v,
                block_tables: &tables,
                lens: &lens,
                block_size: bs,
                window,
                scale: 0.3,
            };
            let want = crate::paged::paged_decode_attention(&c.q, &dec).unwrap();
            let d = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-6, "window {window:?}: {d}");
        }
    }

    #[test]
    fn non_contiguous_q_and_offset_pools() {
        let c = PrefillCase::new(3, 6, 11, 5, 2, 2, 16).unwrap();
        // q as a transposed view; pools as narrowed views of larger tensors (start offsets).
        let qt =
            c.q.transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .transpose(0, 1)
                .unwrap();
        assert!(!qt.is_contiguous());
        let pad = |t: &Tensor| {
            let z = t.narrow(0, 0, 3).unwrap().zeros_like().unwrap();
            Tensor::cat(&[&z, t], 0)
                .unwrap()
                .narrow(0, 3, t.dim(0).unwrap())
                .unwrap()
        };
        let (k, v) = (pad(&c.k), pad(&c.v));
        let mk = |k, v| PagedPrefill {
            k_pool: k,
            v_pool: v,
            block_table: &c.table,
            start: 6,
            block_size: 5,
            window: None,
            scale: 0.25,
            tensor_cores: true,
        };
        let a = paged_prefill_attention(&qt, &mk(&k, &v)).unwrap();
        let b = paged_prefill_attention(&c.q, &mk(&c.k, &c.v)).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let c = PrefillCase::new(4, 4, 9, 4, 1, 2, 8).unwrap();
        let args = |start, block_size, window, table| PagedPrefill {
            k_pool: &c.k,
            v_pool: &c.v,
            block_table: table,
            start,
            block_size,
            window,
            scale: 1.0,
            tensor_cores: true,
        };
        assert!(paged_prefill_attention(&c.q, &args(4, 4, None, &c.table)).is_ok());
        // Positions past the table, block size 0, window 0.
        assert!(paged_prefill_attention(&c.q, &args(20, 4, None, &c.table)).is_err());
        assert!(paged_prefill_attention(&c.q, &args(4, 0, None, &c.table)).is_err());
        assert!(paged_prefill_attention(&c.q, &args(4, 4, Some(0), &c.table)).is_err());
        // A table entry outside the pool, and a table that is not u32.
        let mut row = c.table_row.clone();
        row[1] = 1 << 20;
        let bad = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
        assert!(paged_prefill_attention(&c.q, &args(4, 4, None, &bad)).is_err());
        let f = c.table.to_dtype(DType::F32).unwrap();
        assert!(paged_prefill_attention(&c.q, &args(4, 4, None, &f)).is_err());
        assert!(kernel_supports(DType::BF16, 128, 4));
        assert!(!kernel_supports(DType::BF16, 256, 4));
        assert!(!kernel_supports(DType::F64, 64, 1));
        assert!(uses_tensor_cores(DType::BF16, 128, true));
        assert!(!uses_tensor_cores(DType::BF16, 128, false));
        assert!(!uses_tensor_cores(DType::F32, 128, true));
        assert!(!uses_tensor_cores(DType::F16, 96, true));
    }

    /// The start-up check passes on the CPU (the reference against itself, exactly in f32; in
    /// bf16 its output rounded) at the 7B's shape.
    #[test]
    fn self_check_runs_on_the_cpu() {
        assert_eq!(
            self_check(&Device::Cpu, DType::F32, 8, 4, 128, true).unwrap(),
            0.0
        );
        self_check(&Device::Cpu, DType::BF16, 8, 4, 128, true).unwrap();
    }
}
