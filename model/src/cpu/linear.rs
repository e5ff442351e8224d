//! Small-batch linear layers: `x · wᵀ` for up to [`MAX_ROWS`] rows, each weight row read from
//! memory once, with f32, bf16 or f16 weights.

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::elementwise::dot_w;
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{isa, with_f32, Isa};

/// Up to this many rows linear layers run through [`linear`]; beyond it gemm's packed kernels
/// are faster (measured on bench-135m's shapes, 2 threads: ours 2.5-10x gemm at 4-64 rows, even
/// at 256, gemm 1.2-1.8x ours at 600-2400).
pub(crate) const MAX_ROWS: usize = 256;

/// The element types a linear layer's weights may be stored in on the CPU.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    const KIND: WeightKind;
    fn to_f32(self) -> f32;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightKind {
    F32,
    Bf16,
    F16,
}

impl WeightElem for f32 {
    const KIND: WeightKind = WeightKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElem for half::bf16 {
    const KIND: WeightKind = WeightKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl WeightElem for half::f16 {
    const KIND: WeightKind = WeightKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// A weight matrix's elements in memory order, in whichever dtype it is stored.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(w) => w.len(),
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }

    /// [`gemm_features`] instantiated for the stored element type.
    ///
    /// # Safety
    /// As [`gemm_features`], with these weights as `w`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn features(
        self,
        isa: Isa,
        x: *const f32,
        rows: usize,
        k: usize,
        n: usize,
        o0: usize,
        o1: usize,
        y: *mut f32,
    ) {
        unsafe {
            match self {
                Self::F32(w) => gemm_features(isa, x, w.as_ptr(), rows, k, n, o0, o1, y),
                Self::Bf16(w) => gemm_features(isa, x, w.as_ptr(), rows, k, n, o0, o1, y),
                Self::F16(w) => gemm_features(isa, x, w.as_ptr(), rows, k, n, o0, o1, y),
            }
        }
    }
}

/// The elements of contiguous f32, bf16 or f16 CPU storage under `layout`.
pub(super) fn weight_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<Weights<'a>> {
    let (start, end) = layout.contiguous_offsets()?;
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(Weights::F32(&v[start..end])),
        Storage::Cpu(CpuStorage::BF16(v)) => Some(Weights::Bf16(&v[start..end])),
        Storage::Cpu(CpuStorage::F16(v)) => Some(Weights::F16(&v[start..end])),
        _ => None,
    }
}

/// A raw output pointer handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task that receives a SendPtr writes a region no other task touches, and the
// buffer outlives the parallel loop.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x [rows, in] · wᵀ` for `w [out, in]` (PyTorch's layout) when `rows <= MAX_ROWS`; `x` f32,
/// `w` f32, bf16 or f16 (widened in registers: the same f32 arithmetic on half the bytes).
///
/// gemm packs the whole weight matrix on every call at these sizes and its one-row path does not
/// reach memory speed; here each weight row is read from memory once and dotted with all rows of
/// `x` while it sits in L1, split over the threads by blocks of output features.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    Ok(linear_many(x, &[w])?.and_then(|mut v| v.pop()))
}

/// [`linear`] for several weight matrices applied to the same `x` (q/k/v, gate/up), in one
/// parallel pass: a decode step then waits on the thread pool once instead of once per matrix.
pub(crate) fn linear_many(x: &Tensor, ws: &[&Tensor]) -> candle_core::Result<Option<Vec<Tensor>>> {
    let &[rows, k] = x.dims() else {
        return Ok(None);
    };
    if rows == 0 || rows > MAX_ROWS || k == 0 || ws.is_empty() {
        return Ok(None);
    }
    let mut ns = Vec::with_capacity(ws.len());
    for w in ws {
        match w.dims() {
            &[n, kw] if kw == k && n > 0 => ns.push(n),
            _ => return Ok(None),
        }
    }
    let x = x.contiguous()?;
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let Some(wsl) = guards
        .iter()
        .map(|(s, l)| weight_slice(s, l))
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let ys = with_f32(&x, |xs| {
        let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; rows * n]).collect();
        small_gemm(xs, &wsl, rows, k, &ns, &mut ys);
        ys
    });
    let Some(ys) = ys else { return Ok(None) };
    let dev = x.device();
    Ok(Some(
        ys.into_iter()
            .zip(&ns)
            .map(|(y, &n)| Tensor::from_vec(y, (rows, n), dev))
            .collect::<candle_core::Result<Vec<_>>>()?,
    ))
}

fn small_gemm(x: &[f32], ws: &[Weights], rows: usize, k: usize, ns: &[usize], ys: &mut [Vec<f32>]) {
    let isa = isa();
    let threads = rayon::current_num_threads().max(1);
    // Row blocks whose slice of x stays in L2 (~256 KB) while a block of weights is swept over
    // it; up to a few dozen rows, one block: every weight is then read from memory once.
    let row_block = (65536 / k).clamp(8, 64) / 4 * 4;
    let row_block = if rows <= 2 * row_block {
        rows
    } else {
        row_block
    };
    // Feature blocks: a few per thread for balance when there is one row block, else 64 (a
    // weight block that stays in L2 across the row blocks a thread takes in turn).
    let total: usize = ns.iter().sum();
    let block = if row_block == rows {
        total.div_ceil(threads * 4).next_multiple_of(4).max(16)
    } else {
        64
    };
    let mut tasks = Vec::new();
    for (m, &n) in ns.iter().enumerate() {
        for o0 in (0..n).step_by(block) {
            for r0 in (0..rows).step_by(row_block) {
                tasks.push((m, o0, (o0 + block).min(n), r0, (r0 + row_block).min(rows)));
            }
        }
    }
    let outs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    tasks.into_par_iter().for_each(|(m, o0, o1, r0, r1)| {
        let (w, n, y) = (ws[m], ns[m], outs[m]);
        assert!(x.len() == rows * k && w.len() == n * k && o1 <= n && r1 <= rows);
        // SAFETY: sizes checked above (ys[m] holds rows × n); this task writes only the output
        // features o0..o1 of rows r0..r1 of matrix m, which no other task touches.
        unsafe {
            let (xr, yr) = (x.as_ptr().add(r0 * k), y.get().add(r0 * n));
            w.features(isa, xr, r1 - r0, k, n, o0, o1, yr)
        }
    });
}

/// Output features `o0..o1` of every row: `y[r*n + o] = x[r] · w[o]`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_features<W: WeightElem>(
    isa: Isa,
    x: *const f32,
    w: *const W,
    rows: usize,
    k: usize,
    n: usize,
    o0: usize,
    o1: usize,
    y: *mut f32,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::features_avx512(x, w, rows, k, n, o0, o1, y),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::features_avx2(x, w, rows, k, n, o0, o1, y),
        Isa::Portable => {
            for o in o0..o1 {
                let wr = std::slice::from_raw_parts(w.add(o * k), k);
                for r in 0..rows {
                    let xr = std::slice::from_raw_parts(x.add(r * k), k);
                    *y.add(r * n + o) = dot_w(wr, xr);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_support::{isas, max_diff, rand};
    use candle_core::{DType, Device};

    #[test]
    fn small_gemm_matches_matmul_on_every_isa_and_shape() {
        // k not a multiple of 16 or 8 exercises the tails; n not a multiple of 4 the 1-row tiles.
        for (rows, k, n) in [
            (1, 768, 2048),
            (200, 40, 70),
            (3, 37, 11),
            (16, 64, 96),
            (5, 200, 7),
            (7, 8, 1),
        ] {
            let x = rand(&[rows, k], 1);
            let w = rand(&[n, k], 2);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let (xs, ws) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for isa in isas() {
                let mut y = vec![0f32; rows * n];
                for o0 in (0..n).step_by(16) {
                    let o1 = (o0 + 16).min(n);
                    unsafe {
                        gemm_features(
                            isa,
                            xs.as_ptr(),
                            ws.as_ptr(),
                            rows,
                            k,
                            n,
                            o0,
                            o1,
                            y.as_mut_ptr(),
                        )
                    };
                }
                let got = Tensor::from_vec(y, (rows, n), &Device::Cpu).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 1e-4 * (k as f32).sqrt(), "{isa:?} {rows}x{k}x{n}: {d}");
            }
            let got = linear(&x, &w).unwrap().expect("f32 cpu small batch");
            assert!(max_diff(&got, &want) < 1e-4 * (k as f32).sqrt());
        }
        // Several matrices of different widths in one pass (q/k/v) give each its own product.
        let x = rand(&[5, 40], 8);
        let ws: Vec<Tensor> = [24, 8, 8]
            .iter()
            .map(|&n| rand(&[n, 40], n as u64))
            .collect();
        let got = linear_many(&x, &ws.iter().collect::<Vec<_>>())
            .unwrap()
            .unwrap();
        for (g, w) in got.iter().zip(&ws) {
            assert!(max_diff(g, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-5);
        }
        // For other input dtypes callers fall back to candle.
        let xh = rand(&[2, 8], 3).to_dtype(DType::F16).unwrap();
        let wh = rand(&[4, 8], 4).to_dtype(DType::F16).unwrap();
        assert!(linear(&xh, &wh).unwrap().is_none());
    }

    #[test]
    fn small_gemm_with_16bit_weights_equals_the_widened_f32_weights() {
        // Widening is exact and the arithmetic is the f32 path's: equal bit for bit, per ISA,
        // including the k tails (37, 200) and single-feature tiles (n = 7, 11).
        for (rows, k, n) in [(1, 768, 70), (3, 37, 11), (16, 64, 96), (5, 200, 7)] {
            let x = rand(&[rows, k], 5);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for dtype in [DType::BF16, DType::F16] {
                let w16 = rand(&[n, k], 6).to_dtype(dtype).unwrap();
                let w32 = w16.to_dtype(DType::F32).unwrap();
                let ws32 = w32.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (s16, l16) = w16.storage_and_layout();
                let weights = weight_slice(&s16, l16).expect("16-bit cpu weights");
                for isa in isas() {
                    let run = |w: Weights| {
                        let mut y = vec![0f32; rows * n];
                        unsafe { w.features(isa, xs.as_ptr(), rows, k, n, 0, n, y.as_mut_ptr()) };
                        y
                    };
                    assert_eq!(
                        run(weights),
                        run(Weights::F32(&ws32)),
                        "{isa:?} {dtype:?} {rows}x{k}x{n}"
                    );
                }
                drop(s16);
                let got = linear(&x, &w16)
                    .unwrap()
                    .expect("16-bit weights take the kernel");
                let want = linear(&x, &w32).unwrap().unwrap();
                assert_eq!(max_diff(&got, &want), 0.0, "{dtype:?} {rows}x{k}x{n}");
            }
        }
    }
}
