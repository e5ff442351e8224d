//! The assembled LLaVA-Mistral model: vision tower → projector (→ anyres packing) → decoder.
//!
//! Image features are spliced into the token embeddings at the prompt's image spans (HF expands
//! `<image>` to that many tokens, the original code splices at the placeholder: both give the same
//! embedding sequence), then the decoder runs as for text.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::clip::{Projector, VisionTower};
use crate::config::{
    read_json, resolve_vision_tower_dir, CheckpointFormat, FeatureSelect, LlavaConfig,
};
use crate::error::{ModelError, Result};
use crate::image::{AspectMode, PreprocessConfig, UnpadRounding};
use crate::mistral::{Decoder, KvCache, LayerTaps, PrefillOutput};
use crate::weights::Checkpoint;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// CLIP directory for original-format checkpoints (`--vision-tower`).
    pub vision_tower: Option<PathBuf>,
    /// Compute dtype; default f32 on CPU (bf16/f16 weights are widened once at load) and bf16
    /// elsewhere.
    pub dtype: Option<DType>,
    /// How the decoder's linear weights are stored (the other weights: in the compute dtype).
    pub linear_weights: LinearWeights,
}

/// The storage dtype of the decoder's linear weights (q/k/v/o, gate/up/down, an untied
/// `lm_head`: nearly all of a Mistral's parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LinearWeights {
    /// In the compute dtype (converted at load).
    #[default]
    Compute,
    /// As the checkpoint stores them when that is bf16 or f16 and computing in f32 on the CPU:
    /// the CPU kernels widen them to f32 in registers, so every result is the f32 path's, from
    /// half the memory and (decode streams the weights) nearly twice the decode speed. Otherwise
    /// as `Compute`.
    Checkpoint,
    /// In this dtype (bf16 or f16, f32 compute on the CPU): rounds f32 checkpoints' weights.
    Dtype(DType),
}

/// The dtype the decoder's linear weights are stored in, from the options and the dtype the
/// checkpoint stores them in (`stored`: `q_proj` of layer 0 speaks for all).
pub(crate) fn linear_dtype(
    stored: Option<DType>,
    choice: LinearWeights,
    compute: DType,
    device: &Device,
) -> Result<DType> {
    let wanted = match choice {
        LinearWeights::Compute => return Ok(compute),
        LinearWeights::Checkpoint => match stored {
            Some(d @ (DType::BF16 | DType::F16)) if compute == DType::F32 && device.is_cpu() => d,
            _ => return Ok(compute),
        },
        LinearWeights::Dtype(d) => d,
    };
    if wanted == compute {
        return Ok(compute);
    }
    if !device.is_cpu() || compute != DType::F32 || !matches!(wanted, DType::BF16 | DType::F16) {
        return Err(ModelError::InvalidInput(format!(
            "linear weights in {wanted:?} with {compute:?} compute: only bf16 or f16 weights under \
             f32 compute on the CPU are supported (on a GPU, choose the compute dtype instead)"
        )));
    }
    Ok(wanted)
}

/// The compute dtype: the option, else f32 on the CPU (bf16/f16 weights are widened once at
/// load) and bf16 elsewhere.
pub(crate) fn default_dtype(opts: &LoadOptions, device: &Device) -> DType {
    opts.dtype.unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    })
}

/// One image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// [views, 3, S, S] f32 pixel values (anyres: base view first, then tiles row-major).
    pub pixel_values: Tensor,
    /// Original (height, width), for anyres unpadding.
    pub original_hw: (u32, u32),
}

pub struct LlavaModel {
    config: LlavaConfig,
    preprocess: PreprocessConfig,
    vision: VisionTower,
    projector: Projector,
    image_newline: Option<Tensor>,
    decoder: Decoder,
    device: Device,
    dtype: DType,
}

pub(crate) const VISION: &str = "vision_tower.vision_model";

impl LlavaModel {
    pub fn load(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let config = LlavaConfig::from_dir(dir, opts.vision_tower.as_deref())?;
        let vision_dir = match config.format {
            CheckpointFormat::Original => resolve_vision_tower_dir(
                dir,
                config.mm_vision_tower.as_deref(),
                opts.vision_tower.as_deref(),
            ),
            _ => opts.vision_tower.clone(),
        };
        let preprocess = preprocess_config(dir, &config, vision_dir.as_deref())?;
        let ckpt = Checkpoint::open(dir, config.format, vision_dir.as_deref())?;
        if !ckpt.contains(&format!("{VISION}.embeddings.class_embedding")) {
            return Err(ModelError::VisionTowerNeeded(format!(
                "{} holds no vision-tower weights{}; pass --vision-tower DIR (a CLIP vision model directory{})",
                dir.display(),
                match (&vision_dir, &config.mm_vision_tower) {
                    (Some(vd), _) => format!(" and neither does {}", vd.display()),
                    (None, Some(id)) => format!(" and mm_vision_tower {id:?} is not a local directory"),
                    (None, None) => String::new(),
                },
                config
                    .mm_vision_tower
                    .as_deref()
                    .map(|id| format!(", e.g. a local copy of {id}"))
                    .unwrap_or_default()
            )));
        }
        let dtype = default_dtype(opts, device);
        let stored = ckpt.dtype_of("language_model.model.layers.0.self_attn.q_proj.weight");
        let linear = linear_dtype(stored, opts.linear_weights, dtype, device)?;
        let vb = ckpt.var_builder(dtype, device);
        for i in config.vision_layers_needed()..config.vision.num_hidden_layers {
            ckpt.allow_unused(format!("{VISION}.encoder.layers.{i}."));
        }
        ckpt.allow_unused(format!("{VISION}.post_layernorm."));
        let model = Self::build(config, preprocess, vb, linear).map_err(|e| ckpt.explain(e))?;
        ckpt.check_all_used()?;
        tracing::info!(
            format = ?model.config.format,
            layers = model.config.text.num_hidden_layers,
            hidden = model.config.text.hidden_size,
            ?dtype,
            linear_weights = ?linear,
            "model loaded from {}",
            dir.display()
        );
        Ok(model)
    }

    /// The model's modules from `vb` (rooted at the canonical names, in its dtype and device):
    /// the one construction path of checkpoints and random weights. CLIP layers past the
    /// feature layer and `post_layernorm` are never read.
    pub(crate) fn build(
        config: LlavaConfig,
        preprocess: PreprocessConfig,
        vb: VarBuilder,
        linear: DType,
    ) -> candle_core::Result<Self> {
        let vision =
            VisionTower::new(&config.vision, config.vision_layers_needed(), vb.pp(VISION))?;
        let projector = Projector::new(
            config.vision.hidden_size,
            config.text.hidden_size,
            vb.pp("multi_modal_projector"),
        )?;
        let image_newline = match preprocess.aspect {
            AspectMode::Anyres { .. } => Some(vb.get(config.text.hidden_size, "image_newline")?),
            _ => None,
        };
        let decoder = Decoder::new(&config.text, vb.pp("language_model"), linear)?;
        Ok(Self {
            config,
            preprocess,
            vision,
            projector,
            image_newline,
            decoder,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }
    /// How this checkpoint's images are preprocessed (and, for anyres, packed).
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }
    /// Image tokens an image of this size occupies in the prompt.
    pub fn image_token_count(&self, height: u32, width: u32) -> usize {
        let side = self.config.vision.patches_per_side();
        let base = crate::image::image_token_count(height, width, &self.preprocess, side);
        match self.config.feature_select {
            FeatureSelect::Patch => base,
            // CLS kept: one more token per view (flat layouts only; anyres checks it).
            FeatureSelect::Full => base + 1,
        }
    }
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }

    /// The decoder's device path on or off (see [`Decoder::set_device_ops`]).
    pub fn set_device_ops(&mut self, on: bool) {
        self.decoder.set_device_ops(on)
    }

    /// The decoder's fused kernels on or off (see [`Decoder::set_fused_kernels`]).
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.decoder.set_fused_kernels(on)
    }

    /// The paged prefill op forced on the device path (see [`Decoder::force_prefill_kernel`]).
    pub fn force_prefill_kernel(&mut self, on: bool) {
        self.decoder.force_prefill_kernel(on)
    }

    /// The decoder's stacked projections on or off (see [`Decoder::set_stacked_projections`]).
    pub fn set_stacked_projections(&mut self, on: bool) {
        self.decoder.set_stacked_projections(on)
    }

    /// Sizes the decoder's paged KV pool (see [`Decoder::configure_kv_pool`]).
    pub fn configure_kv_pool(&mut self, config: crate::kv::KvPoolConfig) -> Result<()> {
        self.decoder.configure_kv_pool(config)
    }

    /// See [`crate::mistral::Decoder::set_decode_graphs`].
    pub fn set_decode_graphs(&mut self, mode: crate::mistral::DecodeGraphs) {
        self.decoder.set_decode_graphs(mode)
    }

    /// Image tokens for one image: projector output, anyres-packed with newlines [T, hidden].
    pub fn encode_image(&self, image: &ImageInput) -> Result<Tensor> {
        let pv = image
            .pixel_values
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let (views, _, _, _) = pv.dims4()?;
        let feats = self.vision.forward(&pv)?;
        let feats = match self.config.feature_select {
            FeatureSelect::Patch => feats.narrow(1, 1, feats.dim(1)? - 1)?,
            FeatureSelect::Full => feats,
        };
        let feats = self.projector.forward(&feats)?; // [views, P, H]
        match &self.preprocess.aspect {
            AspectMode::Anyres { pinpoints, unpad } => {
                self.pack_anyres(&feats, views, image.original_hw, pinpoints, *unpad)
            }
            _ => {
                if views != 1 {
                    return Err(ModelError::InvalidInput(format!(
                        "expected one view per image, got {views}"
                    )));
                }
                Ok(feats.squeeze(0)?)
            }
        }
    }

    /// transformers' `LlavaNextModel.pack_image_features`: base view tokens, then the tiles
    /// stitched into one grid, unpadded to the original aspect, with `image_newline` after each row.
    fn pack_anyres(
        &self,
        feats: &Tensor,
        views: usize,
        (orig_h, orig_w): (u32, u32),
        pinpoints: &[(u32, u32)],
        unpad: UnpadRounding,
    ) -> Result<Tensor> {
        let side = self.config.vision.patches_per_side();
        let tile = self.config.vision.image_size as u32;
        let (best_h, best_w) = crate::image::select_best_resolution(orig_h, orig_w, pinpoints);
        let (rows, cols) = ((best_h / tile) as usize, (best_w / tile) as usize);
        if views != 1 + rows * cols {
            return Err(ModelError::InvalidInput(format!(
                "anyres image {orig_h}x{orig_w} needs {} views, got {views}",
                1 + rows * cols
            )));
        }
        let c = feats.dim(2)?;
        if feats.dim(1)? != side * side {
            return Err(ModelError::InvalidInput(
                "anyres packing needs CLS-free patch features".into(),
            ));
        }
        let base = feats.get(0)?;
        let grid = feats
            .narrow(0, 1, rows * cols)?
            .reshape((rows, cols, side, side, c))?
            .permute((4, 0, 2, 1, 3))? // [C, rows, side, cols, side]
            .reshape((c, rows * side, cols * side))?;
        let (cur_h, cur_w) = (rows * side, cols * side);
        let (new_h, new_w) = crate::image::unpadded_feature_shape_with(
            orig_h,
            orig_w,
            cur_h as u32,
            cur_w as u32,
            unpad,
        );
        let (new_h, new_w) = (new_h as usize, new_w as usize);
        let grid =
            grid.narrow(1, (cur_h - new_h) / 2, new_h)?
                .narrow(2, (cur_w - new_w) / 2, new_w)?;
        let newline = self
            .image_newline
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("anyres model without image_newline".into()))?
            .reshape((c, 1, 1))?
            .broadcast_as((c, new_h, 1))?;
        let grid = Tensor::cat(&[&grid, &newline], 2)? // [C, new_h, new_w + 1]
            .reshape((c, new_h * (new_w + 1)))?
            .t()?;
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }

    /// Input embeddings [ids.len(), hidden]: token embeddings with each image's features written
    /// over its span (the ids under a span are ignored).
    pub fn embed_prompt(&self, ids: &[u32], images: &[(Range<usize>, Tensor)]) -> Result<Tensor> {
        let mut spans: Vec<&(Range<usize>, Tensor)> = images.iter().collect();
        spans.sort_by_key(|(r, _)| r.start);
        let mut parts = Vec::with_capacity(2 * spans.len() + 1);
        let mut at = 0;
        for (r, feats) in spans {
            if r.start < at || r.end > ids.len() {
                return Err(ModelError::InvalidInput(format!(
                    "image span {r:?} overlaps another or lies outside the prompt ({} tokens)",
                    ids.len()
                )));
            }
            let rows = feats.dim(0)?;
            if rows != r.len() {
                return Err(ModelError::InvalidInput(format!(
                    "image span {r:?} has {} positions for {rows} image tokens",
                    r.len()
                )));
            }
            if r.start > at {
                parts.push(self.decoder.embed(&ids[at..r.start])?);
            }
            parts.push(feats.to_dtype(self.dtype)?);
            at = r.end;
        }
        if at < ids.len() {
            parts.push(self.decoder.embed(&ids[at..])?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Prefill a prompt (with images already encoded by [`Self::encode_image`]).
    pub fn prefill(
        &self,
        ids: &[u32],
        images: &[(Range<usize>, Tensor)],
        cache: &mut KvCache,
        taps: &LayerTaps,
    ) -> Result<PrefillOutput> {
        let embeds = self.embed_prompt(ids, images)?;
        self.decoder.prefill(&embeds, cache, taps)
    }

    /// One batched decode step (see [`Decoder::decode_step`]).
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decoder.decode_step(tokens, caches)
    }
}

/// The image processor of a checkpoint: the HF processor files, or for original-format
/// checkpoints the CLIP tower's processor with the model config's `image_aspect_ratio`.
fn preprocess_config(
    dir: &Path,
    config: &LlavaConfig,
    vision_dir: Option<&Path>,
) -> Result<PreprocessConfig> {
    let image_size = config.vision.image_size as u32;
    match config.format {
        CheckpointFormat::HfLlava | CheckpointFormat::HfLlavaNext => {
            match PreprocessConfig::from_hf_dir(dir)? {
                Some(p) => Ok(p),
                None if config.format == CheckpointFormat::HfLlava => {
                    Ok(PreprocessConfig::clip_defaults(image_size))
                }
                None => Err(ModelError::config(
                    dir.join("preprocessor_config.json"),
                    "llava_next checkpoint without an image processor config (preprocessor_config.json or processor_config.json)",
                )),
            }
        }
        CheckpointFormat::Original => {
            let clip = match vision_dir {
                Some(vd) => PreprocessConfig::from_hf_dir(vd)?,
                None => None,
            }
            .unwrap_or_else(|| PreprocessConfig::clip_defaults(image_size));
            let path = dir.join("config.json");
            PreprocessConfig::for_original_llava(&read_json(&path)?, clip, &path)
        }
    }
}
