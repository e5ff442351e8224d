//! Paged decode attention: one new query row per sequence over its paged KV cache, in one CUDA
//! launch per layer (model/cuda/paged_attention.cu) instead of a gather + ~11 candle ops, and a
//! plain Rust reference that the kernel must equal within f32 rounding (also the CPU path).
//!
//! Pool layout (the decoder's `KvPool`): per layer, keys and values are `[slots, kv_heads, hd]`;
//! a sequence's position `p` lives in slot `table[p / block_size] * block_size + p % block_size`.
//! Query head `h` reads KV head `h / groups` (GQA, as transformers' `repeat_kv`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::kernel_io::{storage_of, widen_storage, with_pools, PoolReference, Widen};

/// Decode attention of one new query row per sequence over its paged KV cache.
#[derive(Debug, Clone, Copy)]
pub struct PagedDecode<'a> {
    /// `[slots, kv_heads, hd]`.
    pub k_pool: &'a Tensor,
    /// `[slots, kv_heads, hd]`, same dtype as `k_pool`.
    pub v_pool: &'a Tensor,
    /// `[B, max_blocks]` u32, on the pool's device (entries past a sequence's length: any value).
    pub block_tables: &'a Tensor,
    /// `[B]` u32, on the pool's device: sequence `b` attends keys `0..lens[b]` (its new key
    /// already written at `lens[b] - 1`); `lens[b] >= 1`.
    pub lens: &'a Tensor,
    pub block_size: usize,
    /// Mistral's sliding window: the query at `p = lens[b] - 1` sees keys `j` with `p - j < w`.
    pub window: Option<usize>,
    /// Usually `1 / sqrt(hd)`.
    pub scale: f32,
}

/// Largest head_dim the kernel handles (32 lanes × 4 elements).
pub const KERNEL_MAX_HEAD_DIM: usize = 128;
/// Largest GQA group (query heads per KV head) the kernel handles.
pub const KERNEL_MAX_GROUPS: usize = 8;

/// Whether the CUDA kernel handles this compute dtype (of q and the pools alike), head_dim and
/// GQA group size, so that a caller can fall back to candle ops otherwise.
pub fn kernel_supports(dtype: DType, head_dim: usize, groups: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && (1..=KERNEL_MAX_HEAD_DIM).contains(&head_dim)
        && (1..=KERNEL_MAX_GROUPS).contains(&groups)
}

/// `q [B, heads, hd]` (contiguous or not) → `[B, heads, hd]` in q's dtype. Scores in f32 from
/// inputs widened to f32, softmax in f32 over the visible keys, Σ p·v accumulated in f32, cast
/// once. On CUDA this is the kernel (q's dtype must equal the pools' and [`kernel_supports`]
/// must hold); on the CPU it is [`paged_decode_attention_reference`].
pub fn paged_decode_attention(q: &Tensor, args: &PagedDecode) -> candle_core::Result<Tensor> {
    let op = PagedOp::new(q, args)?;
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(args.k_pool, args.v_pool, &op)
}

/// The Rust reference: CPU, any float dtype, f32 math, straightforward loops. Tensors on another
/// device are copied to the CPU first (a test aid); the result is on the CPU.
pub fn paged_decode_attention_reference(
    q: &Tensor,
    args: &PagedDecode,
) -> candle_core::Result<Tensor> {
    let cpu = candle_core::Device::Cpu;
    let (k, v) = (args.k_pool.to_device(&cpu)?, args.v_pool.to_device(&cpu)?);
    let (tables, lens) = (
        args.block_tables.to_device(&cpu)?,
        args.lens.to_device(&cpu)?,
    );
    let args = PagedDecode {
        k_pool: &k,
        v_pool: &v,
        block_tables: &tables,
        lens: &lens,
        ..*args
    };
    paged_decode_attention(&q.to_device(&cpu)?, &args)
}

/// The op: q, k_pool, v_pool are its operands; tables and lens travel in the struct.
struct PagedOp {
    tables: Tensor,
    lens: Tensor,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    slots: usize,
    max_blocks: usize,
    block_size: usize,
    window: Option<usize>,
    scale: f32,
}

impl PagedOp {
    fn new(q: &Tensor, a: &PagedDecode) -> candle_core::Result<Self> {
        let (batch, heads, hd) = q.dims3()?;
        let (slots, kv_heads, khd) = a.k_pool.dims3()?;
        if a.v_pool.dims() != a.k_pool.dims() || khd != hd {
            candle_core::bail!(
                "paged decode: q {:?}, k_pool {:?}, v_pool {:?} do not match",
                q.dims(),
                a.k_pool.dims(),
                a.v_pool.dims()
            );
        }
        if a.v_pool.dtype() != a.k_pool.dtype() {
            candle_core::bail!(
                "paged decode: k_pool is {:?}, v_pool {:?}",
                a.k_pool.dtype(),
                a.v_pool.dtype()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("paged decode: {heads} query heads over {kv_heads} KV heads");
        }
        let (tb, max_blocks) = a.block_tables.dims2()?;
        if tb != batch || a.lens.dims() != [batch] {
            candle_core::bail!(
                "paged decode: batch {batch}, block_tables {:?}, lens {:?}",
                a.block_tables.dims(),
                a.lens.dims()
            );
        }
        if a.block_tables.dtype() != DType::U32 || a.lens.dtype() != DType::U32 {
            candle_core::bail!("paged decode: block_tables and lens must be u32");
        }
        if a.block_size == 0 || a.window == Some(0) {
            candle_core::bail!("paged decode: block_size and window must be positive");
        }
        if !a.block_tables.device().same_device(a.k_pool.device())
            || !a.lens.device().same_device(a.k_pool.device())
        {
            candle_core::bail!("paged decode: block_tables and lens must be on the pool's device");
        }
        // The kernel indexes with i32 block positions and lengths.
        if max_blocks.saturating_mul(a.block_size) > i32::MAX as usize {
            candle_core::bail!("paged decode: block table too long");
        }
        Ok(Self {
            tables: a.block_tables.contiguous()?,
            lens: a.lens.contiguous()?,
            batch,
            heads,
            kv_heads,
            hd,
            slots,
            max_blocks,
            block_size: a.block_size,
            window: a.window,
            scale: a.scale,
        })
    }

    /// Visible keys of a sequence of length `len`: `lo..len`.
    fn visible(&self, len: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| len.saturating_sub(w));
        lo..len
    }

    /// The reference over widened pool rows; `q` is `[B, heads, hd]` in f32.
    fn reference<K: Widen>(&self, q: &[f32], k: &[K], v: &[K]) -> candle_core::Result<Vec<f32>> {
        let tables = self.tables.flatten_all()?.to_vec1::<u32>()?;
        let lens = self.lens.to_vec1::<u32>()?;
        let (hd, groups) = (self.hd, self.heads / self.kv_heads);
        let mut out = vec![0f32; self.batch * self.heads * hd];
        let mut slots = Vec::new();
        let mut scores = Vec::new();
        let mut acc = vec![0f32; hd];
        for b in 0..self.batch {
            let len = lens[b] as usize;
            if len == 0 || len > self.max_blocks * self.block_size {
                candle_core::bail!(
                    "paged decode: lens[{b}] = {len} outside 1..={}",
                    self.max_blocks * self.block_size
                );
            }
            slots.clear();
            for j in self.visible(len) {
                let block = tables[b * self.max_blocks + j / self.block_size] as usize;
                let slot = block * self.block_size + j % self.block_size;
                if slot >= self.slots {
                    candle_core::bail!(
                        "paged decode: sequence {b} position {j} maps to slot {slot} of {}",
                        self.slots
                    );
                }
                slots.push(slot);
            }
            for h in 0..self.heads {
                let kvh = h / groups;
                let qrow = &q[(b * self.heads + h) * hd..][..hd];
                let row = |slot: usize| (slot * self.kv_heads + kvh) * hd;
                scores.clear();
                for &slot in &slots {
                    let krow = &k[row(slot)..][..hd];
                    let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b.widen()).sum();
                    scores.push(dot * self.scale);
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                acc.fill(0.0);
                for (&slot, &p) in slots.iter().zip(&scores) {
                    for (a, x) in acc.iter_mut().zip(&v[row(slot)..][..hd]) {
                        *a += p * x.widen();
                    }
                }
                let o = &mut out[(b * self.heads + h) * hd..][..hd];
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = a / sum;
                }
            }
        }
        Ok(out)
    }

    /// Partitions of the keys per (sequence, KV head): enough blocks to fill the GPU at small
    /// batch (flash-decoding), one when `B × kv_heads` already covers the SMs. Lengths live on
    /// the device, so the bound is the block table's width (or the window).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn splits(&self) -> usize {
        // An H200 / H100 has 132 SMs; aim for ~2 blocks per SM, ≥ 32 keys per partition.
        const SMS: usize = 132;
        const MIN_KEYS: usize = 32;
        const MAX_SPLITS: usize = 32;
        let base = self.batch * self.kv_heads;
        if base >= SMS {
            return 1;
        }
        let bound = self.max_blocks * self.block_size;
        let bound = self.window.map_or(bound, |w| w.min(bound));
        (2 * SMS)
            .div_ceil(base)
            .min(MAX_SPLITS)
            .min(bound.div_ceil(MIN_KEYS))
            .max(1)
    }
}

impl PoolReference for PagedOp {
    fn op_name(&self) -> &'static str {
        "paged decode"
    }

    fn run<K: Widen>(&self, q: &[f32], k: &[K], v: &[K]) -> candle_core::Result<Vec<f32>> {
        self.reference(q, k, v)
    }
}

impl CustomOp3 for PagedOp {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
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
        let q = widen_storage(qs, ql, "paged decode", "q")?;
        let out = with_pools(self, &q, (ks, kl), (vs, vl))?;
        Ok((
            storage_of(qs.dtype(), out),
            Shape::from((self.batch, self.heads, self.hd)),
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
                "paged decode kernel: q {dtype:?} / pools {:?}, head_dim {}, groups {groups} \
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
        Ok((storage, Shape::from((self.batch, self.heads, self.hd))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::PagedOp;
    use crate::kernel_io::device_range;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
    const MODULE: &str = "tga_paged_attention";
    /// Threads per decode block (WARPS in the .cu file).
    const THREADS: u32 = 128;

    /// A u32 tensor's device slice from its start offset, `n` elements (contiguous by
    /// construction: the op made it so).
    fn u32_view<'a>(
        s: &'a Storage,
        l: &Layout,
        n: usize,
        what: &str,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
        match s {
            Storage::Cuda(c) => {
                let o = l.start_offset();
                Ok(c.as_cuda_slice::<u32>()?.slice(o..o + n))
            }
            _ => candle_core::bail!("paged decode: {what} must be on the CUDA device"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch<T: CudaDType + DeviceRepr>(
        op: &PagedOp,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = qs.device.clone();
        let (q0, q1) = device_range(ql, "paged decode", "q")?;
        let (k0, k1) = device_range(kl, "paged decode", "k_pool")?;
        let (v0, v1) = device_range(vl, "paged decode", "v_pool")?;
        let q = qs.as_cuda_slice::<T>()?.slice(q0..q1);
        let k = ks.as_cuda_slice::<T>()?.slice(k0..k1);
        let v = vs.as_cuda_slice::<T>()?.slice(v0..v1);
        let (ts, tl) = op.tables.storage_and_layout();
        let (lst, ll) = op.lens.storage_and_layout();
        let tables = u32_view(&ts, tl, op.batch * op.max_blocks, "block_tables")?;
        let lens = u32_view(&lst, ll, op.batch, "lens")?;

        let groups = op.heads / op.kv_heads;
        let vpt = op.hd.div_ceil(32).next_power_of_two();
        let gcap = groups.next_power_of_two();
        let splits = op.splits();
        let n_out = op.batch * op.heads * op.hd;
        // SAFETY: every element is written by the decode (splits == 1) or the merge kernel.
        let out = unsafe { dev.alloc::<T>(n_out)? };
        // Partials (m, l, acc[hd]) per (sequence, head, split); a 1-element dummy when unused.
        let n_part = match splits {
            1 => 1,
            s => op.batch * op.heads * s * (op.hd + 2),
        };
        // SAFETY: each partial the merge reads is written by the decode kernel first.
        let partial = unsafe { dev.alloc::<f32>(n_part)? };

        let func = dev.get_or_load_custom_func(
            &format!("paged_decode_{name}_v{vpt}_g{gcap}"),
            MODULE,
            PTX,
        )?;
        let (kv_heads, groups_i, hd) = (op.kv_heads as i32, groups as i32, op.hd as i32);
        let (max_blocks, block_size) = (op.max_blocks as i32, op.block_size as i32);
        let n_slots = op.slots as u64;
        // 0 = no window; a window over i32::MAX hides nothing the kernel can index.
        let window = op.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let (scale, splits_i) = (op.scale, splits as i32);
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(&tables);
        b.arg(&lens);
        b.arg(&out);
        b.arg(&partial);
        b.arg(&kv_heads);
        b.arg(&groups_i);
        b.arg(&hd);
        b.arg(&max_blocks);
        b.arg(&block_size);
        b.arg(&n_slots);
        b.arg(&window);
        b.arg(&scale);
        b.arg(&splits_i);
        let cfg = LaunchConfig {
            grid_dim: (op.batch as u32, op.kv_heads as u32, splits as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches paged_decode_* in paged_attention.cu; the views
        // cover the elements the kernel reads (tables/lens lengths, pool slots bounds-checked).
        unsafe { b.launch(cfg) }.w()?;

        if splits > 1 {
            let merge = dev.get_or_load_custom_func(&format!("paged_merge_{name}"), MODULE, PTX)?;
            let mut b = merge.builder();
            b.arg(&partial);
            b.arg(&out);
            b.arg(&hd);
            b.arg(&splits_i);
            let cfg = LaunchConfig {
                grid_dim: (op.batch as u32, op.heads as u32, 1),
                block_dim: ((op.hd as u32).min(THREADS), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the merge reads the partials the decode launch wrote (same stream).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// A random decode batch for checking the kernel: q `[B, kv_heads·groups, hd]` and pools
/// `[slots, kv_heads, hd]` in f32 on the CPU, values uniform in [-2, 2), the pool's blocks handed
/// out shuffled (so sequences interleave) and `u32::MAX` in the table entries past each length
/// (they must never be read). Deterministic in `seed`.
#[derive(Debug)]
pub struct RandomCase {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// `[B, max_blocks]` u32.
    pub tables: Tensor,
    /// `[B]` u32.
    pub lens: Tensor,
    /// The table's rows.
    pub table_rows: Vec<Vec<u32>>,
    pub block_size: usize,
}

impl RandomCase {
    pub fn new(
        seed: u64,
        lens: &[usize],
        block_size: usize,
        kv_heads: usize,
        groups: usize,
        hd: usize,
    ) -> candle_core::Result<Self> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let nb: Vec<usize> = lens.iter().map(|l| l.div_ceil(block_size)).collect();
        let max_blocks = nb.iter().copied().max().unwrap_or(1) + 1;
        let total = nb.iter().sum::<usize>() + 3;
        let mut blocks: Vec<u32> = (0..total as u32).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.random_range(0..=i));
        }
        let mut next = blocks.into_iter();
        let table_rows: Vec<Vec<u32>> = nb
            .iter()
            .map(|&n| {
                (0..max_blocks)
                    .map(|i| match i < n {
                        true => next.next().unwrap_or(0),
                        false => u32::MAX,
                    })
                    .collect()
            })
            .collect();
        let dev = candle_core::Device::Cpu;
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (b, heads, slots) = (lens.len(), kv_heads * groups, total * block_size);
        let lens_u32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        Ok(Self {
            q: Tensor::from_vec(uniform(b * heads * hd), (b, heads, hd), &dev)?,
            k: Tensor::from_vec(uniform(slots * kv_heads * hd), (slots, kv_heads, hd), &dev)?,
            v: Tensor::from_vec(uniform(slots * kv_heads * hd), (slots, kv_heads, hd), &dev)?,
            tables: Tensor::from_vec(table_rows.concat(), (b, max_blocks), &dev)?,
            lens: Tensor::from_vec(lens_u32, b, &dev)?,
            table_rows,
            block_size,
        })
    }
}

/// How far the kernel's output may be from the reference's f32 output `reference` (computed from
/// the same inputs, rounded to `dtype`): f32, `1e-5 · (1 + |r|)` (online softmax and split
/// partitions sum in another order than the reference's one pass); bf16/f16 output, one rounding
/// of the result plus that, `2^-8 · |r| + 1e-5`.
pub fn tolerance(dtype: DType, reference: f64) -> f64 {
    match dtype {
        DType::F32 => 1e-5 * (1.0 + reference.abs()),
        _ => reference.abs() / 256.0 + 1e-5,
    }
}

/// The kernel on `device` against the reference on the CPU, for one [`RandomCase`] batch in
/// `dtype`: the largest |difference|, or an error naming the first element out of
/// [`tolerance`] (or the kernel's own error). On the CPU both sides are the reference.
pub fn check_against_reference(
    device: &candle_core::Device,
    case: &RandomCase,
    window: Option<usize>,
    dtype: DType,
) -> candle_core::Result<f64> {
    let hd = case.q.dim(2)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let round = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
    let (qf, kf, vf) = (round(&case.q)?, round(&case.k)?, round(&case.v)?);
    let args = |k, v, tables, lens| PagedDecode {
        k_pool: k,
        v_pool: v,
        block_tables: tables,
        lens,
        block_size: case.block_size,
        window,
        scale,
    };
    let want = paged_decode_attention_reference(&qf, &args(&kf, &vf, &case.tables, &case.lens))?;
    let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
    let (k, v) = (on(&case.k)?, on(&case.v)?);
    let (tables, lens) = (case.tables.to_device(device)?, case.lens.to_device(device)?);
    // q as a non-contiguous view, as the decoder's may be.
    let q = on(&case.q)?
        .transpose(0, 1)?
        .contiguous()?
        .transpose(0, 1)?;
    let got = paged_decode_attention(&q, &args(&k, &v, &tables, &lens))?;
    if got.dtype() != dtype || got.dims() != want.dims() {
        candle_core::bail!(
            "paged decode: output {:?} {:?}, expected {dtype:?} {:?}",
            got.dtype(),
            got.dims(),
            want.dims()
        );
    }
    let got = got
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let (got, want) = (
        got.flatten_all()?.to_vec1::<f32>()?,
        want.flatten_all()?.to_vec1::<f32>()?,
    );
    let mut max_err = 0f64;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let err = (g - w).abs();
        // NaN fails too (err is NaN when either side is).
        if err.is_nan() || err > tolerance(dtype, w) {
            candle_core::bail!(
                "paged decode on {device:?}, {dtype:?}: element {i} is {g}, the reference {w} \
                 (|diff| {err:e} > {:e})",
                tolerance(dtype, w)
            );
        }
        max_err = max_err.max(err);
    }
    Ok(max_err)
}

/// A start-up check of the kernel at a model's attention shape on `device` (milliseconds): a
/// batch of awkward lengths (1, 17, 513, 1,100; block size 16) without a window, and the same
/// under a 100-token window. The decoder runs it once before its first paged decode and falls
/// back to candle ops when it fails, so that a kernel fault on an untried GPU or driver costs
/// speed, not answers.
pub fn self_check(
    device: &candle_core::Device,
    dtype: DType,
    kv_heads: usize,
    groups: usize,
    hd: usize,
) -> candle_core::Result<f64> {
    let case = RandomCase::new(0x7ea5, &[1, 17, 513, 1100], 16, kv_heads, groups, hd)?;
    let a = check_against_reference(device, &case, None, dtype)?;
    let b = check_against_reference(device, &case, Some(100), dtype)?;
    Ok(a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn case(
        rng: &mut StdRng,
        lens: &[usize],
        bs: usize,
        kvh: usize,
        groups: usize,
        hd: usize,
    ) -> RandomCase {
        RandomCase::new(rng.random(), lens, bs, kvh, groups, hd).unwrap()
    }

    /// Plain dense attention in f64 over the gathered visible rows.
    fn dense(
        c: &RandomCase,
        lens: &[usize],
        bs: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Vec<f64> {
        let (b, heads, hd) = c.q.dims3().unwrap();
        let kvh = c.k.dim(1).unwrap();
        let groups = heads / kvh;
        let widen = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (q, k, v) = (widen(&c.q), widen(&c.k), widen(&c.v));
        let mut out = Vec::new();
        for (bi, &len) in lens.iter().enumerate().take(b) {
            let lo = window.map_or(0, |w| len.saturating_sub(w));
            let slots: Vec<u32> = (lo..len)
                .map(|j| c.table_rows[bi][j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            let idx = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
            let kg = k.index_select(&idx, 0).unwrap();
            let vg = v.index_select(&idx, 0).unwrap();
            for h in 0..heads {
                let qh = q.i((bi, h)).unwrap().to_vec1::<f64>().unwrap();
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

    fn check(
        lens: &[usize],
        bs: usize,
        kvh: usize,
        groups: usize,
        hd: usize,
        window: Option<usize>,
        dtype: DType,
    ) {
        let mut rng = StdRng::seed_from_u64(lens.len() as u64 * 7919 + bs as u64);
        let mut c = case(&mut rng, lens, bs, kvh, groups, hd);
        // Round the inputs to `dtype`; the dense answer uses the same rounded values.
        let round = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (q, k, v) = (round(&c.q), round(&c.k), round(&c.v));
        let scale = 1.0 / (hd as f32).sqrt();
        let args = PagedDecode {
            k_pool: &k,
            v_pool: &v,
            block_tables: &c.tables,
            lens: &c.lens,
            block_size: bs,
            window,
            scale,
        };
        let got = paged_decode_attention_reference(&q, &args).unwrap();
        assert_eq!(got.dtype(), dtype);
        let got = got
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        (c.q, c.k, c.v) = (q, k, v);
        let want = dense(&c, lens, bs, window, scale);
        // f32 math: ~1e-6 of the values' scale (|v| < 2); bf16 output: half an ulp (2^-8 relative).
        let rel = if dtype == DType::BF16 {
            1.0 / 256.0
        } else {
            0.0
        };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-5 + rel * w.abs(),
                "lens {lens:?} bs {bs} groups {groups} window {window:?} {dtype:?}: [{i}] {g} vs {w}"
            );
        }
    }

    #[test]
    fn reference_matches_dense_attention() {
        for dtype in [DType::F32, DType::BF16] {
            for window in [None, Some(7)] {
                for groups in [1, 4] {
                    for bs in [1, 5, 16] {
                        let lens: Vec<usize> = (1..=40).collect();
                        check(&lens, bs, 2, groups, 8, window, dtype);
                    }
                    check(&[300, 1, 513], 16, 2, groups, 64, window, dtype);
                }
            }
        }
    }

    #[test]
    fn non_contiguous_q_and_offset_pools() {
        let lens = [17, 3, 40];
        let mut rng = StdRng::seed_from_u64(3);
        let c = case(&mut rng, &lens, 5, 2, 2, 16);
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
        let mk = |k, v| PagedDecode {
            k_pool: k,
            v_pool: v,
            block_tables: &c.tables,
            lens: &c.lens,
            block_size: 5,
            window: None,
            scale: 0.25,
        };
        let a = paged_decode_attention(&qt, &mk(&k, &v)).unwrap();
        let b = paged_decode_attention(&c.q, &mk(&c.k, &c.v)).unwrap();
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
        let mut rng = StdRng::seed_from_u64(4);
        let c = case(&mut rng, &[4, 9], 4, 1, 2, 8);
        let zero = Tensor::new(&[0u32, 9], &Device::Cpu).unwrap();
        let long = Tensor::new(&[4u32, 100], &Device::Cpu).unwrap();
        for lens in [&zero, &long] {
            let args = PagedDecode {
                k_pool: &c.k,
                v_pool: &c.v,
                block_tables: &c.tables,
                lens,
                block_size: 4,
                window: None,
                scale: 1.0,
            };
            assert!(paged_decode_attention(&c.q, &args).is_err());
        }
        assert!(kernel_supports(DType::BF16, 128, 4));
        assert!(!kernel_supports(DType::BF16, 256, 4));
        assert!(!kernel_supports(DType::F64, 64, 1));
    }
}
