//! Sizing the paged KV cache in bytes (SERVING.md: memory is planned in bytes): from
//! `--kv-cache-memory`, or on CUDA from `--gpu-memory-utilization` (vLLM's meaning: the share of
//! the device the server may use, weights included), or on the CPU from a quarter of the RAM
//! available after loading, capped by what `max_num_seqs` full-context sequences can use.

use candle_core::{DType, Device};
use model::config::TextConfig;
use model::kv::KvPoolConfig;
use model::mistral::kv_bytes_per_block;

/// Share of the RAM available after loading that the CPU default takes.
pub const CPU_RAM_SHARE: f64 = 0.25;
/// Used when the available RAM cannot be read (vLLM's CPU default, `VLLM_CPU_KVCACHE_SPACE`).
pub const CPU_FALLBACK_BYTES: u64 = 4 << 30;

/// What the pool was sized from, for the start-up log.
#[derive(Debug, Clone, PartialEq)]
pub enum KvBudgetSource {
    Flag,
    GpuUtilization {
        utilization: f64,
        total: u64,
        in_use: u64,
        activation_reserve: u64,
    },
    CpuAvailable {
        available: u64,
    },
    CpuFallback,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvBudget {
    pub pool: KvPoolConfig,
    pub bytes_per_block: usize,
    pub source: KvBudgetSource,
    /// The budget before rounding down to whole blocks (and before the CPU cap).
    pub budget_bytes: u64,
}

impl KvBudget {
    /// The pool's storage: its blocks and the decoder's one scratch block, which the padding
    /// rows of a static decode step write (one block over the budget's count).
    pub fn bytes(&self) -> u64 {
        ((self.pool.num_blocks + 1) * self.bytes_per_block) as u64
    }
}

/// The settings the sizing needs.
#[derive(Debug, Clone, Copy)]
pub struct KvBudgetArgs {
    pub kv_cache_memory: Option<u64>,
    pub gpu_memory_utilization: f64,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub max_batch_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KvBudgetError {
    #[error(
        "the KV cache budget ({budget} bytes) holds no block of {block} bytes; raise \
         --kv-cache-memory or --gpu-memory-utilization"
    )]
    TooSmall { budget: u64, block: usize },
}

/// Sizes the pool for `cfg`'s decoder computing in `dtype` on `device`, after the weights are
/// loaded (so that on CUDA the memory in use is known).
pub fn plan(
    cfg: &TextConfig,
    dtype: DType,
    device: &Device,
    args: &KvBudgetArgs,
) -> Result<KvBudget, KvBudgetError> {
    let bytes_per_block = kv_bytes_per_block(cfg, dtype, args.block_size);
    let (budget, source) = match args.kv_cache_memory {
        Some(bytes) => (bytes, KvBudgetSource::Flag),
        None if device.is_cuda() => gpu_budget(cfg, args),
        None => {
            let (budget, source) = match mem_available() {
                Some(available) => (
                    (available as f64 * CPU_RAM_SHARE) as u64,
                    KvBudgetSource::CpuAvailable { available },
                ),
                None => (CPU_FALLBACK_BYTES, KvBudgetSource::CpuFallback),
            };
            // More than every sequence at full context is never used.
            let most = (args.max_num_seqs * args.max_model_len).div_ceil(args.block_size) as u64
                * bytes_per_block as u64;
            (budget.min(most), source)
        }
    };
    let num_blocks = (budget / bytes_per_block as u64) as usize;
    if num_blocks == 0 {
        return Err(KvBudgetError::TooSmall {
            budget,
            block: bytes_per_block,
        });
    }
    Ok(KvBudget {
        pool: KvPoolConfig {
            block_size: args.block_size,
            num_blocks,
        },
        bytes_per_block,
        source,
        budget_bytes: budget,
    })
}

/// `utilization × total − in use − activation reserve`. The reserve covers the activations of
/// one step of `max_batch_tokens` (the widest tensors: the MLP's intermediate rows, in f32) and
/// a margin for the vision tower; it is an estimate, not a profile of the forward.
fn gpu_budget(cfg: &TextConfig, args: &KvBudgetArgs) -> (u64, KvBudgetSource) {
    let Some((free, total)) = gpu_memory() else {
        tracing::warn!(
            "cannot read the GPU's memory: the KV cache gets 4 GiB; set --kv-cache-memory"
        );
        return (CPU_FALLBACK_BYTES, KvBudgetSource::CpuFallback);
    };
    let in_use = total - free;
    let activation_reserve = (1u64 << 30)
        + (args.max_batch_tokens * (3 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4) as u64;
    let allowed = (total as f64 * args.gpu_memory_utilization) as u64;
    let budget = allowed.saturating_sub(in_use + activation_reserve);
    (
        budget,
        KvBudgetSource::GpuUtilization {
            utilization: args.gpu_memory_utilization,
            total,
            in_use,
            activation_reserve,
        },
    )
}

/// Memory free for new allocations on `device`: the host's `MemAvailable` on the CPU, the
/// device's free memory on CUDA; `None` when it cannot be read.
pub fn available_memory(device: &Device) -> Option<u64> {
    match device.is_cuda() {
        true => gpu_memory().map(|(free, _)| free),
        false => mem_available(),
    }
}

#[cfg(feature = "cuda")]
fn gpu_memory() -> Option<(u64, u64)> {
    candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        .ok()
        .map(|(free, total)| (free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory() -> Option<(u64, u64)> {
    None
}

/// `MemAvailable` of /proc/meminfo, in bytes (Linux).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TextConfig {
        TextConfig {
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 512,
            sliding_window: None,
            tie_word_embeddings: false,
        }
    }

    fn args(memory: Option<u64>) -> KvBudgetArgs {
        KvBudgetArgs {
            kv_cache_memory: memory,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            max_num_seqs: 4,
            max_model_len: 512,
            max_batch_tokens: 256,
        }
    }

    #[test]
    fn a_given_budget_is_cut_into_whole_blocks() {
        // 2 layers · 2 (K, V) · 16 tokens · 2 heads · 16 dims · 4 bytes = 8 KiB per block.
        let plan = plan(&cfg(), DType::F32, &Device::Cpu, &args(Some(100 << 10))).unwrap();
        assert_eq!(plan.bytes_per_block, 8 << 10);
        assert_eq!(plan.pool.num_blocks, 12);
        assert_eq!(plan.source, KvBudgetSource::Flag);
        assert!(matches!(
            super::plan(&cfg(), DType::F32, &Device::Cpu, &args(Some(1000))),
            Err(KvBudgetError::TooSmall { .. })
        ));
    }

    #[test]
    fn the_cpu_default_never_exceeds_every_sequence_at_full_context() {
        let plan = plan(&cfg(), DType::F32, &Device::Cpu, &args(None)).unwrap();
        // 4 sequences · 512 tokens / 16 = 128 blocks at most.
        assert!(plan.pool.num_blocks <= 128, "{plan:?}");
        assert!(plan.pool.num_blocks > 0);
    }
}
