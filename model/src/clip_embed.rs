//! CLIP embeddings of captions and images from an HF `CLIPModel` checkpoint: what transformers'
//! `CLIPModel.get_text_features` / `get_image_features` compute, plus the L2-normalised vectors
//! that TGA retrieval (`retrieval`) compares.
//!
//! The vision side reuses [`crate::clip::VisionTower`] run through every layer (its last hidden
//! state), then the CLS row, `post_layernorm` and `visual_projection`. The text side is the same
//! pre-LN encoder layer run causally over token + position embeddings, then `final_layer_norm`,
//! the row at the EOS position (see [`pool_position`]) and `text_projection`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{layer_norm, linear_no_bias, LayerNorm, Linear, VarBuilder};
use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use crate::clip::{EncoderLayer, LayerDims, VisionTower};
use crate::config::{parse_vision, read_json, CheckpointFormat, VisionAct, VisionConfig};
use crate::error::{ModelError, Result};
use crate::image::{preprocess, PreprocessConfig};
use crate::weights::{shard_paths, Checkpoint};

/// `CLIPTextConfig` fields the text tower needs (transformers' defaults for missing ones).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: VisionAct,
    pub eos_token_id: u32,
}

/// A `CLIPModel` config.json: both towers and the shared projection width.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: VisionConfig,
    pub projection_dim: usize,
}

#[derive(Deserialize, Default)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    eos_token_id: Option<Value>,
}

impl ClipModelConfig {
    /// Reads `dir/config.json` (`model_type` "clip", with `text_config` and `vision_config`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw = read_json(&path)?;
        Self::from_json(&raw, &path)
    }

    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::config(path, msg);
        match raw.get("model_type").and_then(Value::as_str) {
            Some("clip") => {}
            other => {
                return Err(bad(format!(
                    "model_type {other:?}: a full CLIPModel config (\"clip\", with text_config and vision_config) is needed for retrieval"
                )))
            }
        }
        let t: RawText = match raw.get("text_config") {
            None | Some(Value::Null) => RawText::default(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?,
        };
        let hidden_act = match t.hidden_act.as_deref() {
            None | Some("quick_gelu") => VisionAct::QuickGelu,
            Some("gelu") => VisionAct::Gelu,
            Some(a) => return Err(bad(format!("text hidden_act {a:?} is not supported"))),
        };
        // CLIPTextConfig allows a list, but CLIPTextModel's pooling compares with one id.
        let eos_token_id = match &t.eos_token_id {
            None | Some(Value::Null) => 49407,
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| bad(format!("text eos_token_id {v} is not one token id")))?,
        };
        let text = ClipTextConfig {
            vocab_size: t.vocab_size.unwrap_or(49408),
            hidden_size: t.hidden_size.unwrap_or(512),
            intermediate_size: t.intermediate_size.unwrap_or(2048),
            num_hidden_layers: t.num_hidden_layers.unwrap_or(12),
            num_attention_heads: t.num_attention_heads.unwrap_or(8),
            max_position_embeddings: t.max_position_embeddings.unwrap_or(77),
            layer_norm_eps: t.layer_norm_eps.unwrap_or(1e-5),
            hidden_act,
            eos_token_id,
        };
        if text.num_attention_heads == 0
            || !text.hidden_size.is_multiple_of(text.num_attention_heads)
            || text.max_position_embeddings == 0
        {
            return Err(bad(
                "text hidden_size must be a multiple of num_attention_heads, max_position_embeddings positive".into(),
            ));
        }
        let vision = parse_vision(
            path,
            raw.get("vision_config").unwrap_or(&Value::Null),
            false,
        )?;
        let projection_dim = match raw.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(v) => v
                .as_u64()
                .filter(|&d| d > 0)
                .ok_or_else(|| bad(format!("projection_dim {v} is not a positive integer")))?
                as usize,
        };
        Ok(Self {
            text,
            vision,
            projection_dim,
        })
    }
}

/// Where transformers' `CLIPTextModel` pools: configs from before transformers PR #24773 say
/// `eos_token_id` 2 and pool at the largest id (`argmax(input_ids)`, the first if repeated);
/// newer ones at the first `eos_token_id`, or position 0 when the sequence holds none (argmax of
/// all zeros).
pub fn pool_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let mut best = 0;
        for (i, &id) in ids.iter().enumerate() {
            if id > ids[best] {
                best = i;
            }
        }
        best
    } else {
        ids.iter().position(|&id| id == eos_token_id).unwrap_or(0)
    }
}

/// L2-normalises `v` in place (in f64, then rounded); a zero or non-finite vector is an error,
/// as it has no direction to compare.
pub fn l2_normalize(v: &mut [f32]) -> Result<()> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(ModelError::InvalidInput(format!(
            "embedding has norm {norm}: cannot be normalised"
        )));
    }
    for x in v {
        *x = (f64::from(*x) / norm) as f32;
    }
    Ok(())
}

struct TextTower {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl TextTower {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let dims = LayerDims {
            hidden: h,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: emb.get((cfg.vocab_size, h), "token_embedding.weight")?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(dims, vb.pp("encoder").pp("layers").pp(i)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            final_layer_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
        })
    }

    /// `ids` [B, n] (right-padded: causal attention keeps the padding out of earlier positions)
    /// → the final-normed hidden states [B, n, hidden].
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let hidden = self.token_embedding.dim(1)?;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, n, hidden))?;
        let mut xs = tok.broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, true)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

/// A loaded CLIP model that embeds captions and images into the shared projection space.
///
/// ```no_run
/// # fn main() -> model::Result<()> {
/// let clip = model::clip_embed::ClipEmbedder::load(
///     std::path::Path::new("fixtures/tiny-clip-full"),
///     &candle_core::Device::Cpu,
///     candle_core::DType::F32,
/// )?;
/// let caption = clip.embed_texts(&["a red knife next to a cup"], 64)?;
/// # Ok(()) }
/// ```
pub struct ClipEmbedder {
    config: ClipModelConfig,
    tokenizer: tokenizers::Tokenizer,
    text: TextTower,
    text_projection: Linear,
    vision: VisionTower,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    preprocess: PreprocessConfig,
    device: Device,
    dtype: DType,
    fingerprint: u64,
    dir: PathBuf,
}

impl ClipEmbedder {
    /// Loads `dir`: config.json (a `CLIPModel`), its safetensors weights, tokenizer.json, and
    /// preprocessor_config.json (else `CLIPImageProcessor`'s defaults for the tower's size).
    /// Every tensor but `logit_scale` must be used.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ClipModelConfig::from_dir(dir)?;
        let mut tokenizer = load_tokenizer(dir, &config)?;
        // As `tokenizer(text, truncation=True, max_length=77)`: the post-processor's BOS/EOS
        // count toward the limit, so EOS survives truncation.
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: config.text.max_position_embeddings,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let preprocess = PreprocessConfig::from_hf_dir(dir)?
            .unwrap_or_else(|| PreprocessConfig::clip_defaults(config.vision.image_size as u32));
        if preprocess.crop_size
            != (
                config.vision.image_size as u32,
                config.vision.image_size as u32,
            )
        {
            return Err(ModelError::config(
                dir.join("preprocessor_config.json"),
                format!(
                    "crop_size {:?} differs from the vision tower's image_size {}",
                    preprocess.crop_size, config.vision.image_size
                ),
            ));
        }
        // CLIPModel names (`text_model.`, `vision_model.`, projections) are outside every rule
        // of the HF LLaVA mapping, so they pass through unchanged; position-id buffers drop out.
        let ckpt = Checkpoint::open(dir, CheckpointFormat::HfLlava, None)?;
        ckpt.allow_unused("logit_scale");
        let vb = ckpt.var_builder(dtype, device);
        let build = || -> candle_core::Result<_> {
            let (p, th, vh) = (
                config.projection_dim,
                config.text.hidden_size,
                config.vision.hidden_size,
            );
            Ok((
                TextTower::new(&config.text, vb.pp("text_model"))?,
                linear_no_bias(th, p, vb.pp("text_projection"))?,
                VisionTower::new(
                    &config.vision,
                    config.vision.num_hidden_layers,
                    vb.pp("vision_model"),
                )?,
                layer_norm(
                    vh,
                    config.vision.layer_norm_eps,
                    vb.pp("vision_model").pp("post_layernorm"),
                )?,
                linear_no_bias(vh, p, vb.pp("visual_projection"))?,
            ))
        };
        let (text, text_projection, vision, post_layernorm, visual_projection) =
            build().map_err(|e| ckpt.explain(e))?;
        ckpt.check_all_used()?;
        let fingerprint = fingerprint_dir(dir)?;
        Ok(Self {
            config,
            tokenizer,
            text,
            text_projection,
            vision,
            post_layernorm,
            visual_projection,
            preprocess,
            device: device.clone(),
            dtype,
            fingerprint,
            dir: dir.to_path_buf(),
        })
    }

    pub fn config(&self) -> &ClipModelConfig {
        &self.config
    }

    /// The embedding width (`projection_dim`).
    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A 64-bit hash of the checkpoint's config, tokenizer and weight files: an index built by
    /// another model is refused by it ([`crate::retrieval::RetrievalIndex::open`]).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Token ids as `tokenizer(text, truncation=True, max_length=max_position_embeddings)`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `get_text_features` of each id sequence (no normalisation): [B, projection_dim], f32.
    /// Sequences may differ in length; each is pooled at its own [`pool_position`].
    pub fn text_features(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let max_pos = self.config.text.max_position_embeddings;
        let vocab = self.config.text.vocab_size;
        let n = ids.iter().map(Vec::len).max().unwrap_or(0);
        if ids.is_empty() || n == 0 {
            return Err(ModelError::InvalidInput("no tokens to embed".into()));
        }
        if n > max_pos {
            return Err(ModelError::InvalidInput(format!(
                "{n} tokens, over max_position_embeddings {max_pos}"
            )));
        }
        let mut flat = Vec::with_capacity(ids.len() * n);
        let mut pools = Vec::with_capacity(ids.len());
        for (row, seq) in ids.iter().enumerate() {
            if let Some(&bad) = seq.iter().find(|&&id| id as usize >= vocab) {
                return Err(ModelError::InvalidInput(format!(
                    "token id {bad} outside the vocabulary of {vocab}"
                )));
            }
            let Some(&last) = seq.last() else {
                return Err(ModelError::InvalidInput("an empty token sequence".into()));
            };
            flat.extend_from_slice(seq);
            // Any valid id will do as padding: no pooled position attends to it.
            flat.extend(std::iter::repeat_n(last, n - seq.len()));
            pools.push((row * n + pool_position(seq, self.config.text.eos_token_id)) as u32);
        }
        let out = crate::cpu::on_pool(|| -> candle_core::Result<Tensor> {
            let ids = Tensor::from_vec(flat, (ids.len(), n), &self.device)?;
            let hidden = self.text.forward(&ids)?;
            let hd = hidden.dim(2)?;
            let pools = Tensor::from_vec(pools, ids.dim(0)?, &self.device)?;
            let pooled = hidden.reshape(((), hd))?.index_select(&pools, 0)?;
            self.text_projection.forward(&pooled)?.to_dtype(DType::F32)
        })?;
        Ok(out)
    }

    /// `get_image_features(pixel_values)` for `pixel_values` [B, 3, S, S]: [B, projection_dim], f32.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pv = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let hidden = self.vision.forward(&pv)?;
        let out = crate::cpu::on_pool(|| -> candle_core::Result<Tensor> {
            let cls = self.post_layernorm.forward(&hidden.i((.., 0))?)?;
            self.visual_projection.forward(&cls)?.to_dtype(DType::F32)
        })?;
        Ok(out)
    }

    /// L2-normalised text embeddings, one per text, in input order. Texts are tokenized, sorted
    /// by length and run `batch_size` at a time, so padding costs little.
    pub fn embed_texts<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let feats = self.text_features(&batch)?.to_vec2::<f32>()?;
            for (&i, mut f) in chunk.iter().zip(feats) {
                l2_normalize(&mut f)?;
                out[i] = f;
            }
        }
        Ok(out)
    }

    /// The checkpoint's image preprocessing (`CLIPImageProcessor`: resize, centre crop, normalise).
    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// The L2-normalised embedding of a decoded image, preprocessed as the checkpoint says.
    pub fn embed_image(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let p = preprocess(img, &self.preprocess)?;
        let (h, w) = (p.size.0 as usize, p.size.1 as usize);
        let pv = Tensor::from_vec(p.pixel_values, (p.n_views, 3, h, w), &Device::Cpu)?;
        let mut v = self.image_features(&pv)?.i(0)?.to_vec1::<f32>()?;
        l2_normalize(&mut v)?;
        Ok(v)
    }
}

/// The text tower's tokenizer: `tokenizer.json` (HF's fast CLIP tokenizer, BOS/EOS added by its
/// post-processor), or else a SentencePiece `tokenizer.model` framed as `[BOS] pieces [EOS]`
/// with the tokenizer's `<s>` and the config's `eos_token_id` (how the toy CLIP of
/// tools/toy_tga is trained; its EOS is the id after the SentencePiece vocabulary).
fn load_tokenizer(dir: &Path, config: &ClipModelConfig) -> Result<tokenizers::Tokenizer> {
    let json = dir.join("tokenizer.json");
    if json.is_file() || !dir.join("tokenizer.model").is_file() {
        return tokenizers::Tokenizer::from_file(&json)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", json.display())));
    }
    let spm = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let bos = spm
        .bos_id()
        .ok_or_else(|| ModelError::Tokenizer(format!("{}: no <s> token", dir.display())))?;
    let eos = config.text.eos_token_id;
    let framing = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<s> $A <eos>")
        .and_then(|b| {
            b.special_tokens(vec![("<s>", bos), ("<eos>", eos)])
                .build()
                .map_err(|e| e.to_string())
        })
        .map_err(|e| ModelError::Tokenizer(format!("CLIP text framing: {e}")))?;
    let mut inner = spm.inner().clone();
    inner.with_post_processor(Some(framing));
    Ok(inner)
}

/// FNV-1a over the bytes of config.json, the tokenizer file and the weight files, in that order.
fn fingerprint_dir(dir: &Path) -> Result<u64> {
    let tokenizer = ["tokenizer.json", "tokenizer.model"]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let mut files = vec![dir.join("config.json"), tokenizer];
    files.extend(shard_paths(dir)?);
    let mut h = crate::retrieval::Fnv64::new();
    for path in files {
        let file = std::fs::File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: read-only map of a checkpoint file; as for the weights themselves, nobody
        // truncates checkpoint files while the server runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        h.write(&map);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_follows_transformers_for_old_and_new_configs() {
        // Legacy (eos 2): the largest id, first occurrence (CLIP's EOS 49407 is the largest).
        assert_eq!(pool_position(&[49406, 320, 49407, 49407], 2), 2);
        // New: the first EOS, even if a larger id comes first.
        assert_eq!(pool_position(&[200, 84, 83, 83], 83), 2);
        assert_eq!(pool_position(&[200, 84, 5], 83), 0);
    }

    #[test]
    fn normalising_a_zero_vector_is_refused() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v).unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(l2_normalize(&mut [0.0, 0.0]).is_err());
    }
}
