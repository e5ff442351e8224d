//! LLaVA-Mistral on candle, with layer taps for the safety diagnostics. No HTTP, no async.
//!
//! - `config`: the three checkpoint variants' configs, unified into [`config::LlavaConfig`].
//! - `weights`: sharded, memory-mapped safetensors with name mapping and shape validation.
//! - `image`: decoding with limits, PIL-exact resizing, pad / anyres preprocessing, token counts.
//! - `tokenizer`, `sentencepiece`, `template`: tokenizers, SentencePiece `.model` files, chat templates.
//! - `device`: CUDA set-up candle leaves at the driver's defaults: one stream for all work, no
//!   per-allocation events, the memory pool's threshold.
//! - `cpu`: f32 CPU kernels (small-batch linear, decode attention, fused softmax/activations).
//! - `clip`, `mistral`, `llava`: vision tower, decoder with [`mistral::LayerTaps`] (and decode steps
//!   as CUDA graphs per batch bucket, [`mistral::DecodeGraphs`]), the assembled model.
//! - `random`: random-weight models of any LLaVA-NeXT shape (presets: the 7B, a tiny one), built
//!   through the loader's construction path.
//! - `kv`: the paged KV cache's block allocator, block tables and prefix hashes (the storage is the
//!   decoder's).
//! - `paged`: paged decode attention over that storage, a CUDA kernel (one launch per layer) and
//!   its Rust reference.
//! - `fused`: residual add + RMSNorm, RoPE of q and k (v carried along) and silu·mul, one CUDA
//!   launch each (the decoder's device path), with Rust references.
//! - `paged_prefill`: paged prefill attention of a prompt chunk over that storage, a CUDA kernel
//!   (flash-attention style, one launch per layer) and its Rust reference; `kernel_io`: what the
//!   two attention references share.
//! - `sampling`: logits to tokens (greedy, temperature, top-k/top-p, seeds, logprobs, stops);
//!   `device_sampling`: the same draws on the device for a decode step's rows (a CUDA kernel and
//!   its Rust reference), so only ids and logprobs cross to the host.
//! - `diagnostics`: the DIAGNOSTICS.md math (logit lens, refusal sets, attention shares, cosines).
//! - `clip_embed`: [`clip_embed::ClipEmbedder`], CLIP text and image embeddings of a full `CLIPModel`.
//! - `retrieval`: the TGA caption corpus, its memory-mapped f16 embedding index, exact cosine search.

pub mod error;
pub use error::{ModelError, Result};

pub mod clip;
pub mod clip_embed;
pub mod config;
pub mod constraint;
mod cpu;
pub mod device;
pub mod device_sampling;
pub mod diagnostics;
pub mod fused;
pub mod image;
mod kernel_io;
pub mod kv;
pub mod llava;
pub mod mistral;
pub mod paged;
pub mod paged_prefill;
pub mod random;
pub mod retrieval;
pub mod sampling;
pub mod sentencepiece;
pub mod template;
pub mod tokenizer;
pub mod weights;
