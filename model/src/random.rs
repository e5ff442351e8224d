//! Random-weight models (`tga-serve serve --random-weights`): any LLaVA-NeXT shape, the 7B one
//! included, served without carrying its checkpoint, for benchmarks and tests.
//!
//! The model is built by the loader's own construction path ([`LlavaModel::build`], the modules'
//! `new(cfg, vb)`) over a [`RandomWeights`] VarBuilder source instead of a [`Checkpoint`]: every
//! tensor is asked for by its canonical name and shape exactly as a checkpoint's would be, and
//! drawn on the target device in its final dtype (no host copy of a GPU model's weights).
//! Initialisation follows transformers' `_init_weights` for Mistral and LLaVA: linear and
//! embedding weights ~ N(0, 0.02) (`initializer_range`), biases 0, norm weights 1. At the 7B
//! shapes that keeps the residual stream within a few tens in bf16 and the logits' std near 1.
//!
//! Seeding: the same seed gives the same weights on the same device and dtype. Each tensor has
//! its own stream, seeded from the seed and its name, so the draws do not depend on the order
//! the modules ask for them. On the CPU the draws come from a seeded ChaCha (candle's CPU RNG
//! cannot be seeded); on CUDA from curand on the device, re-seeded per tensor.
//!
//! [`Checkpoint`]: crate::weights::Checkpoint

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::Value;

use crate::clip::EncoderLayer;
use crate::config::{read_json, CheckpointFormat, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::image::PreprocessConfig;
use crate::llava::{default_dtype, linear_dtype, LlavaModel, LoadOptions, VISION};

/// transformers' `initializer_range` default (MistralConfig, LlavaNextConfig's projector).
pub const INIT_STD: f64 = 0.02;

/// `llava-hf/llava-v1.6-mistral-7b-hf`'s `config.json` (FORMATS.md), its partial `text_config`
/// spelled out: Mistral-7B-Instruct-v0.2 (vocab padded to 32064 rows), CLIP ViT-L/14-336.
const LLAVA_V16_MISTRAL_7B: &str = r#"{
  "architectures": ["LlavaNextForConditionalGeneration"],
  "model_type": "llava_next",
  "image_token_index": 32000,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "projector_hidden_act": "gelu",
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "use_image_newline_parameter": true,
  "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default",
  "vocab_size": 32064,
  "text_config": {
    "model_type": "mistral",
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": null,
    "hidden_act": "silu",
    "tie_word_embeddings": false
  },
  "vision_config": {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768
  }
}"#;

/// The shapes of `fixtures/tiny-llava-next` (the built-in tiny model): Mistral hidden 32, 3
/// layers, 4 heads over 2 KV heads; CLIP hidden 32, 2 layers, 336 px in 14 px patches; anyres
/// with llava-v1.6's pinpoints; vocab 1024 rows over the tiny tokenizer's 1001 ids.
const TINY: &str = r#"{
  "model_type": "llava_next",
  "image_token_index": 1000,
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "projector_hidden_act": "gelu",
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default",
  "text_config": {
    "model_type": "mistral",
    "vocab_size": 1024,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": null
  },
  "vision_config": {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14
  }
}"#;

/// The named presets of `--random-weights`, with their `config.json`.
pub const PRESETS: [(&str, &str); 2] = [
    ("llava-v1.6-mistral-7b", LLAVA_V16_MISTRAL_7B),
    ("tiny", TINY),
];

/// What a random-weight model is built from: an HF `llava_next` (or `llava`) config and the
/// image processor that goes with it.
#[derive(Debug, Clone)]
pub struct RandomModelSpec {
    /// The preset's name, or the config file's path.
    pub name: String,
    pub config: LlavaConfig,
    pub preprocess: PreprocessConfig,
    /// The config's `torch_dtype` (bf16 when it names none): what a checkpoint of it would
    /// store, so `--weights checkpoint` keeps 16-bit linear weights as it does for one.
    pub stored_dtype: DType,
}

impl RandomModelSpec {
    /// A preset name (see [`PRESETS`]), or the path of an HF `config.json` (or of a directory
    /// holding one, whose `preprocessor_config.json` is used when present).
    pub fn parse(arg: &str) -> Result<Self> {
        if let Some((name, json)) = PRESETS.iter().find(|(name, _)| *name == arg) {
            let raw: Value = serde_json::from_str(json).expect("the presets are valid JSON");
            let path = PathBuf::from(format!("<preset {name}>"));
            return Self::from_json(name.to_string(), &path, &raw, None);
        }
        let given = Path::new(arg);
        let (path, dir) = if given.is_dir() {
            (given.join("config.json"), Some(given))
        } else {
            (given.to_path_buf(), given.parent())
        };
        if !path.is_file() {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err(ModelError::config(
                &path,
                format!(
                    "not a random-weight preset ({}) nor a config.json file",
                    names.join(", ")
                ),
            ));
        }
        let raw = read_json(&path)?;
        Self::from_json(arg.to_string(), &path, &raw, dir)
    }

    fn from_json(name: String, path: &Path, raw: &Value, dir: Option<&Path>) -> Result<Self> {
        let config = LlavaConfig::from_hf_json(path, raw)?;
        let side = config.vision.image_size as u32;
        let preprocess = match dir
            .map(PreprocessConfig::from_hf_dir)
            .transpose()?
            .flatten()
        {
            Some(p) => p,
            None if config.format == CheckpointFormat::HfLlavaNext => {
                // LlavaNextImageProcessor as llava-hf saves it, at the tower's size, on the
                // config's pinpoints.
                let mut proc = serde_json::json!({
                    "image_processor_type": "LlavaNextImageProcessor",
                    "size": {"shortest_edge": side},
                    "crop_size": {"height": side, "width": side},
                    "do_pad": true,
                    "resample": 3,
                });
                if let Some(p) = raw.get("image_grid_pinpoints") {
                    proc["image_grid_pinpoints"] = p.clone();
                }
                PreprocessConfig::from_hf_preprocessor(&proc, path)?
            }
            None => PreprocessConfig::clip_defaults(side),
        };
        let stored_dtype = match raw
            .get("torch_dtype")
            .or_else(|| raw.get("dtype"))
            .and_then(Value::as_str)
        {
            Some("float32") => DType::F32,
            Some("float16") => DType::F16,
            _ => DType::BF16,
        };
        Ok(Self {
            name,
            config,
            preprocess,
            stored_dtype,
        })
    }

    /// The compute dtype and the linear weights' dtype a model built with `opts` on `device`
    /// uses (as a checkpoint stored in [`Self::stored_dtype`] would).
    pub fn dtypes(&self, opts: &LoadOptions, device: &Device) -> Result<(DType, DType)> {
        let dtype = default_dtype(opts, device);
        let linear = linear_dtype(Some(self.stored_dtype), opts.linear_weights, dtype, device)?;
        Ok((dtype, linear))
    }

    /// Every tensor the model built with `opts` on `device` holds, and those a checkpoint of
    /// this shape holds besides, found by running the construction over shapes only (nothing
    /// of the weights' size is allocated).
    pub fn footprint(&self, opts: &LoadOptions, device: &Device) -> Result<Footprint> {
        let (dtype, linear) = self.dtypes(opts, device)?;
        let source = RandomWeights::shapes_only();
        let vb = source.var_builder(dtype, &Device::Cpu);
        drop(LlavaModel::build(
            self.config.clone(),
            self.preprocess.clone(),
            vb.clone(),
            linear,
        )?);
        let built = source.records().len();
        // What a checkpoint holds that the model never reads (Checkpoint::allow_unused's).
        let (v, vision) = (vb.pp(VISION), &self.config.vision);
        for i in self.config.vision_layers_needed()..vision.num_hidden_layers {
            EncoderLayer::new(vision.into(), v.pp("encoder").pp("layers").pp(i))?;
        }
        candle_nn::layer_norm(
            vision.hidden_size,
            vision.layer_norm_eps,
            v.pp("post_layernorm"),
        )?;
        let mut tensors = source.records();
        for t in &mut tensors[built..] {
            t.built = false;
        }
        Ok(Footprint { tensors })
    }
}

/// One tensor a random model asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRecord {
    /// The canonical name (as in [`crate::weights`]).
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype it is held in.
    pub dtype: DType,
    /// False for tensors only a checkpoint holds (CLIP layers past the feature layer).
    pub built: bool,
}

impl TensorRecord {
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The tensors of a random model ([`RandomModelSpec::footprint`]).
#[derive(Debug, Clone)]
pub struct Footprint {
    pub tensors: Vec<TensorRecord>,
}

impl Footprint {
    /// Parameters the built model holds.
    pub fn parameters(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.built)
            .map(TensorRecord::elements)
            .sum()
    }

    /// Parameters a checkpoint of this shape holds (the published count, e.g. 7.57 B).
    pub fn checkpoint_parameters(&self) -> u64 {
        self.tensors.iter().map(TensorRecord::elements).sum()
    }

    /// Bytes the built model's weights take, each tensor in its dtype.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.built)
            .map(|t| t.elements() * t.dtype.size_in_bytes() as u64)
            .sum()
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Draw {
        seed: u64,
    },
    /// Scalars broadcast to the shape: the construction runs, nothing weight-sized is stored.
    ShapesOnly,
}

/// A VarBuilder source that answers every name with a tensor of the asked shape, drawn at
/// random, and records what was asked.
#[derive(Clone)]
pub struct RandomWeights {
    mode: Mode,
    records: Arc<Mutex<Vec<TensorRecord>>>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self::with_mode(Mode::Draw { seed })
    }

    fn shapes_only() -> Self {
        Self::with_mode(Mode::ShapesOnly)
    }

    fn with_mode(mode: Mode) -> Self {
        Self {
            mode,
            records: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// The tensors asked for so far, in order.
    pub fn records(&self) -> Vec<TensorRecord> {
        self.records.lock().unwrap().clone()
    }

    fn draw(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let seed = match self.mode {
            Mode::ShapesOnly => return Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(shape),
            Mode::Draw { seed } => seed,
        };
        // layer_norm / rms_norm ask for their weights with Const(1) and LayerNorm biases with
        // Const(0); linear biases come with a uniform hint but start at 0 in transformers too.
        // Everything else (linear, embedding, class / position embeddings, image_newline) is
        // N(0, INIT_STD); `vb.get`'s default hint Const(0) must not make those zero.
        match init {
            Init::Const(c) if c != 0.0 => return Tensor::ones(shape, dtype, dev)?.affine(c, 0.0),
            _ if name.ends_with(".bias") => return Tensor::zeros(shape, dtype, dev),
            _ => {}
        }
        let seed = tensor_seed(seed, name);
        let drawn = if dev.is_cpu() {
            Tensor::from_vec(normal_f32(seed, shape.elem_count()), shape, dev)?
        } else {
            // curand draws f32 only; one tensor at a time is widened (the embedding's 0.5 GB
            // at 7B shapes, transiently).
            dev.set_seed(seed)?;
            Tensor::randn(0f32, 1f32, shape, dev)?
        };
        (drawn * INIT_STD)?.to_dtype(dtype)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.draw(&s, name, h, dtype, dev)?;
        self.records.lock().unwrap().push(TensorRecord {
            name: name.to_string(),
            shape: s.dims().to_vec(),
            dtype,
            built: true,
        });
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights: `{name}` was asked for without a shape"
        )))
    }

    /// Every canonical name exists; the `gamma`/`beta` aliases candle's layer_norm probes for
    /// do not, so it asks for `weight`/`bias` as checkpoints name them.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.ends_with(".gamma") && !name.ends_with(".beta")
    }
}

/// One tensor's stream: the seed and a hash of its name (FNV-1a, stable across Rust versions),
/// mixed by splitmix64.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    splitmix64(seed ^ splitmix64(fnv))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d4_9ce4_d4a8_ded5);
    z ^ (z >> 31)
}

/// `n` standard normal draws, in chunks with their own streams so the threads share the work
/// and the result does not depend on their number.
fn normal_f32(seed: u64, n: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(splitmix64(seed ^ (i as u64 + 1)));
            for x in chunk {
                *x = rng.sample(rand_distr::StandardNormal);
            }
        });
    out
}

impl LlavaModel {
    /// The model of `spec` with weights drawn from `seed` on `device` (see the module docs),
    /// built as [`LlavaModel::load`] builds a checkpoint's.
    pub fn random(
        spec: &RandomModelSpec,
        seed: u64,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        let started = Instant::now();
        let (dtype, linear) = spec.dtypes(opts, device)?;
        let source = RandomWeights::new(seed);
        let model = Self::build(
            spec.config.clone(),
            spec.preprocess.clone(),
            source.var_builder(dtype, device),
            linear,
        )?;
        device.synchronize()?;
        let held = Footprint {
            tensors: source.records(),
        };
        tracing::info!(
            model = %spec.name,
            seed,
            parameters = held.parameters(),
            bytes = held.bytes(),
            gib = format!("{:.2}", held.bytes() as f64 / (1u64 << 30) as f64),
            ?dtype,
            linear_weights = ?linear,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "random weights drawn"
        );
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::llava::{ImageInput, LinearWeights};
    use crate::mistral::LayerTaps;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-next")
    }

    fn tiny() -> RandomModelSpec {
        RandomModelSpec::parse("tiny").unwrap()
    }

    fn f32_opts() -> LoadOptions {
        LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        }
    }

    #[test]
    fn the_tiny_preset_is_the_tiny_fixtures_model() {
        let spec = tiny();
        let mut fixture_cfg = LlavaConfig::from_dir(&fixture(), None).unwrap();
        fixture_cfg.vision_config_source = spec.config.vision_config_source.clone();
        assert_eq!(spec.config, fixture_cfg);
        let fixture_pre = PreprocessConfig::from_hf_dir(&fixture()).unwrap().unwrap();
        assert_eq!(spec.preprocess, fixture_pre);
    }

    #[test]
    fn random_tensors_are_named_and_shaped_as_the_fixture_checkpoint_stores_them() {
        let footprint = tiny().footprint(&f32_opts(), &Device::Cpu).unwrap();
        let drawn: BTreeMap<String, Vec<usize>> = footprint
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(drawn.len(), footprint.tensors.len(), "a tensor asked twice");
        let ckpt =
            crate::weights::Checkpoint::open(&fixture(), CheckpointFormat::HfLlavaNext, None)
                .unwrap();
        assert_eq!(drawn, ckpt.shapes());
        // The tensors the model never reads are those the loader allows to stay unused.
        let unread: Vec<&str> = footprint
            .tensors
            .iter()
            .filter(|t| !t.built)
            .map(|t| t.name.as_str())
            .collect();
        assert!(!unread.is_empty());
        assert!(unread
            .iter()
            .all(|n| n.starts_with(&format!("{VISION}.encoder.layers.1."))
                || n.starts_with(&format!("{VISION}.post_layernorm."))));
    }

    #[test]
    fn the_7b_preset_has_the_published_shapes_and_parameter_count() {
        let spec = RandomModelSpec::parse("llava-v1.6-mistral-7b").unwrap();
        let (t, v) = (&spec.config.text, &spec.config.vision);
        assert_eq!(spec.config.format, CheckpointFormat::HfLlavaNext);
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads
            ),
            (4096, 32, 32, 8)
        );
        assert_eq!(
            (t.head_dim, t.intermediate_size, t.vocab_size),
            (128, 14336, 32064)
        );
        assert_eq!((t.rope_theta, t.rms_norm_eps), (1e6, 1e-5));
        assert_eq!((t.max_position_embeddings, t.sliding_window), (32768, None));
        assert_eq!(
            (
                v.hidden_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.intermediate_size
            ),
            (1024, 24, 16, 4096)
        );
        assert_eq!((v.image_size, v.patch_size), (336, 14));
        assert_eq!(spec.config.vision_layers_needed(), 23);
        assert_eq!(spec.config.image_token_index, Some(32000));
        match &spec.preprocess.aspect {
            crate::image::AspectMode::Anyres { pinpoints, .. } => {
                assert_eq!(pinpoints, &crate::image::LLAVA_NEXT_PINPOINTS.to_vec())
            }
            other => panic!("not anyres: {other:?}"),
        }
        // 640×640 takes 2928 image positions in llava-v1.6-mistral-7b-hf (FORMATS.md).
        let count =
            crate::image::image_token_count(640, 640, &spec.preprocess, v.patches_per_side());
        assert_eq!(count, 2928);

        let bf16 = LoadOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        };
        let footprint = spec.footprint(&bf16, &Device::Cpu).unwrap();
        // LlavaNextForConditionalGeneration's parameter count: Mistral 7.242 B (32064 rows),
        // CLIP ViT-L/14-336 303.5 M, projector 21.0 M, image_newline.
        assert_eq!(footprint.checkpoint_parameters(), 7_566_747_648);
        // The model skips CLIP's last layer and post_layernorm (feature layer −2).
        assert_eq!(
            footprint.parameters(),
            7_566_747_648 - 12_596_224 - 2 * 1024
        );
        assert_eq!(footprint.bytes(), 2 * footprint.parameters());
        // 16-bit linear weights under f32 compute on the CPU: the rest widened to f32.
        let mixed = LoadOptions {
            dtype: Some(DType::F32),
            linear_weights: LinearWeights::Checkpoint,
            ..Default::default()
        };
        let (dtype, linear) = spec.dtypes(&mixed, &Device::Cpu).unwrap();
        assert_eq!((dtype, linear), (DType::F32, DType::F16));
        let mixed = spec.footprint(&mixed, &Device::Cpu).unwrap();
        // Linear weights (7.11 B, lm_head included) in 2 bytes, the other 443 M in 4.
        assert_eq!(mixed.bytes(), 2 * 7_110_656_000 + 4 * 443_493_376);
    }

    /// Greedy-relevant outputs of one image prompt: the last position's logits.
    fn image_prompt_logits(model: &LlavaModel) -> Vec<f32> {
        let bytes = std::fs::read(fixture().join("../images/tiny_20x20.png")).unwrap();
        let img = crate::image::decode_image(&bytes, &Default::default()).unwrap();
        let p = crate::image::preprocess(&img, model.preprocess_config()).unwrap();
        let (vh, vw) = p.size;
        let pixel_values = Tensor::from_vec(
            p.pixel_values,
            (p.n_views, 3, vh as usize, vw as usize),
            &Device::Cpu,
        )
        .unwrap();
        let image = model
            .encode_image(&ImageInput {
                pixel_values,
                original_hw: p.original_hw,
            })
            .unwrap();
        let (h, w) = p.original_hw;
        let n = model.image_token_count(h, w);
        assert_eq!(image.dim(0).unwrap(), n);
        let mut ids = vec![1u32, 5];
        ids.extend(std::iter::repeat_n(1000, n));
        ids.extend([17, 42, 9]);
        let mut cache = model.new_cache();
        let out = model
            .prefill(
                &ids,
                &[(2..2 + n, image)],
                &mut cache,
                &LayerTaps::default(),
            )
            .unwrap();
        let logits = out.logits.to_vec2::<f32>().unwrap().remove(0);
        assert_eq!(logits.len(), 1024);
        logits
    }

    #[test]
    fn the_same_seed_draws_the_same_model_and_another_seed_another() {
        let spec = tiny();
        let a = LlavaModel::random(&spec, 7, &f32_opts(), &Device::Cpu).unwrap();
        let b = LlavaModel::random(&spec, 7, &f32_opts(), &Device::Cpu).unwrap();
        let c = LlavaModel::random(&spec, 8, &f32_opts(), &Device::Cpu).unwrap();
        let w = |m: &LlavaModel| {
            m.decoder()
                .lm_head_weight()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        let (la, lb, lc) = (
            image_prompt_logits(&a),
            image_prompt_logits(&b),
            image_prompt_logits(&c),
        );
        assert_eq!(la, lb);
        assert_ne!(la, lc);
        // The init the module docs state: N(0, 0.02) weights, unit norms.
        let wa = w(&a);
        let std = (wa.iter().map(|x| x * x).sum::<f32>() / wa.len() as f32).sqrt();
        assert!((std - INIT_STD as f32).abs() < 0.002, "std {std}");
        let norm = a.decoder().final_norm().weight().to_vec1::<f32>().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn the_tiny_random_model_gives_finite_logits_in_f32_and_bf16() {
        let spec = tiny();
        for opts in [
            f32_opts(),
            LoadOptions {
                dtype: Some(DType::BF16),
                ..Default::default()
            },
            LoadOptions {
                dtype: Some(DType::F32),
                linear_weights: LinearWeights::Dtype(DType::BF16),
                ..Default::default()
            },
        ] {
            let model = LlavaModel::random(&spec, 0, &opts, &Device::Cpu).unwrap();
            let logits = image_prompt_logits(&model);
            assert!(logits.iter().all(|x| x.is_finite()), "{opts:?}");
            // Not degenerate: the draws make the logits differ across the vocabulary.
            let spread = logits.iter().cloned().fold(f32::MIN, f32::max)
                - logits.iter().cloned().fold(f32::MAX, f32::min);
            assert!(spread > 1e-3, "{opts:?}: spread {spread}");
        }
    }

    #[test]
    fn a_config_json_path_is_served_at_random_and_bad_names_say_what_is_accepted() {
        let spec = RandomModelSpec::parse(fixture().join("config.json").to_str().unwrap()).unwrap();
        assert_eq!(spec.config.text.vocab_size, 1024);
        assert_eq!(spec.stored_dtype, DType::F32);
        let dir = RandomModelSpec::parse(fixture().to_str().unwrap()).unwrap();
        assert_eq!(dir.preprocess, spec.preprocess);
        let err = RandomModelSpec::parse("llava-13b").unwrap_err().to_string();
        assert!(err.contains("llava-v1.6-mistral-7b, tiny"), "{err}");
        let orig = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llava-orig-pad");
        let err = RandomModelSpec::parse(orig.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected an HF llava_next or llava config"),
            "{err}"
        );
    }
}
