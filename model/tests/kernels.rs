//! The paged decode attention kernel (`model::paged::paged_decode_attention` on the test device)
//! against its Rust reference on the CPU.
//!
//! Environment: `TGA_TEST_DEVICE` = `cpu` (default: the op runs the reference itself, so this
//! checks the plumbing in CI) or `cuda` (device 0; needs `--features cuda`: the CUDA kernel).
//!
//! Tolerances (`model::paged::tolerance`): f32, `|kernel - reference| <= 1e-5 · (1 + |reference|)`
//! (f32 summation order: online softmax and split partitions against one pass). bf16 (inputs
//! rounded to bf16, the reference computed from the same rounded inputs in f32): the kernel's bf16
//! output within one bf16 rounding of the reference's f32 output, `<= 2^-8 · |reference| + 1e-5`.

use candle_core::{DType, Device, Tensor};
use model::paged::{check_against_reference, paged_decode_attention, PagedDecode, RandomCase};

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
