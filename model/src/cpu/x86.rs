//! The x86-64 intrinsics: the AVX-512 and AVX2 register tiles of the small-batch linear layers,
//! and the AVX-512 score and weighted-sum loops of decode attention.

use std::arch::x86_64::*;

use super::attention::KvRows;
use super::linear::{WeightElem, WeightKind};

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

/// `scores[j] = scale · q · key(first + j)` for rows of `hd` (a multiple of 16), 16 keys at a
/// time. Each key's sum runs the same way wherever its row lives, so a paged cache gives the
/// numbers a contiguous one does.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores_avx512(
    q: &[f32],
    keys: &KvRows,
    first: usize,
    hd: usize,
    scale: f32,
    scores: &mut [f32],
) {
    assert!(hd.is_multiple_of(16) && q.len() == hd && keys.hd == hd);
    let n = scores.len();
    let (q, out) = (q.as_ptr(), scores.as_mut_ptr());
    let sv = _mm512_set1_ps(scale);
    unsafe {
        let mut j = 0;
        while j + 16 <= n {
            let rows: [*const f32; 16] = std::array::from_fn(|l| keys.row(first + j + l).as_ptr());
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..hd).step_by(16) {
                let qv = _mm512_loadu_ps(q.add(c));
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows[l].add(c)), *a);
                }
            }
            _mm512_storeu_ps(out.add(j), _mm512_mul_ps(reduce16(&acc), sv));
            j += 16;
        }
        for j in j..n {
            let k = keys.row(first + j).as_ptr();
            let mut a = _mm512_setzero_ps();
            for c in (0..hd).step_by(16) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(c)), _mm512_loadu_ps(k.add(c)), a);
            }
            *out.add(j) = _mm512_reduce_add_ps(a) * scale;
        }
    }
}

/// `out = Σ_j p[j] · value(first + j)` for rows of `hd` (a multiple of 16), the output held in
/// registers 64 columns at a time.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn weighted_sum_avx512(
    p: &[f32],
    values: &KvRows,
    first: usize,
    hd: usize,
    out: &mut [f32],
) {
    assert!(hd.is_multiple_of(16) && values.hd == hd && out.len() == hd);
    let o = out.as_mut_ptr();
    unsafe {
        let mut c0 = 0;
        while c0 + 64 <= hd {
            let mut acc = [_mm512_setzero_ps(); 4];
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm512_set1_ps(pj);
                let v = values.row(first + j).as_ptr();
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v.add(c0 + 16 * i)), *a);
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
                let v = values.row(first + j).as_ptr();
                a = _mm512_fmadd_ps(_mm512_set1_ps(pj), _mm512_loadu_ps(v.add(c0)), a);
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
