//! Two fused decoder ops for the device path, each one CUDA launch (model/cuda/fused.cu) where
//! candle takes several, with a plain Rust reference as the op's CPU side:
//!
//! - [`add_rms_norm`]: the residual add and the RMSNorm after it (`s = x + r`, `rms_norm(s)`),
//!   which candle runs as two launches (add, then its `rmsnorm` kernel).
//! - [`rope_qk`]: RoPE of q and k at per-row positions from a cos/sin table kept on the device,
//!   which candle runs as two launches (one `rope` per tensor) fed by angles uploaded per step.
//!
//! Decode at batch 1 is launch-bound, so what counts is the number of launches; the numbers must
//! not change. Both kernels repeat candle 0.11's CUDA kernels operation for operation (fused.cu
//! says how), so that on CUDA they are bit-equal to the candle ops they replace; the references
//! model the kernels (their RMSNorm scale from an f64 sum, their RoPE exactly: see each).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor};
use candle_nn::RmsNorm;
use half::{bf16, f16};

/// Whether the kernels handle this compute dtype (of every operand alike); the decoder keeps
/// candle's ops otherwise.
pub fn kernel_supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// `(xs + residual, norm(xs + residual))` in one launch on CUDA: the sum in the compute dtype
/// (rounded as candle's add rounds it) and candle's RMSNorm of it (`rsqrt(mean(s²) + eps) · s ·
/// w` in f32, rounded once to the compute dtype, as its `rmsnorm` kernel; transformers instead
/// rounds `s · rsqrt(..)` to the dtype before the weight multiplies it). `xs`, `residual`
/// `[.., hidden]` of one shape, `norm`'s weight `[hidden]`, all of one dtype. Both outputs are
/// contiguous views of one buffer. On the CPU this is the reference ([`AddRmsNorm`]).
pub fn add_rms_norm(
    xs: &Tensor,
    residual: &Tensor,
    norm: &RmsNorm,
) -> candle_core::Result<(Tensor, Tensor)> {
    let w = norm.weight();
    let hidden = xs.dim(candle_core::D::Minus1)?;
    if residual.shape() != xs.shape() || w.dims() != [hidden] {
        candle_core::bail!(
            "add_rms_norm: xs {:?}, residual {:?}, weight {:?}",
            xs.dims(),
            residual.dims(),
            w.dims()
        );
    }
    let op = AddRmsNorm {
        rows: xs.elem_count() / hidden.max(1),
        hidden,
        // As candle_nn::RmsNorm::forward passes it to its op.
        eps: norm.eps() as f32,
    };
    let out = xs
        .contiguous()?
        .apply_op3_no_bwd(&residual.contiguous()?, &w.contiguous()?, &op)?;
    Ok((
        out.get(0)?.reshape(xs.shape())?,
        out.get(1)?.reshape(xs.shape())?,
    ))
}

/// The candle-op path [`add_rms_norm`] replaces, as the decoder ran it: an add, then
/// `RmsNorm::forward`.
pub fn add_rms_norm_candle(
    xs: &Tensor,
    residual: &Tensor,
    norm: &RmsNorm,
) -> candle_core::Result<(Tensor, Tensor)> {
    let sum = (xs + residual)?;
    let normed = norm.forward(&sum)?;
    Ok((sum, normed))
}

/// RoPE (transformers' `rotate_half` layout, Mistral's) of q `[rows, heads, hd]` and k
/// `[rows, kv_heads, hd]`, row `r` at position `positions[r]` (u32 `[rows]`, on the device),
/// with the angles of table rows `cos`, `sin` `[table_rows, hd/2]` (compute dtype, on the
/// device: transformers' f32 angles cast to the dtype). One launch on CUDA; on the CPU the
/// reference. For a pair `(x1, x2) = (x[i], x[i + hd/2])`: `x1·c − x2·s` and `x1·s + x2·c`, each
/// one fused multiply-add over the other product rounded to the dtype, in the dtype's arithmetic
/// (what candle's `rope` kernel compiles to on sm_90). Returns (q', k'), contiguous views of one
/// buffer. Positions past the table are an error on the CPU and read the last row on CUDA.
pub fn rope_qk(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, heads, hd) = q.dims3()?;
    let (krows, kv_heads, khd) = k.dims3()?;
    let (table_rows, half) = cos.dims2()?;
    if krows != rows || khd != hd || hd % 2 != 0 || half * 2 != hd || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope_qk: q {:?}, k {:?}, cos {:?}, sin {:?}",
            q.dims(),
            k.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if positions.dims() != [rows] || positions.dtype() != DType::U32 {
        candle_core::bail!(
            "rope_qk: positions must be u32 [{rows}], got {:?} {:?}",
            positions.dtype(),
            positions.dims()
        );
    }
    let dtype = q.dtype();
    if k.dtype() != dtype || cos.dtype() != dtype || sin.dtype() != dtype {
        candle_core::bail!(
            "rope_qk: q {dtype:?}, k {:?}, cos {:?}, sin {:?}",
            k.dtype(),
            cos.dtype(),
            sin.dtype()
        );
    }
    let dev = q.device();
    for t in [k, cos, sin, positions] {
        if !t.device().same_device(dev) {
            candle_core::bail!("rope_qk: every operand must be on q's device");
        }
    }
    if table_rows == 0 || table_rows > u32::MAX as usize {
        candle_core::bail!("rope_qk: table of {table_rows} rows");
    }
    let op = RopeQk {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        positions: positions.contiguous()?,
        rows,
        heads,
        kv_heads,
        hd,
        table_rows,
    };
    let out = q.contiguous()?.apply_op2_no_bwd(&k.contiguous()?, &op)?;
    let nq = rows * heads * hd;
    Ok((
        out.narrow(0, 0, nq)?.reshape((rows, heads, hd))?,
        out.narrow(0, nq, rows * kv_heads * hd)?
            .reshape((rows, kv_heads, hd))?,
    ))
}

/// The candle-op path [`rope_qk`] replaces, as the decoder ran it: `candle_nn::rotary_emb::rope`
/// on q and k, each row its own batch entry so that rows may sit at unrelated positions; `cos`,
/// `sin` `[rows, hd/2]` hold each row's angles.
pub fn rope_qk_candle(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    // rope() wants [b, h, t, d] with cos [b, t, d/2].
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let rope = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.unsqueeze(2)?.contiguous()?;
        candle_nn::rotary_emb::rope(&t, &cos, &sin)?.squeeze(2)
    };
    Ok((rope(q)?, rope(k)?))
}

/// A float element of the compute dtype with the dtype's own arithmetic, each operation rounded
/// once to nearest-even, as on the GPU.
trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn add_rn(self, b: Self) -> Self;
    fn mul_rn(self, b: Self) -> Self;
    /// `self · b + c`, rounded once.
    fn fma_rn(self, b: Self, c: Self) -> Self;
    fn negated(self) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn add_rn(self, b: Self) -> Self {
        self + b
    }
    fn mul_rn(self, b: Self) -> Self {
        self * b
    }
    fn fma_rn(self, b: Self, c: Self) -> Self {
        self.mul_add(b, c)
    }
    fn negated(self) -> Self {
        -self
    }
}

/// The 16-bit types: a sum or product of two of them is computed in f32 and rounded to the type,
/// which equals rounding the exact result (f32 has at least 2p + 2 bits: double rounding is
/// innocuous; a product is even exact in f32).
macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
            fn add_rn(self, b: Self) -> Self {
                <$t>::from_f32(self.to_f32() + b.to_f32())
            }
            fn mul_rn(self, b: Self) -> Self {
                <$t>::from_f32(self.to_f32() * b.to_f32())
            }
            fn fma_rn(self, b: Self, c: Self) -> Self {
                <$t>::from_f32(fma_round_to_odd(self.to_f32(), b.to_f32(), c.to_f32()))
            }
            fn negated(self) -> Self {
                -self
            }
        }
    };
}
half_elem!(bf16);
half_elem!(f16);

/// `a · b + c` rounded to f32 *to odd*, for 16-bit `a`, `b`, `c` (whose product is exact in f32):
/// the sum's exact error (TwoSum) decides the sticky bit, so that rounding the result to nearest
/// 16-bit value equals rounding the exact `a · b + c` once (round-to-odd at ≥ p + 2 bits, Boldo
/// & Melquiond), as the GPU's 16-bit fma does. Plain f32 arithmetic could round twice.
fn fma_round_to_odd(a: f32, b: f32, c: f32) -> f32 {
    let p = a * b;
    let s = p + c;
    let bb = s - p;
    let err = (p - (s - bb)) + (c - bb);
    let bits = s.to_bits();
    if err == 0.0 || bits & 1 == 1 || !s.is_finite() {
        return s;
    }
    // Inexact with an even last bit: the odd neighbour on the side of the exact value (the
    // encoding is sign-magnitude, so +1 moves away from zero for either sign).
    match (err > 0.0) == (s > 0.0) {
        true => f32::from_bits(bits + 1),
        false => f32::from_bits(bits - 1),
    }
}

/// The contiguous elements a layout covers (its start offset applied).
fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused op: {what} must be contiguous"),
    }
}

/// The op behind [`add_rms_norm`]: operands xs, residual, weight; output `[2, rows, hidden]`
/// (the sum, then the normalised rows).
pub struct AddRmsNorm {
    rows: usize,
    hidden: usize,
    eps: f32,
}

impl AddRmsNorm {
    /// The reference: the sum in the dtype's arithmetic; the scale `1/sqrt(mean(s²) + eps)` from
    /// an f64 sum of squares (the kernel's f32 tree sum and approximate rsqrt differ from it by a
    /// few f32 ulps, [`NORM_REFERENCE_ULPS`]); then `w · (scale · s)` in f32, rounded once.
    fn reference<T: Elem>(&self, x: &[T], r: &[T], w: &[T]) -> Vec<T> {
        let n = self.rows * self.hidden;
        let mut out = Vec::with_capacity(2 * n);
        out.extend(x.iter().zip(r).map(|(&a, &b)| a.add_rn(b)));
        for row in 0..self.rows {
            let s = &out[row * self.hidden..][..self.hidden];
            let sq: f64 = s.iter().map(|v| (v.to_f32() as f64).powi(2)).sum();
            let mean = sq / self.hidden as f64;
            let scale = (1.0 / (mean + self.eps as f64).sqrt()) as f32;
            let normed: Vec<T> = s
                .iter()
                .zip(w)
                .map(|(v, w)| T::from_f32(w.to_f32() * (scale * v.to_f32())))
                .collect();
            out.extend(normed);
        }
        out
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Shape::from((2, self.rows, self.hidden));
        let storage = match (xs, rs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(r), CpuStorage::F32(w)) => {
                CpuStorage::F32(self.reference(
                    contiguous(x, xl, "xs")?,
                    contiguous(r, rl, "residual")?,
                    contiguous(w, wl, "weight")?,
                ))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(r), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(self.reference(
                    contiguous(x, xl, "xs")?,
                    contiguous(r, rl, "residual")?,
                    contiguous(w, wl, "weight")?,
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F16(r), CpuStorage::F16(w)) => {
                CpuStorage::F16(self.reference(
                    contiguous(x, xl, "xs")?,
                    contiguous(r, rl, "residual")?,
                    contiguous(w, wl, "weight")?,
                ))
            }
            _ => candle_core::bail!(
                "add_rms_norm: xs {:?}, residual {:?}, weight {:?} (f32, bf16 or f16, alike)",
                xs.dtype(),
                rs.dtype(),
                ws.dtype()
            ),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dtype = xs.dtype();
        if !kernel_supports(dtype) || rs.dtype() != dtype || ws.dtype() != dtype {
            candle_core::bail!(
                "add_rms_norm kernel: xs {dtype:?}, residual {:?}, weight {:?}",
                rs.dtype(),
                ws.dtype()
            );
        }
        let args = (xs, xl, rs, rl, ws, wl);
        let storage = match dtype {
            DType::F32 => cuda::add_rms_norm::<f32>(self, args, "f32")?,
            DType::BF16 => cuda::add_rms_norm::<bf16>(self, args, "bf16")?,
            _ => cuda::add_rms_norm::<f16>(self, args, "f16")?,
        };
        Ok((storage, Shape::from((2, self.rows, self.hidden))))
    }
}

/// The op behind [`rope_qk`]: operands q, k; the table and positions travel in the struct.
/// Output: `[rows·heads·hd + rows·kv_heads·hd]`, q' then k'.
pub struct RopeQk {
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    rows: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    table_rows: usize,
}

impl RopeQk {
    /// The reference: what the kernel computes, operation for operation (so equal to it bit for
    /// bit): `x1·c − x2·s` as `fma(x1, c, −(x2·s))` and `x1·s + x2·c` as `fma(x1, s, x2·c)`.
    fn reference<T: Elem + candle_core::WithDType>(
        &self,
        q: &[T],
        k: &[T],
        cos: &[T],
        sin: &[T],
    ) -> candle_core::Result<Vec<T>> {
        let positions = self.positions.to_vec1::<u32>()?;
        let (hd, half) = (self.hd, self.hd / 2);
        let mut out = Vec::with_capacity(q.len() + k.len());
        for (src, heads) in [(q, self.heads), (k, self.kv_heads)] {
            let start = out.len();
            out.extend_from_slice(src);
            let dst = &mut out[start..];
            for row in 0..self.rows {
                let p = positions[row] as usize;
                if p >= self.table_rows {
                    candle_core::bail!(
                        "rope_qk: position {p} (row {row}) past the table's {} rows",
                        self.table_rows
                    );
                }
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                for h in 0..heads {
                    let x = &mut dst[(row * heads + h) * hd..][..hd];
                    for i in 0..half {
                        let (x1, x2) = (x[i], x[i + half]);
                        x[i] = x1.fma_rn(c[i], x2.mul_rn(s[i]).negated());
                        x[i + half] = x1.fma_rn(s[i], x2.mul_rn(c[i]));
                    }
                }
            }
        }
        Ok(out)
    }

    fn cpu_reference<T: Elem + candle_core::WithDType>(
        &self,
        q: &[T],
        ql: &Layout,
        k: &[T],
        kl: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let cpu = candle_core::Device::Cpu;
        let cos = self.cos.to_device(&cpu)?.flatten_all()?.to_vec1::<T>()?;
        let sin = self.sin.to_device(&cpu)?.flatten_all()?.to_vec1::<T>()?;
        self.reference(contiguous(q, ql, "q")?, contiguous(k, kl, "k")?, &cos, &sin)
    }
}

impl CustomOp2 for RopeQk {
    fn name(&self) -> &'static str {
        "rope-qk"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match (qs, ks) {
            (CpuStorage::F32(q), CpuStorage::F32(k)) => {
                CpuStorage::F32(self.cpu_reference(q, ql, k, kl)?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k)) => {
                CpuStorage::BF16(self.cpu_reference(q, ql, k, kl)?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k)) => {
                CpuStorage::F16(self.cpu_reference(q, ql, k, kl)?)
            }
            _ => candle_core::bail!(
                "rope_qk: q {:?}, k {:?} (f32, bf16 or f16, alike)",
                qs.dtype(),
                ks.dtype()
            ),
        };
        let n = self.rows * (self.heads + self.kv_heads) * self.hd;
        Ok((storage, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dtype = qs.dtype();
        if !kernel_supports(dtype) || ks.dtype() != dtype {
            candle_core::bail!("rope_qk kernel: q {dtype:?}, k {:?}", ks.dtype());
        }
        let args = (qs, ql, ks, kl);
        let storage = match dtype {
            DType::F32 => cuda::rope_qk::<f32>(self, args, "f32")?,
            DType::BF16 => cuda::rope_qk::<bf16>(self, args, "bf16")?,
            _ => cuda::rope_qk::<f16>(self, args, "f16")?,
        };
        let n = self.rows * (self.heads + self.kv_heads) * self.hd;
        Ok((storage, Shape::from(n)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{AddRmsNorm, RopeQk};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "tga_fused";
    /// Threads per RoPE block (one per rotated pair).
    const ROPE_THREADS: u32 = 256;

    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("fused op: {what} not contiguous")))?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    /// A tensor of the op's struct (contiguous by construction) as a device view.
    fn tensor_view<'a, T: CudaDType>(
        s: &'a Storage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        match s {
            Storage::Cuda(c) => view(c, l, what),
            _ => candle_core::bail!("fused op: {what} must be on the CUDA device"),
        }
    }

    type Args3<'a> = (
        &'a CudaStorage,
        &'a Layout,
        &'a CudaStorage,
        &'a Layout,
        &'a CudaStorage,
        &'a Layout,
    );

    pub(super) fn add_rms_norm<T: CudaDType + DeviceRepr>(
        op: &AddRmsNorm,
        (xs, xl, rs, rl, ws, wl): Args3,
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = xs.device.clone();
        let x = view::<T>(xs, xl, "xs")?;
        let r = view::<T>(rs, rl, "residual")?;
        let w = view::<T>(ws, wl, "weight")?;
        let n = op.rows * op.hidden;
        if op.rows > i32::MAX as usize || op.hidden > i32::MAX as usize {
            candle_core::bail!("add_rms_norm kernel: {} rows of {}", op.rows, op.hidden);
        }
        // SAFETY: the kernel writes every element of both halves.
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{name}"), MODULE, PTX)?;
        let (n_u64, ncols) = (n as u64, op.hidden as i32);
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&r);
        b.arg(&w);
        b.arg(&out);
        b.arg(&n_u64);
        b.arg(&ncols);
        b.arg(&op.eps);
        // candle's rmsnorm block size: it fixes the summation order, hence the bits.
        let threads = if op.hidden < 1024 { 32 } else { 1024 };
        let cfg = LaunchConfig {
            grid_dim: (op.rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            // SAFETY: the arguments match add_rms_norm_* in fused.cu; x and r cover rows ×
            // hidden elements, w hidden, out 2 × rows × hidden.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn rope_qk<T: CudaDType + DeviceRepr>(
        op: &RopeQk,
        (qs, ql, ks, kl): (&CudaStorage, &Layout, &CudaStorage, &Layout),
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = qs.device.clone();
        let q = view::<T>(qs, ql, "q")?;
        let k = view::<T>(ks, kl, "k")?;
        let (cs, cl) = op.cos.storage_and_layout();
        let (ss, sl) = op.sin.storage_and_layout();
        let (ps, pl) = op.positions.storage_and_layout();
        let cos = tensor_view::<T>(&cs, cl, "cos")?;
        let sin = tensor_view::<T>(&ss, sl, "sin")?;
        let positions = tensor_view::<u32>(&ps, pl, "positions")?;
        let n = op.rows * (op.heads + op.kv_heads) * op.hd;
        // SAFETY: the kernel writes every element (one thread per rotated pair).
        let out = unsafe { dev.alloc::<T>(n)? };
        let pairs = (n / 2) as u64;
        let blocks = pairs.div_ceil(ROPE_THREADS as u64);
        if blocks > i32::MAX as u64 {
            candle_core::bail!("rope_qk kernel: {pairs} pairs");
        }
        let func = dev.get_or_load_custom_func(&format!("rope_qk_{name}"), MODULE, PTX)?;
        let rows = op.rows as u64;
        let (heads, kv_heads, hd) = (op.heads as i32, op.kv_heads as i32, op.hd as i32);
        let table_rows = op.table_rows as u32;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&positions);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&hd);
        b.arg(&table_rows);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        if pairs > 0 {
            // SAFETY: the arguments match rope_qk_* in fused.cu; q, k cover rows × heads × hd
            // and rows × kv_heads × hd, positions rows, the table table_rows × hd/2 (positions
            // are clamped to it), out n elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// How many f32 ulps (of each output) [`add_rms_norm`]'s normed rows in f32 may be from the
/// reference's: the kernel's scale has a tree-ordered f32 sum of squares (≤ ~14 ulps relative
/// error over 4,096 columns, typically ~1) and rsqrt.approx (≤ 2 ulps) where the reference's is
/// within half an ulp.
pub const NORM_REFERENCE_ULPS: f64 = 16.0;

/// One unit in the last place relative to the value, `2^-(mantissa bits)`.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        DType::F64 => 2f64.powi(-52),
        _ => 2f64.powi(-23),
    }
}

/// The largest |got − want| over two tensors of one shape (on any devices), or an error naming
/// the first element past `tol(index, want)` (NaN included).
pub fn max_diff(
    got: &Tensor,
    want: &Tensor,
    what: &str,
    tol: impl Fn(usize, f64) -> f64,
) -> candle_core::Result<f64> {
    if got.dims() != want.dims() || got.dtype() != want.dtype() {
        candle_core::bail!(
            "{what}: {:?} {:?} against {:?} {:?}",
            got.dtype(),
            got.dims(),
            want.dtype(),
            want.dims()
        );
    }
    let flat = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
        t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (g, w) = (flat(got)?, flat(want)?);
    let mut max = 0f64;
    for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
        let d = (g - w).abs();
        // NaN fails too.
        if d.is_nan() || d > tol(i, w) {
            candle_core::bail!(
                "{what}: element {i} is {g}, expected {w} (|diff| {d:e} > {:e})",
                tol(i, w)
            );
        }
        max = max.max(d);
    }
    Ok(max)
}

/// Uniform values in [-2, 2) on the CPU in f32, deterministic in `seed`.
pub fn uniform(seed: u64, dims: &[usize]) -> candle_core::Result<Tensor> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu)
}

/// RoPE's inverse frequencies `1/θ^(2i/hd)` in f32, as transformers computes them (so that long
/// prompts match it to f32 rounding).
pub fn rope_inv_freq(hd: usize, theta: f32) -> Vec<f32> {
    (0..hd)
        .step_by(2)
        .map(|i| 1.0f32 / theta.powf(i as f32 / hd as f32))
        .collect()
}

/// cos and sin of the angles `p · f` (f32) of each position and inverse frequency, as
/// transformers computes them: `[positions.len() · inv_freq.len()]` each, row-major.
pub fn rope_angles(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let n = positions.len() * inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for &p in positions {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// The RoPE table `[rows, hd/2]` of positions `0..rows` ([`rope_angles`]), cast to `dtype` on
/// `device`.
pub fn rope_table(
    rows: usize,
    hd: usize,
    theta: f32,
    device: &candle_core::Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv_freq = rope_inv_freq(hd, theta);
    let positions: Vec<usize> = (0..rows).collect();
    let (cos, sin) = rope_angles(&inv_freq, &positions);
    let half = inv_freq.len();
    Ok((
        Tensor::from_vec(cos, (rows, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (rows, half), device)?.to_dtype(dtype)?,
    ))
}

/// What [`self_check`] measured: the largest differences of the fused ops from the candle-op
/// path on the same device.
#[derive(Debug, Clone, Copy)]
pub struct SelfCheck {
    pub norm_max_diff: f64,
    pub rope_max_diff: f64,
}

impl SelfCheck {
    /// Bit-equal to candle's ops (what CUDA should give).
    pub fn bit_equal(&self) -> bool {
        self.norm_max_diff == 0.0 && self.rope_max_diff == 0.0
    }
}

/// The fused ops on `device` against the candle-op path on `device` at a model's shape (a few
/// milliseconds): [`add_rms_norm`] on 1 and 17 rows, [`rope_qk`] on 17 rows at positions up to
/// `table_rows − 1` of the given table. Sums must be bit-equal; normed rows within two ulps of
/// the dtype (candle's CPU kernel rounds three times in 16-bit types; on CUDA the two are
/// bit-equal); RoPE within [`rope_tolerance`] (on CUDA bit-equal). The decoder runs it once
/// before its first fused op and keeps candle's ops when it fails, so that a kernel fault on an
/// untried GPU or driver costs speed, not answers.
#[allow(clippy::too_many_arguments)]
pub fn self_check(
    device: &candle_core::Device,
    dtype: DType,
    norm_weight: &Tensor,
    eps: f64,
    heads: usize,
    kv_heads: usize,
    (cos, sin): (&Tensor, &Tensor),
) -> candle_core::Result<SelfCheck> {
    let hidden = norm_weight.dim(0)?;
    let on = |t: Tensor| t.to_dtype(dtype)?.to_device(device);
    let norm = RmsNorm::new(norm_weight.to_dtype(dtype)?.to_device(device)?, eps);
    let mut norm_max = 0f64;
    for (seed, rows) in [(1u64, 1usize), (2, 17)] {
        let x = on(uniform(seed, &[rows, hidden])?)?;
        let r = on(uniform(seed + 100, &[rows, hidden])?)?;
        let (s, n) = add_rms_norm(&x, &r, &norm)?;
        let (ws, wn) = add_rms_norm_candle(&x, &r, &norm)?;
        max_diff(&s, &ws, "add_rms_norm sum", |_, _| 0.0)?;
        let u = unit_roundoff(dtype);
        let tol = |_, w: f64| match dtype {
            DType::F32 => NORM_CANDLE_CPU_ULPS * u * w.abs(),
            _ => 2.0 * u * w.abs(),
        };
        norm_max = norm_max.max(max_diff(&n, &wn, "add_rms_norm normed", tol)?);
    }
    let (rows, hd) = (17, cos.dim(1)? * 2);
    let table_rows = cos.dim(0)?;
    // Scattered positions, the table's last row among them.
    let mut positions: Vec<u32> = (0..rows)
        .map(|i| ((i * 7919) % table_rows) as u32)
        .collect();
    positions[rows - 1] = table_rows as u32 - 1;
    let q = on(uniform(3, &[rows, heads, hd])?)?;
    let k = on(uniform(4, &[rows, kv_heads, hd])?)?;
    let rope_max = check_rope(&q, &k, (cos, sin), &positions)?;
    Ok(SelfCheck {
        norm_max_diff: norm_max,
        rope_max_diff: rope_max,
    })
}

/// How many f32 ulps of each output candle's CPU `rms_norm` (a sequential f32 sum of squares,
/// `s / sqrt(..) · w`) may be from the fused op's f32 normed rows. Seen: see model/tests/kernels.rs.
pub const NORM_CANDLE_CPU_ULPS: f64 = 64.0;

/// How far two RoPE implementations in `dtype` that each round a product and then fuse (or
/// round) the sum may differ, for inputs of magnitude up to `scale` and |cos|, |sin| ≤ 1: two
/// roundings of terms as large as the inputs.
pub fn rope_tolerance(dtype: DType, scale: f64) -> f64 {
    2.0 * unit_roundoff(dtype) * scale
}

/// [`rope_qk`] of q, k at `positions` against [`rope_qk_candle`] with the table rows gathered per
/// row, on q's device: the largest difference (within [`rope_tolerance`], else an error).
pub fn check_rope(
    q: &Tensor,
    k: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    positions: &[u32],
) -> candle_core::Result<f64> {
    let dev = q.device();
    let pos = Tensor::new(positions, dev)?;
    let (gq, gk) = rope_qk(q, k, cos, sin, &pos)?;
    let (wq, wk) = rope_qk_candle(
        q,
        k,
        &cos.index_select(&pos, 0)?,
        &sin.index_select(&pos, 0)?,
    )?;
    let scale = |t: &Tensor| -> candle_core::Result<f64> {
        t.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()
    };
    let dtype = q.dtype();
    let tol = rope_tolerance(dtype, scale(q)?.max(scale(k)?));
    let a = max_diff(&gq, &wq, "rope_qk q", |_, _| tol)?;
    let b = max_diff(&gk, &wk, "rope_qk k", |_, _| tol)?;
    Ok(a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Straightforward f64 RMSNorm of `x + r` (x, r, w in f64 from the dtype's values).
    fn norm_f64(x: &[f64], r: &[f64], w: &[f64], hidden: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let s: Vec<f64> = x.iter().zip(r).map(|(a, b)| a + b).collect();
        let mut n = Vec::with_capacity(s.len());
        for row in s.chunks(hidden) {
            let m = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
            let scale = 1.0 / (m + eps).sqrt();
            n.extend(row.iter().zip(w).map(|(v, w)| v * scale * w));
        }
        (s, n)
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The reference against f64 math: in f32 within a few ulps; in bf16/f16 the sum is the
    /// exact sum rounded once and the normed value the f64 value rounded once (give or take the
    /// f32 products before that rounding: one ulp).
    #[test]
    fn add_rms_norm_reference_matches_f64_math() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, hidden) in [(1, 4096), (3, 32), (17, 100), (5, 1000)] {
                let seed = (rows * 31 + hidden) as u64;
                let r16 = |t: Tensor| t.to_dtype(dtype).unwrap();
                let x = r16(uniform(seed, &[rows, hidden]).unwrap());
                let r = r16(uniform(seed + 1, &[rows, hidden]).unwrap());
                let w = r16((uniform(seed + 2, &[hidden]).unwrap() * 0.5).unwrap());
                let norm = RmsNorm::new(w.clone(), 1e-5);
                let (s, n) = add_rms_norm(&x, &r, &norm).unwrap();
                assert_eq!((s.dtype(), n.dtype()), (dtype, dtype));
                assert!(s.is_contiguous() && n.is_contiguous());
                let (ws, wn) = norm_f64(&f64s(&x), &f64s(&r), &f64s(&w), hidden, 1e-5);
                let u = unit_roundoff(dtype);
                for (i, (g, w)) in f64s(&s).iter().zip(&ws).enumerate() {
                    // Half an ulp: the exact sum rounded once.
                    assert!(
                        (g - w).abs() <= 0.5 * u * w.abs(),
                        "{dtype:?} sum [{i}] {g} {w}"
                    );
                }
                for (i, (g, w)) in f64s(&n).iter().zip(&wn).enumerate() {
                    let tol = match dtype {
                        DType::F32 => 4.0 * u * w.abs(),
                        _ => u * w.abs(),
                    };
                    assert!(
                        (g - w).abs() <= tol,
                        "{dtype:?} {rows}×{hidden} normed [{i}] {g} {w}"
                    );
                }
            }
        }
    }

    /// The reference against f64 rotation of the same (dtype-rounded) inputs and angles: one
    /// rounding of a product plus one of the result.
    #[test]
    fn rope_reference_matches_f64_rotation() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, heads, kv, hd) in [(1, 32, 8, 128), (3, 4, 2, 64), (17, 4, 2, 8)] {
                let (cos, sin) = rope_table(40_000, hd, 1e6, &Device::Cpu, dtype).unwrap();
                let seed = (rows * heads + hd) as u64;
                let q = uniform(seed, &[rows, heads, hd])
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let k = uniform(seed + 1, &[rows, kv, hd])
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let positions: Vec<u32> = (0..rows as u32).map(|i| (i * 12_347) % 40_000).collect();
                let pos = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
                let (gq, gk) = rope_qk(&q, &k, &cos, &sin, &pos).unwrap();
                let (c, s) = (f64s(&cos), f64s(&sin));
                let half = hd / 2;
                for (src, got, h) in [(&q, &gq, heads), (&k, &gk, kv)] {
                    let (x, g) = (f64s(src), f64s(got));
                    for (i, &g) in g.iter().enumerate() {
                        let (row, d) = (i / (h * hd), i % hd);
                        let (j, base) = (d % half, i - d);
                        let p = positions[row] as usize;
                        let (cc, ss) = (c[p * half + j], s[p * half + j]);
                        let (x1, x2) = (x[base + j], x[base + j + half]);
                        let want = match d < half {
                            true => x1 * cc - x2 * ss,
                            false => x1 * ss + x2 * cc,
                        };
                        let tol = unit_roundoff(dtype) * (x1.abs() + x2.abs());
                        assert!(
                            (g - want).abs() <= tol,
                            "{dtype:?} rows {rows} hd {hd} [{i}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Round-to-odd then to nearest 16-bit equals rounding the exact `a·b + c` once, checked where
    /// f64 holds the exact value (inputs of similar magnitude).
    #[test]
    fn fma_rounds_once() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..200_000 {
            let v = |rng: &mut StdRng| bf16::from_f32(rng.random_range(-4.0f32..4.0));
            let (a, b, c) = (v(&mut rng), v(&mut rng), v(&mut rng));
            let exact = a.to_f64() * b.to_f64() + c.to_f64();
            // Exact in f64 here; rounded to bf16 once through its bits.
            let want = round_f64_to_bf16(exact);
            let got = Elem::fma_rn(a, b, c);
            assert_eq!(got.to_bits(), want.to_bits(), "{a} * {b} + {c}");
        }
        // Where plain f32 arithmetic rounds twice: 1.0625² = 1 + 33·2^-8 is a bf16 midpoint, and
        // + 2^-40 lies just above it (rounds up), but f32 drops the 2^-40 and the tie goes to
        // the even neighbour below.
        let (a, c) = (bf16::from_f32(1.0625), bf16::from_f32(2f32.powi(-40)));
        assert_eq!(Elem::fma_rn(a, a, c), bf16::from_f32(1.0 + 34.0 / 256.0));
        assert_eq!(
            bf16::from_f32(1.0625f32 * 1.0625 + 2f32.powi(-40)).to_f32(),
            1.125
        );
    }

    /// Round-to-nearest-even of an f64 to bf16 through its bits (normal range).
    fn round_f64_to_bf16(x: f64) -> bf16 {
        let bits = x.to_bits();
        // Keep 7 fraction bits of f64's 52: drop 45, ties to even.
        let (keep, rest) = (bits >> 45, bits & ((1u64 << 45) - 1));
        let half = 1u64 << 44;
        let keep = match rest.cmp(&half) {
            std::cmp::Ordering::Greater => keep + 1,
            std::cmp::Ordering::Equal => keep + (keep & 1),
            std::cmp::Ordering::Less => keep,
        };
        bf16::from_f64(f64::from_bits(keep << 45))
    }

    #[test]
    fn rope_rejects_positions_past_the_table() {
        let (cos, sin) = rope_table(10, 8, 1e4, &Device::Cpu, DType::F32).unwrap();
        let q = uniform(1, &[2, 2, 8]).unwrap();
        let pos = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
        assert!(rope_qk(&q, &q, &cos, &sin, &pos).is_err());
        assert!(kernel_supports(DType::BF16) && !kernel_supports(DType::F64));
    }
}
