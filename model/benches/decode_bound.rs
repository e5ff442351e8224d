//! Batch-1 decode against the memory-bandwidth bound, measured in alternation.
//!
//! bench/RESULTS.md compares batch-1 decode with `all weight bytes (f32) / copy bandwidth`. On a
//! shared host both figures drift by ±15 % from one minute to the next, so two benches run a
//! minute apart can disagree about the ratio by more than the margin being judged. Here the two
//! are measured in turns: per round, copy passes (STREAM convention: read + write bytes), then
//! batch-1 decode steps, then copy passes again; the round's ratio uses the copy bandwidth
//! around its decode steps. Prints one `BENCH bound_round` line per round and a summary
//! `BENCH bound_paired` line (median, min, max of the ratios) for tools/bench.sh.
//!
//! Each round also times the same steps with the checkpoint's bf16 linear weights kept in bf16
//! (`--weights checkpoint`), right after the f32 ones: `BENCH bound_bf16` gives the median of
//! the per-round speed-ups (the host's drift cancels in each pair).
//!
//! `TGA_BOUND_ROUNDS` (default 15) sets the number of rounds.

mod common;

use std::hint::black_box;
use std::time::Instant;

use model::llava::{LinearWeights, LlavaModel};
use model::mistral::{KvCache, LayerTaps};

/// Per copy buffer (two are allocated), as in the `bandwidth` bench.
const BYTES: usize = 512 << 20;
const COPIES_PER_HALF: usize = 6;
const STEPS_PER_ROUND: usize = 60;

/// All tensors of the checkpoint's safetensors files, as f32 bytes (the weight bytes).
fn weight_bytes_f32() -> u64 {
    let dir = common::model_dir();
    let mut numel = 0u64;
    for entry in std::fs::read_dir(&dir).expect("model dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let file = std::fs::File::open(&path).expect("safetensors file");
        // Mapped, so that only the header's pages are read, not the weights.
        // SAFETY: the checkpoint is not modified while the bench runs.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.expect("map safetensors file");
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        for info in meta.tensors().values() {
            numel += info.shape.iter().product::<usize>() as u64;
        }
    }
    4 * numel
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rounds: usize = std::env::var("TGA_BOUND_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(15);
    let threads = common::threads();
    let weight_bytes = weight_bytes_f32();
    let (model, _) = common::load();
    let (model16, _) = common::load_with(LinearWeights::Checkpoint);
    let vocab = model.config().text.vocab_size as u32;

    // The same context in each model's cache. One step first so that the cache has grown past
    // the prompt, as in the `llava` bench.
    let context = |m: &LlavaModel| {
        let mut cache = m.new_cache();
        let ids = common::context_ids(0, vocab);
        m.prefill(&ids, &[], &mut cache, &LayerTaps::default())
            .expect("context prefill");
        m.decode_step(&[100], &mut [&mut cache])
            .expect("decode step");
        cache
    };
    let (mut cache, mut cache16) = (context(&model), context(&model16));
    // Mean seconds per step over `STEPS_PER_ROUND` steps from the same context.
    let steps = |m: &LlavaModel, cache: &mut KvCache| {
        let mut total = 0.0;
        let len = cache.len();
        for _ in 0..STEPS_PER_ROUND {
            let t = Instant::now();
            black_box(
                m.decode_step(&[200], &mut [&mut *cache])
                    .expect("decode step"),
            );
            total += t.elapsed().as_secs_f64();
            // Rolled back (not timed): every step sees the same context.
            cache.truncate(len);
        }
        total / STEPS_PER_ROUND as f64
    };

    let n = BYTES / 4;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let copy_gbs = |dst: &mut [f32]| {
        let t = Instant::now();
        for _ in 0..COPIES_PER_HALF {
            common::copy(&src, dst, threads);
            black_box(&dst);
        }
        (2 * BYTES * COPIES_PER_HALF) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    // Warm-up of all three.
    copy_gbs(&mut dst);
    steps(&model, &mut cache);
    steps(&model16, &mut cache16);

    println!(
        "BENCH bound_setup threads={threads} weight_bytes={weight_bytes} context={} rounds={rounds} \
         steps_per_round={STEPS_PER_ROUND} copies_per_half={COPIES_PER_HALF}",
        cache.len()
    );
    let mut ratios = Vec::with_capacity(rounds);
    let mut speedups = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let before = copy_gbs(&mut dst);
        let step_s = steps(&model, &mut cache);
        let step16_s = steps(&model16, &mut cache16);
        let after = copy_gbs(&mut dst);
        let copy = (before + after) / 2.0;
        let bound = copy * 1e9 / weight_bytes as f64;
        let ratio = 1.0 / step_s / bound;
        ratios.push(ratio);
        speedups.push(step_s / step16_s);
        println!(
            "BENCH bound_round round={r} copy_gbs={copy:.2} copy_before={before:.2} \
             copy_after={after:.2} step_ms={:.3} tok_s={:.2} bound_tok_s={bound:.2} ratio={ratio:.4} \
             bf16_step_ms={:.3}",
            step_s * 1e3,
            1.0 / step_s,
            step16_s * 1e3
        );
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    println!(
        "BENCH bound_paired rounds={rounds} median_ratio={:.4} min_ratio={lo:.4} max_ratio={hi:.4}",
        median(&mut ratios)
    );
    println!(
        "BENCH bound_bf16 rounds={rounds} median_speedup={:.4}",
        median(&mut speedups)
    );
}
