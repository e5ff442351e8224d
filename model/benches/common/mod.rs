//! Shared by the benches: thread count, the bench-135m checkpoint, the copy pass.

#![allow(dead_code)] // each bench uses its own subset

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use model::llava::{LinearWeights, LlavaModel, LoadOptions};
use model::tokenizer::Tokenizer;

/// Threads of the measurement: `RAYON_NUM_THREADS`, else all CPUs (what the model's pool uses).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One copy of `src` into `dst`, split over `threads` scoped threads (STREAM's "Copy").
pub fn copy(src: &[f32], dst: &mut [f32], threads: usize) {
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (d, sr) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            s.spawn(move || d.copy_from_slice(sr));
        }
    });
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir() -> PathBuf {
    std::env::var_os("TGA_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("bench/models/bench-135m"))
}

pub fn image_path(name: &str) -> PathBuf {
    root().join("fixtures/images").join(name)
}

pub fn load() -> (LlavaModel, Tokenizer) {
    load_with(LinearWeights::Compute)
}

/// [`load`] with the decoder's linear weights stored as `linear_weights` says.
pub fn load_with(linear_weights: LinearWeights) -> (LlavaModel, Tokenizer) {
    let dir = model_dir();
    assert!(
        dir.join("config.json").is_file(),
        "no bench checkpoint at {}: run tools/bench.sh (or tools/.venv/bin/python \
         tools/make_fixtures.py --bench-135m {0})",
        dir.display()
    );
    let t = Instant::now();
    let opts = LoadOptions {
        linear_weights,
        ..Default::default()
    };
    let model = LlavaModel::load(&dir, &opts, &Device::Cpu).expect("load bench-135m");
    println!(
        "BENCH load_s={:.2} dtype={:?}",
        t.elapsed().as_secs_f64(),
        model.dtype()
    );
    let tok = Tokenizer::from_dir(&dir).expect("bench-135m tokenizer");
    (model, tok)
}

/// Context lengths of the decode sequences: 200, 217, …, 455.
pub fn context_len(i: usize) -> usize {
    200 + 17 * i
}

/// Deterministic, varied text ids of sequence `i` (no image: decode cost does not depend on what
/// the cached positions held).
pub fn context_ids(i: usize, vocab: u32) -> Vec<u32> {
    (0..context_len(i))
        .map(|j| 3 + ((j as u32 * 7919 + i as u32 * 104_729) % (vocab - 3)))
        .collect()
}
