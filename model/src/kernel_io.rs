//! What the attention ops' CPU references (`paged`, `paged_prefill`) share: widening any float
//! storage to f32, running a reference over pools of any float dtype, and returning the result in
//! the query's dtype; and, under the `cuda` feature, the contiguous device ranges of operands.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};

/// A float element widened to f32.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for f64 {
    fn widen(self) -> f32 {
        self as f32
    }
}
impl Widen for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// The contiguous elements a layout covers (its start offset applied); `op` and `what` name
/// the operand in the error.
pub(crate) fn contiguous<'a, T>(
    s: &'a [T],
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// A float storage's contiguous elements, widened to f32.
pub(crate) fn widen_storage(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    fn all<T: Widen>(s: &[T], l: &Layout, op: &str, what: &str) -> candle_core::Result<Vec<f32>> {
        Ok(contiguous(s, l, op, what)?
            .iter()
            .map(|x| x.widen())
            .collect())
    }
    match s {
        CpuStorage::F32(s) => all(s, l, op, what),
        CpuStorage::F64(s) => all(s, l, op, what),
        CpuStorage::BF16(s) => all(s, l, op, what),
        CpuStorage::F16(s) => all(s, l, op, what),
        other => candle_core::bail!("{op}: {what} of dtype {:?}", other.dtype()),
    }
}

/// An attention reference over K/V pools of one float dtype, widened as it reads them.
pub(crate) trait PoolReference {
    /// The op's name, for errors.
    fn op_name(&self) -> &'static str;
    /// Output in f32 from f32 queries and the pools' elements.
    fn run<K: Widen>(&self, q: &[f32], k: &[K], v: &[K]) -> candle_core::Result<Vec<f32>>;
}

/// Runs `reference` over the pools `ks`, `vs` (the same float dtype, contiguous).
pub(crate) fn with_pools(
    reference: &impl PoolReference,
    q: &[f32],
    (ks, kl): (&CpuStorage, &Layout),
    (vs, vl): (&CpuStorage, &Layout),
) -> candle_core::Result<Vec<f32>> {
    let op = reference.op_name();
    match (ks, vs) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => reference.run(
            q,
            contiguous(k, kl, op, "k_pool")?,
            contiguous(v, vl, op, "v_pool")?,
        ),
        (CpuStorage::F64(k), CpuStorage::F64(v)) => reference.run(
            q,
            contiguous(k, kl, op, "k_pool")?,
            contiguous(v, vl, op, "v_pool")?,
        ),
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => reference.run(
            q,
            contiguous(k, kl, op, "k_pool")?,
            contiguous(v, vl, op, "v_pool")?,
        ),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => reference.run(
            q,
            contiguous(k, kl, op, "k_pool")?,
            contiguous(v, vl, op, "v_pool")?,
        ),
        _ => candle_core::bail!("{op}: pools of dtype {:?} / {:?}", ks.dtype(), vs.dtype()),
    }
}

/// f32 results as a storage of `dtype` (rounded once; f32 for any non-float dtype).
pub(crate) fn storage_of(dtype: DType, out: Vec<f32>) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(out.into_iter().map(f64::from).collect()),
        DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
        _ => CpuStorage::F32(out),
    }
}

/// A contiguous operand's element range on the device.
#[cfg(feature = "cuda")]
pub(crate) fn device_range(
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} not contiguous")))
}
