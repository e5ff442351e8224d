//! Mistral decoder (GQA, RoPE, RMSNorm, SwiGLU) with a per-sequence KV cache and layer taps.
//!
//! Matches transformers' `MistralModel` with eager attention: scores `q·kᵀ·d^-½`, causal (and
//! sliding-window) mask, softmax in f32. Taps are chosen per forward in [`LayerTaps`] and cost
//! nothing when empty. Layer indexing is HF `output_hidden_states`: `h[0]` = input embeddings,
//! `h[j]` = output of block j; unlike HF, `h[N]` is taken *before* the final norm (DIAGNOSTICS.md).

use std::ops::Range;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use crate::config::TextConfig;
use crate::cpu;
use crate::error::{ModelError, Result};
use crate::kv::{BlockCopy, BlockTable, KvBlocks, KvPoolConfig};

/// Prefill attention runs in chunks of query rows whose score matrix (heads × rows × keys) stays
/// under this many bytes. Larger score buffers (512 rows × 2373 keys × 12 heads is 58 MB) exceed
/// glibc's 32 MiB mmap ceiling, so every op on them (scale, mask, softmax) gets fresh pages from
/// the kernel and faults them in, and they do not stay in a typical L3: that made attention over
/// half of bench-135m's decoder prefill, and the ~150-row chunks this budget gives there make it
/// 1.4× faster (bench/RESULTS.md). Any chunking gives the rows of one pass up to f32 summation
/// order (within 5e-5 on logits there).
const SCORE_CHUNK_BYTES: usize = 16 << 20;
const MIN_QUERY_CHUNK: usize = 16;
const MAX_QUERY_CHUNK: usize = 512;
/// Off the CPU the cost is per launch, not per page: a chunk is up to 1,024 rows with f32 scores
/// under 512 MiB (an image prompt's ~3,000 rows of the 7B take three chunks per layer, not 35).
const DEVICE_SCORE_CHUNK_BYTES: usize = 512 << 20;
const DEVICE_MAX_QUERY_CHUNK: usize = 1024;

/// What to record or change during one prefill. Positions are absolute sequence positions.
#[derive(Debug, Clone, Default)]
pub struct LayerTaps {
    /// Hidden states `h[0..=N]` at these positions → [`TapOutput::hidden`].
    pub hidden_positions: Vec<usize>,
    /// Attention probability rows of these query positions, every layer and head.
    pub attention_queries: Vec<usize>,
    /// Mean-pooled hidden states over these spans, every layer → [`TapOutput::pooled`].
    pub pooled_spans: Vec<Range<usize>>,
    /// Positions whose logits are returned (default: the last position only).
    pub logit_positions: Option<Vec<usize>>,
    /// Intervention: at these blocks (1-based), no query may attend to these key spans. The
    /// cache keeps the mask, so the tokens decoded after this prefill obey it too.
    pub mask_keys: Option<KeyMask>,
    /// Intervention: hidden-state edits applied right after the given blocks.
    pub state_edits: Vec<StateEdit>,
}

#[derive(Debug, Clone)]
pub struct KeyMask {
    /// Block indices 1..=N.
    pub layers: Vec<usize>,
    pub spans: Vec<Range<usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditMode {
    /// `h ← h + v` (the paper's reconstruction experiment).
    Add,
    /// `h ← v` (the reference code's variant).
    Replace,
}

/// After block `after_layer` (1..=N), the hidden states at `positions` get `vector` ([hidden]).
#[derive(Debug, Clone)]
pub struct StateEdit {
    pub after_layer: usize,
    pub positions: Vec<Range<usize>>,
    pub vector: Tensor,
    pub mode: EditMode,
}

/// What a prefill recorded.
#[derive(Debug)]
pub struct TapOutput {
    /// [N+1, len(hidden_positions), hidden], `h[N]` before the final norm.
    pub hidden: Option<Tensor>,
    /// Per block (N entries): [heads, len(attention_queries), keys].
    pub attention: Vec<Tensor>,
    /// [N+1, len(pooled_spans), hidden].
    pub pooled: Option<Tensor>,
}

/// The taps of one prompt prefilled in chunks, gathered chunk by chunk
/// ([`Decoder::prefill_chunk`]) and assembled by [`Self::finish`] into what one whole prefill
/// records.
#[derive(Debug, Default)]
pub struct TapAccumulator {
    /// Per hidden-state tap: [N+1, hidden], once its chunk ran.
    hidden: Vec<Option<Tensor>>,
    /// Per attention query: per block [heads, 1, keys of its chunk].
    attention: Vec<Option<Vec<Tensor>>>,
    /// [N+1, spans, hidden]: per pooled span, the sum of its positions seen so far.
    pooled_sum: Option<Tensor>,
}

impl TapAccumulator {
    pub fn new(taps: &LayerTaps) -> Self {
        Self {
            hidden: vec![None; taps.hidden_positions.len()],
            attention: vec![None; taps.attention_queries.len()],
            pooled_sum: None,
        }
    }

    fn add(
        &mut self,
        hidden_here: &[(usize, u32)],
        hidden_rec: &[Tensor],
        queries_here: &[(usize, usize)],
        attention: &[Tensor],
        pooled_rec: &[Tensor],
    ) -> Result<()> {
        if !hidden_here.is_empty() {
            let layers = Tensor::stack(hidden_rec, 0)?; // [N+1, k, hidden]
            for (k, &(i, _)) in hidden_here.iter().enumerate() {
                self.hidden[i] = Some(layers.narrow(1, k, 1)?.squeeze(1)?);
            }
        }
        // Row k of each block's record is this chunk's k-th query.
        for (k, &(i, _)) in queries_here.iter().enumerate() {
            let rows = attention
                .iter()
                .map(|a| a.narrow(1, k, 1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.attention[i] = Some(rows);
        }
        if !pooled_rec.is_empty() {
            let sums = Tensor::stack(pooled_rec, 0)?;
            self.pooled_sum = Some(match self.pooled_sum.take() {
                None => sums,
                Some(prev) => (prev + sums)?,
            });
        }
        Ok(())
    }

    /// The taps of the whole prompt (`total` positions): attention rows padded to every key,
    /// pooled sums divided into means. A tap whose position no chunk ran is an error.
    pub fn finish(self, taps: &LayerTaps, total: usize) -> Result<TapOutput> {
        let missing = |p: usize, what: &str| {
            ModelError::InvalidInput(format!("{what} at position {p}: no forward ran it"))
        };
        let hidden = match self.hidden.is_empty() {
            true => None,
            false => {
                let rows = self
                    .hidden
                    .into_iter()
                    .zip(&taps.hidden_positions)
                    .map(|(h, &p)| h.ok_or_else(|| missing(p, "hidden-state tap")))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::stack(&rows, 1)?)
            }
        };
        let mut attention = Vec::new();
        if !self.attention.is_empty() {
            let per_query = self
                .attention
                .into_iter()
                .zip(&taps.attention_queries)
                .map(|(a, &p)| a.ok_or_else(|| missing(p, "attention tap")))
                .collect::<Result<Vec<_>>>()?;
            for block in 0..per_query[0].len() {
                let rows = per_query
                    .iter()
                    .map(|q| {
                        let r = &q[block];
                        let keys = r.dim(D::Minus1)?;
                        r.pad_with_zeros(D::Minus1, 0, total - keys)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                attention.push(Tensor::cat(&rows, 1)?);
            }
        }
        let pooled = match self.pooled_sum {
            None => None,
            Some(sums) => {
                // As `mean`: the sum times 1/len.
                let means = taps
                    .pooled_spans
                    .iter()
                    .enumerate()
                    .map(|(i, s)| sums.narrow(1, i, 1)? * (1.0 / s.len() as f64))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&means, 1)?)
            }
        };
        Ok(TapOutput {
            hidden,
            attention,
            pooled,
        })
    }
}

/// One sequence's view of the paged KV cache: its block table, the positions cached, and the
/// key mask of the prefill that filled it.
#[derive(Debug)]
pub struct KvCache {
    table: BlockTable,
    len: usize,
    /// The key mask of the prefill that filled this cache, applied to every later query.
    mask: Option<KeyMask>,
}

impl KvCache {
    /// A cache over `table` whose first `len` positions are already filled (a reused prefix).
    pub fn from_table(table: BlockTable, len: usize) -> Self {
        assert!(len <= table.capacity(), "cached prefix beyond the table");
        Self {
            table,
            len,
            mask: None,
        }
    }

    /// Positions already cached (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// The table, to reserve room ahead of a forward (the scheduler does, so that a forward
    /// never runs out of blocks halfway).
    pub fn table_mut(&mut self) -> &mut BlockTable {
        &mut self.table
    }

    /// For an empty cache: takes the leading blocks whose content hashes are `hashes` from the
    /// pool's prefix cache (see [`BlockTable::reuse_prefix`]); returns the positions now cached.
    pub fn reuse_prefix(&mut self, hashes: &[u64]) -> usize {
        assert!(self.len == 0, "prefix reuse into a non-empty cache");
        self.len = self.table.reuse_prefix(hashes) * self.table.block_size();
        self.len
    }

    /// Forgets the positions from `len` on (their blocks stay reserved for rewriting).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Another sequence continuing from the same cached positions, sharing every block
    /// (copy-on-write).
    pub fn fork(&self) -> KvCache {
        Self {
            table: self.table.fork(),
            len: self.len,
            mask: self.mask.clone(),
        }
    }

    /// Key spans masked at block `block` (1-based) for queries of this sequence.
    fn masked_at(&self, block: usize) -> Option<&[Range<usize>]> {
        self.mask
            .as_ref()
            .filter(|m| m.layers.contains(&block))
            .map(|m| m.spans.as_slice())
    }
}

/// The paged pool's storage: per layer, keys and values `[slots, kv_heads, head_dim]` (slot =
/// block · block_size + offset; a token's heads are contiguous, so writing a run of positions
/// within a block is one copy).
struct KvPool {
    blocks: KvBlocks,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// One block past the allocator's, never handed out: the padding rows of a static decode
    /// step ([`DecodeGraphs`]) write and read it.
    scratch: u32,
}

impl KvPool {
    /// `commit`: write the whole pool now (a sized serving pool), rather than let the OS map
    /// zero pages as blocks are first used (the decoder's default pool).
    fn new(
        cfg: &TextConfig,
        pool: KvPoolConfig,
        dev: &Device,
        dtype: DType,
        commit: bool,
    ) -> Result<Self> {
        let shape = (
            (pool.num_blocks + 1) * pool.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        // A serving pool is committed now, as on a GPU: on the CPU zeroed memory would be mapped
        // lazily, and the resident size would creep up to the budget as blocks are first used
        // (and an overcommitted host would fail then, not at start-up).
        let committed = || -> candle_core::Result<Tensor> {
            match dev.is_cpu() && commit {
                true => Tensor::ones(shape, dtype, dev)?.affine(0.0, 0.0),
                false => Tensor::zeros(shape, dtype, dev),
            }
        };
        for _ in 0..cfg.num_hidden_layers {
            k.push(committed()?);
            v.push(committed()?);
        }
        Ok(Self {
            blocks: KvBlocks::new(pool),
            k,
            v,
            scratch: u32::try_from(pool.num_blocks)
                .map_err(|_| ModelError::InvalidInput(format!("{} KV blocks", pool.num_blocks)))?,
        })
    }

    /// Writes `k`, `v` [n, kv_heads, hd] of layer `layer` at positions `start..start+n`.
    fn write(
        &self,
        layer: usize,
        table: &BlockTable,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let n = k.dim(0)?;
        let bs = table.block_size();
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let mut i = 0;
        while i < n {
            let pos = start + i;
            let run = (bs - pos % bs).min(n - i);
            let slot = table.slot(pos);
            self.k[layer].slice_set(&k.narrow(0, i, run)?, 0, slot)?;
            self.v[layer].slice_set(&v.narrow(0, i, run)?, 0, slot)?;
            i += run;
        }
        Ok(())
    }

    /// Writes `k`, `v` [n, kv_heads, hd] of layer `layer` at the slots of `index` (from
    /// [`write_index`]): one scatter per tensor whatever the rows' blocks, for devices where each
    /// copy is a launch.
    fn scatter(&self, layer: usize, index: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (n, width) = index.dims2()?;
        for (pool, new) in [(&self.k[layer], k), (&self.v[layer], v)] {
            let slots = pool.dim(0)?;
            pool.reshape((slots, width))?.scatter_set(
                index,
                &new.reshape((n, width))?.contiguous()?,
                0,
            )?;
        }
        Ok(())
    }

    /// Layer `layer`'s cached keys and values at `slots` (a [len] u32 tensor of pool slots, in
    /// position order): k, v [kv_heads, len, hd].
    fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let g = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.index_select(slots, 0)?.transpose(0, 1)?.contiguous()
        };
        Ok((g(&self.k[layer])?, g(&self.v[layer])?))
    }

    /// Copy-on-write: block `from`'s slots onto block `to`, in every layer.
    fn copy(&self, copies: &[BlockCopy], block_size: usize) -> Result<()> {
        for c in copies {
            for t in self.k.iter().chain(&self.v) {
                // A copy of its own: a narrowed pool is a view of the pool's storage, which
                // `slice_set` cannot write from.
                let src = t
                    .narrow(0, c.from as usize * block_size, block_size)?
                    .copy()?;
                t.slice_set(&src, 0, c.to as usize * block_size)?;
            }
        }
        Ok(())
    }

    /// Makes room for positions `range` of `cache` (allocating blocks a scheduler did not
    /// reserve) and gives it private copies of shared blocks those positions fall in.
    fn prepare(&self, cache: &mut KvCache, range: Range<usize>) -> Result<()> {
        if !cache.table.pool().same_pool(&self.blocks) {
            return Err(ModelError::InvalidInput(
                "KV cache from another model's pool".into(),
            ));
        }
        let table = &mut cache.table;
        table.reserve(range.end).map_err(ModelError::OutOfBlocks)?;
        let copies = table
            .prepare_write(range)
            .map_err(ModelError::OutOfBlocks)?;
        self.copy(&copies, table.block_size())
    }
}

/// The scatter index that writes rows at `slots` into a pool `[slots, kv_heads, hd]` viewed as
/// `[slots, width]` (width = kv_heads · hd): each slot repeated along its row, u32 [n, width].
fn write_index(slots: &[u32], width: usize, dev: &Device) -> Result<Tensor> {
    let n = slots.len();
    Ok(Tensor::from_vec(slots.to_vec(), (n, 1), dev)?
        .broadcast_as((n, width))?
        .contiguous()?)
}

/// What a decode step on the device path shares across layers: the new tokens' write index, the
/// paged kernel's tables and lengths, and, for the candle-ops attention only (the kernel reads
/// the pool itself, so a step that uses it builds and uploads neither), every sequence's slots
/// padded to the longest (padding reads the sequence's own position 0, which the mask hides) and
/// the additive mask [B, 1, 1, L] (0 or -inf: padding and keys outside a sliding window).
struct BatchedDecode {
    /// `(slots, mask)`, when built.
    padded: Option<(Tensor, Tensor)>,
    write: Tensor,
    len: usize,
    /// For the paged kernel: block tables [B, max_blocks] u32 (padded with block 0) and the
    /// lengths attended [B] u32.
    tables: Tensor,
    lens: Tensor,
    block_size: usize,
}

impl BatchedDecode {
    /// `padded`: build the candle-ops attention's padded slots and mask too.
    fn new(
        caches: &[&mut KvCache],
        positions: &[usize],
        window: Option<usize>,
        width: usize,
        padded: bool,
        dev: &Device,
    ) -> Result<Self> {
        let b = caches.len();
        let len = positions.iter().max().map_or(0, |p| p + 1);
        let padded = match padded {
            false => None,
            true => {
                let mut slots = Vec::with_capacity(b * len);
                let mut mask = Vec::with_capacity(b * len);
                for (cache, &pos) in caches.iter().zip(positions) {
                    let table = &cache.table;
                    let pad = table.slot(0) as u32;
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for j in 0..len {
                        let visible = j <= pos && j >= first;
                        slots.push(if j <= pos { table.slot(j) as u32 } else { pad });
                        mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                    }
                }
                Some((
                    Tensor::from_vec(slots, b * len, dev)?,
                    Tensor::from_vec(mask, (b, 1, 1, len), dev)?,
                ))
            }
        };
        let new: Vec<u32> = caches
            .iter()
            .zip(positions)
            .map(|(c, &p)| c.table.slot(p) as u32)
            .collect();
        let block_size = caches.first().map_or(1, |c| c.table.block_size());
        let max_blocks = len.div_ceil(block_size).max(1);
        let mut tables = vec![0u32; b * max_blocks];
        for (row, (cache, &pos)) in tables
            .chunks_mut(max_blocks)
            .zip(caches.iter().zip(positions))
        {
            let used = (pos + 1).div_ceil(block_size);
            for (t, &blk) in row.iter_mut().zip(cache.table.blocks().iter().take(used)) {
                *t = blk;
            }
        }
        let lens: Vec<u32> = positions.iter().map(|&p| p as u32 + 1).collect();
        Ok(Self {
            padded,
            write: write_index(&new, width, dev)?,
            len,
            tables: Tensor::from_vec(tables, (b, max_blocks), dev)?,
            lens: Tensor::from_vec(lens, b, dev)?,
            block_size,
        })
    }
}

/// [`Attention::mask`] without key spans, built on `dev` from position ranges (a host-built
/// mask is c × klen floats uploaded in every layer: ~1 GB over an image prompt of the 7B).
fn device_mask(
    window: Option<usize>,
    q0: usize,
    c: usize,
    kbeg: usize,
    klen: usize,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let window_needed = window.is_some_and(|w| q0 + c > w);
    if c == 1 && !window_needed {
        return Ok(None);
    }
    let range = |a: usize, n: usize| Tensor::arange(a as u32, (a + n) as u32, dev);
    let q = range(q0, c)?.reshape((c, 1))?;
    let neg = Tensor::full(f32::NEG_INFINITY, (c, klen), dev)?;
    let zero = Tensor::zeros((c, klen), DType::F32, dev)?;
    // Later keys are hidden (kpos > qpos) ...
    let mut mask = range(kbeg, klen)?
        .reshape((1, klen))?
        .broadcast_gt(&q)?
        .where_cond(&neg, &zero)?;
    // ... and, with a sliding window, keys w or more behind (kpos + w <= qpos).
    if let Some(w) = window.filter(|_| window_needed) {
        mask = range(kbeg + w, klen)?
            .reshape((1, klen))?
            .broadcast_le(&q)?
            .where_cond(&neg, &mask)?;
    }
    Ok(Some(mask))
}

/// Pool slots of positions `0..len` of `table`, as a u32 tensor for gathering.
fn slots_tensor(table: &BlockTable, len: usize, dev: &Device) -> Result<Tensor> {
    let slots: Vec<u32> = (0..len).map(|p| table.slot(p) as u32).collect();
    Ok(Tensor::from_vec(slots, len, dev)?)
}

/// A prefill chunk's use of the paged prefill kernel (`crate::paged_prefill`): its sequence's
/// block table on the device (the blocks of positions `0..start+n`), shared by every layer, and
/// the kernel that passed the start-up check.
struct PrefillKernel {
    table: Tensor,
    block_size: usize,
    tensor_cores: bool,
}

/// RoPE angles computed as transformers does (f32 inv_freq, f32 position × inv_freq), so that
/// long prompts match it to f32 rounding.
struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    fn new(cfg: &TextConfig) -> Self {
        Self {
            inv_freq: crate::fused::rope_inv_freq(cfg.head_dim, cfg.rope_theta as f32),
        }
    }

    /// cos, sin [positions.len(), head_dim/2], computed in f32 and then cast to `dtype` (the
    /// compute dtype), as transformers' rotary embedding does.
    fn cos_sin(&self, positions: &[usize], dev: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = crate::fused::rope_angles(&self.inv_freq, positions);
        Ok((
            Tensor::from_vec(cos, (positions.len(), half), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (positions.len(), half), dev)?.to_dtype(dtype)?,
        ))
    }
}

/// Where the RoPE angles of [`Attention::qkv_rope`]'s rows come from.
#[derive(Clone, Copy)]
enum Rope<'a> {
    /// cos, sin [rows, hd/2]: row r's angles in row r (candle's rope op).
    Rows { cos: &'a Tensor, sin: &'a Tensor },
    /// A table [table_rows, hd/2] on the device and each row's position in it, u32 [rows], for
    /// the fused kernel ([`crate::fused::rope_qk`]): one launch for q and k, no angles uploaded.
    Table {
        cos: &'a Tensor,
        sin: &'a Tensor,
        positions: &'a Tensor,
    },
}

/// A bias-free linear layer; at decode-sized batches on the CPU it runs the weight-streaming
/// kernel of [`cpu::linear`] instead of gemm. Its weight may be stored in another dtype than the
/// compute dtype (16-bit weights under f32 compute on the CPU, `LinearWeights`).
struct Proj(Linear);

impl Proj {
    /// `weight_dtype`: the dtype the weight is stored in.
    fn new(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        weight_dtype: DType,
    ) -> candle_core::Result<Self> {
        Ok(Self(linear_no_bias(
            in_dim,
            out_dim,
            vb.to_dtype(weight_dtype),
        )?))
    }

    fn weight(&self) -> &Tensor {
        self.0.weight()
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match cpu::linear(xs, self.0.weight())? {
            Some(y) => Ok(y),
            None => self.general(xs),
        }
    }

    /// candle's matmul; a weight stored in another dtype is widened for this call only (prefill
    /// sized inputs, where the conversion is a few percent of the product).
    fn general(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.0.weight();
        if w.dtype() == xs.dtype() {
            return self.0.forward(xs);
        }
        Linear::new(w.to_dtype(xs.dtype())?, None).forward(xs)
    }

    /// One projection whose weight is `projs`' weights stacked (`[Σ out, in]`): their outputs
    /// side by side from one product.
    fn stack(projs: &[&Proj]) -> candle_core::Result<Proj> {
        let ws: Vec<&Tensor> = projs.iter().map(|p| p.weight()).collect();
        Ok(Proj(Linear::new(Tensor::cat(&ws, 0)?, None)))
    }

    /// Output features `start..start + len` of `stacked` as a projection of their own (a view of
    /// its weight: no copy).
    fn rows_of(stacked: &Proj, start: usize, len: usize) -> candle_core::Result<Proj> {
        Ok(Proj(Linear::new(
            stacked.weight().narrow(0, start, len)?,
            None,
        )))
    }

    /// Several projections of the same input (one pass over the thread pool on the CPU path).
    fn forward_many<const N: usize>(
        projs: [&Proj; N],
        xs: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        let ws = projs.map(|p| p.weight());
        if let Some(ys) = cpu::linear_many(xs, &ws)? {
            if let Ok(ys) = <[Tensor; N]>::try_from(ys) {
                return Ok(ys);
            }
        }
        let mut ys = Vec::with_capacity(N);
        for p in projs {
            ys.push(p.general(xs)?);
        }
        Ok(<[Tensor; N]>::try_from(ys).expect("one output per projection"))
    }
}

/// A projection stacked from several of one input (`[q; k; v]`, `[gate; up]`) for the device
/// path, made at construction off the CPU (where the separate projections are then views of it:
/// one copy of the weights) and at first use on the CPU (tests of the device path).
type Stacked = std::sync::OnceLock<Proj>;

/// `cell`'s stacked projection, stacking `projs` now if it has none yet.
fn stacked_proj<'a>(cell: &'a Stacked, projs: &[&Proj]) -> candle_core::Result<&'a Proj> {
    if let Some(p) = cell.get() {
        return Ok(p);
    }
    let p = Proj::stack(projs)?;
    Ok(cell.get_or_init(|| p))
}

/// Off the CPU: `projs` stacked into `cell`, each replaced by its rows of the stack (so that the
/// device holds the weights once).
fn stack_in_place(cell: &Stacked, projs: &mut [&mut Proj]) -> candle_core::Result<()> {
    let all = Proj::stack(&projs.iter().map(|p| &**p).collect::<Vec<_>>())?;
    let mut start = 0;
    for p in projs.iter_mut() {
        let len = p.weight().dim(0)?;
        **p = Proj::rows_of(&all, start, len)?;
        start += len;
    }
    let _ = cell.set(all);
    Ok(())
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// `[q_proj; k_proj; v_proj]` for the device path's one product (see [`Stacked`]).
    qkv_proj: Stacked,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

/// Per-layer instructions derived from [`LayerTaps`].
struct AttnTaps<'a> {
    queries: &'a [usize],
    masked: Option<&'a [Range<usize>]>,
    /// The device path (see [`Decoder::set_device_ops`]): no CPU kernels, masks built on the
    /// device, larger query chunks.
    device_ops: bool,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder, wd: DType) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut attn = Self {
            q_proj: Proj::new(h, q, vb.pp("q_proj"), wd)?,
            k_proj: Proj::new(h, kv, vb.pp("k_proj"), wd)?,
            v_proj: Proj::new(h, kv, vb.pp("v_proj"), wd)?,
            o_proj: Proj::new(q, h, vb.pp("o_proj"), wd)?,
            qkv_proj: Stacked::new(),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            window: cfg.sliding_window,
        };
        if !vb.device().is_cpu() {
            stack_in_place(
                &attn.qkv_proj,
                &mut [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj],
            )?;
        }
        Ok(attn)
    }

    /// [`Attention::qkv`] with the angles from `rope`; `stacked`: q, k and v from one product
    /// with the stacked weight (the device path), and with a RoPE table q', k' and v from one
    /// launch ([`crate::fused::rope_qkv`]), contiguous.
    fn qkv_rope(&self, xs: &Tensor, rope: Rope, stacked: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let rows = xs.dim(0)?;
        if stacked {
            let (h, kvh) = (self.heads, self.kv_heads);
            let projs = [&self.q_proj, &self.k_proj, &self.v_proj];
            let qkv = stacked_proj(&self.qkv_proj, &projs)?
                .forward(xs)?
                .reshape((rows, h + 2 * kvh, self.head_dim))?;
            return Ok(match rope {
                Rope::Rows { cos, sin } => crate::fused::rope_qkv_candle(&qkv, h, kvh, cos, sin)?,
                Rope::Table {
                    cos,
                    sin,
                    positions,
                } => crate::fused::rope_qkv(&qkv, h, kvh, cos, sin, positions)?,
            });
        }
        let [q, k, v] = Proj::forward_many([&self.q_proj, &self.k_proj, &self.v_proj], xs)?;
        let q = q.reshape((rows, self.heads, self.head_dim))?;
        let k = k.reshape((rows, self.kv_heads, self.head_dim))?;
        let v = v.reshape((rows, self.kv_heads, self.head_dim))?;
        let (q, k) = match rope {
            Rope::Rows { cos, sin } => crate::fused::rope_qk_candle(&q, &k, cos, sin)?,
            Rope::Table {
                cos,
                sin,
                positions,
            } => crate::fused::rope_qk(&q, &k, cos, sin, positions)?,
        };
        Ok((q, k, v))
    }

    /// Attention of `n` new rows of one sequence starting at `start` over its cache (layer
    /// `layer` of `pool`, through `table`; `slots` are the pool slots of positions
    /// `0..start+n` when a cached prefix must be read). xs [n, hidden] → [n, hidden]; records
    /// probability rows for `taps.queries`. With `kernel`, a layer without a key mask takes the
    /// paged prefill kernel over the pool instead (see [`Attention::attend_paged`]).
    #[allow(clippy::too_many_arguments)]
    fn forward_seq(
        &self,
        xs: &Tensor,
        start: usize,
        (rope, stacked): (Rope, bool),
        (pool, layer, table, slots): (&KvPool, usize, &BlockTable, Option<&Tensor>),
        write_index: Option<&Tensor>,
        kernel: Option<&PrefillKernel>,
        taps: &AttnTaps,
        recorded: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let (q, k, v) = self.qkv_rope(xs, rope, stacked)?;
        match write_index {
            Some(index) => pool.scatter(layer, index, &k, &v)?,
            None => pool.write(layer, table, start, &k, &v)?,
        }
        // Key-span masks (interventions) keep the general path.
        if let Some(kernel) = kernel.filter(|_| taps.masked.is_none()) {
            let out = self.attend_paged(&q, start, (pool, layer, table), kernel, taps, recorded)?;
            let out = out.reshape((n, self.heads * self.head_dim))?;
            return Ok(self.o_proj.forward(&out)?);
        }
        let (keys, values) = match slots {
            Some(slots) => pool.gather(layer, slots)?,
            // Nothing cached before: the new rows are all the keys.
            None => (
                k.transpose(0, 1)?.contiguous()?,
                v.transpose(0, 1)?.contiguous()?,
            ),
        };
        let out = self.attend(
            &q.transpose(0, 1)?.contiguous()?,
            start,
            &keys,
            &values,
            taps,
            recorded,
        )?;
        // [heads, n, hd] → [n, heads*hd]
        let out = out
            .transpose(0, 1)?
            .reshape((n, self.heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }

    /// Attention of q [n, heads, hd] at positions start..start+n through the paged prefill
    /// kernel, every key read from the pool (this chunk's already written): no gather, no score
    /// matrix. The probability rows of `taps.queries` are computed apart, explicitly
    /// ([`Attention::probability_rows`]). → [n, heads, hd].
    fn attend_paged(
        &self,
        q: &Tensor,
        start: usize,
        (pool, layer, table): (&KvPool, usize, &BlockTable),
        kernel: &PrefillKernel,
        taps: &AttnTaps,
        recorded: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let args = crate::paged_prefill::PagedPrefill {
            k_pool: &pool.k[layer],
            v_pool: &pool.v[layer],
            block_table: &kernel.table,
            start,
            block_size: kernel.block_size,
            window: self.window,
            // The scale `attend` applies (f64, rounded to f32 by the f32 multiply).
            scale: (1.0 / (self.head_dim as f64).sqrt()) as f32,
            tensor_cores: kernel.tensor_cores,
        };
        let out = crate::paged_prefill::paged_prefill_attention(q, &args)?;
        if !taps.queries.is_empty() {
            let total = start + q.dim(0)?;
            *recorded = Some(self.probability_rows(q, start, total, pool, layer, table, taps)?);
        }
        Ok(out)
    }

    /// The attention probabilities of `taps.queries` (positions in this chunk; q [n, heads, hd]
    /// from `start`) over keys `0..total` read from the pool, as [`Attention::attend`] records
    /// them: per query, scores q·kᵀ over its visible keys, scaled and softmaxed in f32, back in
    /// the compute dtype, zero outside the visible range; [heads, queries, total] in the order
    /// of `taps.queries`. DIAGNOSTICS.md §2 wants these rows exact, from an explicit softmax.
    #[allow(clippy::too_many_arguments)]
    fn probability_rows(
        &self,
        q: &Tensor,
        start: usize,
        total: usize,
        pool: &KvPool,
        layer: usize,
        table: &BlockTable,
        taps: &AttnTaps,
    ) -> Result<Tensor> {
        let groups = self.heads / self.kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut rows = Vec::with_capacity(taps.queries.len());
        for &qpos in taps.queries {
            if qpos < start || qpos >= total {
                return Err(ModelError::InvalidInput(format!(
                    "attention tap at position {qpos} is outside this forward ({start}..{total})"
                )));
            }
            let lo = self.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
            let slots: Vec<u32> = (lo..=qpos).map(|p| table.slot(p) as u32).collect();
            let slots = Tensor::from_vec(slots, qpos + 1 - lo, q.device())?;
            // [kv_heads, keys, hd]
            let keys = pool.k[layer]
                .index_select(&slots, 0)?
                .transpose(0, 1)?
                .contiguous()?;
            let qr =
                q.narrow(0, qpos - start, 1)?
                    .reshape((self.kv_heads, groups, self.head_dim))?;
            let scores = qr
                .matmul(&keys.t()?)?
                .reshape((self.heads, 1, qpos + 1 - lo))?;
            let dtype = scores.dtype();
            let scores = (scores.to_dtype(DType::F32)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            rows.push(probs.pad_with_zeros(D::Minus1, lo, total - qpos - 1)?);
        }
        Ok(Tensor::cat(&rows, 1)?)
    }

    /// q [heads, n, hd] at positions start..start+n; keys/values [kv_heads, start+n, hd].
    fn attend(
        &self,
        q: &Tensor,
        start: usize,
        keys: &Tensor,
        values: &Tensor,
        taps: &AttnTaps,
        recorded: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let n = q.dim(1)?;
        let total = start + n;
        let groups = self.heads / self.kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let dev = q.device();
        let chunk = match taps.device_ops {
            false => (SCORE_CHUNK_BYTES / (self.heads * total * q.dtype().size_in_bytes()))
                .clamp(MIN_QUERY_CHUNK, MAX_QUERY_CHUNK),
            true => (DEVICE_SCORE_CHUNK_BYTES / (self.heads * total * 4))
                .clamp(MIN_QUERY_CHUNK, DEVICE_MAX_QUERY_CHUNK),
        };
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut rows: Vec<(usize, Tensor)> = Vec::new();
        for c0 in (0..n).step_by(chunk) {
            let c = chunk.min(n - c0);
            let kend = start + c0 + c;
            // Sliding window: the earliest key any query of this chunk may see.
            let kbeg = match self.window {
                Some(w) => (start + c0 + 1).saturating_sub(w),
                None => 0,
            };
            let klen = kend - kbeg;
            // Grouped-query attention without materialising repeated K/V: queries of the
            // `groups` heads sharing a KV head are stacked along the row axis.
            let qc = q
                .narrow(1, c0, c)?
                .reshape((self.kv_heads, groups * c, self.head_dim))?;
            let kc = keys.narrow(1, kbeg, klen)?;
            let vc = values.narrow(1, kbeg, klen)?;
            let scores = qc.matmul(&kc.t()?)?.reshape((self.heads, c, klen))?;
            let keys = cpu::KeyRange::Causal {
                q0: start + c0,
                rows_per_head: c,
                kbeg,
                window: self.window,
            };
            // Key-span masks (interventions) take the general path below.
            let fused = match (taps.masked, taps.device_ops) {
                (None, false) => cpu::masked_softmax(&scores, scale as f32, keys)?,
                _ => None,
            };
            let probs = match fused {
                Some(p) => p,
                None => {
                    // In f32 whatever the compute dtype, as transformers' eager attention does
                    // its softmax; the probabilities then go back to the compute dtype.
                    let dtype = scores.dtype();
                    let scores = (scores.to_dtype(DType::F32)? * scale)?;
                    let mask = match (taps.masked, taps.device_ops) {
                        (None, true) => device_mask(self.window, start + c0, c, kbeg, klen, dev)?,
                        _ => self
                            .mask(start + c0, c, kbeg, klen, taps.masked)?
                            .map(|m| Tensor::from_vec(m, (c, klen), dev))
                            .transpose()?,
                    };
                    let scores = match mask {
                        Some(m) => scores.broadcast_add(&m.unsqueeze(0)?)?,
                        None => scores,
                    };
                    candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?
                }
            };
            for &qpos in taps.queries {
                if qpos >= start + c0 && qpos < start + c0 + c {
                    let row = probs.narrow(1, qpos - start - c0, 1)?; // [heads, 1, klen]
                    let row = row.pad_with_zeros(D::Minus1, kbeg, total - kend)?;
                    rows.push((qpos, row));
                }
            }
            let probs = probs.reshape((self.kv_heads, groups * c, klen))?;
            let o = probs.matmul(&vc.contiguous()?)?; // [kv, groups*c, hd]
            outs.push(o.reshape((self.heads, c, self.head_dim))?);
        }
        if !taps.queries.is_empty() {
            // Keep the caller's order of query positions.
            let mut ordered = Vec::with_capacity(taps.queries.len());
            for &qpos in taps.queries {
                match rows.iter().find(|(p, _)| *p == qpos) {
                    Some((_, r)) => ordered.push(r.clone()),
                    None => {
                        return Err(ModelError::InvalidInput(format!(
                            "attention tap at position {qpos} is outside this forward ({start}..{total})"
                        )))
                    }
                }
            }
            *recorded = Some(Tensor::cat(&ordered, 1)?);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Decode attention of B new rows q [B, heads, hd] over their sequences' caches, batched
    /// over the padded plan (the device path): one gather per tensor and two matmuls per layer
    /// whatever B, where the per-sequence path launches ~10 kernels per sequence. The same
    /// operations as [`Attention::attend`] (f32 softmax, probabilities back in the compute
    /// dtype); padded keys get probability exactly 0.
    fn attend_batched(
        &self,
        q: &Tensor,
        pool: &KvPool,
        layer: usize,
        plan: &BatchedDecode,
    ) -> Result<Tensor> {
        let b = q.dim(0)?;
        let (kvh, hd, len) = (self.kv_heads, self.head_dim, plan.len);
        let (slots, mask) = plan.padded.as_ref().ok_or_else(|| {
            ModelError::InvalidInput("decode plan built without the padded gather".into())
        })?;
        let groups = self.heads / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let gather = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.index_select(slots, 0)?
                .reshape((b, len, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = (gather(&pool.k[layer])?, gather(&pool.v[layer])?); // [B, kv, L, hd]
                                                                         // Head h reads KV head h / groups (GQA): [B, heads, hd] → [B, kv, groups, hd].
        let q = q.contiguous()?.reshape((b, kvh, groups, hd))?;
        let scores = q.matmul(&k.t()?)?; // [B, kv, groups, L]
        let dtype = scores.dtype();
        let scores = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        Ok(probs.matmul(&v)?.reshape((b, self.heads * hd))?)
    }

    /// Additive mask for queries at `q0..q0+c` over keys `kbeg..kbeg+klen`, or None when nothing
    /// is masked (the whole chunk sees all its keys).
    fn mask(
        &self,
        q0: usize,
        c: usize,
        kbeg: usize,
        klen: usize,
        masked: Option<&[Range<usize>]>,
    ) -> Result<Option<Vec<f32>>> {
        let causal_needed = c > 1;
        let window_needed = self.window.is_some_and(|w| q0 + c > w);
        if !causal_needed && !window_needed && masked.is_none() {
            return Ok(None);
        }
        let mut m = vec![0f32; c * klen];
        for i in 0..c {
            let qpos = q0 + i;
            let row = &mut m[i * klen..(i + 1) * klen];
            for (j, slot) in row.iter_mut().enumerate() {
                let kpos = kbeg + j;
                let outside_window = self.window.is_some_and(|w| qpos >= kpos + w);
                let hidden = masked.is_some_and(|spans| spans.iter().any(|s| s.contains(&kpos)));
                if kpos > qpos || outside_window || hidden {
                    *slot = f32::NEG_INFINITY;
                }
            }
            if row.iter().all(|x| x.is_infinite()) {
                return Err(ModelError::InvalidInput(format!(
                    "attention mask leaves query position {qpos} no key to attend to"
                )));
            }
        }
        Ok(Some(m))
    }
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    /// `[gate_proj; up_proj]` for the device path's one product (see [`Stacked`]).
    gate_up_proj: Stacked,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder, wd: DType) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut mlp = Self {
            gate_proj: Proj::new(h, i, vb.pp("gate_proj"), wd)?,
            up_proj: Proj::new(h, i, vb.pp("up_proj"), wd)?,
            down_proj: Proj::new(i, h, vb.pp("down_proj"), wd)?,
            gate_up_proj: Stacked::new(),
        };
        if !vb.device().is_cpu() {
            stack_in_place(
                &mlp.gate_up_proj,
                &mut [&mut mlp.gate_proj, &mut mlp.up_proj],
            )?;
        }
        Ok(mlp)
    }

    /// `stacked`: gate and up from one product with the stacked weight and `silu(gate) · up` in
    /// one launch ([`crate::fused::silu_mul`]), the device path's fused MLP.
    fn forward(&self, xs: &Tensor, stacked: bool) -> candle_core::Result<Tensor> {
        if stacked {
            let gate_up =
                stacked_proj(&self.gate_up_proj, &[&self.gate_proj, &self.up_proj])?.forward(xs)?;
            return self.down_proj.forward(&crate::fused::silu_mul(&gate_up)?);
        }
        let [gate, up] = Proj::forward_many([&self.gate_proj, &self.up_proj], xs)?;
        let act = match cpu::silu_mul(&gate, &up)? {
            Some(a) => a,
            None => (gate.silu()? * up)?,
        };
        self.down_proj.forward(&act)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder, wd: DType) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"), wd)?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), wd)?,
        })
    }
}

/// Batch sizes a static decode step pads to ([`DecodeGraphs`]); a CUDA graph is captured per size.
pub const DECODE_BUCKETS: [usize; 12] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256];

/// The longest context (positions) a static decode step serves: its block tables are this wide
/// (the paged kernel's partitions are fixed by the width at capture); longer steps run eagerly.
pub const STATIC_MAX_CONTEXT: usize = 4096;

/// The bucket of [`DECODE_BUCKETS`] a step of `batch` sequences pads to.
pub fn decode_bucket(batch: usize) -> Option<usize> {
    DECODE_BUCKETS.iter().copied().find(|&s| s >= batch)
}

/// How decode steps run ([`Decoder::set_decode_graphs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeGraphs {
    /// Eagerly, op by op, at the batch's own size.
    Off,
    /// On the static path, eagerly: the batch padded to its bucket (padding rows read and write
    /// the pool's scratch block), every input in one device buffer per bucket uploaded once per
    /// step, the paged kernel over tables [`STATIC_MAX_CONTEXT`] wide. What a graph replays; on
    /// the CPU, the tests' way to check it against the eager path.
    Static,
    /// The static path captured as one CUDA graph per bucket at its first step and replayed
    /// after (each capture checked against the eager static step bit for bit, else graphs are
    /// turned off); on the CPU the same as `Static`.
    Captured,
}

impl DecodeGraphs {
    /// `TGA_CUDA_GRAPHS=1` captures graphs on CUDA; anything else (the default until a GPU run
    /// has measured and checked them) runs eagerly.
    pub fn from_env() -> Self {
        match std::env::var("TGA_CUDA_GRAPHS").as_deref() {
            Ok("1" | "on" | "true") => Self::Captured,
            _ => Self::Off,
        }
    }
}

/// One bucket's static decode step: its inputs on the device and, on CUDA, its graph.
struct StaticStep {
    batch: usize,
    block_size: usize,
    /// u32 [4·batch + batch·max_blocks()]: tokens, positions, lengths, write slots, block tables.
    inputs: Tensor,
    /// f32 [batch, vocab]: what the captured graph writes its logits to.
    #[cfg(feature = "cuda")]
    logits: Tensor,
    #[cfg(feature = "cuda")]
    graph: Option<graph::Graph>,
}

impl StaticStep {
    /// The width of its block tables: [`STATIC_MAX_CONTEXT`] positions.
    fn max_blocks(&self) -> usize {
        STATIC_MAX_CONTEXT.div_ceil(self.block_size)
    }
}

/// The static steps made so far, by bucket.
struct StaticSteps {
    mode: DecodeGraphs,
    steps: std::collections::HashMap<usize, StaticStep>,
}

#[cfg(feature = "cuda")]
mod graph {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, DriverError};

    /// A captured decode step. cudarc's graph is not `Send`: it is only used under the
    /// decoder's lock on its static steps, so one thread at a time.
    pub(super) struct Graph(pub(super) CudaGraph);
    // SAFETY: every use of the graph is serialised by `Decoder::static_steps`' mutex, and the
    // CUDA driver allows a graph exec to be launched from any thread of its context.
    unsafe impl Send for Graph {}

    impl Graph {
        pub(super) fn launch(&self) -> Result<(), DriverError> {
            self.0.launch()
        }
    }

    pub(super) const CAPTURE_MODE: sys::CUstreamCaptureMode =
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
    /// Allocations a replay leaves unfreed are freed at the next launch (the graph frees every
    /// intermediate itself; this only guards against a leak).
    pub(super) const INSTANTIATE: sys::CUgraphInstantiate_flags =
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
}

/// The Mistral decoder (`language_model`): embeddings, blocks, final norm, unembedding.
pub struct Decoder {
    embed_tokens: Embedding,
    pool: KvPool,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    cfg: TextConfig,
    device: Device,
    dtype: DType,
    /// See [`Decoder::set_device_ops`].
    device_ops: bool,
    /// The paged kernel's start-up check (`crate::paged::self_check`), run before its first use.
    paged_checked: std::sync::OnceLock<bool>,
    /// See [`Decoder::set_fused_kernels`].
    fused_kernels: bool,
    /// The fused kernels' start-up check (`crate::fused::self_check`), run before their first use.
    fused_checked: std::sync::OnceLock<bool>,
    /// See [`Decoder::set_stacked_projections`].
    stacked_projections: bool,
    /// RoPE's cos, sin [max_position_embeddings, hd/2] on the device for the fused kernel, made
    /// at its first use (None if that failed: candle's rope then serves).
    rope_table: std::sync::OnceLock<Option<(Tensor, Tensor)>>,
    /// The paged prefill kernel's start-up check (`crate::paged_prefill::self_check`): the
    /// kernel that passed it (`Some(tensor_cores)`), or `None` (candle ops).
    prefill_checked: std::sync::OnceLock<Option<bool>>,
    /// See [`Decoder::force_prefill_kernel`].
    prefill_forced: bool,
    /// See [`Decoder::set_decode_graphs`].
    static_steps: std::sync::Mutex<StaticSteps>,
}

/// Result of a prefill.
#[derive(Debug)]
pub struct PrefillOutput {
    /// [len(logit_positions) or 1, vocab], f32.
    pub logits: Tensor,
    pub taps: TapOutput,
}

impl Decoder {
    /// `vb` points at `language_model` and computes in its dtype; the linear layers' weights
    /// (attention and MLP projections, an untied `lm_head`) are stored as `linear_dtype`.
    pub fn new(cfg: &TextConfig, vb: VarBuilder, linear_dtype: DType) -> candle_core::Result<Self> {
        let wd = linear_dtype;
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, m.pp("layers").pp(i), wd))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Proj(Linear::new(embed_tokens.embeddings().clone(), None))
        } else {
            Proj::new(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"), wd)?
        };
        let pool = KvPool::new(
            cfg,
            default_pool(cfg, vb.dtype()),
            vb.device(),
            vb.dtype(),
            false,
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            embed_tokens,
            pool,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(cfg),
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            device_ops: !vb.device().is_cpu(),
            paged_checked: std::sync::OnceLock::new(),
            fused_kernels: !switched_off("TGA_FUSED_KERNELS"),
            fused_checked: std::sync::OnceLock::new(),
            stacked_projections: true,
            rope_table: std::sync::OnceLock::new(),
            prefill_checked: std::sync::OnceLock::new(),
            prefill_forced: false,
            static_steps: std::sync::Mutex::new(StaticSteps {
                mode: DecodeGraphs::from_env(),
                steps: Default::default(),
            }),
        })
    }

    /// Chooses the device path (the default off the CPU): tensor ops batched for launch counts
    /// (one scatter per layer for new keys and values, batched decode attention, masks built on
    /// the device) instead of the CPU's fused f32 kernels. On the CPU only for tests, which check
    /// that the GPU's path computes what the exact one does.
    pub fn set_device_ops(&mut self, on: bool) {
        self.device_ops = on;
    }

    /// Whether the device path runs the fused kernels of [`crate::fused`] (on by default, off
    /// with `TGA_FUSED_KERNELS=0`): the residual adds with the RMSNorm after them, and RoPE of q
    /// and k from a table on the device. On CUDA they must first pass their start-up check; on
    /// the CPU (tests) their references run.
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused_kernels = on;
    }

    /// On the device path, prefill attention through the paged prefill op
    /// (`crate::paged_prefill`) whatever the device, without its start-up check: on the CPU the
    /// op is its Rust reference. A test aid, which checks the decoder's side of the CUDA kernel
    /// (reads from the pool, probability taps, masked layers' fallback) on the CPU.
    pub fn force_prefill_kernel(&mut self, on: bool) {
        self.prefill_forced = on;
    }

    /// How decode steps run ([`DecodeGraphs`]; by default from `TGA_CUDA_GRAPHS`). The static
    /// path needs the device path with the fused kernels and stacked projections, and on CUDA
    /// the paged decode kernel; steps it cannot take (a key mask, a context over
    /// [`STATIC_MAX_CONTEXT`], a batch over the largest bucket, positions past the RoPE table)
    /// run eagerly.
    pub fn set_decode_graphs(&mut self, mode: DecodeGraphs) {
        let steps = self
            .static_steps
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        steps.mode = mode;
        steps.steps.clear();
    }

    /// A test aid for the decode paths: each of `prompts` prefilled into a cache of its own,
    /// then one decode step per entry of `live` over the first `live[s]` sequences (the batch
    /// may shrink as it goes), each fed the previous step's greedy tokens (`first` at the
    /// first). Returns every step's logit rows, in order.
    pub fn greedy_trace(
        &self,
        prompts: &[Vec<u32>],
        first: &[u32],
        live: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let mut caches = prompts
            .iter()
            .map(|ids| {
                let mut cache = self.new_cache();
                let taps = LayerTaps::default();
                let mut acc = TapAccumulator::new(&taps);
                self.prefill_chunk(&self.embed(ids)?, &mut cache, &taps, &mut acc, false)?;
                Ok(cache)
            })
            .collect::<Result<Vec<KvCache>>>()?;
        let (mut rows, mut next) = (Vec::new(), first.to_vec());
        for &n in live {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().take(n).collect();
            let out = self.decode_step(&next[..n], &mut refs)?.to_vec2::<f32>()?;
            next = out
                .iter()
                .map(|r| crate::sampling::argmax(r) as u32)
                .collect();
            next.resize(prompts.len(), 0);
            rows.extend(out);
        }
        Ok(rows)
    }

    /// The decode-step mode now (a failed graph capture turns `Captured` into `Static`) and
    /// the buckets with a static step, each with whether its CUDA graph is captured.
    pub fn decode_graphs(&self) -> (DecodeGraphs, Vec<(usize, bool)>) {
        let state = self.static_steps.lock().unwrap_or_else(|e| e.into_inner());
        let mut buckets: Vec<(usize, bool)> = state
            .steps
            .iter()
            .map(|(&b, _step)| {
                #[cfg(feature = "cuda")]
                let captured = _step.graph.is_some();
                #[cfg(not(feature = "cuda"))]
                let captured = false;
                (b, captured)
            })
            .collect();
        buckets.sort_unstable();
        (state.mode, buckets)
    }

    /// Whether the fused device path (see [`Decoder::set_fused_kernels`], which this needs) also
    /// computes q, k, v with one product over the stacked `[q_proj; k_proj; v_proj]` weight (q', k'
    /// and v then from one RoPE launch in decode) and gate, up with one over `[gate_proj;
    /// up_proj]`, followed by one `silu(gate) · up` launch (on by default). Off the CPU the
    /// decoder holds the stacked weights only (the separate projections are views of them); on
    /// the CPU they are stacked at the device path's first use.
    pub fn set_stacked_projections(&mut self, on: bool) {
        self.stacked_projections = on;
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    /// The unembedding W_U [vocab, hidden] (for the logit lens).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }
    /// The final RMSNorm weight [hidden] and eps (for the logit lens).
    pub fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// An empty cache drawing blocks from this decoder's pool.
    pub fn new_cache(&self) -> KvCache {
        KvCache::from_table(self.pool.blocks.table(), 0)
    }

    /// The pool's allocator (for a scheduler: free blocks, reservations, prefix reuse).
    pub fn kv_blocks(&self) -> &KvBlocks {
        &self.pool.blocks
    }

    /// Replaces the KV pool with one of `config`'s shape, its memory committed now. Caches of
    /// the old pool stay valid as tables but are refused by forwards.
    pub fn configure_kv_pool(&mut self, config: KvPoolConfig) -> Result<()> {
        // The static steps' graphs write the old pool: they go first.
        self.static_steps
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .steps
            .clear();
        // Free the old storage first: the two need not fit together.
        self.pool.k.clear();
        self.pool.v.clear();
        self.pool = KvPool::new(&self.cfg, config, &self.device, self.dtype, true)?;
        Ok(())
    }

    /// Token embeddings [ids.len(), hidden].
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed_tokens.forward(&ids)?)
    }

    /// Runs `embeds` [n, hidden] (positions cache.len()..) through the decoder, appending to the
    /// cache. Returns f32 logits of the chosen positions and the recorded taps, every one of
    /// which must lie in this forward.
    pub fn prefill(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        taps: &LayerTaps,
    ) -> Result<PrefillOutput> {
        let start = cache.len;
        let total = start + embeds.dim(0)?;
        let outside = |p: usize| p < start || p >= total;
        let bad = taps
            .hidden_positions
            .iter()
            .map(|&p| (p, "hidden-state tap"))
            .chain(taps.logit_positions.iter().flatten().map(|&p| (p, "logit")))
            .find(|&(p, _)| outside(p));
        if let Some((p, what)) = bad {
            return Err(ModelError::InvalidInput(format!(
                "{what} position {p} outside this forward ({start}..{total})"
            )));
        }
        if let Some(s) = taps
            .pooled_spans
            .iter()
            .find(|s| s.is_empty() || s.start < start || s.end > total)
        {
            return Err(ModelError::InvalidInput(format!(
                "pooled span {s:?} outside this forward ({start}..{total})"
            )));
        }
        if let Some(s) = taps
            .state_edits
            .iter()
            .flat_map(|e| &e.positions)
            .find(|s| s.start < start || s.end > total)
        {
            return Err(ModelError::InvalidInput(format!(
                "state edit span {s:?} outside this forward ({start}..{total})"
            )));
        }
        let mut acc = TapAccumulator::new(taps);
        let logits = self.prefill_chunk(embeds, cache, taps, &mut acc, true)?;
        Ok(PrefillOutput {
            logits: logits.expect("asked for logits"),
            taps: acc.finish(taps, total)?,
        })
    }

    /// One chunk of a prompt prefilled in several forwards (chunked prefill): runs `embeds`
    /// [n, hidden] at positions `cache.len()..`, recording into `acc` the taps of `taps` that
    /// fall in this chunk (hidden states and attention rows of its positions, partial sums of the
    /// pooled spans) and applying its interventions to this chunk's positions; the key mask
    /// holds for every chunk. Returns the logits (of `taps.logit_positions` in this chunk, or
    /// of its last position) when `logits`. [`TapAccumulator::finish`] assembles the taps.
    pub fn prefill_chunk(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        taps: &LayerTaps,
        acc: &mut TapAccumulator,
        logits: bool,
    ) -> Result<Option<Tensor>> {
        cpu::on_pool_for(&self.device, || {
            self.prefill_on_pool(embeds, cache, taps, acc, logits)
        })
    }

    fn prefill_on_pool(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        taps: &LayerTaps,
        acc: &mut TapAccumulator,
        want_logits: bool,
    ) -> Result<Option<Tensor>> {
        let n = embeds.dim(0)?;
        if n == 0 {
            return Err(ModelError::InvalidInput("empty prompt".into()));
        }
        let start = cache.len;
        let total = start + n;
        let here = |p: usize| p >= start && p < total;
        self.pool.prepare(cache, start..total)?;
        // A key mask given with the prompt holds for all its chunks and what follows.
        let mask_keys = taps.mask_keys.clone().or_else(|| cache.mask.clone());
        let kernel = match self.prefill_kernel(self.dtype) {
            Some(tensor_cores) => {
                let bs = cache.table.block_size();
                let blocks = &cache.table.blocks()[..total.div_ceil(bs)];
                Some(PrefillKernel {
                    table: Tensor::new(blocks, &self.device)?,
                    block_size: bs,
                    tensor_cores,
                })
            }
            None => None,
        };
        // The general path gathers a cached prefix (the kernel reads the pool itself).
        let slots = match start {
            0 => None,
            _ if kernel.is_some() && mask_keys.is_none() => None,
            _ => Some(slots_tensor(&cache.table, total, &self.device)?),
        };
        let write_index = match self.device_ops {
            true => {
                let slots: Vec<u32> = (start..total).map(|p| cache.table.slot(p) as u32).collect();
                let width = self.cfg.num_key_value_heads * self.cfg.head_dim;
                Some(write_index(&slots, width, &self.device)?)
            }
            false => None,
        };
        let fuse = self.fused_ops();
        let stacked = fuse && self.stacked_projections;
        // RoPE: on the fused path from the device's table at this chunk's positions (as decode),
        // else this chunk's angles computed and uploaded.
        let table = self
            .rope_table(stacked)
            .filter(|(cos, _)| total <= cos.dims()[0]);
        let (pos, angles);
        let rope = match table {
            Some((cos, sin)) => {
                pos = Tensor::arange(start as u32, total as u32, &self.device)?;
                Rope::Table {
                    cos,
                    sin,
                    positions: &pos,
                }
            }
            None => {
                let positions: Vec<usize> = (start..total).collect();
                angles = self.rotary.cos_sin(&positions, &self.device, self.dtype)?;
                Rope::Rows {
                    cos: &angles.0,
                    sin: &angles.1,
                }
            }
        };
        // This chunk's hidden-state taps: (index in taps.hidden_positions, row in the chunk).
        let hidden_here: Vec<(usize, u32)> = taps
            .hidden_positions
            .iter()
            .enumerate()
            .filter(|&(_, &p)| here(p))
            .map(|(i, &p)| (i, (p - start) as u32))
            .collect();
        let hidden_idx = match hidden_here.is_empty() {
            true => None,
            false => {
                let rows: Vec<u32> = hidden_here.iter().map(|&(_, r)| r).collect();
                Some(Tensor::new(rows.as_slice(), &self.device)?)
            }
        };
        // This chunk's attention taps: (index in taps.attention_queries, position).
        let queries_here: Vec<(usize, usize)> = taps
            .attention_queries
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, q)| here(q))
            .collect();
        let queries: Vec<usize> = queries_here.iter().map(|&(_, q)| q).collect();
        // Each pooled span's part in this chunk.
        let pooled_parts: Vec<Range<usize>> = taps
            .pooled_spans
            .iter()
            .map(|s| s.start.max(start)..s.end.min(total))
            .collect();
        let mut hidden_rec = Vec::new();
        let mut pooled_rec = Vec::new();
        let record = |xs: &Tensor,
                      hidden_rec: &mut Vec<Tensor>,
                      pooled_rec: &mut Vec<Tensor>|
         -> Result<()> {
            if let Some(idx) = &hidden_idx {
                hidden_rec.push(xs.index_select(idx, 0)?.to_dtype(DType::F32)?);
            }
            if !pooled_parts.is_empty() {
                let hidden = xs.dim(1)?;
                let sums = pooled_parts
                    .iter()
                    .map(|p| match p.is_empty() {
                        true => Tensor::zeros((1, hidden), DType::F32, xs.device()),
                        false => xs
                            .narrow(0, p.start - start, p.len())?
                            .to_dtype(DType::F32)?
                            .sum_keepdim(0),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                pooled_rec.push(Tensor::cat(&sums, 0)?);
            }
            Ok(())
        };

        let mut xs = embeds.to_dtype(self.dtype)?;
        record(&xs, &mut hidden_rec, &mut pooled_rec)?;
        let mut attention = Vec::new();
        let mut next_h = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let block = i + 1;
            let masked = mask_keys
                .as_ref()
                .filter(|m| m.layers.contains(&block))
                .map(|m| m.spans.as_slice());
            let attn_taps = AttnTaps {
                queries: &queries,
                masked,
                device_ops: self.device_ops,
            };
            let mut rec = None;
            // The previous layer's residual add may have normed the input already (fused).
            let h = match next_h.take() {
                Some(h) => h,
                None => layer.input_layernorm.forward(&xs)?,
            };
            let a = layer.self_attn.forward_seq(
                &h,
                start,
                (rope, stacked),
                (&self.pool, i, &cache.table, slots.as_ref()),
                write_index.as_ref(),
                kernel.as_ref(),
                &attn_taps,
                &mut rec,
            )?;
            let (sum, normed) = self.add_norm(&xs, &a, &layer.post_attention_layernorm, fuse)?;
            let m = layer.mlp.forward(&normed, stacked)?;
            let edits: Vec<&StateEdit> = taps
                .state_edits
                .iter()
                .filter(|e| e.after_layer == block)
                .collect();
            // The next layer's input norm joins this residual add unless an edit comes between.
            match self.layers.get(i + 1).filter(|_| fuse && edits.is_empty()) {
                Some(next) => {
                    let (s, h) = crate::fused::add_rms_norm(&sum, &m, &next.input_layernorm)?;
                    (xs, next_h) = (s, Some(h));
                }
                None => xs = (sum + m)?,
            }
            for edit in edits {
                xs = apply_edit(&xs, start, edit)?;
            }
            if let Some(r) = rec {
                attention.push(r.to_dtype(DType::F32)?);
            }
            record(&xs, &mut hidden_rec, &mut pooled_rec)?;
        }
        cache.len = total;
        if mask_keys.is_some() {
            cache.mask = mask_keys;
        }
        acc.add(
            &hidden_here,
            &hidden_rec,
            &queries_here,
            &attention,
            &pooled_rec,
        )?;

        if !want_logits {
            return Ok(None);
        }
        let logit_rows = match &taps.logit_positions {
            Some(ps) => {
                let idx: Vec<u32> = ps
                    .iter()
                    .filter(|&&p| here(p))
                    .map(|&p| (p - start) as u32)
                    .collect();
                xs.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?
            }
            None => xs.narrow(0, n - 1, 1)?,
        };
        let logits = self
            .lm_head
            .forward(&self.norm.forward(&logit_rows)?)?
            .to_dtype(DType::F32)?;
        Ok(Some(logits))
    }

    /// One decode step for B sequences of different lengths: `tokens[b]` is appended to
    /// `caches[b]`. Each linear layer is one matmul over the B new rows; attention runs per
    /// sequence over its own cache. Returns f32 logits [B, vocab].
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        cpu::on_pool_for(&self.device, || self.decode_step_on_pool(tokens, caches))
    }

    fn decode_step_on_pool(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || b != caches.len() {
            return Err(ModelError::InvalidInput(format!(
                "decode step with {b} tokens for {} caches",
                caches.len()
            )));
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        for (cache, &pos) in caches.iter_mut().zip(&positions) {
            self.pool.prepare(cache, pos..pos + 1)?;
        }
        let fuse = self.fused_ops();
        let stacked = fuse && self.stacked_projections;
        if let Some(logits) = self.decode_static(tokens, caches, &positions)? {
            return Ok(logits);
        }
        // RoPE: the fused kernel reads the device's table at the uploaded positions; otherwise
        // (or past the table) this step's angles are computed and uploaded.
        let table = self
            .rope_table(fuse)
            .filter(|(cos, _)| positions.iter().all(|&p| p < cos.dims()[0]));
        let (pos, angles);
        let rope = match table {
            Some((cos, sin)) => {
                let p: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
                pos = Tensor::new(p.as_slice(), &self.device)?;
                Rope::Table {
                    cos,
                    sin,
                    positions: &pos,
                }
            }
            None => {
                angles = self.rotary.cos_sin(&positions, &self.device, self.dtype)?;
                Rope::Rows {
                    cos: &angles.0,
                    sin: &angles.1,
                }
            }
        };
        let mut xs = self.embed(tokens)?.to_dtype(self.dtype)?;
        let (hd, heads) = (self.cfg.head_dim, self.cfg.num_attention_heads);
        let plan = match self.device_ops {
            true => Some(BatchedDecode::new(
                caches,
                &positions,
                self.cfg.sliding_window,
                self.cfg.num_key_value_heads * hd,
                !self.paged_kernel(self.dtype),
                &self.device,
            )?),
            false => None,
        };
        // Each layer's normed input: the previous layer's last residual add made it.
        let mut h = self.first_norm(&xs)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let (q, k, v) = attn.qkv_rope(&h, rope, stacked)?;
            match &plan {
                Some(plan) => self.pool.scatter(i, &plan.write, &k, &v)?,
                None => {
                    for (s, cache) in caches.iter().enumerate() {
                        let (ks, vs) = (k.narrow(0, s, 1)?, v.narrow(0, s, 1)?); // [1, kv, hd]
                        self.pool.write(i, &cache.table, positions[s], &ks, &vs)?;
                    }
                }
            }
            // Sequences under a key-mask intervention take the general path at its layers.
            let any_masked = caches.iter().any(|c| c.masked_at(i + 1).is_some());
            let fused = match (any_masked, &plan) {
                (false, None) => self.fused_decode_attention(i, &q, caches, &positions)?,
                (false, Some(plan)) if self.paged_kernel(q.dtype()) => {
                    let args = crate::paged::PagedDecode {
                        k_pool: &self.pool.k[i],
                        v_pool: &self.pool.v[i],
                        block_tables: &plan.tables,
                        lens: &plan.lens,
                        block_size: plan.block_size,
                        window: attn.window,
                        scale: 1.0 / (hd as f32).sqrt(),
                    };
                    let o = crate::paged::paged_decode_attention(&q, &args)?;
                    Some(o.reshape((b, heads * hd))?)
                }
                (false, Some(plan)) => Some(attn.attend_batched(&q, &self.pool, i, plan)?),
                (true, _) => None,
            };
            let o = match fused {
                Some(o) => o,
                None => {
                    let mut outs = Vec::with_capacity(b);
                    for (s, cache) in caches.iter().enumerate() {
                        let pos = positions[s];
                        let slots = slots_tensor(&cache.table, pos + 1, &self.device)?;
                        let (keys, values) = self.pool.gather(i, &slots)?;
                        let qs = q.narrow(0, s, 1)?.transpose(0, 1)?.contiguous()?; // [heads, 1, hd]
                        let taps = AttnTaps {
                            queries: &[],
                            masked: cache.masked_at(i + 1),
                            device_ops: self.device_ops,
                        };
                        let o = attn.attend(&qs, pos, &keys, &values, &taps, &mut None)?;
                        outs.push(o.reshape((1, heads * hd))?);
                    }
                    Tensor::cat(&outs, 0)?
                }
            };
            (xs, h) = self.layer_tail(i, &xs, &o, fuse, stacked)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        // h: the final norm of the last layer's output.
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }
}

impl Decoder {
    /// The decode step on the static path ([`DecodeGraphs`]), or `None` when it does not apply
    /// (then the caller runs the step eagerly). `positions` were prepared in the pool.
    fn decode_static(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        positions: &[usize],
    ) -> Result<Option<Tensor>> {
        let b = tokens.len();
        let Some(bs) = caches.first().map(|c| c.table.block_size()) else {
            return Ok(None);
        };
        let max_context = positions.iter().max().map_or(0, |p| p + 1);
        let fits = caches
            .iter()
            .all(|c| c.mask.is_none() && c.table.block_size() == bs);
        let Some((bucket, rope)) = self.static_plan(b, max_context).filter(|_| fits) else {
            return Ok(None);
        };
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let logits = self.run_static_step(bucket, bs, rope, |r| {
            let cache = caches.get(r)?;
            let pos = positions[r];
            let used = (pos + 1).div_ceil(bs);
            Some((
                tokens[r],
                pos,
                cache.table.slot(pos) as u32,
                &cache.table.blocks()[..used],
            ))
        })?;
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(Some(logits.narrow(0, 0, b)?.copy()?))
    }

    /// Makes the static step of every bucket up to `max_batch` now, from padding rows only
    /// (they touch nothing but the scratch block), and with `DecodeGraphs::Captured` on CUDA
    /// captures and checks each bucket's graph: what a server does at start-up, so that no
    /// request pays for a capture. Returns the buckets made (none when the static path is off
    /// or does not apply).
    pub fn warm_decode_graphs(&self, max_batch: usize) -> Result<Vec<usize>> {
        let bs = self.pool.blocks.table().block_size();
        let mut made = Vec::new();
        for &bucket in DECODE_BUCKETS
            .iter()
            .take_while(|&&s| s <= max_batch.max(1))
        {
            let Some((_, rope)) = self.static_plan(bucket, 1) else {
                break;
            };
            self.run_static_step(bucket, bs, rope, |_| None)?;
            made.push(bucket);
        }
        Ok(made)
    }

    /// The bucket a static step of `batch` rows and `max_context` positions runs at, and the
    /// RoPE table it reads, when the static path is on and applies (module docs of
    /// [`DecodeGraphs`]).
    fn static_plan(&self, batch: usize, max_context: usize) -> Option<(usize, &(Tensor, Tensor))> {
        let mode = self
            .static_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mode;
        let bucket = decode_bucket(batch).filter(|_| mode != DecodeGraphs::Off)?;
        let applies = self.device_ops
            && self.fused_ops()
            && self.stacked_projections
            && (self.device.is_cpu() || self.paged_kernel(self.dtype))
            && max_context <= STATIC_MAX_CONTEXT;
        let rope = self
            .rope_table(applies)
            .filter(|(cos, _)| max_context <= cos.dims()[0])?;
        Some((bucket, rope))
    }

    /// Uploads a static step's inputs (`row(r)`: token, position, write slot and the blocks in
    /// use of row r, `None` for a padding row, which holds token 0 at position 0 of the scratch
    /// block) and runs it ([`Self::run_static`]): logits f32 [bucket, vocab].
    fn run_static_step<'a>(
        &self,
        bucket: usize,
        bs: usize,
        rope: &(Tensor, Tensor),
        row: impl Fn(usize) -> Option<(u32, usize, u32, &'a [u32])>,
    ) -> Result<Tensor> {
        let m = STATIC_MAX_CONTEXT.div_ceil(bs);
        let mut guard = self.static_steps.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        let step = match state.steps.entry(bucket) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(StaticStep {
                batch: bucket,
                block_size: bs,
                inputs: Tensor::zeros(4 * bucket + bucket * m, DType::U32, &self.device)?,
                #[cfg(feature = "cuda")]
                logits: Tensor::zeros((bucket, self.cfg.vocab_size), DType::F32, &self.device)?,
                #[cfg(feature = "cuda")]
                graph: None,
            }),
        };
        let scratch = self.pool.scratch;
        let mut host = vec![0u32; 4 * bucket + bucket * m];
        let (head, tables) = host.split_at_mut(4 * bucket);
        tables.fill(scratch);
        for r in 0..bucket {
            let (token, pos, slot) = match row(r) {
                Some((token, pos, slot, blocks)) => {
                    tables[r * m..r * m + blocks.len()].copy_from_slice(blocks);
                    (token, pos, slot)
                }
                None => (0, 0, scratch * bs as u32),
            };
            head[r] = token;
            head[bucket + r] = pos as u32;
            head[2 * bucket + r] = pos as u32 + 1;
            head[3 * bucket + r] = slot;
        }
        let fresh = Tensor::from_vec(host, 4 * bucket + bucket * m, &self.device)?;
        step.inputs.slice_set(&fresh, 0, 0)?;
        drop(fresh);
        self.run_static(step, rope, &mut state.mode)
    }

    /// Runs a static step whose inputs are uploaded: its graph when captured; else eagerly,
    /// capturing it first when `mode` asks (on CUDA). A capture that fails or whose replay
    /// differs from the eager step turns graphs off (`mode` becomes `Static`) and logs why.
    fn run_static(
        &self,
        step: &mut StaticStep,
        rope: &(Tensor, Tensor),
        mode: &mut DecodeGraphs,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            if let Some(graph) = &step.graph {
                graph
                    .launch()
                    .map_err(|e| candle_core::Error::Msg(format!("decode graph launch: {e}")))?;
                return Ok(step.logits.clone());
            }
            if *mode == DecodeGraphs::Captured {
                // candle's parameter uploads (shapes, strides) are cached by content from the
                // eager step on, so that the capture finds them on the device.
                let _cache = cuda.enable_cuda_graph_htod_cache();
                let eager = self.static_forward(step, rope)?;
                match self.capture(cuda, step, rope, &eager) {
                    Ok(graph) => {
                        tracing::info!(batch = step.batch, "decode step captured as a CUDA graph");
                        step.graph = Some(graph);
                        return Ok(eager);
                    }
                    Err(e) => {
                        tracing::error!(batch = step.batch, error = %e,
                            "decode graph capture failed its check: decode steps run eagerly");
                        *mode = DecodeGraphs::Static;
                        // A replay may have written other keys and values: the eager step's
                        // again.
                        return self.static_forward(step, rope);
                    }
                }
            }
        }
        let _ = mode;
        self.static_forward(step, rope)
    }

    /// Captures `step`'s forward as a CUDA graph, replays it once and checks that its logits
    /// equal `eager`'s (the same step run op by op from the same inputs) bit for bit.
    #[cfg(feature = "cuda")]
    fn capture(
        &self,
        cuda: &candle_core::CudaDevice,
        step: &StaticStep,
        rope: &(Tensor, Tensor),
        eager: &Tensor,
    ) -> Result<graph::Graph> {
        let msg = |what: &str, e: &dyn std::fmt::Display| {
            ModelError::from(candle_core::Error::Msg(format!("{what}: {e}")))
        };
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(graph::CAPTURE_MODE)
            .map_err(|e| msg("begin capture", &e))?;
        // Every tensor the forward makes is dropped inside the capture (freed by the graph);
        // its logits are copied into the step's own buffer.
        let recorded = self
            .static_forward(step, rope)
            .and_then(|l| Ok(step.logits.slice_set(&l, 0, 0)?));
        // End the capture whatever happened, so that the stream is usable again.
        let ended = stream.end_capture(graph::INSTANTIATE);
        recorded?;
        let graph = ended
            .map_err(|e| msg("end capture", &e))?
            .ok_or_else(|| msg("end capture", &"no graph"))?;
        let graph = graph::Graph(graph);
        graph.launch().map_err(|e| msg("replay", &e))?;
        let (want, got) = (
            eager.flatten_all()?.to_vec1::<f32>()?,
            step.logits.flatten_all()?.to_vec1::<f32>()?,
        );
        match want
            .iter()
            .zip(&got)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            None => Ok(graph),
            Some(i) => Err(msg(
                "replay differs from the eager step",
                &format!("logit {i}: {} against {}", got[i], want[i]),
            )),
        }
    }

    /// The static step's forward at its bucket's size, from its uploaded inputs: logits f32
    /// [batch, vocab]. Every op reads the device (nothing crosses from the host), so that a
    /// CUDA graph can record it.
    fn static_forward(&self, step: &StaticStep, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
        let (bk, m) = (step.batch, step.max_blocks());
        let part = |i: usize| step.inputs.narrow(0, i * bk, bk);
        let (tokens, positions, lens, slots) = (part(0)?, part(1)?, part(2)?, part(3)?);
        let tables = step.inputs.narrow(0, 4 * bk, bk * m)?.reshape((bk, m))?;
        let (hd, heads) = (self.cfg.head_dim, self.cfg.num_attention_heads);
        let width = self.cfg.num_key_value_heads * hd;
        let write = slots
            .reshape((bk, 1))?
            .broadcast_as((bk, width))?
            .contiguous()?;
        let rope = Rope::Table {
            cos,
            sin,
            positions: &positions,
        };
        let block_size = step.block_size;
        let mut xs = self.embed_tokens.forward(&tokens)?.to_dtype(self.dtype)?;
        let mut h = self.first_norm(&xs)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let (q, k, v) = attn.qkv_rope(&h, rope, true)?;
            self.pool.scatter(i, &write, &k, &v)?;
            let args = crate::paged::PagedDecode {
                k_pool: &self.pool.k[i],
                v_pool: &self.pool.v[i],
                block_tables: &tables,
                lens: &lens,
                block_size,
                window: attn.window,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let o = crate::paged::paged_decode_attention(&q, &args)?.reshape((bk, heads * hd))?;
            (xs, h) = self.layer_tail(i, &xs, &o, true, true)?;
        }
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Whether decode attention takes the paged CUDA kernel (crate::paged): on CUDA where it
    /// supports the shapes and passed its start-up check against the reference (else an error
    /// is logged and the candle-ops path serves), unless `TGA_PAGED_ATTENTION=0` asks for the
    /// candle-ops path (the kernel's side-by-side benchmark, and a way around a kernel fault).
    fn paged_kernel(&self, dtype: DType) -> bool {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| !switched_off("TGA_PAGED_ATTENTION"));
        let groups = self.cfg.num_attention_heads / self.cfg.num_key_value_heads.max(1);
        enabled
            && self.device.is_cuda()
            && crate::paged::kernel_supports(dtype, self.cfg.head_dim, groups)
            && *self.paged_checked.get_or_init(|| {
                let (kvh, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
                match crate::paged::self_check(&self.device, dtype, kvh, groups, hd) {
                    Ok(max_err) => {
                        tracing::info!(?dtype, max_err, "paged decode kernel equals its reference");
                        true
                    }
                    Err(e) => {
                        tracing::error!(
                            ?dtype,
                            error = %e,
                            "paged decode kernel failed its start-up check: decode attention \
                             falls back to candle ops (slower, same results)"
                        );
                        false
                    }
                }
            })
    }

    /// Whether this forward's device path takes the fused kernels of [`crate::fused`] (see
    /// [`Decoder::set_fused_kernels`]): on CUDA once they passed their start-up check against
    /// candle's ops (else an error is logged and candle's ops serve), on the CPU as references.
    fn fused_ops(&self) -> bool {
        self.device_ops
            && self.fused_kernels
            && crate::fused::kernel_supports(self.dtype)
            && match &self.device {
                Device::Cpu => true,
                Device::Cuda(_) => *self.fused_checked.get_or_init(|| self.fused_self_check()),
                _ => false,
            }
    }

    fn fused_self_check(&self) -> bool {
        let check = || -> candle_core::Result<(crate::fused::SelfCheck, f64)> {
            let Some((cos, sin)) = self.rope_table(true) else {
                candle_core::bail!("no RoPE table on the device");
            };
            crate::fused::self_check(
                &self.device,
                self.dtype,
                self.norm.weight(),
                self.norm.eps(),
                self.cfg.num_attention_heads,
                self.cfg.num_key_value_heads,
                (cos, sin),
            )
            .and_then(|c| {
                let silu = crate::fused::self_check_silu_mul(
                    &self.device,
                    self.dtype,
                    self.cfg.intermediate_size,
                )?;
                Ok((c, silu))
            })
        };
        match check() {
            Ok((c, silu)) => {
                tracing::info!(
                    dtype = ?self.dtype,
                    norm_max_diff = c.norm_max_diff,
                    rope_max_diff = c.rope_max_diff,
                    silu_mul_max_diff = silu,
                    bit_equal = c.bit_equal() && silu == 0.0,
                    "fused add+RMSNorm, RoPE and silu·mul kernels equal candle's ops"
                );
                true
            }
            Err(e) => {
                tracing::error!(
                    dtype = ?self.dtype,
                    error = %e,
                    "fused kernels failed their start-up check: the decoder keeps candle's ops \
                     for residual adds, norms, RoPE and the MLP's activation, and separate \
                     projections (slower, same results)"
                );
                false
            }
        }
    }

    /// RoPE's table on the device for the fused kernel (positions `0..max_position_embeddings`,
    /// the very angles [`Rotary::cos_sin`] gives), made at the first call that wants it.
    fn rope_table(&self, wanted: bool) -> Option<&(Tensor, Tensor)> {
        if !wanted {
            return None;
        }
        self.rope_table
            .get_or_init(|| {
                let rows = self.cfg.max_position_embeddings.max(1);
                let positions: Vec<usize> = (0..rows).collect();
                match self.rotary.cos_sin(&positions, &self.device, self.dtype) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(error = %e, "RoPE table: candle's rope serves");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The first layer's input norm of `xs` (the final norm when there is no layer): a decode
    /// step's `h` before its first layer.
    fn first_norm(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.layers.first() {
            Some(first) => first.input_layernorm.forward(xs),
            None => self.norm.forward(xs),
        }
    }

    /// Decode layer `i` after its attention `o` [rows, heads·hd]: the output projection, the
    /// residual add with the post-attention norm, the MLP, and the residual add with the next
    /// layer's input norm (the final norm after the last layer). Returns the residual stream
    /// and its normed copy, the next layer's input.
    fn layer_tail(
        &self,
        i: usize,
        xs: &Tensor,
        o: &Tensor,
        fuse: bool,
        stacked: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let layer = &self.layers[i];
        let o = layer.self_attn.o_proj.forward(o)?;
        let (sum, normed) = self.add_norm(xs, &o, &layer.post_attention_layernorm, fuse)?;
        let m = layer.mlp.forward(&normed, stacked)?;
        let next = self
            .layers
            .get(i + 1)
            .map_or(&self.norm, |l| &l.input_layernorm);
        self.add_norm(&sum, &m, next, fuse)
    }

    /// `xs + residual` and `norm` of it: one launch on the fused path, else candle's add and
    /// norm (the same numbers on CUDA, [`crate::fused::add_rms_norm`]).
    fn add_norm(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        norm: &RmsNorm,
        fused: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match fused {
            true => crate::fused::add_rms_norm(xs, residual, norm),
            false => crate::fused::add_rms_norm_candle(xs, residual, norm),
        }
    }

    /// Whether prefill attention takes the paged prefill kernel (crate::paged_prefill), and
    /// which (`Some(tensor_cores)`): on the device path on CUDA where it supports the shapes
    /// and passed its start-up check against the reference (the tensor-core kernel first, then
    /// the CUDA-core one; else an error is logged and the candle-ops path serves), unless
    /// `TGA_PREFILL_KERNEL=0` asks for the candle-ops path; or where forced
    /// ([`Decoder::force_prefill_kernel`]).
    fn prefill_kernel(&self, dtype: DType) -> Option<bool> {
        static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !self.device_ops {
            return None;
        }
        if self.prefill_forced {
            return Some(true);
        }
        let enabled = *ENABLED.get_or_init(|| !switched_off("TGA_PREFILL_KERNEL"));
        let (kvh, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        let groups = self.cfg.num_attention_heads / kvh.max(1);
        if !enabled
            || !self.device.is_cuda()
            || !crate::paged_prefill::kernel_supports(dtype, hd, groups)
        {
            return None;
        }
        *self.prefill_checked.get_or_init(|| {
            let mut kernels = vec![false];
            if crate::paged_prefill::uses_tensor_cores(dtype, hd, true) {
                kernels.insert(0, true);
            }
            for tensor_cores in kernels {
                let check = crate::paged_prefill::self_check(
                    &self.device,
                    dtype,
                    kvh,
                    groups,
                    hd,
                    tensor_cores,
                );
                match check {
                    Ok(max_err) => {
                        tracing::info!(
                            ?dtype,
                            tensor_cores,
                            max_err,
                            "paged prefill kernel equals its reference"
                        );
                        return Some(tensor_cores);
                    }
                    Err(e) => tracing::error!(
                        ?dtype,
                        tensor_cores,
                        error = %e,
                        "paged prefill kernel failed its start-up check"
                    ),
                }
            }
            tracing::error!(
                ?dtype,
                "prefill attention falls back to candle ops (slower, same results)"
            );
            None
        })
    }

    /// Layer `i`'s attention of the B new tokens (already written) through the fused CPU
    /// kernel, reading the pool through each block table; `None` where it does not apply (not
    /// f32 on the CPU).
    fn fused_decode_attention(
        &self,
        i: usize,
        q: &Tensor,
        caches: &[&mut KvCache],
        positions: &[usize],
    ) -> Result<Option<Tensor>> {
        let views: Vec<cpu::CachedKv> = caches
            .iter()
            .zip(positions)
            .map(|(cache, &pos)| cpu::CachedKv {
                k: &self.pool.k[i],
                v: &self.pool.v[i],
                blocks: cache.table.blocks(),
                block_size: cache.table.block_size(),
                len: pos + 1,
            })
            .collect();
        let attn = &self.layers[i].self_attn;
        Ok(cpu::decode_attention(
            q,
            &views,
            attn.kv_heads,
            attn.window,
        )?)
    }
}

/// Whether the environment variable `var` turns a kernel off (`0`, `off` or `false`).
fn switched_off(var: &str) -> bool {
    matches!(std::env::var(var).as_deref(), Ok("0" | "off" | "false"))
}

fn apply_edit(xs: &Tensor, start: usize, edit: &StateEdit) -> Result<Tensor> {
    let (n, h) = xs.dims2()?;
    let v = edit.vector.to_dtype(xs.dtype())?.reshape((1, h))?;
    let mut select = vec![0f32; n];
    // Only the positions of this forward (a chunk of the prompt); other chunks get theirs.
    for span in &edit.positions {
        for p in span.start.max(start)..span.end.min(start + n) {
            select[p - start] = 1.0;
        }
    }
    if select.iter().all(|&s| s == 0.0) {
        return Ok(xs.clone());
    }
    let sel = Tensor::from_vec(select, (n, 1), xs.device())?.to_dtype(xs.dtype())?;
    let delta = sel.broadcast_mul(&v)?;
    Ok(match edit.mode {
        EditMode::Add => (xs + delta)?,
        // h·(1−sel) + v·sel
        EditMode::Replace => (xs.broadcast_mul(&(1.0 - &sel)?)? + delta)?,
    })
}

/// The pool a decoder starts with, before a server sizes (and commits) it from its memory budget:
/// room for eight sequences of the full context, at most 1 GiB (mapped lazily on the CPU: blocks
/// never used cost nothing) and at least 64 blocks.
fn default_pool(cfg: &TextConfig, dtype: DType) -> KvPoolConfig {
    let block_size = DEFAULT_BLOCK_SIZE;
    let per_block = kv_bytes_per_block(cfg, dtype, block_size);
    let wanted = (8 * cfg.max_position_embeddings).div_ceil(block_size);
    let cap = (1usize << 30) / per_block.max(1);
    KvPoolConfig {
        block_size,
        num_blocks: wanted.min(cap).max(64),
    }
}

/// Tokens per block unless configured (vLLM's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Bytes one block of `block_size` tokens takes over all layers, keys and values.
pub fn kv_bytes_per_block(cfg: &TextConfig, dtype: DType, block_size: usize) -> usize {
    2 * cfg.num_hidden_layers
        * block_size
        * cfg.num_key_value_heads
        * cfg.head_dim
        * dtype.size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    /// A stacked projection's product is its parts' products side by side, bit for bit (the
    /// CPU kernel's dot product per output feature up to 256 rows, gemm beyond); stacked in place
    /// (as off the CPU), the parts are views of the one stacked weight and still compute the same.
    #[test]
    fn stacked_projections_are_the_separate_ones_side_by_side() {
        let w = |seed: u64, n: usize| crate::fused::uniform(seed, &[n, 64]).unwrap();
        let parts = || {
            [48, 16, 16]
                .into_iter()
                .enumerate()
                .map(|(i, n)| Proj(Linear::new(w(i as u64, n), None)))
                .collect::<Vec<_>>()
        };
        let (separate, cell) = (parts(), Stacked::new());
        let refs: Vec<&Proj> = separate.iter().collect();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        for rows in [1, 3, 17, 300] {
            let x = crate::fused::uniform(9 + rows as u64, &[rows, 64]).unwrap();
            let all = stacked_proj(&cell, &refs).unwrap().forward(&x).unwrap();
            let [q, k, v] = Proj::forward_many([refs[0], refs[1], refs[2]], &x).unwrap();
            let want = Tensor::cat(&[q, k, v], 1).unwrap();
            assert_eq!(bits(&all), bits(&want), "{rows} rows");
        }
        let mut in_place = parts();
        let in_place_cell = Stacked::new();
        let [a, b, c] = &mut in_place[..] else {
            unreachable!()
        };
        stack_in_place(&in_place_cell, &mut [a, b, c]).unwrap();
        let all = in_place_cell.get().unwrap();
        let (stack, _) = all.weight().storage_and_layout();
        let x = crate::fused::uniform(5, &[3, 64]).unwrap();
        for (p, s) in in_place.iter().zip(&separate) {
            let (storage, _) = p.weight().storage_and_layout();
            assert!(
                std::ptr::eq(&*storage, &*stack),
                "a view of the stacked weight"
            );
            drop(storage);
            assert_eq!(bits(&p.forward(&x).unwrap()), bits(&s.forward(&x).unwrap()));
        }
    }

    /// The device's mask hides what the rule says: later keys, and keys `w` or more behind.
    #[test]
    fn device_mask_hides_later_keys_and_keys_outside_the_window() {
        let dev = Device::Cpu;
        for window in [None, Some(1), Some(3), Some(8)] {
            for (q0, c, kbeg, klen) in [(0, 5, 0, 5), (4, 3, 2, 5), (10, 1, 0, 11), (7, 4, 5, 6)] {
                let got = device_mask(window, q0, c, kbeg, klen, &dev).unwrap();
                let want: Vec<Vec<f32>> = (0..c)
                    .map(|i| {
                        (0..klen)
                            .map(|j| {
                                let (q, k) = (q0 + i, kbeg + j);
                                match k > q || window.is_some_and(|w| q >= k + w) {
                                    true => f32::NEG_INFINITY,
                                    false => 0.0,
                                }
                            })
                            .collect()
                    })
                    .collect();
                let everything_visible = want.iter().flatten().all(|&x| x == 0.0);
                match got {
                    Some(m) => assert_eq!(rows(&m), want, "{window:?} {q0} {c} {kbeg} {klen}"),
                    None => assert!(everything_visible, "{window:?} {q0} {c} {kbeg} {klen}"),
                }
            }
        }
    }

    /// A batched decode plan pads every sequence to the longest with its own position 0, hides
    /// the padding and the keys outside the window, and writes each new token at its slot.
    #[test]
    fn batched_decode_plan_pads_masks_and_writes_at_the_new_slots() {
        let dev = Device::Cpu;
        let blocks = KvBlocks::new(KvPoolConfig {
            block_size: 4,
            num_blocks: 8,
        });
        let mut a = KvCache::from_table(blocks.table(), 0);
        let mut b = KvCache::from_table(blocks.table(), 0);
        // Interleave the two tables' blocks.
        for len in [4, 8] {
            a.table_mut().reserve(len).unwrap();
            b.table_mut().reserve(len).unwrap();
        }
        let positions = [6, 2];
        let (sa, sb): (Vec<u32>, Vec<u32>) = (
            (0..7).map(|p| a.table().slot(p) as u32).collect(),
            (0..3).map(|p| b.table().slot(p) as u32).collect(),
        );
        assert_ne!(sa[4], sa[3] + 1, "tables not interleaved: {sa:?}");
        let caches = [&mut a, &mut b];
        let unpadded = BatchedDecode::new(&caches, &positions, Some(4), 6, false, &dev).unwrap();
        assert!(unpadded.padded.is_none());
        let plan = BatchedDecode::new(&caches, &positions, Some(4), 6, true, &dev).unwrap();
        assert_eq!(plan.len, 7);
        let (slots, mask) = plan.padded.as_ref().unwrap();
        let slots: Vec<u32> = slots.to_vec1().unwrap();
        assert_eq!(slots[..7], sa[..]);
        assert_eq!(slots[7..10], sb[..]);
        assert!(slots[10..].iter().all(|&s| s == sb[0]), "{slots:?}");
        let mask: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        let inf = f32::NEG_INFINITY;
        // Window 4 at position 6: keys 3..=6; at position 2: keys 0..=2, then padding.
        assert_eq!(mask[..7], [inf, inf, inf, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(mask[7..], [0.0, 0.0, 0.0, inf, inf, inf, inf]);
        let write: Vec<Vec<u32>> = plan.write.to_vec2().unwrap();
        assert_eq!(write, vec![vec![sa[6]; 6], vec![sb[2]; 6]]);
        assert_eq!(unpadded.write.to_vec2::<u32>().unwrap(), write);
        assert_eq!(
            unpadded.tables.to_vec2::<u32>().unwrap(),
            plan.tables.to_vec2::<u32>().unwrap()
        );
    }

    /// The tiny preset's decoder (4 heads over 2 KV heads, head_dim 8) with random weights and
    /// the given sliding window, f32 on the CPU, on the device path.
    fn random_decoder(window: Option<usize>) -> Decoder {
        let mut cfg = crate::random::RandomModelSpec::parse("tiny")
            .unwrap()
            .config
            .text;
        cfg.sliding_window = window;
        let vb = crate::random::RandomWeights::new(11).var_builder(DType::F32, &Device::Cpu);
        let mut dec = Decoder::new(&cfg, vb, DType::F32).unwrap();
        dec.set_device_ops(true);
        // Unit-variance weights make scores of ~±10 and softmax rows nearly one-hot; with q
        // and k shrunk the rows spread over many keys, so that every key read counts.
        for layer in &mut dec.layers {
            let attn = &mut layer.self_attn;
            for proj in [&mut attn.q_proj, &mut attn.k_proj] {
                let w = (proj.weight() * 0.4).unwrap();
                *proj = Proj(Linear::new(w, None));
            }
        }
        dec
    }

    /// A prompt prefilled in chunks of `chunk` rows: the last position's logits and the taps.
    fn prefill_in_chunks(
        dec: &Decoder,
        ids: &[u32],
        chunk: usize,
        taps: &LayerTaps,
    ) -> (Tensor, TapOutput) {
        let n = ids.len();
        let embeds = dec.embed(ids).unwrap();
        let mut cache = dec.new_cache();
        let mut acc = TapAccumulator::new(taps);
        let mut logits = None;
        for a in (0..n).step_by(chunk) {
            let part = embeds.narrow(0, a, chunk.min(n - a)).unwrap();
            let last = a + chunk >= n;
            logits = dec
                .prefill_chunk(&part, &mut cache, taps, &mut acc, last)
                .unwrap();
        }
        (logits.unwrap(), acc.finish(taps, n).unwrap())
    }

    /// Decode steps on the static path (the batch padded to its bucket, inputs from one device
    /// buffer, padding rows on the scratch block, tables STATIC_MAX_CONTEXT wide) give the
    /// eager path's logits: three sequences of different lengths (bucket 4), then two of them
    /// (bucket 2), with and without a sliding window that the longest outgrows.
    #[test]
    fn static_decode_steps_equal_eager_ones() {
        for window in [None, Some(9)] {
            let eager = random_decoder(window);
            let mut statik = random_decoder(window);
            statik.set_decode_graphs(DecodeGraphs::Static);
            // Buckets made ahead from padding rows only (a server's start-up) change nothing.
            assert_eq!(statik.warm_decode_graphs(3).unwrap(), [1, 2]);
            assert_eq!(eager.warm_decode_graphs(3).unwrap(), Vec::<usize>::new());
            let prompts: Vec<Vec<u32>> = [2u32, 7, 12]
                .iter()
                .map(|&n| (0..n).map(|i| (i * 7 + 3) % 50).collect())
                .collect();
            let run = |dec: &Decoder| -> (Vec<Vec<f32>>, Vec<u32>) {
                let rows = dec
                    .greedy_trace(&prompts, &[1, 2, 3], &[3, 3, 3, 3, 3, 2, 2, 2])
                    .unwrap();
                let greedy = rows
                    .iter()
                    .map(|r| crate::sampling::argmax(r) as u32)
                    .collect();
                (rows, greedy)
            };
            let (want, want_ids) = run(&eager);
            let (got, got_ids) = run(&statik);
            assert_eq!(got_ids, want_ids, "window {window:?}");
            let mut worst = 0f32;
            for (g, w) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(w) {
                    worst = worst.max((a - b).abs() / (1.0 + b.abs()));
                }
            }
            assert!(worst <= 1e-5, "window {window:?}: {worst}");
            let (mode, buckets) = statik.decode_graphs();
            assert_eq!(mode, DecodeGraphs::Static);
            assert_eq!(
                buckets,
                [(1, false), (2, false), (4, false)],
                "the static path served both batch sizes"
            );
        }
    }

    #[test]
    fn batches_pad_to_the_next_bucket() {
        assert_eq!(decode_bucket(1), Some(1));
        assert_eq!(decode_bucket(3), Some(4));
        assert_eq!(decode_bucket(17), Some(24));
        assert_eq!(decode_bucket(64), Some(64));
        assert_eq!(decode_bucket(65), Some(96));
        assert_eq!(decode_bucket(257), None);
        assert!(DECODE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    /// max |a - b| / (1 + max |b|).
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / (1.0 + m.to_scalar::<f32>().unwrap())
    }

    /// The device path's prefill through the paged prefill op (forced on the CPU, where the op
    /// is its Rust reference, as the CUDA kernel is checked to be) against its candle ops:
    /// logits, hidden states and attention rows within f32 rounding, whole and in chunks (the
    /// earlier chunks' keys read from the pool), with and without a sliding window, and with a
    /// key mask at one block (which keeps the candle ops there).
    #[test]
    fn prefill_kernel_path_equals_candle_ops() {
        const TOL: f32 = 1e-5;
        let n = 150;
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 1000).collect();
        let mut worst = 0f32;
        for window in [None, Some(24)] {
            let base = random_decoder(window);
            let mut kern = random_decoder(window);
            kern.force_prefill_kernel(true);
            assert_eq!(base.prefill_kernel(DType::F32), None);
            assert_eq!(kern.prefill_kernel(DType::F32), Some(true));
            for masked in [false, true] {
                let taps = LayerTaps {
                    hidden_positions: vec![0, 77, 149],
                    attention_queries: vec![149, 30, 100, 0, 63, 64],
                    mask_keys: masked.then(|| KeyMask {
                        layers: vec![2],
                        spans: vec![10..20, 40..41],
                    }),
                    ..Default::default()
                };
                for chunk in [n, 64, 37, 1] {
                    let what = format!("window {window:?} masked {masked} chunk {chunk}");
                    let (want_l, want_t) = prefill_in_chunks(&base, &ids, chunk, &taps);
                    let (got_l, got_t) = prefill_in_chunks(&kern, &ids, chunk, &taps);
                    let mut diffs = vec![
                        rel_diff(&got_l, &want_l),
                        rel_diff(
                            got_t.hidden.as_ref().unwrap(),
                            want_t.hidden.as_ref().unwrap(),
                        ),
                    ];
                    assert_eq!(got_t.attention.len(), want_t.attention.len(), "{what}");
                    for (g, w) in got_t.attention.iter().zip(&want_t.attention) {
                        assert_eq!(g.dims(), [4, taps.attention_queries.len(), n], "{what}");
                        diffs.push(rel_diff(g, w));
                        // Zero exactly where the mask (causal, window, key spans) hides a key.
                        let (g, w) = (g.flatten_all().unwrap(), w.flatten_all().unwrap());
                        let (g, w) = (g.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
                        for (x, y) in g.iter().zip(&w) {
                            assert_eq!(*x == 0.0, *y == 0.0, "{what}: {x} vs {y}");
                        }
                    }
                    let d = diffs.iter().copied().fold(0f32, f32::max);
                    assert!(d <= TOL, "{what}: relative differences {diffs:?}");
                    worst = worst.max(d);
                }
            }
        }
        eprintln!("prefill kernel path vs candle ops: max relative |diff| {worst:.2e} (tolerance {TOL:e})");
    }
}
