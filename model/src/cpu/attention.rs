//! Attention: decode attention over each sequence's KV cache, and the fused scale·mask·softmax
//! of prefill and vision attention.

use candle_core::Tensor;
use rayon::prelude::*;

use super::elementwise::{dot, softmax_in_place, softmax_row};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{f32_slice, isa, with_f32, Isa};

/// One KV head's rows of one sequence in a paged pool `[slots, kv_heads, hd]`: position `j` is
/// in slot `j % block_size` of block `blocks[j / block_size]`.
#[derive(Clone, Copy)]
pub(crate) struct KvRows<'a> {
    pub data: &'a [f32],
    pub blocks: &'a [u32],
    pub block_size: usize,
    /// Floats per slot (kv_heads · hd).
    pub stride: usize,
    /// This head's offset in a slot (head · hd).
    pub head: usize,
    pub hd: usize,
}

impl KvRows<'_> {
    #[inline(always)]
    pub fn row(&self, j: usize) -> &[f32] {
        let slot =
            self.blocks[j / self.block_size] as usize * self.block_size + j % self.block_size;
        &self.data[slot * self.stride + self.head..][..self.hd]
    }
}

/// Attention of `groups` query heads over one KV head's cached positions `kbeg..len`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one_body(
    q: &[f32],
    k: KvRows,
    v: KvRows,
    kbeg: usize,
    len: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    let mut scores = vec![0f32; len - kbeg];
    #[cfg(target_arch = "x86_64")]
    let wide = hd.is_multiple_of(16) && isa() == Isa::Avx512;
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX-512 detected; qh and oh hold hd values, the rows kbeg..len exist.
            unsafe { x86::scores_avx512(qh, &k, kbeg, hd, scale, &mut scores) };
            softmax_in_place(&mut scores);
            unsafe { x86::weighted_sum_avx512(&scores, &v, kbeg, hd, oh) };
            continue;
        }
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(qh, k.row(kbeg + j)) * scale;
        }
        softmax_in_place(&mut scores);
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (o, &x) in oh.iter_mut().zip(v.row(kbeg + j)) {
                *o += p * x;
            }
        }
    }
}

multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn attend_one(q: &[f32], k: KvRows, v: KvRows, kbeg: usize, len: usize, hd: usize, scale: f32, out: &mut [f32])
        => attend_one_body
);

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

/// One sequence's keys and values for a layer in the paged pool: `k`, `v` are the pool's
/// `[slots, kv_heads, head_dim]` tensors, `blocks` the sequence's block table, and positions
/// `0..len` are valid.
pub(crate) struct CachedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub blocks: &'a [u32],
    pub block_size: usize,
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
        let slots = c.k.dim(0)?;
        let fits = c.len <= c.blocks.len() * c.block_size
            && c.blocks
                .iter()
                .all(|&bl| (bl as usize + 1) * c.block_size <= slots);
        if c.k.dims() != [slots, kv_heads, hd] || c.v.dims() != c.k.dims() || !fits {
            return Ok(None);
        }
        views.push((k, v, c.blocks, c.block_size, c.len));
    }
    let out = with_f32(&q, |qs| {
        let mut out = vec![0f32; b * heads * hd];
        out.par_chunks_mut(groups * hd)
            .enumerate()
            .for_each(|(pair, o)| {
                let (s, g) = (pair / kv_heads, pair % kv_heads);
                let (k, v, blocks, block_size, len) = views[s];
                let kbeg = window.map_or(0, |w| len.saturating_sub(w));
                let qh = &qs[(s * heads + g * groups) * hd..][..groups * hd];
                let rows = |data| KvRows {
                    data,
                    blocks,
                    block_size,
                    stride: kv_heads * hd,
                    head: g * hd,
                    hd,
                };
                attend_one(qh, rows(k), rows(v), kbeg, len, hd, scale, o);
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
    use crate::cpu::test_support::{max_diff, rand};
    use candle_core::{Device, IndexOp};

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
    fn decode_attention_matches_reference_with_gqa_and_window() {
        // hd 64 and 80 take the AVX-512 paths where the CPU has them (80: a 16-column tail); 20 the
        // portable code.
        for hd in [20, 64, 80] {
            decode_attention_case(hd);
        }
    }

    fn decode_attention_case(hd: usize) {
        let (kv, groups, bs) = (2, 3, 4);
        let heads = kv * groups;
        let lens = [1usize, 17, 50];
        // Each sequence's blocks are scattered over one pool (every third block, from the end).
        let per_seq = 50usize.div_ceil(bs);
        let num_blocks = 3 * per_seq;
        let tables: Vec<Vec<u32>> = (0..3)
            .map(|s| {
                (0..per_seq)
                    .map(|i| (num_blocks - 1 - (3 * i + s)) as u32)
                    .collect()
            })
            .collect();
        let kpool = rand(&[num_blocks * bs, kv, hd], 10);
        let vpool = rand(&[num_blocks * bs, kv, hd], 20);
        // The rows of sequence s, head g, positions kbeg..len, gathered: [len - kbeg, hd].
        let gather = |pool: &Tensor, s: usize, g: usize, kbeg: usize, len: usize| {
            let rows: Vec<Tensor> = (kbeg..len)
                .map(|j| {
                    let slot = tables[s][j / bs] as usize * bs + j % bs;
                    pool.i((slot, g)).unwrap().unsqueeze(0).unwrap()
                })
                .collect();
            Tensor::cat(&rows, 0).unwrap()
        };
        let q = rand(&[3, heads, hd], 30);
        for window in [None, Some(8)] {
            let caches: Vec<CachedKv> = (0..3)
                .map(|i| CachedKv {
                    k: &kpool,
                    v: &vpool,
                    blocks: &tables[i],
                    block_size: bs,
                    len: lens[i],
                })
                .collect();
            let got = decode_attention(&q, &caches, kv, window).unwrap().unwrap();
            for (s, &len) in lens.iter().enumerate() {
                let kbeg = window.map_or(0, |w| len.saturating_sub(w));
                for h in 0..heads {
                    let g = h / groups;
                    let qh = q.i((s, h)).unwrap().unsqueeze(0).unwrap();
                    let k = gather(&kpool, s, g, kbeg, len);
                    let v = gather(&vpool, s, g, kbeg, len);
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
