//! The decoder's fused path (`model::fused`: residual add + RMSNorm, RoPE from a table at
//! per-row positions) against its candle-op path, both on the device path (`set_device_ops`),
//! on the tiny llava_next fixture in f32 on the CPU, where the fused ops run their references
//! through the same decoder code as on CUDA: prefill logits and hidden-state taps (with a
//! state edit, which keeps the unfused residual add after its layer) and batched decode steps
//! of prompts of different lengths. The stacked projections (one product for q|k|v and one for
//! gate|up, silu·mul in one op) against separate ones, both on the fused path, likewise.
//!
//! Tolerance: 1e-5 absolute on f32 logits and hidden states. The two paths differ only in f32
//! rounding: the references' RMSNorm scale comes from an f64 sum of squares and their RoPE
//! fuses one product (`fma`), where candle's CPU kernels sum in f32 and round both products.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use model::llava::{LinearWeights, LlavaModel, LoadOptions};
use model::mistral::{EditMode, LayerTaps, StateEdit};

const TOL: f32 = 1e-5;

fn load(fused: bool, stacked: bool) -> LlavaModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next");
    let opts = LoadOptions {
        vision_tower: None,
        dtype: Some(DType::F32),
        linear_weights: LinearWeights::Compute,
    };
    let mut m = LlavaModel::load(&dir, &opts, &Device::Cpu).expect("loading tiny-llava-next");
    m.set_device_ops(true);
    m.set_fused_kernels(fused);
    m.set_stacked_projections(stacked);
    m
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Pseudo-random prompts of the given lengths.
fn prompts(lengths: &[usize], vocab: u64) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut x = 0x2545_f491_4f6c_dd1du64 ^ i as u64;
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect()
}

/// Per prompt: prefill logits, hidden-state taps, then the logits of 4 batched decode steps.
fn run(model: &LlavaModel, prompts: &[Vec<u32>]) -> Vec<(Tensor, Tensor, Vec<Tensor>)> {
    let dec = model.decoder();
    let hidden = dec.config().hidden_size;
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut out = Vec::new();
    let mut toks = Vec::new();
    for (p, cache) in prompts.iter().zip(caches.iter_mut()) {
        let n = p.len();
        let taps = LayerTaps {
            hidden_positions: vec![0, n / 2, n - 1],
            state_edits: vec![StateEdit {
                after_layer: 2,
                positions: std::iter::once(0..n.div_ceil(2)).collect(),
                vector: Tensor::full(0.25f32, hidden, &Device::Cpu).unwrap(),
                mode: EditMode::Add,
            }],
            ..Default::default()
        };
        let r = dec.prefill(&dec.embed(p).unwrap(), cache, &taps).unwrap();
        let logits = r.logits.i(0).unwrap();
        toks.push(logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        out.push((logits, r.taps.hidden.unwrap(), Vec::new()));
    }
    for _ in 0..4 {
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let l = model.decode_step(&toks, &mut refs).unwrap();
        for (b, t) in toks.iter_mut().enumerate() {
            let row = l.i(b).unwrap();
            *t = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            out[b].2.push(row);
        }
    }
    out
}

/// `got` against `want` on prompts of 1, 17, 40 and 300 tokens: prefill logits, hidden taps
/// and decode logits within `TOL`, greedy tokens equal; prints the largest differences.
fn assert_same_answers(got: &LlavaModel, want: &LlavaModel, what: &str) {
    let vocab = want.decoder().config().vocab_size as u64;
    let lengths = [1, 17, 40, 300];
    let ps = prompts(&lengths, vocab);
    let (got, want) = (run(got, &ps), run(want, &ps));
    let mut worst = [0f32; 3];
    for (i, ((gl, gh, gd), (wl, wh, wd))) in got.iter().zip(&want).enumerate() {
        let n = lengths[i];
        let d = [
            max_abs_diff(gl, wl),
            max_abs_diff(gh, wh),
            gd.iter()
                .zip(wd)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0f32, f32::max),
        ];
        for (j, &d) in d.iter().enumerate() {
            assert!(d <= TOL, "prompt of {n}: value {j} differs by {d}");
            worst[j] = worst[j].max(d);
        }
        for (s, (a, b)) in gd.iter().zip(wd).enumerate() {
            assert_eq!(
                a.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
                b.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
                "prompt of {n}: greedy token of step {s}"
            );
        }
    }
    eprintln!(
        "{what}: max |Δ| prefill logits {:.2e}, hidden taps {:.2e}, decode logits {:.2e} \
         (tolerance {TOL:e})",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn fused_path_equals_candle_ops_on_the_device_path() {
    assert_same_answers(
        &load(true, true),
        &load(false, true),
        "fused vs candle ops (device path, CPU, f32)",
    );
}

/// The stacked projections (q|k|v and gate|up each one product, then `rope_qkv` and `silu_mul`)
/// against separate projections with candle's silu·mul path, both fused, on the device path.
/// In f32 on the CPU the products are the same dot products (`cpu::linear` per output feature,
/// gemm for the 300-token prefill) and the silu differs only in `exp` (the CPU kernel's against
/// Rust's): within f32 rounding, held to the same tolerance.
#[test]
fn stacked_projections_equal_separate_ones_on_the_device_path() {
    assert_same_answers(
        &load(true, true),
        &load(true, false),
        "stacked vs separate projections (fused device path, CPU, f32)",
    );
}
