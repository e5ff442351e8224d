//! The paged attention kernels against their Rust references on the CPU: decode
//! (`model::paged::paged_decode_attention`) and prefill
//! (`model::paged_prefill::paged_prefill_attention`) on the test device.
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

use candle_core::{DType, Device, Tensor};
use model::paged::{check_against_reference, paged_decode_attention, PagedDecode, RandomCase};
use model::paged_prefill::{paged_prefill_attention, PagedPrefill, PrefillCase};

/// The device the kernel runs on, from `TGA_TEST_DEVICE` (`cpu` when unset).
fn device() -> Device {
    let name = std::env::var("TGA_TEST_DEVICE").unwrap_or_default();
    match name.to_ascii_lowercase().as_str() {
        "" | "cpu" => Device::Cpu,
        #[cfg(feature = "cuda")]
        "cuda" => Device::new_cuda(0).unwrap_or_else(|e| panic!("opening CUDA device 0: {e}")),
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
