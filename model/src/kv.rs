//! The paged KV cache's bookkeeping (vLLM's PagedAttention): a fixed pool of blocks of
//! `block_size` token slots, handed out to sequences through block tables, with reference counts
//! so that sequences can share blocks (a common prompt prefix found by its hash, or the prompt of
//! `n` choices) and copy a shared block before writing into it.
//!
//! This module holds no tensors: [`crate::mistral::Decoder`] keeps the pool's K/V storage and
//! reads and writes it through a sequence's [`BlockTable`]; the server's scheduler plans with the
//! same allocator (free blocks, reservations, preemption) through the shared [`KvBlocks`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// The pool's shape: how many blocks of how many token slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPoolConfig {
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvPoolConfig {
    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.block_size * self.num_blocks
    }
}

/// No free block is left in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache pool has {free} free blocks, {needed} are needed")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// Prefix-cache counters (in blocks), vLLM's `prefix_cache_queries` / `hits`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub queried: u64,
    pub hit: u64,
}

/// Reference counts, the free list and the prefix-hash index of one pool.
///
/// A block is in exactly one of three states: held (reference count > 0), cached (count 0 but
/// still indexed by its content hash, so a later prompt with the same prefix can take it back;
/// evicted least recently released first), or free.
#[derive(Debug)]
pub struct BlockAllocator {
    config: KvPoolConfig,
    refs: Vec<u32>,
    free: VecDeque<u32>,
    hash_of: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    /// Cached blocks by release time (oldest first).
    cached: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    stats: PrefixStats,
}

impl BlockAllocator {
    pub fn new(config: KvPoolConfig) -> Self {
        let n = config.num_blocks;
        Self {
            config,
            refs: vec![0; n],
            // Popped from the back: block 0 first.
            free: (0..n as u32).rev().collect(),
            hash_of: vec![None; n],
            by_hash: HashMap::new(),
            cached: BTreeMap::new(),
            released_at: vec![0; n],
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn config(&self) -> KvPoolConfig {
        self.config
    }

    /// Blocks that can be handed out now (free or cached).
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// Blocks held by some sequence.
    pub fn used(&self) -> usize {
        self.config.num_blocks - self.available()
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// One block for a writer (reference count 1): the most recently freed one (its memory is
    /// the most likely to be in cache); a cached block is evicted when nothing is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop_back() {
            Some(b) => b,
            None => {
                let (&at, &b) = self.cached.iter().next()?;
                self.cached.remove(&at);
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One more holder of `block`.
    pub fn retain(&mut self, block: u32) {
        let i = block as usize;
        if self.refs[i] == 0 {
            // Taken back from the prefix cache.
            self.cached.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// One holder fewer; at zero the block is cached if it has a hash, else free.
    pub fn release(&mut self, block: u32) {
        let i = block as usize;
        assert!(
            self.refs[i] > 0,
            "block {block} released more often than held"
        );
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.cached.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }

    /// The block holding the content `hash`, retained for the caller; counts the query.
    pub fn lookup(&mut self, hash: u64) -> Option<u32> {
        self.stats.queried += 1;
        let block = *self.by_hash.get(&hash)?;
        self.stats.hit += 1;
        self.retain(block);
        Some(block)
    }

    /// How many of the leading `hashes` the prefix cache holds, and how many of those no
    /// sequence holds (reusing them takes them out of [`Self::available`]). A peek: nothing is
    /// retained or counted.
    pub fn cached_prefix(&self, hashes: &[u64]) -> (usize, usize) {
        let blocks = hashes.iter().map_while(|h| self.by_hash.get(h));
        blocks.fold((0, 0), |(n, idle), &b| {
            (n + 1, idle + usize::from(self.refs[b as usize] == 0))
        })
    }

    /// Counts prefix-cache queries that were not looked up (the blocks after the first miss).
    pub fn count_misses(&mut self, blocks: usize) {
        self.stats.queried += blocks as u64;
    }

    /// Indexes a full block by its content hash (first writer wins: a block with the same
    /// content already indexed stays the one found).
    pub fn publish(&mut self, block: u32, hash: u64) {
        let i = block as usize;
        if self.hash_of[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash_of[i] = Some(hash);
        self.by_hash.insert(hash, block);
    }

    /// A block's content is about to change: it leaves the prefix index.
    fn unpublish(&mut self, block: u32) {
        if let Some(h) = self.hash_of[block as usize].take() {
            self.by_hash.remove(&h);
        }
    }
}

/// One pool's allocator, shared by the decoder, the sequences' tables and the scheduler.
#[derive(Debug, Clone)]
pub struct KvBlocks(Arc<Mutex<BlockAllocator>>);

impl KvBlocks {
    pub fn new(config: KvPoolConfig) -> Self {
        Self(Arc::new(Mutex::new(BlockAllocator::new(config))))
    }

    /// The allocator, locked. Poisoning is ignored: its state is updated before anything that
    /// can panic.
    pub fn lock(&self) -> MutexGuard<'_, BlockAllocator> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> KvPoolConfig {
        self.lock().config()
    }

    pub fn same_pool(&self, other: &KvBlocks) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// An empty table drawing on this pool.
    pub fn table(&self) -> BlockTable {
        BlockTable {
            pool: self.clone(),
            blocks: Vec::new(),
            block_size: self.config().block_size,
        }
    }
}

/// A copy of one block's slots onto another (copy-on-write), to be done in every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub from: u32,
    pub to: u32,
}

/// One sequence's blocks, in position order: position `p` lives in slot `p % block_size` of
/// `blocks[p / block_size]`. Dropping the table releases its blocks.
#[derive(Debug)]
pub struct BlockTable {
    pool: KvBlocks,
    blocks: Vec<u32>,
    block_size: usize,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn pool(&self) -> &KvBlocks {
        &self.pool
    }

    /// Token positions the table has room for.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// The pool slot of position `pos` (which must be within [`Self::capacity`]).
    pub fn slot(&self, pos: usize) -> usize {
        self.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Blocks needed beyond the current ones to hold `tokens` positions.
    pub fn blocks_needed(&self, tokens: usize) -> usize {
        tokens
            .div_ceil(self.block_size)
            .saturating_sub(self.blocks.len())
    }

    /// Grows the table to hold `tokens` positions: all the blocks needed or none.
    pub fn reserve(&mut self, tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(tokens);
        if needed == 0 {
            return Ok(());
        }
        let mut pool = self.pool.lock();
        let free = pool.available();
        if free < needed {
            return Err(OutOfBlocks { needed, free });
        }
        for _ in 0..needed {
            self.blocks
                .push(pool.allocate().expect("availability checked"));
        }
        Ok(())
    }

    /// Takes, for an empty table, the leading blocks whose content hashes are `hashes` (a
    /// prompt's full blocks, in order) from the prefix cache, up to the first miss. Returns how
    /// many blocks were reused.
    pub fn reuse_prefix(&mut self, hashes: &[u64]) -> usize {
        assert!(
            self.blocks.is_empty(),
            "prefix reuse into a non-empty table"
        );
        let mut pool = self.pool.lock();
        for (i, &h) in hashes.iter().enumerate() {
            match pool.lookup(h) {
                Some(b) => self.blocks.push(b),
                None => {
                    pool.count_misses(hashes.len() - i - 1);
                    break;
                }
            }
        }
        self.blocks.len()
    }

    /// Indexes this table's leading full blocks by `hashes` so that later prompts can reuse
    /// them.
    pub fn publish(&self, hashes: &[u64]) {
        let mut pool = self.pool.lock();
        for (&b, &h) in self.blocks.iter().zip(hashes) {
            pool.publish(b, h);
        }
    }

    /// Blocks among those holding positions `range` that another holder shares: writing there
    /// copies them first ([`Self::prepare_write`]), one free block each.
    pub fn shared_blocks(&self, range: Range<usize>) -> usize {
        if range.is_empty() {
            return 0;
        }
        let first = range.start / self.block_size;
        let last = ((range.end - 1) / self.block_size).min(self.blocks.len().saturating_sub(1));
        if first >= self.blocks.len() {
            return 0;
        }
        self.count_shared(&self.pool.lock(), first..=last)
    }

    /// How many of the blocks at `indices` another holder also holds.
    fn count_shared(
        &self,
        pool: &BlockAllocator,
        indices: std::ops::RangeInclusive<usize>,
    ) -> usize {
        indices
            .filter(|&i| pool.ref_count(self.blocks[i]) > 1)
            .count()
    }

    /// Before positions `range` are written: every block they touch that another holder shares
    /// is replaced by a private copy (returned, for the caller to copy the slots), and blocks
    /// about to change leave the prefix index.
    pub fn prepare_write(&mut self, range: Range<usize>) -> Result<Vec<BlockCopy>, OutOfBlocks> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let first = range.start / self.block_size;
        let last = (range.end - 1) / self.block_size;
        let mut pool = self.pool.lock();
        let shared = self.count_shared(&pool, first..=last);
        if pool.available() < shared {
            return Err(OutOfBlocks {
                needed: shared,
                free: pool.available(),
            });
        }
        let mut copies = Vec::new();
        for i in first..=last {
            let b = self.blocks[i];
            if pool.ref_count(b) > 1 {
                let to = pool.allocate().expect("availability checked");
                pool.release(b);
                self.blocks[i] = to;
                copies.push(BlockCopy { from: b, to });
            } else {
                pool.unpublish(b);
            }
        }
        Ok(copies)
    }

    /// Another table over the same blocks (each retained once more): `n` choices of one
    /// prompt share its prefill, and copy a block only when they write into it.
    pub fn fork(&self) -> BlockTable {
        let mut pool = self.pool.lock();
        for &b in &self.blocks {
            pool.retain(b);
        }
        BlockTable {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
            block_size: self.block_size,
        }
    }

    /// Releases every block (the sequence is finished or preempted).
    pub fn clear(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let mut pool = self.pool.lock();
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Content hashes of a token sequence's full blocks, each chained to the previous one (vLLM's
/// automatic prefix caching): block `i`'s hash covers every token up to its end, and `extra`
/// (e.g. the hashes of the images whose positions a block holds) is mixed in per block.
pub fn prefix_hashes(
    tokens: &[u32],
    block_size: usize,
    mut extra: impl FnMut(Range<usize>) -> u64,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut prev = 0u64;
    for (i, chunk) in tokens.chunks_exact(block_size).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        prev.hash(&mut h);
        chunk.hash(&mut h);
        extra(i * block_size..(i + 1) * block_size).hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KvBlocks {
        KvBlocks::new(KvPoolConfig {
            block_size: 4,
            num_blocks: n,
        })
    }

    #[test]
    fn reserve_takes_all_blocks_needed_or_none_and_drop_frees_them() {
        let p = pool(3);
        let mut a = p.table();
        a.reserve(5).unwrap();
        assert_eq!(a.blocks().len(), 2);
        assert_eq!(a.slot(5), a.blocks()[1] as usize * 4 + 1);
        let mut b = p.table();
        assert_eq!(b.reserve(9), Err(OutOfBlocks { needed: 3, free: 1 }));
        assert!(
            b.blocks().is_empty(),
            "nothing kept from a failed reservation"
        );
        b.reserve(4).unwrap();
        assert_eq!(p.lock().available(), 0);
        a.reserve(8).unwrap(); // already room
        drop(a);
        assert_eq!(p.lock().available(), 2);
        drop(b);
        assert_eq!(p.lock().available(), 3);
        assert_eq!(p.lock().used(), 0);
    }

    #[test]
    fn prefix_blocks_are_shared_by_hash_until_the_first_miss_and_cached_after_release() {
        let p = pool(4);
        let tokens: Vec<u32> = (0..10).collect();
        let hashes = prefix_hashes(&tokens, 4, |_| 0);
        assert_eq!(hashes.len(), 2);
        let mut a = p.table();
        assert_eq!(a.reuse_prefix(&hashes), 0);
        a.reserve(10).unwrap();
        a.publish(&hashes);
        let mut b = p.table();
        assert_eq!(b.reuse_prefix(&hashes), 2);
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        assert_eq!(p.lock().ref_count(a.blocks()[0]), 2);
        // A different second block: only the first is shared.
        let other = prefix_hashes(&[0, 1, 2, 3, 9, 9, 9, 9], 4, |_| 0);
        assert_eq!(other[0], hashes[0]);
        let mut c = p.table();
        assert_eq!(c.reuse_prefix(&other), 1);
        assert_eq!(p.lock().prefix_stats(), PrefixStats { queried: 6, hit: 3 });
        drop((a, b, c));
        // Released but cached: found again without recomputing, and still reclaimable.
        assert_eq!(p.lock().available(), 4);
        let mut d = p.table();
        assert_eq!(d.reuse_prefix(&hashes), 2);
        assert_eq!(p.lock().available(), 2);
        drop(d);
        let mut e = p.table();
        e.reserve(16).unwrap(); // evicts the cached blocks
        drop(e);
        let mut f = p.table();
        assert_eq!(
            f.reuse_prefix(&hashes),
            0,
            "evicted blocks are no longer indexed"
        );
    }

    #[test]
    fn extra_content_changes_the_hash() {
        let t = [1u32; 8];
        let a = prefix_hashes(&t, 4, |_| 1);
        let b = prefix_hashes(&t, 4, |r| if r.start == 4 { 2 } else { 1 });
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }

    #[test]
    fn writes_into_shared_blocks_copy_them_first() {
        let p = pool(4);
        let mut a = p.table();
        a.reserve(6).unwrap();
        let mut b = a.fork();
        assert_eq!(p.lock().ref_count(a.blocks()[1]), 2);
        assert_eq!(b.shared_blocks(6..7), 1);
        assert_eq!(b.shared_blocks(0..8), 2);
        // Positions beyond the table touch no block yet.
        assert_eq!(b.shared_blocks(8..9), 0);
        // b writes position 6 (block 1, shared): it gets a private copy.
        let copies = b.prepare_write(6..7).unwrap();
        assert_eq!(
            copies,
            vec![BlockCopy {
                from: a.blocks()[1],
                to: b.blocks()[1]
            }]
        );
        assert_ne!(a.blocks()[1], b.blocks()[1]);
        assert_eq!(a.blocks()[0], b.blocks()[0]);
        assert_eq!(p.lock().ref_count(a.blocks()[1]), 1);
        assert_eq!(b.shared_blocks(6..7), 0);
        // a now owns its block alone: no copy.
        assert!(a.prepare_write(6..7).unwrap().is_empty());
        drop(a);
        drop(b);
        assert_eq!(p.lock().used(), 0);
    }

    #[test]
    fn a_block_being_rewritten_leaves_the_prefix_index() {
        let p = pool(2);
        let mut a = p.table();
        a.reserve(4).unwrap();
        let h = prefix_hashes(&[1, 2, 3, 4], 4, |_| 0);
        a.publish(&h);
        a.prepare_write(2..3).unwrap();
        let mut b = p.table();
        assert_eq!(b.reuse_prefix(&h), 0);
    }
}
