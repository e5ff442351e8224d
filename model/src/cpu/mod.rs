//! f32 CPU kernels for the hot paths where candle's generic ops lose most of the time
//! (bench/RESULTS.md, "Profile"): small-batch linear layers (decode), decode attention over each
//! sequence's KV cache, fused scale·mask·softmax for prefill and vision attention, and the fused
//! SwiGLU / QuickGELU activations.
//!
//! Every entry point takes candle tensors and returns `Ok(None)` unless they are f32 tensors on
//! the CPU in the layout it needs, so callers fall back to candle's ops (other dtypes, GPUs).
//! The one exception is the linear layers' weights, which may also be bf16 or f16: they are
//! widened to f32 in registers (exact), so the arithmetic is the f32 path's, on half the bytes.
//! The x86-64 paths are chosen at run time (AVX-512, AVX2+FMA, portable), so a portable build
//! still uses the machine's vector units.
//!
//! - `linear`: the small-batch linear layers (weights in f32, bf16 or f16);
//! - `attention`: decode attention over KV caches and the fused masked softmax;
//! - `activations`: fused SwiGLU / QuickGELU;
//! - `elementwise`: the vectorisable bodies (dot products, exp, softmax) compiled per ISA;
//! - `x86`: the AVX-512 and AVX2 intrinsics.

use std::sync::OnceLock;

use candle_core::{DType, Device, Layout, Storage, Tensor};

/// Instantiates `$body` (an `#[inline(always)]` fn) for AVX-512, AVX2+FMA and portable code and
/// defines `$name` that dispatches on [`isa`]. The bodies are plain Rust written so that LLVM
/// vectorises them (fixed-width accumulators, no reductions across lanes inside loops).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
            match isa() {
                // SAFETY: isa() detected these features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { v3($($arg),*) },
                Isa::Portable => $body($($arg),*),
            }
        }
    };
}

mod activations;
mod attention;
mod elementwise;
mod linear;

// Index loops over the register tile read more plainly than iterator chains.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86;

pub(crate) use activations::{quick_gelu, silu_mul};
pub(crate) use attention::{decode_attention, masked_softmax, CachedKv, KeyRange};
pub(crate) use elementwise::exp_sum;
pub(crate) use linear::{linear, linear_many};
use linear::{weight_slice, Weights};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// The best instruction set this CPU has, or a lower one named by `TGA_CPU_ISA` (`avx2`,
/// `portable`): CI runs the model tests once per level so every code path is checked.
fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("TGA_CPU_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            if cap != "portable" && cap != "avx2" && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if cap != "portable"
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Portable
    })
}

/// Runs `f` on the f32 elements of a contiguous f32 CPU tensor, in memory order.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    f32_slice(&storage, layout).map(f)
}

/// The elements of contiguous f32 CPU storage under `layout`.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match weight_slice(storage, layout)? {
        Weights::F32(v) => Some(v),
        _ => None,
    }
}

/// Runs `f` on a worker of rayon's global pool. From outside the pool, every parallel loop in `f`
/// (candle's matmuls, the kernels here: ~70 per decode step) would inject its work and park the
/// calling thread until it is done, two context switches each; on a worker the caller takes part.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// [`on_pool`] on the CPU; on another device `f` runs on the calling thread, so that all the work
/// of a forward on a GPU is issued from the one thread that owns the model (candle gives each host
/// thread its own CUDA stream, and nothing orders two threads' streams: a result read on one
/// thread could be read before another thread's kernels wrote it).
pub(crate) fn on_pool_for<R: Send>(
    device: &candle_core::Device,
    f: impl FnOnce() -> R + Send,
) -> R {
    if device.is_cpu() {
        on_pool(f)
    } else {
        f()
    }
}

/// Fixtures shared by the submodules' unit tests.
#[cfg(test)]
mod test_support {
    use candle_core::{Device, Tensor};

    use super::Isa;

    pub(super) fn rand(shape: &[usize], seed: u64) -> Tensor {
        // A small LCG keeps the test independent of candle's RNG.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    pub(super) fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}
