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
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor,
};
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
/// (what candle's `rope` kernel compiles to on sm_90). q and k are read in place when each row
/// is contiguous (rows may lie any stride apart: views of a stacked projection), else copied
/// first. Returns (q', k'), contiguous views of one buffer. Positions past the table are an error
/// on the CPU and read the last row on CUDA.
pub fn rope_qk(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (rows, heads, hd) = q.dims3()?;
    let (krows, kv_heads, khd) = k.dims3()?;
    if krows != rows || khd != hd {
        candle_core::bail!("rope_qk: q {:?}, k {:?}", q.dims(), k.dims());
    }
    let op = RopeQk::new(q, cos, sin, positions, heads, kv_heads, false)?;
    if k.dtype() != q.dtype() || !k.device().same_device(q.device()) {
        candle_core::bail!(
            "rope_qk: k {:?} on another device or of another dtype",
            k.dtype()
        );
    }
    let rows_in_place = |t: &Tensor| -> candle_core::Result<Tensor> {
        match row_strided(t.layout()) {
            Some(_) => Ok(t.clone()),
            None => t.contiguous(),
        }
    };
    let out = rows_in_place(q)?.apply_op2_no_bwd(&rows_in_place(k)?, &op)?;
    let nq = rows * heads * hd;
    Ok((
        out.narrow(0, 0, nq)?.reshape((rows, heads, hd))?,
        out.narrow(0, nq, rows * kv_heads * hd)?
            .reshape((rows, kv_heads, hd))?,
    ))
}

/// [`rope_qk`] of the q and k of a stacked projection `qkv` `[rows, heads + 2·kv_heads, hd]`
/// (per row: q's heads, then k's, then v's), with v copied along unrotated in the same launch:
/// returns (q' `[rows, heads, hd]`, k' and v `[rows, kv_heads, hd]`), contiguous views of one
/// buffer, ready for attention and the KV pool's writes without further copies. `qkv` is read
/// in place when each row is contiguous.
pub fn rope_qkv(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (rows, all, hd) = qkv.dims3()?;
    if all != heads + 2 * kv_heads {
        candle_core::bail!(
            "rope_qkv: qkv {:?} for {heads} + 2·{kv_heads} heads",
            qkv.dims()
        );
    }
    let op = RopeQk::new(qkv, cos, sin, positions, heads, kv_heads, true)?;
    let qkv = match row_strided(qkv.layout()) {
        Some(_) => qkv.clone(),
        None => qkv.contiguous()?,
    };
    let out = qkv.apply_op1_no_bwd(&op)?;
    let (nq, nk) = (rows * heads * hd, rows * kv_heads * hd);
    Ok((
        out.narrow(0, 0, nq)?.reshape((rows, heads, hd))?,
        out.narrow(0, nq, nk)?.reshape((rows, kv_heads, hd))?,
        out.narrow(0, nq + nk, nk)?.reshape((rows, kv_heads, hd))?,
    ))
}

/// The candle-op path [`rope_qkv`] replaces: q, k, v narrowed out of `qkv`, [`rope_qk_candle`]
/// of q and k (`cos`, `sin` `[rows, hd/2]`, each row's angles), v as it is.
pub fn rope_qkv_candle(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let q = qkv.narrow(1, 0, heads)?;
    let k = qkv.narrow(1, heads, kv_heads)?;
    let v = qkv.narrow(1, heads + kv_heads, kv_heads)?;
    let (q, k) = rope_qk_candle(&q, &k, cos, sin)?;
    Ok((q, k, v))
}

/// `silu(gate) · up` of a stacked projection `gate_up` `[rows, 2·inter]` (per row: gate, then
/// up) → `[rows, inter]`, in one launch on CUDA where candle takes two (`silu`, then `mul`): as
/// those ops compute it, candle's CUDA silu (f32 `g / (1 + exp(−g))`, in bf16 computed in f32
/// and rounded once, in f16 in half arithmetic) rounded to the dtype, then the dtype's product
/// with up rounded once; so bit-equal to candle's CUDA ops. On the CPU the reference
/// ([`SiluMul`]), with Rust's `exp` (candle's CPU silu in f32 and f16; in bf16 candle's CPU op
/// rounds each step to bf16 instead, [`SILU_MUL_CANDLE_CPU_ULPS`]).
pub fn silu_mul(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, two_inter) = gate_up.dims2()?;
    if two_inter % 2 != 0 {
        candle_core::bail!("silu_mul: gate_up {:?} has an odd width", gate_up.dims());
    }
    if !kernel_supports(gate_up.dtype()) {
        candle_core::bail!("silu_mul: {:?}", gate_up.dtype());
    }
    let op = SiluMul {
        rows,
        inter: two_inter / 2,
    };
    gate_up.contiguous()?.apply_op1_no_bwd(&op)
}

/// The candle-op path [`silu_mul`] replaces: `gate.silu() * up` over the two halves.
pub fn silu_mul_candle(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let inter = gate_up.dim(1)? / 2;
    let gate = gate_up.narrow(1, 0, inter)?;
    let up = gate_up.narrow(1, inter, inter)?;
    gate.silu()? * up
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

/// `(start, row stride)` of a layout `[rows, ..]` whose rows are each contiguous (a row's
/// elements adjacent, rows any stride ≥ a row's size apart: a narrowed slice of wider rows).
fn row_strided(l: &Layout) -> Option<(usize, usize)> {
    let (dims, strides) = (l.dims(), l.stride());
    let (&rows, inner) = dims.split_first()?;
    let width: usize = inner.iter().product();
    let mut expected = 1;
    for (&d, &st) in inner.iter().zip(&strides[1..]).rev() {
        if d > 1 && st != expected {
            return None;
        }
        expected *= d;
    }
    let stride = match rows {
        0 | 1 => width,
        _ => strides[0],
    };
    (stride >= width).then_some((l.start_offset(), stride))
}

/// The op behind [`rope_qk`] (operands q, k: `CustomOp2`) and [`rope_qkv`] (operand qkv:
/// `CustomOp1`, `with_v`); the table and positions travel in the struct. Output:
/// `[rows·heads·hd + rows·kv_heads·hd (+ rows·kv_heads·hd)]`, q' then k' (then v).
pub struct RopeQk {
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    rows: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    table_rows: usize,
    with_v: bool,
}

/// One operand of the RoPE reference: a row's `heads · hd` elements start at `start + row ·
/// stride` of `data`.
struct Rows<'a, T> {
    data: &'a [T],
    start: usize,
    stride: usize,
    heads: usize,
}

impl RopeQk {
    /// Checks the table, positions and dtypes against `x` ([rows, .., hd]: q or qkv).
    fn new(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        positions: &Tensor,
        heads: usize,
        kv_heads: usize,
        with_v: bool,
    ) -> candle_core::Result<Self> {
        let (rows, _, hd) = x.dims3()?;
        let (table_rows, half) = cos.dims2()?;
        if hd % 2 != 0 || half * 2 != hd || sin.dims() != cos.dims() {
            candle_core::bail!(
                "rope: x {:?}, cos {:?}, sin {:?}",
                x.dims(),
                cos.dims(),
                sin.dims()
            );
        }
        if positions.dims() != [rows] || positions.dtype() != DType::U32 {
            candle_core::bail!(
                "rope: positions must be u32 [{rows}], got {:?} {:?}",
                positions.dtype(),
                positions.dims()
            );
        }
        let dtype = x.dtype();
        if cos.dtype() != dtype || sin.dtype() != dtype {
            candle_core::bail!(
                "rope: x {dtype:?}, cos {:?}, sin {:?}",
                cos.dtype(),
                sin.dtype()
            );
        }
        let dev = x.device();
        for t in [cos, sin, positions] {
            if !t.device().same_device(dev) {
                candle_core::bail!("rope: every operand must be on q's device");
            }
        }
        if table_rows == 0 || table_rows > u32::MAX as usize {
            candle_core::bail!("rope: table of {table_rows} rows");
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            positions: positions.contiguous()?,
            rows,
            heads,
            kv_heads,
            hd,
            table_rows,
            with_v,
        })
    }

    fn out_len(&self) -> usize {
        let kv = match self.with_v {
            true => 2 * self.kv_heads,
            false => self.kv_heads,
        };
        self.rows * (self.heads + kv) * self.hd
    }

    /// The reference: what the kernel computes, operation for operation (so equal to it bit for
    /// bit): `x1·c − x2·s` as `fma(x1, c, −(x2·s))` and `x1·s + x2·c` as `fma(x1, s, x2·c)`; v
    /// (when given) copied.
    fn reference<T: Elem + candle_core::WithDType>(
        &self,
        q: Rows<T>,
        k: Rows<T>,
        v: Option<Rows<T>>,
        cos: &[T],
        sin: &[T],
    ) -> candle_core::Result<Vec<T>> {
        let positions = self.positions.to_vec1::<u32>()?;
        let (hd, half) = (self.hd, self.hd / 2);
        let mut out = Vec::with_capacity(self.out_len());
        for (src, rotate) in [(Some(q), true), (Some(k), true), (v, false)] {
            let Some(src) = src else { continue };
            let width = src.heads * hd;
            for (row, &p) in positions.iter().enumerate().take(self.rows) {
                let at = out.len();
                out.extend_from_slice(&src.data[src.start + row * src.stride..][..width]);
                if !rotate {
                    continue;
                }
                let p = p as usize;
                if p >= self.table_rows {
                    candle_core::bail!(
                        "rope_qk: position {p} (row {row}) past the table's {} rows",
                        self.table_rows
                    );
                }
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                for x in out[at..].chunks_exact_mut(hd) {
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

    /// An operand's rows under its layout (each row contiguous, else an error).
    fn rows_of<'a, T>(
        data: &'a [T],
        l: &Layout,
        heads: usize,
        what: &str,
    ) -> candle_core::Result<Rows<'a, T>> {
        match row_strided(l) {
            Some((start, stride)) => Ok(Rows {
                data,
                start,
                stride,
                heads,
            }),
            None => candle_core::bail!("rope: {what}'s rows must each be contiguous"),
        }
    }

    fn cpu_reference<T: Elem + candle_core::WithDType>(
        &self,
        q: Rows<T>,
        k: Rows<T>,
        v: Option<Rows<T>>,
    ) -> candle_core::Result<Vec<T>> {
        let cpu = candle_core::Device::Cpu;
        let cos = self.cos.to_device(&cpu)?.flatten_all()?.to_vec1::<T>()?;
        let sin = self.sin.to_device(&cpu)?.flatten_all()?.to_vec1::<T>()?;
        self.reference(q, k, v, &cos, &sin)
    }

    /// q, k, v of a stacked `qkv` under `l`: the same rows, at head offsets 0, heads, heads +
    /// kv_heads.
    fn stacked<'a, T>(&self, data: &'a [T], l: &Layout) -> candle_core::Result<[Rows<'a, T>; 3]> {
        let whole = Self::rows_of(data, l, self.heads + 2 * self.kv_heads, "qkv")?;
        let part = |offset: usize, heads: usize| Rows {
            data,
            start: whole.start + offset * self.hd,
            stride: whole.stride,
            heads,
        };
        Ok([
            part(0, self.heads),
            part(self.heads, self.kv_heads),
            part(self.heads + self.kv_heads, self.kv_heads),
        ])
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
        let (h, kvh) = (self.heads, self.kv_heads);
        let storage = match (qs, ks) {
            (CpuStorage::F32(q), CpuStorage::F32(k)) => CpuStorage::F32(self.cpu_reference(
                Self::rows_of(q, ql, h, "q")?,
                Self::rows_of(k, kl, kvh, "k")?,
                None,
            )?),
            (CpuStorage::BF16(q), CpuStorage::BF16(k)) => CpuStorage::BF16(self.cpu_reference(
                Self::rows_of(q, ql, h, "q")?,
                Self::rows_of(k, kl, kvh, "k")?,
                None,
            )?),
            (CpuStorage::F16(q), CpuStorage::F16(k)) => CpuStorage::F16(self.cpu_reference(
                Self::rows_of(q, ql, h, "q")?,
                Self::rows_of(k, kl, kvh, "k")?,
                None,
            )?),
            _ => candle_core::bail!(
                "rope_qk: q {:?}, k {:?} (f32, bf16 or f16, alike)",
                qs.dtype(),
                ks.dtype()
            ),
        };
        Ok((storage, Shape::from(self.out_len())))
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
        let parts = [(qs, ql, 0), (ks, kl, 0)];
        let storage = match dtype {
            DType::F32 => cuda::rope_qkv::<f32>(self, &parts, "f32")?,
            DType::BF16 => cuda::rope_qkv::<bf16>(self, &parts, "bf16")?,
            _ => cuda::rope_qkv::<f16>(self, &parts, "f16")?,
        };
        Ok((storage, Shape::from(self.out_len())))
    }
}

impl CustomOp1 for RopeQk {
    fn name(&self) -> &'static str {
        "rope-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match s {
            CpuStorage::F32(x) => {
                let [q, k, v] = self.stacked(x, l)?;
                CpuStorage::F32(self.cpu_reference(q, k, Some(v))?)
            }
            CpuStorage::BF16(x) => {
                let [q, k, v] = self.stacked(x, l)?;
                CpuStorage::BF16(self.cpu_reference(q, k, Some(v))?)
            }
            CpuStorage::F16(x) => {
                let [q, k, v] = self.stacked(x, l)?;
                CpuStorage::F16(self.cpu_reference(q, k, Some(v))?)
            }
            _ => candle_core::bail!("rope_qkv: {:?} (f32, bf16 or f16)", s.dtype()),
        };
        Ok((storage, Shape::from(self.out_len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dtype = s.dtype();
        if !kernel_supports(dtype) {
            candle_core::bail!("rope_qkv kernel: {dtype:?}");
        }
        let (h, kvh) = (self.heads, self.kv_heads);
        let parts = [(s, l, 0), (s, l, h), (s, l, h + kvh)];
        let storage = match dtype {
            DType::F32 => cuda::rope_qkv::<f32>(self, &parts, "f32")?,
            DType::BF16 => cuda::rope_qkv::<bf16>(self, &parts, "bf16")?,
            _ => cuda::rope_qkv::<f16>(self, &parts, "f16")?,
        };
        Ok((storage, Shape::from(self.out_len())))
    }
}

/// The op behind [`silu_mul`]: operand gate_up `[rows, 2·inter]` (contiguous), output
/// `[rows, inter]`.
pub struct SiluMul {
    rows: usize,
    inter: usize,
}

/// candle's silu in a dtype as [`silu_mul`] computes it (candle's CUDA kernels).
trait Silu: Elem {
    fn silu(self) -> Self;
}

impl Silu for f32 {
    fn silu(self) -> Self {
        self / (1.0 + (-self).exp())
    }
}

impl Silu for bf16 {
    /// In f32, rounded once (candle's CUDA `usilu_bf16`; its CPU op rounds every step).
    fn silu(self) -> Self {
        let x = self.to_f32();
        bf16::from_f32(x / (1.0 + (-x).exp()))
    }
}

impl Silu for f16 {
    /// In half arithmetic, every step rounded (candle's `silu_fwd<__half>` with `hexp`, and its
    /// CPU op).
    fn silu(self) -> Self {
        let e = f16::from_f32((-self.to_f32()).exp());
        let d = f16::ONE.add_rn(e);
        f16::from_f32(self.to_f32() / d.to_f32())
    }
}

impl SiluMul {
    /// The reference: per output, [`Silu::silu`] of the gate, times up in the dtype's arithmetic.
    fn reference<T: Silu>(&self, gu: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.rows * self.inter);
        for row in gu.chunks_exact(2 * self.inter).take(self.rows) {
            let (gate, up) = row.split_at(self.inter);
            out.extend(gate.iter().zip(up).map(|(&g, &u)| g.silu().mul_rn(u)));
        }
        out
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.reference(contiguous(x, l, "gate_up")?)),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.reference(contiguous(x, l, "gate_up")?)),
            CpuStorage::F16(x) => CpuStorage::F16(self.reference(contiguous(x, l, "gate_up")?)),
            _ => candle_core::bail!("silu_mul: {:?} (f32, bf16 or f16)", s.dtype()),
        };
        Ok((storage, Shape::from((self.rows, self.inter))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let storage = match s.dtype() {
            DType::F32 => cuda::silu_mul::<f32>(self, s, l, "f32")?,
            DType::BF16 => cuda::silu_mul::<bf16>(self, s, l, "bf16")?,
            DType::F16 => cuda::silu_mul::<f16>(self, s, l, "f16")?,
            d => candle_core::bail!("silu_mul kernel: {d:?}"),
        };
        Ok((storage, Shape::from((self.rows, self.inter))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{AddRmsNorm, RopeQk, SiluMul};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "tga_fused";
    /// Threads per RoPE block (one per rotated pair).
    const ROPE_THREADS: u32 = 256;
    /// Threads per silu·mul block (one per output).
    const SILU_THREADS: u32 = 256;

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

    /// One operand of the RoPE kernel: its storage, layout (rows each contiguous) and the head
    /// its rows start at (q, k, v of a stacked qkv share a storage and layout).
    pub(super) type RopePart<'a> = (&'a CudaStorage, &'a Layout, usize);

    /// The rows of `heads` heads starting at head `offset` of each row of `(s, l)` as a device
    /// view, and the row stride.
    fn rows_view<'a, T: CudaDType>(
        (s, l, offset): RopePart<'a>,
        rows: usize,
        width: usize,
        hd: usize,
        what: &str,
    ) -> candle_core::Result<(CudaView<'a, T>, u64)> {
        let Some((start, stride)) = super::row_strided(l) else {
            candle_core::bail!("rope kernel: {what}'s rows are not each contiguous");
        };
        let start = start + offset * hd;
        let end = start + (rows.max(1) - 1) * stride + width;
        Ok((s.as_cuda_slice::<T>()?.slice(start..end), stride as u64))
    }

    /// RoPE of q and k (and v copied along when three parts are given) into one contiguous
    /// output `[q' | k' (| v)]`, one launch.
    pub(super) fn rope_qkv<T: CudaDType + DeviceRepr>(
        op: &RopeQk,
        parts: &[RopePart],
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = parts[0].0.device.clone();
        let (rows, hd) = (op.rows, op.hd);
        let (q, q_stride) = rows_view::<T>(parts[0], rows, op.heads * hd, hd, "q")?;
        let (k, k_stride) = rows_view::<T>(parts[1], rows, op.kv_heads * hd, hd, "k")?;
        let v = match parts.get(2) {
            Some(&p) => Some(rows_view::<T>(p, rows, op.kv_heads * hd, hd, "v")?),
            None => None,
        };
        let (cs, cl) = op.cos.storage_and_layout();
        let (ss, sl) = op.sin.storage_and_layout();
        let (ps, pl) = op.positions.storage_and_layout();
        let cos = tensor_view::<T>(&cs, cl, "cos")?;
        let sin = tensor_view::<T>(&ss, sl, "sin")?;
        let positions = tensor_view::<u32>(&ps, pl, "positions")?;
        let n = op.out_len();
        // SAFETY: the kernel writes every element (one thread per pair of q', k' and v).
        let out = unsafe { dev.alloc::<T>(n)? };
        let pairs = (n / 2) as u64;
        let blocks = pairs.div_ceil(ROPE_THREADS as u64);
        if blocks > i32::MAX as u64 {
            candle_core::bail!("rope kernel: {pairs} pairs");
        }
        let func = dev.get_or_load_custom_func(&format!("rope_qkv_{name}"), MODULE, PTX)?;
        let rows = rows as u64;
        let (heads, kv_heads, hd) = (op.heads as i32, op.kv_heads as i32, hd as i32);
        let table_rows = op.table_rows as u32;
        // No v: a null pointer (the kernel then has no v pairs).
        let null = 0u64;
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        match &v {
            Some((v, _)) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&positions);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&hd);
        b.arg(&table_rows);
        let v_stride = v.as_ref().map_or(0, |(_, s)| *s);
        b.arg(&q_stride);
        b.arg(&k_stride);
        b.arg(&v_stride);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        if pairs > 0 {
            // SAFETY: the arguments match rope_qkv_* in fused.cu; the views of q, k (and v)
            // cover rows rows of heads × hd (kv_heads × hd) elements their strides apart,
            // positions rows, the table table_rows × hd/2 (positions are clamped to it), out n
            // elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn silu_mul<T: CudaDType + DeviceRepr>(
        op: &SiluMul,
        s: &CudaStorage,
        l: &Layout,
        name: &str,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device.clone();
        let gate_up = view::<T>(s, l, "gate_up")?;
        let n = op.rows * op.inter;
        if gate_up.len() != 2 * n {
            candle_core::bail!(
                "silu_mul kernel: {} elements for {n} outputs",
                gate_up.len()
            );
        }
        // SAFETY: the kernel writes every element (one thread per output).
        let out = unsafe { dev.alloc::<T>(n)? };
        let blocks = (n as u64).div_ceil(SILU_THREADS as u64);
        if blocks > i32::MAX as u64 {
            candle_core::bail!("silu_mul kernel: {n} outputs");
        }
        let func = dev.get_or_load_custom_func(&format!("silu_mul_{name}"), MODULE, PTX)?;
        let (n_u64, inter) = (n as u64, op.inter as u64);
        let mut b = func.builder();
        b.arg(&gate_up);
        b.arg(&out);
        b.arg(&n_u64);
        b.arg(&inter);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SILU_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        if n > 0 {
            // SAFETY: the arguments match silu_mul_* in fused.cu; gate_up covers rows × 2·inter
            // elements, out rows × inter.
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
    let v = on(uniform(5, &[rows, kv_heads, hd])?)?;
    check_rope_qkv(&q, &k, &v, (cos, sin), &positions)?;
    Ok(SelfCheck {
        norm_max_diff: norm_max,
        rope_max_diff: rope_max,
    })
}

/// [`rope_qkv`] of `[q | k | v]` stacked per row (rows strided, as a projection's output is
/// narrowed) against [`rope_qk`] of q and k: the same kernel, so bit-equal, and v unchanged.
pub fn check_rope_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    positions: &[u32],
) -> candle_core::Result<()> {
    let (heads, kv_heads) = (q.dim(1)?, k.dim(1)?);
    // Wider rows than q|k|v (a narrowed stack), to exercise the row stride.
    let pad = k.narrow(1, 0, 1)?;
    let qkv = Tensor::cat(&[q, k, v, &pad], 1)?.narrow(1, 0, heads + 2 * kv_heads)?;
    let pos = Tensor::new(positions, q.device())?;
    let (gq, gk, gv) = rope_qkv(&qkv, heads, kv_heads, cos, sin, &pos)?;
    let (wq, wk) = rope_qk(q, k, cos, sin, &pos)?;
    max_diff(&gq, &wq, "rope_qkv q", |_, _| 0.0)?;
    max_diff(&gk, &wk, "rope_qkv k", |_, _| 0.0)?;
    max_diff(&gv, v, "rope_qkv v", |_, _| 0.0)?;
    Ok(())
}

/// How many ulps of the dtype (of each output) [`silu_mul`] may be from candle's `silu` then
/// `mul` on the CPU. f32 and f16: 0 (the same arithmetic). bf16: candle's CPU op rounds `exp`,
/// `1 + e` and the quotient to bf16 (relative error ≤ 3·2^-8 against the kernel's one rounding
/// of the f32 value, ≤ 2^-8), and both round the product: 2^-8 · 6 = 3 ulps, plus one for the
/// ulp's step between binades.
pub const SILU_MUL_CANDLE_CPU_ULPS: f64 = 4.0;

/// How many ulps of the dtype (of each output) the CUDA kernel of [`silu_mul`] may be from its
/// CPU reference: CUDA's `expf` (≤ 2 ulps) against Rust's (≤ 1), through `1 + e` and the quotient
/// (≤ 3 ulps more in f32); in 16-bit types the f32 silu may then round to the neighbouring value
/// (1 ulp) before the product's rounding (1 more).
pub fn silu_mul_reference_ulps(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 8.0,
        _ => 2.0,
    }
}

/// [`silu_mul`] on `device` against candle's `silu` and `mul` on `device` at `inter` columns
/// (1 and 17 rows; gates in [-8, 8) so that both tails of the sigmoid are exercised): the largest
/// difference, within [`SILU_MUL_CANDLE_CPU_ULPS`] in 16-bit types and 0 in f32 (else an error).
/// On CUDA the two are the same arithmetic (bit-equal). Run by the decoder with
/// [`self_check`] before its first fused op.
pub fn self_check_silu_mul(
    device: &candle_core::Device,
    dtype: DType,
    inter: usize,
) -> candle_core::Result<f64> {
    let mut max = 0f64;
    for (seed, rows) in [(6u64, 1usize), (7, 17)] {
        let gu = (uniform(seed, &[rows, 2 * inter])? * 4.0)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let got = silu_mul(&gu)?;
        let want = silu_mul_candle(&gu)?;
        let ulps = match dtype {
            DType::F32 => 0.0,
            _ => SILU_MUL_CANDLE_CPU_ULPS,
        };
        let u = unit_roundoff(dtype);
        max = max.max(max_diff(&got, &want, "silu_mul", |_, w| {
            ulps * u * w.abs()
        })?);
    }
    Ok(max)
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

    /// q and k read in place from a stacked projection's rows (strided views) give what their
    /// contiguous copies give, and rope_qkv's q', k' are rope_qk's with v carried unchanged.
    #[test]
    fn rope_reads_strided_rows_in_place() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, heads, kv, hd) in [(1, 32, 8, 128), (3, 4, 2, 64), (17, 4, 1, 8)] {
                let (cos, sin) = rope_table(100, hd, 1e4, &Device::Cpu, dtype).unwrap();
                let qkv = uniform(rows as u64, &[rows, heads + 2 * kv + 3, hd])
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .narrow(1, 1, heads + 2 * kv)
                    .unwrap();
                let q = qkv.narrow(1, 0, heads).unwrap();
                let k = qkv.narrow(1, heads, kv).unwrap();
                let v = qkv.narrow(1, heads + kv, kv).unwrap();
                assert!(row_strided(q.layout()).is_some() && (rows == 1 || !q.is_contiguous()));
                let positions: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % 100).collect();
                let pos = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
                let (sq, sk) = rope_qk(&q, &k, &cos, &sin, &pos).unwrap();
                let (cq, ck) = rope_qk(
                    &q.contiguous().unwrap(),
                    &k.contiguous().unwrap(),
                    &cos,
                    &sin,
                    &pos,
                )
                .unwrap();
                assert_eq!(f64s(&sq), f64s(&cq), "{dtype:?} {rows} q");
                assert_eq!(f64s(&sk), f64s(&ck), "{dtype:?} {rows} k");
                let (gq, gk, gv) = rope_qkv(&qkv, heads, kv, &cos, &sin, &pos).unwrap();
                assert_eq!(f64s(&gq), f64s(&cq), "{dtype:?} {rows} qkv q");
                assert_eq!(f64s(&gk), f64s(&ck), "{dtype:?} {rows} qkv k");
                assert_eq!(f64s(&gv), f64s(&v), "{dtype:?} {rows} qkv v");
                assert!(gq.is_contiguous() && gk.is_contiguous() && gv.is_contiguous());
                check_rope_qkv(&q, &k, &v, (&cos, &sin), &positions).unwrap();
                // candle's path over the same strided views (decode past the table).
                let rows_of = |t: &Tensor| t.index_select(&pos, 0).unwrap();
                let (wq, wk, wv) =
                    rope_qkv_candle(&qkv, heads, kv, &rows_of(&cos), &rows_of(&sin)).unwrap();
                let tol = rope_tolerance(dtype, 2.0);
                max_diff(&gq, &wq, "candle q", |_, _| tol).unwrap();
                max_diff(&gk, &wk, "candle k", |_, _| tol).unwrap();
                max_diff(&gv, &wv, "candle v", |_, _| 0.0).unwrap();
            }
        }
        // Rows that are not each contiguous are copied first.
        let t = uniform(3, &[4, 2, 8]).unwrap();
        assert!(row_strided(t.transpose(0, 1).unwrap().layout()).is_none());
        assert!(row_strided(t.narrow(2, 0, 4).unwrap().layout()).is_none());
    }

    /// The silu·mul reference against f64 math on the same inputs: f32 within a few ulps; bf16
    /// the f64 silu rounded once (give or take the f32 exp: one ulp), then the product rounded.
    #[test]
    fn silu_mul_reference_matches_f64_math() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, inter) in [(1, 14336), (3, 7), (17, 100)] {
                let gu = (uniform((rows + inter) as u64, &[rows, 2 * inter]).unwrap() * 4.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let got = f64s(&silu_mul(&gu).unwrap());
                let x = f64s(&gu);
                let u = unit_roundoff(dtype);
                for (i, g) in got.iter().enumerate() {
                    let (row, col) = (i / inter, i % inter);
                    let gate = x[row * 2 * inter + col];
                    let up = x[row * 2 * inter + inter + col];
                    let want = gate / (1.0 + (-gate).exp()) * up;
                    let ulps = match dtype {
                        DType::F32 => 4.0,
                        DType::BF16 => 2.0,
                        // Half arithmetic: exp, 1 + e, the quotient and the product rounded.
                        _ => 4.0,
                    };
                    assert!(
                        (g - want).abs() <= ulps * u * want.abs(),
                        "{dtype:?} {rows}×{inter} [{i}] {g} vs {want}"
                    );
                }
                // On the CPU the op is the reference, and equals candle's ops in f32 and f16.
                if dtype != DType::BF16 {
                    let candle = f64s(&silu_mul_candle(&gu).unwrap());
                    assert_eq!(got, candle, "{dtype:?} {rows}×{inter}");
                }
            }
        }
        assert!(silu_mul(&uniform(1, &[2, 7]).unwrap()).is_err());
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
