//! Prefill and batched decode on the bench-135m checkpoint (f32 on CPU), for bench/RESULTS.md.
//!
//! `tools/bench.sh` generates the checkpoint (bf16 on disk, widened to f32 at load) into
//! `bench/models/bench-135m` and runs this with `RAYON_NUM_THREADS`; `TGA_BENCH_MODEL` overrides the
//! directory. The workloads mirror `tools/bench_transformers.py`:
//! - prefill: the llava_next prompt layout `<s> [INST] <image×2340> \n text [/INST]` with the
//!   480×640 (h×w) fixture image, anyres, 2373 tokens in all. Timed: vision tower + projector +
//!   anyres packing + decoder over all 2373 positions, logits of the last one (what one serving
//!   prefill does). Image decoding and preprocessing are not timed (printed once for reference).
//! - decode: one batched step of B = 1, 4, 16 sequences of different lengths (200..455 tokens of
//!   context) through [`LlavaModel::decode_step`]; throughput counts B tokens per step. Every
//!   iteration starts from the same caches, so the context does not grow while measuring.
//! - decode_bf16_weights: the same steps with the linear weights kept in bf16 (`--weights
//!   checkpoint`; f32 arithmetic, identical results).
//!
//! Besides criterion's report, lines starting `BENCH ` give a per-part breakdown for bench.sh.

mod common;

use std::cell::RefCell;
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use model::image::{decode_image, preprocess, ImageLimits};
use model::llava::{ImageInput, LinearWeights, LlavaModel};
use model::mistral::{KvCache, LayerTaps};
use model::tokenizer::Tokenizer;

/// The prompt length of the benchmark (2340 image tokens for 480×640 + 33 text tokens).
const PREFILL_TOKENS: usize = 2373;
const IMAGE: &str = "landscape_480x640.png";
const DECODE_BATCHES: [usize; 3] = [1, 4, 16];

/// `<s> [INST] <image span> \n filler… [/INST]` with the filler cut so the prompt has exactly
/// `PREFILL_TOKENS` ids; returns the ids and the image span.
fn prefill_prompt(
    model: &LlavaModel,
    tok: &Tokenizer,
    image_tokens: usize,
) -> (Vec<u32>, Range<usize>) {
    let image_id = model
        .config()
        .image_token_index
        .expect("llava_next has an image token");
    let mut ids = tok.encode("[INST]", true).expect("encode");
    let span = ids.len()..ids.len() + image_tokens;
    ids.extend(std::iter::repeat_n(image_id, image_tokens));
    let tail = tok.encode(" [/INST]", false).expect("encode");
    let text =
        "\nDescribe this image in detail: every object, its colour and position, the light, \
                the weather and the overall mood of the scene, and anything unusual in it.";
    let filler = tok.encode(text, false).expect("encode");
    let need = PREFILL_TOKENS
        .checked_sub(ids.len() + tail.len())
        .expect("prompt shorter than its image span");
    assert!(
        filler.len() >= need,
        "filler text too short: {} < {need}",
        filler.len()
    );
    ids.extend_from_slice(&filler[..need]);
    ids.extend_from_slice(&tail);
    assert_eq!(ids.len(), PREFILL_TOKENS);
    (ids, span)
}

fn prefill(c: &mut Criterion) {
    let (model, tok) = common::load();
    let bytes = std::fs::read(common::image_path(IMAGE)).expect("fixture image");
    let t = Instant::now();
    let img = decode_image(&bytes, &ImageLimits::default()).expect("decode");
    let p = preprocess(&img, model.preprocess_config()).expect("preprocess");
    println!("BENCH preprocess_ms={:.1}", t.elapsed().as_secs_f64() * 1e3);
    let (h, w) = p.original_hw;
    assert_eq!((h, w), (480, 640));
    let image_tokens = model.image_token_count(h, w);
    let (vh, vw) = p.size;
    let input = ImageInput {
        pixel_values: Tensor::from_vec(
            p.pixel_values,
            (p.n_views, 3, vh as usize, vw as usize),
            &Device::Cpu,
        )
        .expect("pixel tensor"),
        original_hw: (h, w),
    };
    let (ids, span) = prefill_prompt(&model, &tok, image_tokens);
    println!(
        "BENCH prefill_tokens={} image_tokens={image_tokens} views={}",
        ids.len(),
        p.n_views
    );

    // (vision, decoder) seconds of every timed run, for the breakdown.
    let parts: RefCell<Vec<(f64, f64)>> = RefCell::new(Vec::new());
    let mut g = c.benchmark_group("prefill");
    // One run takes seconds: criterion's minimum of 10 samples of one iteration each.
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function(format!("image_480x640_{}tok", ids.len()), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                let feats = model.encode_image(&input).expect("encode_image");
                let t1 = Instant::now();
                let mut cache = model.new_cache();
                let out = model
                    .prefill(
                        &ids,
                        &[(span.clone(), feats)],
                        &mut cache,
                        &LayerTaps::default(),
                    )
                    .expect("prefill");
                std::hint::black_box(out.logits);
                let t2 = Instant::now();
                parts
                    .borrow_mut()
                    .push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()));
                total += t2 - t0;
            }
            total
        })
    });
    g.finish();
    let parts = parts.into_inner();
    let n = parts.len() as f64;
    let vision = parts.iter().map(|p| p.0).sum::<f64>() / n;
    let decoder = parts.iter().map(|p| p.1).sum::<f64>() / n;
    println!(
        "BENCH prefill_breakdown runs={} vision_ms={:.1} decoder_ms={:.1} decoder_tok_s={:.1}",
        parts.len(),
        vision * 1e3,
        decoder * 1e3,
        ids.len() as f64 / decoder
    );
}

fn decode(c: &mut Criterion) {
    decode_with(c, "decode", LinearWeights::Compute);
}

/// The same steps with the checkpoint's bf16 linear weights kept in bf16 (`--weights checkpoint`).
fn decode_bf16_weights(c: &mut Criterion) {
    decode_with(c, "decode_bf16_weights", LinearWeights::Checkpoint);
}

fn decode_with(c: &mut Criterion, group: &str, linear_weights: LinearWeights) {
    let (model, _) = common::load_with(linear_weights);
    let max_b = *DECODE_BATCHES.iter().max().expect("batches");
    let vocab = model.config().text.vocab_size as u32;
    let t = Instant::now();
    let mut caches: Vec<KvCache> = (0..max_b)
        .map(|i| {
            let ids = common::context_ids(i, vocab);
            let mut cache = model.new_cache();
            model
                .prefill(&ids, &[], &mut cache, &LayerTaps::default())
                .expect("context prefill");
            cache
        })
        .collect();
    // One step first: the cache buffers grow once past the prompt (a copy), as in serving; the
    // measured steps then append in place.
    let first: Vec<u32> = (0..max_b as u32).map(|b| 100 + b).collect();
    {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        model.decode_step(&first, &mut refs).expect("decode step");
    }
    println!(
        "BENCH decode_contexts={:?} setup_s={:.1}",
        caches.iter().map(|c| c.len()).collect::<Vec<_>>(),
        t.elapsed().as_secs_f64()
    );

    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for &b in &DECODE_BATCHES {
        let tokens: Vec<u32> = (0..b as u32).map(|i| 200 + i).collect();
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(format!("batch_{b}"), |bench| {
            // Each step is rolled back (its blocks stay), so every iteration sees the same
            // contexts.
            bench.iter(|| {
                let lens: Vec<usize> = caches[..b].iter().map(|c| c.len()).collect();
                let mut refs: Vec<&mut KvCache> = caches[..b].iter_mut().collect();
                let out = model.decode_step(&tokens, &mut refs).expect("decode step");
                for (c, len) in caches[..b].iter_mut().zip(lens) {
                    c.truncate(len);
                }
                out
            })
        });
    }
    g.finish();
}

criterion_group!(benches, prefill, decode, decode_bf16_weights);
criterion_main!(benches);
