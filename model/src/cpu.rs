//! f32 CPU kernels for the hot paths where candle's generic ops lose most of the time
//! (bench/RESULTS.md, "Profile"): small-batch linear layers (decode), decode attention over each
//! sequence's KV cache, fused scale·mask·softmax for prefill and vision attention, and the fused
//! SwiGLU / QuickGELU activations.
//!
//! Every entry point takes candle tensors and returns `Ok(None)` unless they are f32 tensors on
//! the CPU in the layout it needs, so callers fall back to candle's ops (other dtypes, GPUs).
//! The one exception is the linear layers' weights, which may also be bf16 or f16: they are
//! widened to f32 in registers (exact), so the arithmetic is the f32 path's, on half the bytes.
//! The x86-64 paths are chosen at run time (AVX-512, AVX2+FMA, portable), so a portable build
//! still uses the machine's vector units.

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Up to this many rows linear layers run through [`linear`]; beyond it gemm's packed kernels
/// are faster (measured on bench-135m's shapes, 2 threads: ours 2.5-10x gemm at 4-64 rows, even
/// at 256, gemm 1.2-1.8x ours at 600-2400).
pub(crate) const MAX_ROWS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// The best instruction set this CPU has, or a lower one named by `TGA_CPU_ISA` (`avx2`,
/// `portable`): CI runs the model tests once per level so every code path is checked.
fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("TGA_CPU_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if cap != "portable" && cap != "avx2" && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if cap != "portable"
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Portable
    })
}

/// Runs `f` on the f32 elements of a contiguous f32 CPU tensor, in memory order.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    f32_slice(&storage, layout).map(f)
}

/// The elements of contiguous f32 CPU storage under `layout`.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match weight_slice(storage, layout)? {
        Weights::F32(v) => Some(v),
        _ => None,
    }
}

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
enum Weights<'a> {
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
fn weight_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<Weights<'a>> {
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

/// Runs `f` on a worker of rayon's global pool. From outside the pool, every parallel loop in `f`
/// (candle's matmuls, the kernels here: ~70 per decode step) would inject its work and park the
/// calling thread until it is done, two context switches each; on a worker the caller takes part.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

// ---------------------------------------------------------------------------------------------
// Small-batch linear layers
// ---------------------------------------------------------------------------------------------

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

// Index loops over the register tile read more plainly than iterator chains.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{WeightElem, WeightKind};

    /// 16 weights from `p`, widened to f32 (bf16: the bits shifted up; f16: vcvtph2ps).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<W: WeightElem>(p: *const W) -> __m512 {
        unsafe {
            match W::KIND {
                WeightKind::F32 => _mm512_loadu_ps(p as *const f32),
                WeightKind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                )),
                WeightKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            }
        }
    }

    /// The last `len` (< 16) weights from `p`, widened, zero beyond.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_tail<W: WeightElem>(p: *const W, len: usize) -> __m512 {
        unsafe {
            let mut buf = [0f32; 16];
            for (j, b) in buf.iter_mut().enumerate().take(len) {
                *b = (*p.add(j)).to_f32();
            }
            _mm512_loadu_ps(buf.as_ptr())
        }
    }

    /// 8 weights from `p`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
        unsafe {
            match W::KIND {
                WeightKind::F32 => _mm256_loadu_ps(p as *const f32),
                WeightKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                )),
                WeightKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }

    /// `y[b*n + a] = w[a] · x[b]` for an NW×NX tile; rows of w and x are `k` apart.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<W: WeightElem, const NW: usize, const NX: usize>(
        w: *const W,
        x: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NX]; NW];
            let mut i = 0;
            while i + 16 <= k {
                let mut wv = [_mm512_setzero_ps(); NW];
                for (a, v) in wv.iter_mut().enumerate() {
                    *v = load16(w.add(a * k + i));
                    // The next tile's weight rows: the hardware prefetcher alone left batch-1
                    // decode 16 % below this (9.1 vs 7.7 ms per step on bench-135m). For 16-bit
                    // weights this touches each line twice; once per line measured slower
                    // (bf16 speed-up over f32 1.72× vs 1.86×, paired runs of `decode_bound`).
                    _mm_prefetch::<_MM_HINT_T0>(w.add((a + NW) * k + i) as *const i8);
                }
                for b in 0..NX {
                    let xv = _mm512_loadu_ps(x.add(b * k + i));
                    for a in 0..NW {
                        acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                    }
                }
                i += 16;
            }
            if i < k {
                let m: __mmask16 = (1u16 << (k - i)) - 1;
                for b in 0..NX {
                    let xv = _mm512_maskz_loadu_ps(m, x.add(b * k + i));
                    for a in 0..NW {
                        let wv = load16_tail(w.add(a * k + i), k - i);
                        acc[a][b] = _mm512_fmadd_ps(wv, xv, acc[a][b]);
                    }
                }
            }
            for a in 0..NW {
                for b in 0..NX {
                    *y.add(b * n + a) = _mm512_reduce_add_ps(acc[a][b]);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows512<W: WeightElem, const NW: usize>(
        x: *const f32,
        w: *const W,
        rows: usize,
        k: usize,
        n: usize,
        y: *mut f32,
    ) {
        unsafe {
            let mut r = 0;
            while r + 4 <= rows {
                tile512::<W, NW, 4>(w, x.add(r * k), k, y.add(r * n), n);
                r += 4;
            }
            let (x, y) = (x.add(r * k), y.add(r * n));
            match rows - r {
                3 => tile512::<W, NW, 3>(w, x, k, y, n),
                2 => tile512::<W, NW, 2>(w, x, k, y, n),
                1 => tile512::<W, NW, 1>(w, x, k, y, n),
                _ => {}
            }
        }
    }

    /// Sums of each of 16 vectors, in order, as one vector (a transpose-and-add tree: ~3
    /// instructions per sum instead of a full horizontal reduction each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce16(v: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
        let w: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Quads: per 128-bit lane, position p holds a part of vector 4j+p.
        let u: [__m512; 4] = std::array::from_fn(|j| {
            let (c, d) = (w[2 * j], w[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(c, d),
                _mm512_shuffle_ps::<0xEE>(c, d),
            )
        });
        // Add the four 128-bit lanes: lane m of the result holds vectors 4m..4m+4.
        let half = |a, b| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        half(half(u[0], u[1]), half(u[2], u[3]))
    }

    /// `scores[j] = scale · q · keys[j]` for rows of `hd` (a multiple of 16), 16 keys at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores_avx512(
        q: &[f32],
        keys: &[f32],
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        assert!(hd.is_multiple_of(16) && q.len() == hd && keys.len() == scores.len() * hd);
        let n = scores.len();
        let (q, k, out) = (q.as_ptr(), keys.as_ptr(), scores.as_mut_ptr());
        let sv = _mm512_set1_ps(scale);
        unsafe {
            let mut j = 0;
            while j + 16 <= n {
                let mut acc = [_mm512_setzero_ps(); 16];
                for c in (0..hd).step_by(16) {
                    let qv = _mm512_loadu_ps(q.add(c));
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k.add((j + l) * hd + c)), *a);
                    }
                }
                _mm512_storeu_ps(out.add(j), _mm512_mul_ps(reduce16(&acc), sv));
                j += 16;
            }
            for j in j..n {
                let mut a = _mm512_setzero_ps();
                for c in (0..hd).step_by(16) {
                    a = _mm512_fmadd_ps(
                        _mm512_loadu_ps(q.add(c)),
                        _mm512_loadu_ps(k.add(j * hd + c)),
                        a,
                    );
                }
                *out.add(j) = _mm512_reduce_add_ps(a) * scale;
            }
        }
    }

    /// `out = Σ_j p[j] · values[j]` for rows of `hd` (a multiple of 16), the output held in
    /// registers 64 columns at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_sum_avx512(
        p: &[f32],
        values: &[f32],
        hd: usize,
        out: &mut [f32],
    ) {
        assert!(hd.is_multiple_of(16) && values.len() == p.len() * hd && out.len() == hd);
        let (v, o) = (values.as_ptr(), out.as_mut_ptr());
        unsafe {
            let mut c0 = 0;
            while c0 + 64 <= hd {
                let mut acc = [_mm512_setzero_ps(); 4];
                for (j, &pj) in p.iter().enumerate() {
                    let pv = _mm512_set1_ps(pj);
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v.add(j * hd + c0 + 16 * i)), *a);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(c0 + 16 * i), *a);
                }
                c0 += 64;
            }
            while c0 < hd {
                let mut a = _mm512_setzero_ps();
                for (j, &pj) in p.iter().enumerate() {
                    a = _mm512_fmadd_ps(_mm512_set1_ps(pj), _mm512_loadu_ps(v.add(j * hd + c0)), a);
                }
                _mm512_storeu_ps(o.add(c0), a);
                c0 += 16;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn features_avx512<W: WeightElem>(
        x: *const f32,
        w: *const W,
        rows: usize,
        k: usize,
        n: usize,
        o0: usize,
        o1: usize,
        y: *mut f32,
    ) {
        unsafe {
            let mut o = o0;
            while o + 4 <= o1 {
                rows512::<W, 4>(x, w.add(o * k), rows, k, n, y.add(o));
                o += 4;
            }
            while o < o1 {
                rows512::<W, 1>(x, w.add(o * k), rows, k, n, y.add(o));
                o += 1;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The AVX2 tile: 16 vector registers allow 4 weight rows × 2 input rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<W: WeightElem, const NW: usize, const NX: usize>(
        w: *const W,
        x: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NX]; NW];
            let mut i = 0;
            while i + 8 <= k {
                let mut wv = [_mm256_setzero_ps(); NW];
                for (a, v) in wv.iter_mut().enumerate() {
                    *v = load8(w.add(a * k + i));
                    _mm_prefetch::<_MM_HINT_T0>(w.add((a + NW) * k + i) as *const i8);
                }
                for b in 0..NX {
                    let xv = _mm256_loadu_ps(x.add(b * k + i));
                    for a in 0..NW {
                        acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                    }
                }
                i += 8;
            }
            for a in 0..NW {
                for b in 0..NX {
                    let mut s = hsum256(acc[a][b]);
                    for j in i..k {
                        s += (*w.add(a * k + j)).to_f32() * *x.add(b * k + j);
                    }
                    *y.add(b * n + a) = s;
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows256<W: WeightElem, const NW: usize>(
        x: *const f32,
        w: *const W,
        rows: usize,
        k: usize,
        n: usize,
        y: *mut f32,
    ) {
        unsafe {
            let mut r = 0;
            while r + 2 <= rows {
                tile256::<W, NW, 2>(w, x.add(r * k), k, y.add(r * n), n);
                r += 2;
            }
            if r < rows {
                tile256::<W, NW, 1>(w, x.add(r * k), k, y.add(r * n), n);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn features_avx2<W: WeightElem>(
        x: *const f32,
        w: *const W,
        rows: usize,
        k: usize,
        n: usize,
        o0: usize,
        o1: usize,
        y: *mut f32,
    ) {
        unsafe {
            let mut o = o0;
            while o + 4 <= o1 {
                rows256::<W, 4>(x, w.add(o * k), rows, k, n, y.add(o));
                o += 4;
            }
            while o < o1 {
                rows256::<W, 1>(x, w.add(o * k), rows, k, n, y.add(o));
                o += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vectorisable element-wise pieces (compiled per ISA through `multiversion!`)
// ---------------------------------------------------------------------------------------------

/// Instantiates `$body` (an `#[inline(always)]` fn) for AVX-512, AVX2+FMA and portable code and
/// defines `$name` that dispatches on [`isa`]. The bodies are plain Rust written so that LLVM
/// vectorises them (fixed-width accumulators, no reductions across lanes inside loops).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
            match isa() {
                // SAFETY: isa() detected these features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { v3($($arg),*) },
                Isa::Portable => $body($($arg),*),
            }
        }
    };
}

const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_w(a, b)
}

/// `a · b` with `a` widened to f32 element by element.
#[inline(always)]
fn dot_w<W: WeightElem>(a: &[W], b: &[f32]) -> f32 {
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
fn exp(x: f32) -> f32 {
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
fn softmax_in_place(xs: &mut [f32]) {
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

multiversion!(fn softmax_row(input: &[f32], out: &mut [f32], scale: f32) => softmax_row_body);

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

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

multiversion!(fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) => silu_mul_body);

#[inline(always)]
fn quick_gelu_body(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = x / (1.0 + exp(-1.702 * x));
    }
}

multiversion!(fn quick_gelu_chunk(xs: &[f32], out: &mut [f32]) => quick_gelu_body);

/// Attention of `groups` query heads over one KV head's cache rows `kbeg..len`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kbeg: usize,
    len: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    let mut scores = vec![0f32; len - kbeg];
    let (keys, values) = (&k[kbeg * hd..len * hd], &v[kbeg * hd..len * hd]);
    #[cfg(target_arch = "x86_64")]
    let wide = hd.is_multiple_of(16) && isa() == Isa::Avx512;
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512 detected; qh and oh hold hd values, keys and values len-kbeg
            // rows of hd, scores len-kbeg slots.
            unsafe { x86::scores_avx512(qh, keys, hd, scale, &mut scores) };
            softmax_in_place(&mut scores);
            unsafe { x86::weighted_sum_avx512(&scores, values, hd, oh) };
            continue;
        }
        for (s, kr) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
            *s = dot(qh, kr) * scale;
        }
        softmax_in_place(&mut scores);
        oh.fill(0.0);
        for (&p, vr) in scores.iter().zip(values.chunks_exact(hd)) {
            for (o, &x) in oh.iter_mut().zip(vr) {
                *o += p * x;
            }
        }
    }
}

multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn attend_one(q: &[f32], k: &[f32], v: &[f32], kbeg: usize, len: usize, hd: usize, scale: f32, out: &mut [f32])
        => attend_one_body
);

// ---------------------------------------------------------------------------------------------
// Tensor-level entry points
// ---------------------------------------------------------------------------------------------

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

/// Which keys (as indices into a score row) a row of a score matrix may see.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyRange {
    /// Every key (vision attention).
    All,
    /// Causal (and sliding-window) attention: row `i` of each head is the query at position
    /// `q0 + i % rows_per_head`; column `j` is the key at position `kbeg + j`.
    Causal {
        q0: usize,
        rows_per_head: usize,
        kbeg: usize,
        window: Option<usize>,
    },
}

/// `softmax(scores · scale)` over the last axis with keys outside [`KeyRange`] at probability 0:
/// the scale, mask and softmax passes of eager attention in one pass per row.
pub(crate) fn masked_softmax(
    scores: &Tensor,
    scale: f32,
    keys: KeyRange,
) -> candle_core::Result<Option<Tensor>> {
    let klen = scores.dim(candle_core::D::Minus1)?;
    if klen == 0 {
        return Ok(None);
    }
    let out = with_f32(scores, |s| {
        let mut out = vec![0f32; s.len()];
        out.par_chunks_mut(klen)
            .zip(s.par_chunks(klen))
            .enumerate()
            .with_min_len(8)
            .for_each(|(row, (o, s))| {
                let (lo, hi) = match keys {
                    KeyRange::All => (0, klen),
                    KeyRange::Causal {
                        q0,
                        rows_per_head,
                        kbeg,
                        window,
                    } => {
                        let qpos = q0 + row % rows_per_head;
                        let first = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
                        (
                            first.saturating_sub(kbeg).min(klen),
                            (qpos + 1).saturating_sub(kbeg).min(klen),
                        )
                    }
                };
                if lo < hi {
                    softmax_row(&s[lo..hi], &mut o[lo..hi], scale);
                }
            });
        out
    });
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, scores.shape(), scores.device())?)),
        None => Ok(None),
    }
}

/// One sequence's cached keys and values for a layer: buffers [kv_heads, capacity, head_dim]
/// of which the first `len` rows per head are valid.
pub(crate) struct CachedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub len: usize,
}

/// Decode attention: `q [B, heads, hd]` (sequence b's new token, already in its cache) over each
/// sequence's cache, in parallel over (sequence, KV head). Returns [B, heads·hd].
pub(crate) fn decode_attention(
    q: &Tensor,
    caches: &[CachedKv],
    kv_heads: usize,
    window: Option<usize>,
) -> candle_core::Result<Option<Tensor>> {
    let &[b, heads, hd] = q.dims() else {
        return Ok(None);
    };
    if b != caches.len() || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Ok(None);
    }
    let groups = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let q = q.contiguous()?;
    let guards: Vec<_> = caches
        .iter()
        .map(|c| (c.k.storage_and_layout(), c.v.storage_and_layout(), c))
        .collect();
    let mut views = Vec::with_capacity(b);
    for (kg, vg, c) in &guards {
        let (Some(k), Some(v)) = (f32_slice(&kg.0, kg.1), f32_slice(&vg.0, vg.1)) else {
            return Ok(None);
        };
        let cap = c.k.dim(1)?;
        if c.k.dims() != [kv_heads, cap, hd] || c.v.dims() != c.k.dims() || c.len > cap {
            return Ok(None);
        }
        views.push((k, v, cap, c.len));
    }
    let out = with_f32(&q, |qs| {
        let mut out = vec![0f32; b * heads * hd];
        out.par_chunks_mut(groups * hd)
            .enumerate()
            .for_each(|(pair, o)| {
                let (s, g) = (pair / kv_heads, pair % kv_heads);
                let (k, v, cap, len) = views[s];
                let kbeg = window.map_or(0, |w| len.saturating_sub(w));
                let qh = &qs[(s * heads + g * groups) * hd..][..groups * hd];
                let (k, v) = (
                    &k[g * cap * hd..][..len * hd],
                    &v[g * cap * hd..][..len * hd],
                );
                attend_one(qh, k, v, kbeg, len, hd, scale, o);
            });
        out
    });
    match out {
        Some(v) => Ok(Some(Tensor::from_vec(v, (b, heads * hd), q.device())?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG keeps the test independent of candle's RNG.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

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

    #[test]
    fn masked_softmax_matches_mask_then_softmax() {
        let (heads, rows, klen, q0, kbeg) = (3, 5, 40, 30, 2);
        let s = rand(&[heads, rows, klen], 5);
        for window in [None, Some(10)] {
            let mut mask = vec![0f32; rows * klen];
            for i in 0..rows {
                for j in 0..klen {
                    let (q, kp) = (q0 + i, kbeg + j);
                    if kp > q || window.is_some_and(|w| q >= kp + w) {
                        mask[i * klen + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (1, rows, klen), &Device::Cpu).unwrap();
            let want = candle_nn::ops::softmax_last_dim(
                &(&s * 0.125).unwrap().broadcast_add(&mask).unwrap(),
            )
            .unwrap();
            let keys = KeyRange::Causal {
                q0,
                rows_per_head: rows,
                kbeg,
                window,
            };
            let got = masked_softmax(&s, 0.125, keys).unwrap().unwrap();
            assert!(max_diff(&got, &want) < 1e-6, "{window:?}");
        }
        let want = candle_nn::ops::softmax_last_dim(&(&s * 2.0).unwrap()).unwrap();
        let got = masked_softmax(&s, 2.0, KeyRange::All).unwrap().unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn fused_activations_match_candle() {
        let (g, u) = (rand(&[7, 33], 6), rand(&[7, 33], 7));
        let g = (g * 8.0).unwrap();
        let want = (g.silu().unwrap() * &u).unwrap();
        assert!(max_diff(&silu_mul(&g, &u).unwrap().unwrap(), &want) < 1e-5);
        let want = (&g * candle_nn::ops::sigmoid(&(&g * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&quick_gelu(&g).unwrap().unwrap(), &want) < 1e-5);
    }

    #[test]
    fn decode_attention_matches_reference_with_gqa_and_window() {
        // hd 64 and 80 take the AVX-512 paths where the CPU has them (80: a 16-column tail); 20 the
        // portable code.
        for hd in [20, 64, 80] {
            decode_attention_case(hd);
        }
    }

    fn decode_attention_case(hd: usize) {
        let (kv, groups, cap) = (2, 3, 50);
        let heads = kv * groups;
        let lens = [1usize, 17, 50];
        let ks: Vec<Tensor> = (0..3).map(|i| rand(&[kv, cap, hd], 10 + i)).collect();
        let vs: Vec<Tensor> = (0..3).map(|i| rand(&[kv, cap, hd], 20 + i)).collect();
        let q = rand(&[3, heads, hd], 30);
        for window in [None, Some(8)] {
            let caches: Vec<CachedKv> = (0..3)
                .map(|i| CachedKv {
                    k: &ks[i],
                    v: &vs[i],
                    len: lens[i],
                })
                .collect();
            let got = decode_attention(&q, &caches, kv, window).unwrap().unwrap();
            for (s, &len) in lens.iter().enumerate() {
                let kbeg = window.map_or(0, |w| len.saturating_sub(w));
                for h in 0..heads {
                    let g = h / groups;
                    let qh = q.i((s, h)).unwrap().unsqueeze(0).unwrap();
                    let k = ks[s].i((g, kbeg..len)).unwrap();
                    let v = vs[s].i((g, kbeg..len)).unwrap();
                    let p = candle_nn::ops::softmax_last_dim(
                        &(qh.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap(),
                    )
                    .unwrap();
                    let want = p.matmul(&v).unwrap().squeeze(0).unwrap();
                    let got_h = got.i((s, h * hd..(h + 1) * hd)).unwrap();
                    let d = max_diff(&got_h, &want);
                    assert!(d < 1e-5, "seq {s} head {h} window {window:?}: {d}");
                }
            }
            assert_eq!(got.dims(), &[3, heads * hd]);
        }
    }
}
