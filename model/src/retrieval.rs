//! TGA retrieval: a caption corpus, an index of its CLIP text embeddings, and exact cosine search
//! for the caption nearest an image embedding (TOY_TGA.md: the retrieved text R placed before the
//! image, `"Retrieved Text: {R}. <image>\n{instruction}"`).
//!
//! Corpus: UTF-8 text, one caption per line (`\n`, an optional `\r` before it is dropped), no
//! empty or blank lines, at most [`MAX_CAPTION_BYTES`] bytes a line; errors name the 1-based line.
//!
//! Index file (little-endian), memory-mapped when opened:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TGARIDX\0` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | dims |
//! | 16 | 8 | rows (= corpus lines) |
//! | 24 | 8 | corpus length in bytes |
//! | 32 | 8 | corpus hash ([`Fnv64`] of its bytes) |
//! | 40 | 8 | embedder fingerprint ([`crate::clip_embed::ClipEmbedder::fingerprint`]; 0 = unknown) |
//! | 48 | 16 | zero |
//! | 64 | rows·dims·2 | the L2-normalised embeddings, row-major IEEE f16 |
//!
//! The corpus fields make a stale index (corpus edited after the build) an error at open, not a
//! silently wrong caption. Search is exact: every row's dot product with the normalised query,
//! f16 widened to f32 in registers, in parallel over row blocks; ties go to the lowest row.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use rayon::prelude::*;

use crate::clip_embed::{l2_normalize, ClipEmbedder};
use crate::error::{ModelError, Result};

/// The longest caption line accepted, in bytes (the paper's captions are a sentence or two; CLIP
/// reads 77 tokens).
pub const MAX_CAPTION_BYTES: usize = 1024;

const MAGIC: &[u8; 8] = b"TGARIDX\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 64;

/// 64-bit FNV-1a over 8-byte little-endian words (then the tail bytes one by one): a fast
/// fingerprint for staleness checks, not a cryptographic hash.
#[derive(Debug, Clone)]
pub struct Fnv64 {
    h: u64,
    len: u64,
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Self {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    /// Feeds `bytes`; the result depends on how the input is split into calls only through the
    /// word boundaries, so callers feed each input in one call.
    pub fn write(&mut self, bytes: &[u8]) {
        let words = bytes.chunks_exact(8);
        let tail = words.remainder();
        for w in words {
            let w = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.h = (self.h ^ w).wrapping_mul(Self::PRIME);
        }
        for &b in tail {
            self.h = (self.h ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        self.len += bytes.len() as u64;
    }

    pub fn finish(&self) -> u64 {
        (self.h ^ self.len).wrapping_mul(Self::PRIME)
    }
}

/// What an index records of the corpus it was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorpusId {
    pub lines: u64,
    pub bytes: u64,
    pub hash: u64,
}

/// A validated caption corpus.
#[derive(Debug, Clone)]
pub struct CaptionCorpus {
    text: String,
    /// Byte ranges of the captions in `text`.
    lines: Vec<(usize, usize)>,
    id: CorpusId,
    source: PathBuf,
}

impl CaptionCorpus {
    /// Reads and validates a corpus file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(bytes, path)
    }

    /// Validates `bytes` (`source` names it in errors): every line non-blank, valid UTF-8 and at
    /// most [`MAX_CAPTION_BYTES`] bytes; a final newline is optional; at least one line.
    pub fn from_bytes(bytes: Vec<u8>, source: &Path) -> Result<Self> {
        let err = |line: usize, msg: String| ModelError::Corpus {
            path: source.to_path_buf(),
            line,
            msg,
        };
        let mut hash = Fnv64::new();
        hash.write(&bytes);
        if bytes.is_empty() {
            return Err(err(1, "the corpus is empty".into()));
        }
        let mut lines = Vec::new();
        let mut start = 0;
        let body_end = bytes.len() - usize::from(bytes.last() == Some(&b'\n'));
        for (i, raw) in bytes[..body_end].split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let seg = raw.strip_suffix(b"\r").unwrap_or(raw);
            if seg.len() > MAX_CAPTION_BYTES {
                return Err(err(
                    n,
                    format!(
                        "line is {} bytes, over the limit of {MAX_CAPTION_BYTES}",
                        seg.len()
                    ),
                ));
            }
            let text = std::str::from_utf8(seg).map_err(|e| {
                err(
                    n,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                )
            })?;
            if text.trim().is_empty() {
                return Err(err(n, "empty line (every line must hold a caption)".into()));
            }
            lines.push((start, start + seg.len()));
            start += raw.len() + 1;
        }
        // Every line was checked to be UTF-8 and '\r'/'\n' are ASCII, so the whole is too.
        let text = String::from_utf8(bytes).map_err(|e| err(0, e.to_string()))?;
        Ok(Self {
            id: CorpusId {
                lines: lines.len() as u64,
                bytes: text.len() as u64,
                hash: hash.finish(),
            },
            text,
            lines,
            source: source.to_path_buf(),
        })
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Caption `row` (0-based), without its line ending.
    pub fn get(&self, row: usize) -> Option<&str> {
        self.lines.get(row).map(|&(a, b)| &self.text[a..b])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.lines.iter().map(|&(a, b)| &self.text[a..b])
    }

    pub fn id(&self) -> CorpusId {
        self.id
    }

    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// Writes an index file row by row (to `PATH.tmp`, renamed into place by [`IndexWriter::finish`],
/// so a crash never leaves a truncated index under the real name).
pub struct IndexWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    dims: usize,
    rows: u64,
    corpus: CorpusId,
}

impl IndexWriter {
    pub fn create(path: &Path, dims: usize, corpus: CorpusId, embedder: u64) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dims32 = u32::try_from(dims)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| ModelError::InvalidInput(format!("index dims {dims}")))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
        let mut header = [0u8; HEADER_BYTES];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&dims32.to_le_bytes());
        header[16..24].copy_from_slice(&corpus.lines.to_le_bytes());
        header[24..32].copy_from_slice(&corpus.bytes.to_le_bytes());
        header[32..40].copy_from_slice(&corpus.hash.to_le_bytes());
        header[40..48].copy_from_slice(&embedder.to_le_bytes());
        out.write_all(&header).map_err(io)?;
        Ok(Self {
            out,
            tmp,
            path: path.to_path_buf(),
            dims,
            rows: 0,
            corpus,
        })
    }

    /// Appends one embedding, L2-normalised here (so every row is a unit vector before rounding).
    pub fn push(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.dims {
            return Err(ModelError::InvalidInput(format!(
                "index row of {} dims, expected {}",
                row.len(),
                self.dims
            )));
        }
        if self.rows == self.corpus.lines {
            return Err(ModelError::InvalidInput(format!(
                "more index rows than the corpus's {} lines",
                self.corpus.lines
            )));
        }
        let mut v = row.to_vec();
        l2_normalize(&mut v)?;
        let mut buf = Vec::with_capacity(2 * v.len());
        for x in v {
            buf.extend_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        self.out.write_all(&buf).map_err(|source| ModelError::Io {
            path: self.tmp.clone(),
            source,
        })?;
        self.rows += 1;
        Ok(())
    }

    /// Checks that every corpus line has its row, flushes, syncs and renames into place.
    pub fn finish(self) -> Result<PathBuf> {
        if self.rows != self.corpus.lines {
            drop(self.out);
            let _ = std::fs::remove_file(&self.tmp);
            return Err(ModelError::InvalidInput(format!(
                "index has {} rows for a corpus of {} lines",
                self.rows, self.corpus.lines
            )));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let file = self.out.into_inner().map_err(|e| ModelError::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        Ok(self.path)
    }
}

/// A memory-mapped embedding index.
pub struct RetrievalIndex {
    map: memmap2::Mmap,
    rows: usize,
    dims: usize,
    embedder: u64,
    path: PathBuf,
}

impl std::fmt::Debug for RetrievalIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetrievalIndex")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("dims", &self.dims)
            .finish()
    }
}

impl RetrievalIndex {
    /// Embeds every caption of `corpus` with `embedder` (`batch_size` captions per forward pass),
    /// writes the index to `path` and opens it.
    pub fn build(
        path: &Path,
        corpus: &CaptionCorpus,
        embedder: &ClipEmbedder,
        batch_size: usize,
    ) -> Result<Self> {
        let mut w = IndexWriter::create(path, embedder.dim(), corpus.id(), embedder.fingerprint())?;
        let captions: Vec<&str> = corpus.iter().collect();
        // Chunks of many batches: bounded memory, and length-sorting inside each chunk.
        for chunk in captions.chunks(batch_size.max(1) * 64) {
            for row in embedder.embed_texts(chunk, batch_size)? {
                w.push(&row)?;
            }
        }
        w.finish()?;
        Self::open(path, &corpus.id(), Some(embedder.fingerprint()))
    }

    /// Maps an index file and checks it against the corpus it must describe (and the embedder's
    /// fingerprint, when given and the file records one).
    pub fn open(path: &Path, corpus: &CorpusId, embedder: Option<u64>) -> Result<Self> {
        let bad = |msg: String| ModelError::Index {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map; the index is written to a temporary name and renamed, so a
        // rebuild replaces the file instead of changing the mapped pages.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if map.len() < HEADER_BYTES || &map[0..8] != MAGIC {
            return Err(bad("not a retrieval index (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "index version {version}, this build reads {VERSION}"
            )));
        }
        let dims = u32_at(12) as usize;
        let rows = u64_at(16);
        let found = CorpusId {
            lines: rows,
            bytes: u64_at(24),
            hash: u64_at(32),
        };
        let built_by = u64_at(40);
        let want_len = usize::try_from(rows)
            .ok()
            .and_then(|r| r.checked_mul(dims))
            .and_then(|n| n.checked_mul(2))
            .and_then(|n| n.checked_add(HEADER_BYTES));
        if dims == 0 || want_len != Some(map.len()) {
            return Err(bad(format!(
                "{} bytes for {rows} rows of {dims} dims (truncated or corrupt)",
                map.len()
            )));
        }
        if found != *corpus {
            return Err(bad(format!(
                "stale: built from a corpus of {} lines / {} bytes (hash {:016x}), the corpus has {} lines / {} bytes (hash {:016x}); rebuild the index",
                found.lines, found.bytes, found.hash, corpus.lines, corpus.bytes, corpus.hash
            )));
        }
        if let Some(e) = embedder {
            if built_by != 0 && built_by != e {
                return Err(bad(format!(
                    "stale: built by another CLIP model (fingerprint {built_by:016x}, this one {e:016x}); rebuild the index"
                )));
            }
        }
        Ok(Self {
            map,
            rows: rows as usize,
            dims,
            embedder: built_by,
            path: path.to_path_buf(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The fingerprint of the model that built it (0: not recorded).
    pub fn embedder_fingerprint(&self) -> u64 {
        self.embedder
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The embedding matrix, row-major.
    pub fn matrix(&self) -> &[f16] {
        let body = &self.map[HEADER_BYTES..];
        // SAFETY: the map is page-aligned and the body starts at byte 64, so it is 2-aligned; its
        // length is rows·dims·2 (checked at open); every bit pattern is a valid f16.
        unsafe { std::slice::from_raw_parts(body.as_ptr().cast::<f16>(), self.rows * self.dims) }
    }

    /// Row `row`, widened to f32.
    pub fn row(&self, row: usize) -> Option<Vec<f32>> {
        (row < self.rows).then(|| {
            self.matrix()[row * self.dims..(row + 1) * self.dims]
                .iter()
                .map(|x| x.to_f32())
                .collect()
        })
    }

    /// The row whose embedding is nearest `query` by cosine, and that cosine (the query is
    /// normalised here; rows are unit vectors up to f16 rounding). Exact search; ties go to the
    /// lowest row.
    pub fn nearest(&self, query: &[f32]) -> Result<(usize, f32)> {
        if query.len() != self.dims {
            return Err(ModelError::InvalidInput(format!(
                "query of {} dims for an index of {}",
                query.len(),
                self.dims
            )));
        }
        let mut q = query.to_vec();
        l2_normalize(&mut q)?;
        let m = self.matrix();
        let dims = self.dims;
        // ~1 MB of f16 per task: large enough to amortise scheduling, many per thread.
        let block = (1 << 19) / dims.max(1) + 1;
        let best = crate::cpu::on_pool(|| {
            m.par_chunks(block * dims)
                .enumerate()
                .map(|(b, chunk)| {
                    let mut best = (usize::MAX, f32::NEG_INFINITY);
                    for (i, row) in chunk.chunks_exact(dims).enumerate() {
                        let s = dot_f16(row, &q);
                        // Strictly greater: the first (lowest) row of equal score stays.
                        if s > best.1 || best.0 == usize::MAX {
                            best = (b * block + i, s);
                        }
                    }
                    best
                })
                .reduce(|| (usize::MAX, f32::NEG_INFINITY), better)
        });
        if best.0 == usize::MAX {
            return Err(ModelError::Index {
                path: self.path.clone(),
                msg: "the index has no rows".into(),
            });
        }
        Ok(best)
    }
}

/// The better of two (row, score) candidates: higher score, then lower row.
fn better(a: (usize, f32), b: (usize, f32)) -> (usize, f32) {
    if a.0 == usize::MAX {
        return b;
    }
    if b.0 == usize::MAX {
        return a;
    }
    if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
        b
    } else {
        a
    }
}

/// `row · q` with `row` widened from f16; the vector path is chosen at run time.
fn dot_f16(row: &[f16], q: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        let ok = *AVX2.get_or_init(|| {
            std::env::var("TGA_CPU_ISA").as_deref() != Ok("portable")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        });
        if ok {
            // SAFETY: the features were detected on this CPU.
            return unsafe { x86::dot_f16_avx2(row, q) };
        }
    }
    row.iter().zip(q).map(|(a, b)| a.to_f32() * b).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Four 8-lane accumulators (FMA latency), then the tail in scalar code.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16_avx2(row: &[f16], q: &[f32]) -> f32 {
        let n = row.len().min(q.len());
        let (r, qp) = (row.as_ptr().cast::<u16>(), q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads [i, i + 8) with i + 8 <= n, inside both slices.
        unsafe {
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * k;
                    let w = _mm256_cvtph_ps(_mm_loadu_si128(r.add(o).cast()));
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(qp.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(r.add(i).cast()));
                acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(qp.add(i)), acc[0]);
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            let mut total = _mm_cvtss_f32(s);
            for j in i..n {
                total += row[j].to_f32() * q[j];
            }
            total
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_dot_product_matches_the_scalar_one() {
        for n in [1, 7, 8, 31, 32, 33, 768] {
            let row: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 37 % 11) as f32 - 5.0) / 7.0))
                .collect();
            let q: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 5.0).collect();
            let want: f64 = row
                .iter()
                .zip(&q)
                .map(|(a, b)| f64::from(a.to_f32()) * f64::from(*b))
                .sum();
            let got = dot_f16(&row, &q);
            assert!((f64::from(got) - want).abs() < 1e-4, "{n}: {got} vs {want}");
        }
    }

    #[test]
    fn better_prefers_the_higher_score_then_the_lower_row() {
        assert_eq!(better((3, 0.5), (1, 0.5)), (1, 0.5));
        assert_eq!(better((1, 0.5), (3, 0.5)), (1, 0.5));
        assert_eq!(better((3, 0.5), (9, 0.6)), (9, 0.6));
        assert_eq!(
            better((usize::MAX, f32::NEG_INFINITY), (9, -1.0)),
            (9, -1.0)
        );
    }
}
