//! The custom kernels against their Rust references on the CPU, on the test device: paged
//! decode attention (`model::paged::paged_decode_attention`), paged prefill attention
//! (`model::paged_prefill::paged_prefill_attention`), the fused add + RMSNorm and RoPE kernels
//! (`model::fused`), those also against the candle ops they replace (on the same device), and
//! the device sampler (`model::device_sampling`: ids equal but for a rounding at a boundary of
//! the kept mass, logprobs within 1e-4; see `check_against_reference`).
//!
//! Environment: `TGA_TEST_DEVICE` = `cpu` (default: the op runs the reference itself, so this
//! checks the plumbing in CI) or `cuda` (device 0; needs `--features cuda`: the CUDA kernel).
//!
//! Tolerances (`model::paged::tolerance`): f32, `|kernel - reference| <= 1e-5 · (1 + |reference|)`
//! (f32 summation order: online softmax and split partitions against one pass). bf16 (inputs
//! rounded to bf16, the reference computed from the same rounded inputs in f32): the kernel's bf16
//! output within one bf16 rounding of the reference's f32 output, `<= 2^-8 · |reference| + 1e-5`.
//! Prefill (`model::paged_prefill::tolerance`): the same, plus for bf16/f16 the tensor-core
//! kernel's rounding of the probabilities before P·V, `2^-8 · (Σ p·|v| / Σ p)`.
//!
//! Fused ops, bounds in units u = 2^-23 (f32) or 2^-7 (bf16) relative to each value:
//! - sums of `add_rms_norm`: bit-equal to candle's add everywhere;
//! - normed rows: on CUDA bit-equal to candle's `rms_norm` (the kernel repeats its reduction);
//!   on the CPU within `NORM_CANDLE_CPU_ULPS` (f32) or 2 u (bf16: candle's CPU kernel rounds
//!   three times) of it; against the reference (f64 scale) within `NORM_REFERENCE_ULPS` (f32)
//!   or 1 u (bf16), 0 on the CPU;
//! - RoPE: on CUDA bit-equal to candle's `rope` and to the reference; on the CPU (where the op
//!   is the reference) within `rope_tolerance` (2 u of the inputs' scale) of candle's CPU rope;
//!   `rope_qkv` of a stacked q|k|v (strided rows) bit-equal to `rope_qk`, v unchanged;
//! - silu·mul: on CUDA bit-equal to candle's `silu` then `mul` (the same arithmetic), within
//!   `silu_mul_reference_ulps` (8 u in f32, 2 u in bf16: CUDA's expf) of the reference; on the
//!   CPU (the op is the reference) bit-equal to candle's ops in f32, within
//!   `SILU_MUL_CANDLE_CPU_ULPS` (4 u) in bf16 (candle's CPU op rounds every step to bf16).

use candle_core::{DType, Device, Tensor};
use model::fused::{
    add_rms_norm, add_rms_norm_candle, max_diff, rope_qk, rope_table, rope_tolerance, silu_mul,
    silu_mul_candle, silu_mul_reference_ulps, uniform, unit_roundoff, NORM_CANDLE_CPU_ULPS,
    NORM_REFERENCE_ULPS, SILU_MUL_CANDLE_CPU_ULPS,
};
use model::paged::{check_against_reference, paged_decode_attention, PagedDecode, RandomCase};
use model::paged_prefill::{paged_prefill_attention, PagedPrefill, PrefillCase};

/// The device the kernel runs on, from `TGA_TEST_DEVICE` (`cpu` when unset).
fn device() -> Device {
    let name = std::env::var("TGA_TEST_DEVICE").unwrap_or_default();
    match name.to_ascii_lowercase().as_str() {
        "" | "cpu" => Device::Cpu,
        #[cfg(feature = "cuda")]
        "cuda" => {
            model::device::open_cuda(0).unwrap_or_else(|e| panic!("opening CUDA device 0: {e}"))
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => panic!(
            "TGA_TEST_DEVICE=cuda, but this test binary was built without CUDA support: \
             build it with `cargo test -p tga-model --features cuda --test kernels`"
        ),
        other => panic!("TGA_TEST_DEVICE={other:?}: expected `cpu` or `cuda`"),
    }
}

struct Shape {
    kv_heads: usize,
    groups: usize,
    hd: usize,
}

/// The 7B's attention (32 query heads over 8 KV heads, head_dim 128) and a small one.
const SHAPES: [Shape; 2] = [
    Shape {
        kv_heads: 8,
        groups: 4,
        hd: 128,
    },
    Shape {
        kv_heads: 2,
        groups: 2,
        hd: 8,
    },
];

const LENGTHS: [usize; 8] = [1, 15, 16, 17, 511, 512, 513, 3000];

/// Max error of one batch: the kernel on `dev` against the reference on the CPU (within
/// `model::paged::tolerance` everywhere, else the test fails).
fn run(
    dev: &Device,
    lens: &[usize],
    bs: usize,
    s: &Shape,
    window: Option<usize>,
    dtype: DType,
) -> f64 {
    let seed = (lens.iter().sum::<usize>() * 31 + bs) as u64;
    let case = RandomCase::new(seed, lens, bs, s.kv_heads, s.groups, s.hd).unwrap();
    check_against_reference(dev, &case, window, dtype).unwrap_or_else(|e| {
        panic!(
            "lens {lens:?} bs {bs} hd {} groups {} window {window:?}: {e}",
            s.hd, s.groups
        )
    })
}

/// The decoder's start-up check (`model::paged::self_check`) at the 7B's shape.
#[test]
fn self_check_passes() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16] {
        let e = model::paged::self_check(&dev, dtype, 8, 4, 128).unwrap();
        println!("device {dev:?} {dtype:?} self-check: max |diff| {e:.3e}");
    }
}

fn sweep(dtype: DType) {
    let dev = device();
    println!("device {dev:?}, dtype {dtype:?}");
    for s in &SHAPES {
        for window in [None, Some(100)] {
            for bs in [16, 5] {
                let mut max_err = 0f64;
                // Each length alone (batch 1: the most splits), then all of them in one batch.
                for &len in &LENGTHS {
                    max_err = max_err.max(run(&dev, &[len], bs, s, window, dtype));
                }
                max_err = max_err.max(run(&dev, &LENGTHS, bs, s, window, dtype));
                max_err = max_err.max(run(&dev, &[513, 1, 17, 16], bs, s, window, dtype));
                println!(
                    "  hd {:3} heads {:2}/{} window {window:?} block {bs:2}: max |diff| {max_err:.3e}",
                    s.hd,
                    s.kv_heads * s.groups,
                    s.kv_heads
                );
            }
        }
    }
}

#[test]
fn paged_decode_f32() {
    sweep(DType::F32);
}

#[test]
fn paged_decode_bf16() {
    sweep(DType::BF16);
}

/// Block size 1 and a window longer than the context (nothing hidden), small shape only.
#[test]
fn paged_decode_edge_blocks() {
    let dev = device();
    let s = &SHAPES[1];
    for dtype in [DType::F32, DType::BF16] {
        let e = run(&dev, &[1, 2, 40, 33], 1, s, None, dtype);
        let e = e.max(run(&dev, &[1, 2, 40, 33], 1, s, Some(5000), dtype));
        let e = e.max(run(&dev, &[600, 1], 1, s, Some(1), dtype));
        println!("device {dev:?} {dtype:?} block 1: max |diff| {e:.3e}");
    }
}

/// Kernel time at the 7B's shape in bf16 (decode, one layer): `--ignored` (on CUDA, for numbers).
#[test]
#[ignore]
fn paged_decode_timing() {
    let dev = device();
    let (kvh, heads, hd, bs) = (8usize, 32usize, 128usize, 16usize);
    for (b, len) in [
        (1usize, 512usize),
        (1, 3000),
        (8, 3000),
        (32, 1000),
        (64, 3000),
    ] {
        let nblk = len.div_ceil(bs);
        let slots = b * nblk * bs;
        let k = Tensor::ones((slots, kvh, hd), DType::BF16, &dev).unwrap();
        let v = k.clone();
        let table: Vec<u32> = (0..(b * nblk) as u32).collect();
        let tables = Tensor::from_vec(table, (b, nblk), &dev).unwrap();
        let lens = Tensor::from_vec(vec![len as u32; b], b, &dev).unwrap();
        let q = Tensor::ones((b, heads, hd), DType::BF16, &dev).unwrap();
        let args = PagedDecode {
            k_pool: &k,
            v_pool: &v,
            block_tables: &tables,
            lens: &lens,
            block_size: bs,
            window: None,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let iters = 100;
        for _ in 0..5 {
            paged_decode_attention(&q, &args).unwrap();
        }
        dev.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..iters {
            paged_decode_attention(&q, &args).unwrap();
        }
        dev.synchronize().unwrap();
        let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
        let bytes = (2 * b * len * kvh * hd * 2) as f64;
        println!(
            "B {b:3} len {len:5}: {us:8.1} µs per call, K+V {:.1} MB, {:.0} GB/s",
            bytes / 1e6,
            bytes / us / 1e3
        );
    }
}

/// One stream for all host threads (`model::device::open_cuda`): a result queued on one thread
/// and read on another, with no synchronisation between them, is read complete. Under candle's
/// default per-thread streams the reading thread's copy is not ordered after the other thread's
/// kernels (a 256 MB tensor written by 64 launches, ~10 ms of GPU work, is read part-done); on
/// the CPU the ops are synchronous and this only checks the arithmetic. 20 rounds.
#[test]
fn work_queued_on_one_thread_is_complete_when_another_reads_it() {
    let dev = device();
    const STEPS: usize = 64;
    let n = if dev.is_cuda() { 1 << 26 } else { 1 << 12 };
    for round in 0..20 {
        let d = dev.clone();
        let queued = std::thread::spawn(move || {
            let mut t = Tensor::zeros(n, DType::F32, &d).unwrap();
            for _ in 0..STEPS {
                t = (t + 1.0).unwrap();
            }
            t // handed over without a synchronisation
        })
        .join()
        .unwrap();
        let values = queued.to_vec1::<f32>().unwrap();
        let wrong = values.iter().filter(|&&x| x != STEPS as f32).count();
        assert_eq!(
            wrong, 0,
            "round {round}: {wrong} of {n} elements read before their last write"
        );
    }
}

/// Where an image prompt's time to first token goes (`--ignored`, for the GPU script): a random
/// model (`TGA_STAGES_MODEL`, default `llava-v1.6-mistral-7b` on CUDA, `tiny` on the CPU) in
/// the default dtype (bf16 on CUDA), one 672×672 image, each stage ended by a device
/// synchronisation so that its time is the device's: preprocessing (CPU), vision tower +
/// projector + anyres packing, input embeddings, the decoder's prefill in 2,048-position chunks
/// (the server's default on CUDA), then batch-1 decode steps at that context with the logits
/// read back, as the engine does; then decode steps at batch 1, 32 and 64 over 128-token
/// contexts (T2's shape), and each batch's draws on the host (logits copied back) against the
/// device sampler's. Medians of 5 runs after a warm-up; one `STAGES {json}` line.
#[test]
#[ignore]
fn image_prefill_stage_timing() {
    use model::llava::{ImageInput, LlavaModel, LoadOptions};
    use model::mistral::{LayerTaps, TapAccumulator};
    use std::time::Instant;

    let dev = device();
    let preset = std::env::var("TGA_STAGES_MODEL").unwrap_or_else(|_| {
        match dev.is_cuda() {
            true => "llava-v1.6-mistral-7b",
            false => "tiny",
        }
        .into()
    });
    let spec = model::random::RandomModelSpec::parse(&preset).unwrap();
    let mut model = LlavaModel::random(&spec, 0, &LoadOptions::default(), &dev).unwrap();
    // Room for the batched decode below: 64 sequences of 128 + 24 positions, and the image's.
    model
        .configure_kv_pool(model::kv::KvPoolConfig {
            block_size: 16,
            num_blocks: 64 * 10 + 2 * 200,
        })
        .unwrap();
    let (side, chunk, runs, steps) = (672u32, 2048usize, 5usize, 16usize);
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 13 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    });
    let image_tokens = model.image_token_count(side, side);
    // BOS, a few text tokens, the image, a few more: about the server's chat prompt.
    let (before, after) = (5usize, 12usize);
    let total = before + image_tokens + after;
    let ids: Vec<u32> = (0..total as u32).map(|i| 1 + i % 100).collect();
    let span = before..before + image_tokens;
    let sync = || dev.synchronize().unwrap();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;

    let mut stages: Vec<(&str, Vec<f64>)> = [
        "preprocess",
        "vision",
        "embed",
        "prefill",
        "first_token",
        "decode_step",
    ]
    .into_iter()
    .map(|s| (s, Vec::new()))
    .collect();
    let mut chunks_ms: Vec<Vec<f64>> = Vec::new();
    for run in 0..=runs {
        let warm = run == 0;
        let mut times = Vec::new();
        let t = Instant::now();
        let processed = model::image::preprocess(&img, model.preprocess_config()).unwrap();
        times.push(ms(t));
        let t = Instant::now();
        let pv = Tensor::from_vec(
            processed.pixel_values,
            (
                processed.n_views,
                3,
                processed.size.0 as usize,
                processed.size.1 as usize,
            ),
            &Device::Cpu,
        )
        .unwrap();
        let feats = model
            .encode_image(&ImageInput {
                pixel_values: pv,
                original_hw: processed.original_hw,
            })
            .unwrap();
        sync();
        times.push(ms(t));
        let t = Instant::now();
        let embeds = model.embed_prompt(&ids, &[(span.clone(), feats)]).unwrap();
        sync();
        times.push(ms(t));
        let t = Instant::now();
        let mut cache = model.new_cache();
        let taps = LayerTaps::default();
        let mut acc = TapAccumulator::new(&taps);
        let mut logits = None;
        let mut per_chunk = Vec::new();
        for c0 in (0..total).step_by(chunk) {
            let tc = Instant::now();
            let n = chunk.min(total - c0);
            let last = c0 + n == total;
            logits = model
                .decoder()
                .prefill_chunk(
                    &embeds.narrow(0, c0, n).unwrap(),
                    &mut cache,
                    &taps,
                    &mut acc,
                    last,
                )
                .unwrap();
            sync();
            per_chunk.push(ms(tc));
        }
        times.push(ms(t));
        let t = Instant::now();
        let row = logits
            .expect("the last chunk's logits")
            .to_vec2::<f32>()
            .unwrap();
        assert!(row[0].iter().all(|x| x.is_finite()), "non-finite logits");
        let first = model::sampling::argmax(&row[0]) as u32;
        times.push(ms(t));
        let mut step_ms = Vec::new();
        let mut next = first;
        for _ in 0..steps {
            let t = Instant::now();
            let l = model.decode_step(&[next], &mut [&mut cache]).unwrap();
            let l = l.to_vec2::<f32>().unwrap();
            next = model::sampling::argmax(&l[0]) as u32;
            step_ms.push(ms(t));
        }
        step_ms.sort_by(f64::total_cmp);
        times.push(step_ms[steps / 2]);
        if !warm {
            for ((_, v), x) in stages.iter_mut().zip(times) {
                v.push(x);
            }
            chunks_ms.push(per_chunk);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut json = serde_json::json!({
        "model": preset,
        "device": format!("{dev:?}"),
        "dtype": format!("{:?}", model.dtype()),
        "image": format!("{side}x{side}"),
        "image_tokens": image_tokens,
        "prompt_tokens": total,
        "chunk": chunk,
        "runs": runs,
    });
    for (name, v) in &stages {
        json[format!("{name}_ms")] = serde_json::json!(median(v));
        println!("{name:>12}: {:9.2} ms (median of {runs})", median(v));
    }
    let ttft: f64 = stages[..5].iter().map(|(_, v)| median(v)).sum();
    println!(
        "{:>12}: {ttft:9.2} ms (sum of the medians up to the first token)",
        "ttft"
    );
    let n_chunks = chunks_ms[0].len();
    let chunk_medians: Vec<f64> = (0..n_chunks)
        .map(|i| median(&chunks_ms.iter().map(|c| c[i]).collect::<Vec<_>>()))
        .collect();
    println!("prefill chunks: {chunk_medians:.2?} ms");
    json["ttft_ms"] = serde_json::json!(ttft);
    json["prefill_chunks_ms"] = serde_json::json!(chunk_medians);

    // Batched decode at a 128-token context (T2's prompts): the model's step, logits read back,
    // no engine or HTTP; median of 16 steps after 4 warm-up steps.
    let prompt: Vec<u32> = (0..128u32).map(|i| 1 + i % 100).collect();
    let embeds = model.embed_prompt(&prompt, &[]).unwrap();
    for b in [1usize, 32, 64] {
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        for cache in caches.iter_mut() {
            let taps = LayerTaps::default();
            let mut acc = TapAccumulator::new(&taps);
            model
                .decoder()
                .prefill_chunk(&embeds, cache, &taps, &mut acc, false)
                .unwrap();
        }
        let mut tokens = vec![7u32; b];
        let mut step_ms = Vec::new();
        for step in 0..20 {
            let t = Instant::now();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let logits = model.decode_step(&tokens, &mut refs).unwrap();
            let rows = logits.to_vec2::<f32>().unwrap();
            tokens = rows
                .iter()
                .map(|r| model::sampling::argmax(r) as u32)
                .collect();
            if step >= 4 {
                step_ms.push(ms(t));
            }
        }
        let m = median(&step_ms);
        println!("decode batch {b:2} at context 128: {m:8.2} ms per step");
        json[format!("decode_b{b}_step_ms")] = serde_json::json!(m);
        // The step's draws (temperature 1, top-p 0.9, 5 top logprobs) from its logits on the
        // device: copied to the host and drawn there in parallel, as the engine does without
        // device sampling; or drawn on the device (model::device_sampling). Median of 16.
        use rayon::prelude::*;
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let logits = model.decode_step(&tokens, &mut refs).unwrap();
        let specs = vec![
            model::sampling::DrawSpec {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
                min_p: 0.0,
                top_logprobs: 5,
                u: 0.5,
            };
            b
        ];
        let vocab = logits.dim(1).unwrap();
        let (mut host_ms, mut device_ms) = (Vec::new(), Vec::new());
        for _ in 0..17 {
            sync();
            let t = Instant::now();
            let rows = logits.to_vec2::<f32>().unwrap();
            let ids: Vec<u32> = rows
                .par_iter()
                .zip(&specs)
                .map(|(r, s)| {
                    let mut sampler = model::sampling::Sampler::new(Default::default());
                    sampler.sample_logits_with(r, s).unwrap().id
                })
                .collect();
            host_ms.push(ms(t));
            let t = Instant::now();
            let drawn = model::device_sampling::sample_rows(&logits, &specs, vocab).unwrap();
            device_ms.push(ms(t));
            assert_eq!(drawn.len(), ids.len());
        }
        let (h, d) = (median(&host_ms[1..]), median(&device_ms[1..]));
        println!("sampling batch {b:2}: host {h:8.3} ms, device {d:8.3} ms");
        json[format!("sample_host_b{b}_ms")] = serde_json::json!(h);
        json[format!("sample_device_b{b}_ms")] = serde_json::json!(d);
    }
    println!("STAGES {json}");
}

/// `add_rms_norm` on the test device for `rows` × `hidden` in `dtype` (inputs uniform in
/// [-2, 2), weight in [-1, 1)): (max |diff| from candle's ops on the device, from the reference).
fn fused_norm_case(dev: &Device, dtype: DType, rows: usize, hidden: usize) -> (f64, f64) {
    let seed = (rows * 7 + hidden) as u64;
    let on = |t: Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let x = on(uniform(seed, &[rows, hidden]).unwrap());
    let r = on(uniform(seed + 1, &[rows, hidden]).unwrap());
    let w = on((uniform(seed + 2, &[hidden]).unwrap() * 0.5).unwrap());
    let norm = candle_nn::RmsNorm::new(w.clone(), 1e-5);
    // Non-contiguous xs (a transposed copy transposed back), as a caller's may be.
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    let (s, n) = add_rms_norm(&xt, &r, &norm).unwrap();
    let (ws, wn) = add_rms_norm_candle(&x, &r, &norm).unwrap();
    let what = format!("{dtype:?} {rows}×{hidden}");
    max_diff(&s, &ws, &format!("{what} sum"), |_, _| 0.0).unwrap();
    let u = unit_roundoff(dtype);
    let ulps = match (dev.is_cuda(), dtype) {
        (true, _) => 0.0,
        (false, DType::F32) => NORM_CANDLE_CPU_ULPS,
        (false, _) => 2.0,
    };
    let vs_candle = max_diff(&n, &wn, &format!("{what} normed vs candle"), |_, w| {
        ulps * u * w.abs()
    })
    .unwrap();
    let cpu = Device::Cpu;
    let to_cpu = |t: &Tensor| t.to_device(&cpu).unwrap();
    let cpu_norm = candle_nn::RmsNorm::new(to_cpu(&w), 1e-5);
    let (rs, rn) = add_rms_norm(&to_cpu(&x), &to_cpu(&r), &cpu_norm).unwrap();
    max_diff(&s, &rs, &format!("{what} sum vs reference"), |_, _| 0.0).unwrap();
    let ulps = match (dev.is_cuda(), dtype) {
        (false, _) => 0.0,
        (true, DType::F32) => NORM_REFERENCE_ULPS,
        (true, _) => 1.0,
    };
    let vs_ref = max_diff(&n, &rn, &format!("{what} normed vs reference"), |_, w| {
        ulps * u * w.abs()
    })
    .unwrap();
    (vs_candle, vs_ref)
}

fn fused_norm_sweep(dtype: DType) {
    let dev = device();
    for hidden in [4096, 32, 100, 1000, 1024, 5120] {
        let (mut a, mut b) = (0f64, 0f64);
        for rows in [1, 3, 17, 2943] {
            let (x, y) = fused_norm_case(&dev, dtype, rows, hidden);
            (a, b) = (a.max(x), b.max(y));
        }
        println!(
            "device {dev:?} {dtype:?} add_rms_norm hidden {hidden:4}: max |diff| from candle \
             {a:.3e}, from the reference {b:.3e}"
        );
    }
}

#[test]
fn fused_add_rms_norm_f32() {
    fused_norm_sweep(DType::F32);
}

#[test]
fn fused_add_rms_norm_bf16() {
    fused_norm_sweep(DType::BF16);
}

/// `rope_qk` on the test device at `rows` random positions below 32,768 of the 7B's table
/// (θ = 10^6), against candle's rope on the device and against the reference on the CPU.
fn fused_rope_case(
    dev: &Device,
    dtype: DType,
    rows: usize,
    (heads, kv_heads, hd): (usize, usize, usize),
    table: &(Tensor, Tensor),
) -> (f64, f64) {
    let seed = (rows * 13 + heads + hd) as u64;
    let on = |t: Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let q = on(uniform(seed, &[rows, heads, hd]).unwrap());
    let k = on(uniform(seed + 1, &[rows, kv_heads, hd]).unwrap());
    let table_rows = table.0.dim(0).unwrap() as u64;
    let mut x = seed;
    let mut positions: Vec<u32> = (0..rows)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % table_rows) as u32
        })
        .collect();
    positions[0] = table_rows as u32 - 1;
    if rows > 1 {
        positions[1] = 0;
    }
    let vs_candle = model::fused::check_rope(&q, &k, (&table.0, &table.1), &positions)
        .unwrap_or_else(|e| panic!("{dtype:?} rows {rows} hd {hd}: {e}"));
    // q, k, v stacked per row (strided views): rope_qkv equals rope_qk, v carried unchanged.
    let v = on(uniform(seed + 2, &[rows, kv_heads, hd]).unwrap());
    model::fused::check_rope_qkv(&q, &k, &v, (&table.0, &table.1), &positions)
        .unwrap_or_else(|e| panic!("{dtype:?} rows {rows} hd {hd}: {e}"));
    let pos = Tensor::new(positions.as_slice(), dev).unwrap();
    let (gq, gk) = rope_qk(&q, &k, &table.0, &table.1, &pos).unwrap();
    let cpu = Device::Cpu;
    let c = |t: &Tensor| t.to_device(&cpu).unwrap();
    let (rq, rk) = rope_qk(&c(&q), &c(&k), &c(&table.0), &c(&table.1), &c(&pos)).unwrap();
    let what = format!("{dtype:?} rows {rows} hd {hd}");
    let a = max_diff(&gq, &rq, &format!("{what} q vs reference"), |_, _| 0.0).unwrap();
    let b = max_diff(&gk, &rk, &format!("{what} k vs reference"), |_, _| 0.0).unwrap();
    (vs_candle, a.max(b))
}

fn fused_rope_sweep(dtype: DType) {
    let dev = device();
    for shape in [(32, 8, 128), (4, 2, 64), (4, 2, 8)] {
        let table = rope_table(32_768, shape.2, 1e6, &dev, dtype).unwrap();
        let (mut a, mut b) = (0f64, 0f64);
        for rows in [1, 3, 17, 2943] {
            let (x, y) = fused_rope_case(&dev, dtype, rows, shape, &table);
            (a, b) = (a.max(x), b.max(y));
        }
        println!(
            "device {dev:?} {dtype:?} rope_qk heads {}/{} hd {:3}: max |diff| from candle {a:.3e} \
             (bound {:.1e}), from the reference {b:.3e}",
            shape.0,
            shape.1,
            shape.2,
            rope_tolerance(dtype, 2.0)
        );
        if dev.is_cuda() {
            assert_eq!(
                a, 0.0,
                "{dtype:?} {shape:?}: candle's CUDA rope is the same arithmetic"
            );
        }
    }
}

#[test]
fn fused_rope_f32() {
    fused_rope_sweep(DType::F32);
}

#[test]
fn fused_rope_bf16() {
    fused_rope_sweep(DType::BF16);
}

/// The decoder's start-up check of the fused ops at the 7B's shapes (hidden 4,096, 32/8 heads
/// of 128, its whole RoPE table).
#[test]
fn fused_self_check_passes() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16] {
        let w = (uniform(5, &[4096]).unwrap() * 0.5)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let table = rope_table(32_768, 128, 1e6, &dev, dtype).unwrap();
        let c = model::fused::self_check(&dev, dtype, &w, 1e-5, 32, 8, (&table.0, &table.1))
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        println!("device {dev:?} {dtype:?} fused self-check: {c:?}");
        if dev.is_cuda() {
            assert!(c.bit_equal(), "{dtype:?}: {c:?}");
        }
    }
}

/// Prompt chunks `(start, rows)` at both shapes: one row, the kernels' query and key tile edges
/// (16 / 32 / 64), block edges, rows after a cached prefix.
const CHUNKS: [(usize, usize); 10] = [
    (0, 1),
    (0, 15),
    (0, 16),
    (0, 17),
    (17, 1),
    (513, 16),
    (0, 511),
    (0, 512),
    (0, 513),
    (2048, 65),
];
/// Long chunks, at the small shape only (the reference's time at the 7B's grows as rows ×
/// keys): an image prompt's 3,000 rows, the second chunk of a 2,943-token prompt in chunks of
/// 2,048, and rows past a 4,096-token window.
const LONG_CHUNKS: [(usize, usize); 3] = [(0, 3000), (2048, 895), (4000, 200)];

/// Max error of one prefill chunk: the kernel on `dev` against the reference on the CPU.
#[allow(clippy::too_many_arguments)]
fn run_prefill(
    dev: &Device,
    (start, n): (usize, usize),
    bs: usize,
    s: &Shape,
    window: Option<usize>,
    dtype: DType,
    tensor_cores: bool,
) -> f64 {
    let seed = (start * 7919 + n * 31 + bs) as u64;
    let case = PrefillCase::new(seed, start, n, bs, s.kv_heads, s.groups, s.hd).unwrap();
    model::paged_prefill::check_against_reference(dev, &case, window, dtype, tensor_cores)
        .unwrap_or_else(|e| {
            panic!(
                "start {start} rows {n} bs {bs} hd {} groups {} window {window:?} tensor cores \
                 {tensor_cores}: {e}",
                s.hd, s.groups
            )
        })
}

/// The decoder's start-up check (`model::paged_prefill::self_check`) at the 7B's shape, for
/// both kernels.
#[test]
fn prefill_self_check_passes() {
    let dev = device();
    for (dtype, tc) in [
        (DType::F32, false),
        (DType::BF16, true),
        (DType::BF16, false),
    ] {
        let e = model::paged_prefill::self_check(&dev, dtype, 8, 4, 128, tc).unwrap();
        println!(
            "device {dev:?} {dtype:?} tensor cores {tc}: prefill self-check max |diff| {e:.3e}"
        );
    }
}

fn prefill_sweep(dtype: DType, tensor_cores: bool) {
    let dev = device();
    println!("device {dev:?}, dtype {dtype:?}, tensor cores {tensor_cores}");
    for (si, s) in SHAPES.iter().enumerate() {
        let long: &[(usize, usize)] = if si == 0 { &[] } else { &LONG_CHUNKS };
        for window in [None, Some(100), Some(4096)] {
            for bs in [16, 5] {
                let mut max_err = 0f64;
                for &chunk in CHUNKS.iter().chain(long) {
                    // On the CPU both sides are the reference: the 7B's shape only in short
                    // chunks, so that the plumbing check stays quick.
                    if dev.is_cpu() && si == 0 && chunk.0 + chunk.1 > 64 {
                        continue;
                    }
                    max_err =
                        max_err.max(run_prefill(&dev, chunk, bs, s, window, dtype, tensor_cores));
                }
                println!(
                    "  hd {:3} heads {:2}/{} window {window:?} block {bs:2}: max |diff| {max_err:.3e}",
                    s.hd,
                    s.kv_heads * s.groups,
                    s.kv_heads
                );
            }
        }
    }
}

#[test]
fn paged_prefill_f32() {
    prefill_sweep(DType::F32, false);
}

/// bf16 through the tensor-core kernel (the serving path).
#[test]
fn paged_prefill_bf16() {
    prefill_sweep(DType::BF16, true);
}

/// bf16 through the CUDA-core kernel (the tensor-core kernel's fallback).
#[test]
fn paged_prefill_bf16_cuda_cores() {
    prefill_sweep(DType::BF16, false);
}

/// f16 (both kernels), head_dim 64 (the tensor-core kernel's other instance), block size 1, a
/// window of 1, and a GQA group that does not divide the kernels' rows per block (3).
#[test]
fn paged_prefill_edge_cases() {
    let dev = device();
    let hd64 = Shape {
        kv_heads: 2,
        groups: 4,
        hd: 64,
    };
    let odd = Shape {
        kv_heads: 2,
        groups: 3,
        hd: 128,
    };
    let mut max_err = 0f64;
    for (dtype, tc) in [
        (DType::F16, true),
        (DType::F16, false),
        (DType::BF16, true),
        (DType::F32, false),
    ] {
        for s in [&SHAPES[0], &hd64, &odd] {
            for chunk in [(0, 1), (0, 33), (5, 70), (100, 29)] {
                for window in [None, Some(1), Some(40)] {
                    max_err = max_err.max(run_prefill(&dev, chunk, 16, s, window, dtype, tc));
                }
            }
        }
        for chunk in [(0, 1), (0, 40), (7, 33)] {
            for window in [None, Some(5)] {
                max_err = max_err.max(run_prefill(&dev, chunk, 1, &SHAPES[1], window, dtype, tc));
            }
        }
    }
    println!("device {dev:?} prefill edge cases: max |diff| {max_err:.3e}");
}

/// Pools that are views at an odd element offset (the tensor-core kernel's 16-byte copies need
/// 16-byte alignment: it falls back to plain loads) and a q with an offset give the very numbers
/// of fresh tensors, through both kernels.
#[test]
fn paged_prefill_offset_views() {
    let dev = device();
    let s = &SHAPES[0];
    let case = PrefillCase::new(9, 21, 50, 16, s.kv_heads, s.groups, s.hd).unwrap();
    let table = case.table.to_device(&dev).unwrap();
    // The same values 3 elements into a larger buffer, viewed as [slots, kv_heads, hd].
    let offset = |t: &Tensor| -> Tensor {
        let t = t.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let flat = t.flatten_all().unwrap();
        let pad = Tensor::zeros(3, DType::BF16, &dev).unwrap();
        Tensor::cat(&[&pad, &flat], 0)
            .unwrap()
            .narrow(0, 3, flat.dim(0).unwrap())
            .unwrap()
            .reshape(t.dims())
            .unwrap()
    };
    let fresh = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
    for tensor_cores in [true, false] {
        for window in [None, Some(30)] {
            let run = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let args = PagedPrefill {
                    k_pool: k,
                    v_pool: v,
                    block_table: &table,
                    start: case.start,
                    block_size: case.block_size,
                    window,
                    scale: 1.0 / (s.hd as f32).sqrt(),
                    tensor_cores,
                };
                paged_prefill_attention(q, &args)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let a = run(&fresh(&case.q), &fresh(&case.k), &fresh(&case.v));
            let b = run(&offset(&case.q), &offset(&case.k), &offset(&case.v));
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "tensor cores {tensor_cores} window {window:?}");
        }
    }
}

/// Prefill kernel time at the 7B's shape in bf16 (one layer), tensor cores and CUDA cores:
/// `--ignored` (on CUDA, for numbers). TFLOP/s counts the visible (causal) scores only, two
/// matmuls of 2 flops per multiply-add.
#[test]
#[ignore]
fn paged_prefill_timing() {
    let dev = device();
    let (kvh, heads, hd, bs) = (8usize, 32usize, 128usize, 16usize);
    for (start, n) in [(0usize, 2048usize), (2048, 895), (0, 2943), (0, 512)] {
        let total = start + n;
        let nblk = total.div_ceil(bs);
        let k = Tensor::randn(0f32, 1.0, (nblk * bs, kvh, hd), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (nblk * bs, kvh, hd), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let table: Vec<u32> = (0..nblk as u32).rev().collect();
        let table = Tensor::from_vec(table, nblk, &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (n, heads, hd), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let visible: usize = (start..total).map(|p| p + 1).sum();
        let flops = (4 * heads * hd * visible) as f64;
        for tensor_cores in [true, false] {
            let args = PagedPrefill {
                k_pool: &k,
                v_pool: &v,
                block_table: &table,
                start,
                block_size: bs,
                window: None,
                scale: 1.0 / (hd as f32).sqrt(),
                tensor_cores,
            };
            let iters = if dev.is_cpu() { 1 } else { 20 };
            for _ in 0..2 {
                paged_prefill_attention(&q, &args).unwrap();
            }
            dev.synchronize().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..iters {
                paged_prefill_attention(&q, &args).unwrap();
            }
            dev.synchronize().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            println!(
                "start {start:5} rows {n:5} tensor cores {tensor_cores:5}: {ms:8.3} ms per call, \
                 {:.1} TFLOP/s, ×32 layers {:.1} ms",
                flops / ms / 1e9,
                32.0 * ms
            );
        }
    }
}

/// `silu_mul` on the test device for `rows` × `inter` in `dtype` (gates and ups uniform in
/// [-8, 8)): (max |diff| from candle's `silu` then `mul` on the device, from the reference on
/// the CPU).
fn fused_silu_mul_case(dev: &Device, dtype: DType, rows: usize, inter: usize) -> (f64, f64) {
    let seed = (rows * 11 + inter) as u64;
    let gu = (uniform(seed, &[rows, 2 * inter]).unwrap() * 4.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let got = silu_mul(&gu).unwrap();
    let want = silu_mul_candle(&gu).unwrap();
    let what = format!("{dtype:?} {rows}×{inter}");
    let u = unit_roundoff(dtype);
    let ulps = match (dev.is_cuda(), dtype) {
        (true, _) | (false, DType::F32) => 0.0,
        (false, _) => SILU_MUL_CANDLE_CPU_ULPS,
    };
    let vs_candle = max_diff(&got, &want, &format!("{what} vs candle"), |_, w| {
        ulps * u * w.abs()
    })
    .unwrap();
    let reference = silu_mul(&gu.to_device(&Device::Cpu).unwrap()).unwrap();
    let ulps = match dev.is_cuda() {
        true => silu_mul_reference_ulps(dtype),
        false => 0.0,
    };
    let vs_ref = max_diff(&got, &reference, &format!("{what} vs reference"), |_, w| {
        ulps * u * w.abs()
    })
    .unwrap();
    (vs_candle, vs_ref)
}

fn fused_silu_mul_sweep(dtype: DType) {
    let dev = device();
    for inter in [14336, 1, 7, 100, 1000] {
        let (mut a, mut b) = (0f64, 0f64);
        for rows in [1, 3, 17, 2943] {
            // The 7B's widest case once (2,943 × 14,336: an image prompt's MLP).
            if rows == 2943 && inter != 14336 && inter != 7 {
                continue;
            }
            let (x, y) = fused_silu_mul_case(&dev, dtype, rows, inter);
            (a, b) = (a.max(x), b.max(y));
        }
        println!(
            "device {dev:?} {dtype:?} silu_mul inter {inter:5}: max |diff| from candle {a:.3e}, \
             from the reference {b:.3e}"
        );
    }
}

#[test]
fn fused_silu_mul_f32() {
    fused_silu_mul_sweep(DType::F32);
}

#[test]
fn fused_silu_mul_bf16() {
    fused_silu_mul_sweep(DType::BF16);
}

/// The decoder's start-up check of silu·mul at the 7B's intermediate size (on CUDA: bit-equal
/// to candle's ops).
#[test]
fn fused_silu_mul_self_check_passes() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16] {
        let d = model::fused::self_check_silu_mul(&dev, dtype, 14336)
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        println!("device {dev:?} {dtype:?} silu_mul self-check: max |diff| {d:.3e}");
        if dev.is_cuda() {
            assert_eq!(d, 0.0, "{dtype:?}");
        }
    }
}

/// The device sampler against its reference at awkward vocabulary sizes and the 7B's, in each
/// logits dtype (48 rows of greedy, temperature, top-k, top-p and min-p draws each).
#[test]
fn device_sampler_equals_its_reference() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for vocab in [1usize, 15, 16, 17, 511, 512, 513, 3000, 32064] {
            model::device_sampling::self_check(&dev, dtype, vocab)
                .unwrap_or_else(|e| panic!("{dtype:?}, vocab {vocab}: {e}"));
        }
    }
}

/// Decode steps through CUDA graphs (`DecodeGraphs::Captured`: each bucket captured at its
/// first step, its replay checked bit for bit against the eager static step, which must not
/// fail) against eager steps, f32: greedy tokens equal, logits within 1e-4 relative (the static
/// step pads the batch and widens the block tables, which changes cuBLAS's shapes and the paged
/// kernel's partitions). Three sequences of different lengths (bucket 4), then two (2), then one
/// (1); on CUDA all three buckets must hold a graph. On the CPU the static path, uncaptured.
#[test]
fn decode_graphs_equal_eager_steps() {
    use model::llava::{LlavaModel, LoadOptions};
    use model::mistral::DecodeGraphs;
    let dev = device();
    let spec = model::random::RandomModelSpec::parse("tiny").unwrap();
    let build = |mode| {
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            ..LoadOptions::default()
        };
        let mut m = LlavaModel::random(&spec, 0, &opts, &dev).unwrap();
        // The device path (the default off the CPU), which the static path needs.
        m.set_device_ops(true);
        m.set_decode_graphs(mode);
        m
    };
    let prompts: Vec<Vec<u32>> = [3u32, 9, 20]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 11 + 5) % 90).collect())
        .collect();
    let live = [3, 3, 3, 2, 2, 2, 1, 1, 1];
    let run = |model: &LlavaModel| {
        model
            .decoder()
            .greedy_trace(&prompts, &[4, 5, 6], &live)
            .unwrap()
    };
    let want = run(&build(DecodeGraphs::Off));
    let graphed = build(DecodeGraphs::Captured);
    let got = run(&graphed);
    let (mode, buckets) = graphed.decoder().decode_graphs();
    assert_eq!(
        buckets.iter().map(|b| b.0).collect::<Vec<_>>(),
        [1, 2, 4],
        "every step took the static path"
    );
    if dev.is_cuda() {
        assert_eq!(mode, DecodeGraphs::Captured, "a capture failed its check");
        assert!(buckets.iter().all(|b| b.1), "{buckets:?}");
    }
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            model::sampling::argmax(g),
            model::sampling::argmax(w),
            "greedy tokens"
        );
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs() / (1.0 + b.abs()));
        }
    }
    println!("graphs: {mode:?} {buckets:?}; logits max relative difference {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
}
