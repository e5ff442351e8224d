//! The paged decode attention kernel (`model::paged::paged_decode_attention` on the test device)
//! against its Rust reference on the CPU.
//!
//! Environment: `TGA_TEST_DEVICE` = `cpu` (default: the op runs the reference itself, so this
//! checks the plumbing in CI) or `cuda` (device 0; needs `--features cuda`: the CUDA kernel).
//!
//! Tolerances: f32, `|kernel - reference| <= 1e-5 · (1 + |reference|)` (f32 summation order:
//! online softmax and split partitions against one pass). bf16 (inputs rounded to bf16, the
//! reference computed from the same rounded inputs in f32): the kernel's bf16 output within one
//! bf16 rounding of the reference's f32 output, `<= 2^-8 · |reference| + 1e-5`.

use candle_core::{DType, Device, Tensor};
use model::paged::{paged_decode_attention, paged_decode_attention_reference, PagedDecode};
use rand::{rngs::StdRng, Rng, SeedableRng};

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

/// Max error of one batch: the kernel on `dev` against the reference on the CPU.
fn run(
    dev: &Device,
    lens: &[usize],
    bs: usize,
    s: &Shape,
    window: Option<usize>,
    dtype: DType,
) -> f64 {
    let mut rng = StdRng::seed_from_u64((lens.iter().sum::<usize>() * 31 + bs) as u64);
    let cpu = Device::Cpu;
    let (b, heads) = (lens.len(), s.kv_heads * s.groups);
    // Blocks handed out shuffled, so sequences interleave in the pool; u32::MAX past each length.
    let nb: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let max_blocks = nb.iter().copied().max().unwrap_or(1) + 2;
    let total = nb.iter().sum::<usize>() + 4;
    let mut blocks: Vec<u32> = (0..total as u32).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.random_range(0..=i));
    }
    let mut next = blocks.into_iter();
    let mut table = Vec::with_capacity(b * max_blocks);
    for &n in &nb {
        for i in 0..max_blocks {
            table.push(if i < n {
                next.next().expect("enough blocks")
            } else {
                u32::MAX
            });
        }
    }
    let slots = total * bs;
    let mut randn =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
    let q = Tensor::from_vec(randn(b * heads * s.hd), (b, heads, s.hd), &cpu).unwrap();
    let k = Tensor::from_vec(
        randn(slots * s.kv_heads * s.hd),
        (slots, s.kv_heads, s.hd),
        &cpu,
    )
    .unwrap();
    let v = Tensor::from_vec(
        randn(slots * s.kv_heads * s.hd),
        (slots, s.kv_heads, s.hd),
        &cpu,
    )
    .unwrap();
    let (q, k, v) = (
        q.to_dtype(dtype).unwrap(),
        k.to_dtype(dtype).unwrap(),
        v.to_dtype(dtype).unwrap(),
    );
    let tables = Tensor::from_vec(table, (b, max_blocks), &cpu).unwrap();
    let lens_t =
        Tensor::from_vec(lens.iter().map(|&l| l as u32).collect::<Vec<_>>(), b, &cpu).unwrap();
    let scale = 1.0 / (s.hd as f32).sqrt();

    // Reference in f32 from the (rounded) inputs widened to f32.
    let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let want = paged_decode_attention_reference(
        &qf,
        &PagedDecode {
            k_pool: &kf,
            v_pool: &vf,
            block_tables: &tables,
            lens: &lens_t,
            block_size: bs,
            window,
            scale,
        },
    )
    .unwrap();

    // The kernel, with q as a non-contiguous view (as the decoder's q after a transpose may be).
    let to = |t: &Tensor| t.to_device(dev).unwrap();
    let (qd, kd, vd, td, ld) = (to(&q), to(&k), to(&v), to(&tables), to(&lens_t));
    let qd = qd
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    let got = paged_decode_attention(
        &qd,
        &PagedDecode {
            k_pool: &kd,
            v_pool: &vd,
            block_tables: &td,
            lens: &ld,
            block_size: bs,
            window,
            scale,
        },
    )
    .unwrap_or_else(|e| panic!("kernel on {dev:?}: {e}"));
    assert_eq!(got.dtype(), dtype);
    assert_eq!(got.dims(), [b, heads, s.hd]);
    let got = got.to_device(&cpu).unwrap().to_dtype(DType::F32).unwrap();
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let mut max_err = 0f64;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let tol = match dtype {
            DType::BF16 => w.abs() / 256.0 + 1e-5,
            _ => 1e-5 * (1.0 + w.abs()),
        };
        let err = (g - w).abs();
        assert!(
            err <= tol,
            "{dtype:?} lens {lens:?} bs {bs} hd {} groups {} window {window:?}: [{i}] \
             kernel {g} reference {w} (err {err:e} > {tol:e})",
            s.hd,
            s.groups
        );
        max_err = max_err.max(err);
    }
    max_err
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
