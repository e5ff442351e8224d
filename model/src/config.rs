//! Checkpoint configs of the three LLaVA-Mistral variants (FORMATS.md), unified into [`LlavaConfig`].
//!
//! - HF `llava_next` / `llava`: `config.json` with nested, possibly partial `text_config` /
//!   `vision_config` (missing fields take transformers' `MistralConfig` / `CLIPVisionConfig`
//!   defaults).
//! - Original LLaVA (`llava_mistral`): a flat Mistral config plus `mm_*` keys; the CLIP config comes
//!   from the vision-tower directory (`--vision-tower`, or `mm_vision_tower` when it is a path), or
//!   from a table of the published towers.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Which on-disk layout a checkpoint uses; decides tensor names, tokenization and image handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    /// HF `llava` (LLaVA-1.5 in llava-hf format).
    HfLlava,
    /// HF `llava_next` (LLaVA-1.6, anyres).
    HfLlavaNext,
    /// The original LLaVA codebase (`llava_mistral`), what TGA training writes.
    Original,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: VisionAct,
}

impl VisionConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAct {
    QuickGelu,
    Gelu,
}

/// `vision_feature_select_strategy` / `mm_vision_select_feature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop CLS (`default` in HF, `patch` in the original code).
    Patch,
    /// Keep CLS (`full` / `cls_patch`).
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub format: CheckpointFormat,
    pub text: TextConfig,
    pub vision: VisionConfig,
    /// Index into CLIP's hidden states (HF convention: 0 = embeddings, −1 = last layer).
    pub vision_feature_layer: i64,
    pub feature_select: FeatureSelect,
    pub projector_bias: bool,
    /// HF formats: the `<image>` token id expanded to the image's token count.
    pub image_token_index: Option<u32>,
    /// Original format: what `mm_vision_tower` names (hub id or path).
    pub mm_vision_tower: Option<String>,
    /// Where the vision config was read from, for messages.
    pub vision_config_source: String,
}

impl LlavaConfig {
    /// Number of CLIP encoder layers that must actually run to reach the feature layer.
    pub fn vision_layers_needed(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64;
        let idx = if self.vision_feature_layer < 0 {
            n + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        idx.clamp(0, n) as usize
    }

    /// Reads `dir/config.json`; `vision_tower` overrides where the CLIP config (and, if the
    /// checkpoint lacks them, the CLIP weights) come from for original-format checkpoints.
    pub fn from_dir(dir: &Path, vision_tower: Option<&Path>) -> Result<Self> {
        let path = dir.join("config.json");
        let raw = read_json(&path)?;
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        match model_type {
            "llava" | "llava_next" => Self::from_hf(&path, &raw, model_type == "llava_next"),
            "llava_mistral" | "llava_llama" | "mistral" | "llama" => {
                Self::from_original(dir, &path, &raw, vision_tower)
            }
            other => Err(ModelError::config(
                &path,
                format!(
                    "unsupported model_type {other:?}: expected llava_next, llava or llava_mistral"
                ),
            )),
        }
    }

    /// An HF `llava` / `llava_next` `config.json` already read (`path` names it in messages):
    /// what random-weight models are built from.
    pub fn from_hf_json(path: &Path, raw: &Value) -> Result<Self> {
        match raw.get("model_type").and_then(Value::as_str).unwrap_or("") {
            t @ ("llava" | "llava_next") => Self::from_hf(path, raw, t == "llava_next"),
            other => Err(ModelError::config(
                path,
                format!("model_type {other:?}: expected an HF llava_next or llava config"),
            )),
        }
    }

    fn from_hf(path: &Path, raw: &Value, next: bool) -> Result<Self> {
        let text_raw = raw.get("text_config").cloned().unwrap_or(Value::Null);
        if let Some(mt) = text_raw.get("model_type").and_then(Value::as_str) {
            if mt != "mistral" && mt != "llama" {
                return Err(ModelError::config(
                    path,
                    format!("text_config.model_type {mt:?} is not a Mistral-family decoder"),
                ));
            }
        }
        let text = parse_text(path, &text_raw)?;
        let vision_raw = raw.get("vision_config").cloned().unwrap_or(Value::Null);
        // transformers' LlavaConfig builds a CLIP-L/14-336 when vision_config is absent.
        let vision = parse_vision(path, &vision_raw, !vision_raw.is_object())?;
        let vision_feature_layer = match raw.get("vision_feature_layer") {
            None | Some(Value::Null) => -2,
            Some(Value::Number(n)) => n.as_i64().unwrap_or(-2),
            Some(other) => {
                return Err(ModelError::config(
                    path,
                    format!("vision_feature_layer {other} is not supported (one layer only)"),
                ))
            }
        };
        let feature_select = match raw
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or("default")
        {
            "default" => FeatureSelect::Patch,
            "full" => FeatureSelect::Full,
            s => {
                return Err(ModelError::config(
                    path,
                    format!("unknown vision_feature_select_strategy {s:?}"),
                ))
            }
        };
        let act = raw
            .get("projector_hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(ModelError::config(
                path,
                format!("projector_hidden_act {act:?} is not supported (gelu only)"),
            ));
        }
        let image_token_index = raw
            .get("image_token_index")
            .or_else(|| raw.get("image_token_id"))
            .and_then(Value::as_u64)
            .unwrap_or(32000) as u32;
        Ok(Self {
            format: if next {
                CheckpointFormat::HfLlavaNext
            } else {
                CheckpointFormat::HfLlava
            },
            text,
            vision,
            vision_feature_layer,
            feature_select,
            projector_bias: raw
                .get("multimodal_projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            image_token_index: Some(image_token_index),
            mm_vision_tower: None,
            vision_config_source: path.display().to_string(),
        })
    }

    fn from_original(
        dir: &Path,
        path: &Path,
        raw: &Value,
        vision_tower: Option<&Path>,
    ) -> Result<Self> {
        let text = parse_text(path, raw)?;
        let mm_vision_tower = raw
            .get("mm_vision_tower")
            .or_else(|| raw.get("vision_tower"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (vision, source) =
            original_vision_config(dir, path, mm_vision_tower.as_deref(), vision_tower)?;
        let select = raw
            .get("mm_vision_select_feature")
            .and_then(Value::as_str)
            .unwrap_or("patch");
        let feature_select = match select {
            "patch" => FeatureSelect::Patch,
            "cls_patch" => FeatureSelect::Full,
            s => {
                return Err(ModelError::config(
                    path,
                    format!("unknown mm_vision_select_feature {s:?}"),
                ))
            }
        };
        let projector = raw
            .get("mm_projector_type")
            .and_then(Value::as_str)
            .unwrap_or("linear");
        if projector != "mlp2x_gelu" {
            return Err(ModelError::config(
                path,
                format!("mm_projector_type {projector:?} is not supported (mlp2x_gelu only)"),
            ));
        }
        Ok(Self {
            format: CheckpointFormat::Original,
            text,
            vision,
            vision_feature_layer: raw
                .get("mm_vision_select_layer")
                .and_then(Value::as_i64)
                .unwrap_or(-2),
            feature_select,
            projector_bias: true,
            image_token_index: None,
            mm_vision_tower,
            vision_config_source: source,
        })
    }
}

/// The CLIP config of an original-format checkpoint: from `--vision-tower`, else from
/// `mm_vision_tower` when it names an existing directory (absolute or relative to the model), else
/// from the published towers LLaVA uses.
fn original_vision_config(
    dir: &Path,
    path: &Path,
    mm_vision_tower: Option<&str>,
    vision_tower: Option<&Path>,
) -> Result<(VisionConfig, String)> {
    if let Some(vt) = resolve_vision_tower_dir(dir, mm_vision_tower, vision_tower) {
        let cpath = vt.join("config.json");
        let raw = read_json(&cpath)?;
        // A full CLIPModel config nests the tower under vision_config.
        let vraw = raw.get("vision_config").cloned().unwrap_or(raw);
        return Ok((
            parse_vision(&cpath, &vraw, false)?,
            cpath.display().to_string(),
        ));
    }
    match mm_vision_tower {
        Some(id) if id.ends_with("clip-vit-large-patch14-336") => {
            Ok((clip_large_336(), format!("built-in config of {id}")))
        }
        Some(id) if id.ends_with("clip-vit-large-patch14") => {
            let mut v = clip_large_336();
            v.image_size = 224;
            Ok((v, format!("built-in config of {id}")))
        }
        Some(id) => Err(ModelError::VisionTowerNeeded(format!(
            "{}: mm_vision_tower {id:?} is not a directory here and not a known CLIP tower; pass --vision-tower DIR (a CLIP vision model directory with config.json)",
            path.display()
        ))),
        None => Err(ModelError::config(
            path,
            "original-format config without mm_vision_tower; pass --vision-tower DIR",
        )),
    }
}

/// The vision-tower directory to use, if any (the override wins).
pub fn resolve_vision_tower_dir(
    dir: &Path,
    mm_vision_tower: Option<&str>,
    vision_tower: Option<&Path>,
) -> Option<PathBuf> {
    if let Some(vt) = vision_tower {
        return Some(vt.to_path_buf());
    }
    let id = mm_vision_tower?;
    [dir.join(id), PathBuf::from(id)]
        .into_iter()
        .find(|p| p.join("config.json").is_file())
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(path, e))
}

/// transformers' `MistralConfig` fields; `None` means "take the default".
#[derive(Deserialize, Default)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
}

fn parse_text(path: &Path, raw: &Value) -> Result<TextConfig> {
    let r: RawText = if raw.is_null() {
        RawText::default()
    } else {
        serde_json::from_value(raw.clone()).map_err(|e| ModelError::config(path, e))?
    };
    if let Some(act) = &r.hidden_act {
        if act != "silu" {
            return Err(ModelError::config(
                path,
                format!("text hidden_act {act:?} is not supported (silu only)"),
            ));
        }
    }
    // transformers 5.x moved rope_theta into rope_parameters; older files have it flat.
    let mut rope_theta = r.rope_theta;
    for params in [&r.rope_parameters, &r.rope_scaling].into_iter().flatten() {
        if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
            rope_theta = Some(t);
        }
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(ModelError::config(
                path,
                format!("rope_type {kind:?} is not supported (default RoPE only)"),
            ));
        }
    }
    let hidden_size = r.hidden_size.unwrap_or(4096);
    let num_attention_heads = r.num_attention_heads.unwrap_or(32);
    let num_key_value_heads = r.num_key_value_heads.unwrap_or(8);
    let head_dim = r
        .head_dim
        .unwrap_or(hidden_size / num_attention_heads.max(1));
    let cfg = TextConfig {
        vocab_size: r.vocab_size.unwrap_or(32000),
        hidden_size,
        intermediate_size: r.intermediate_size.unwrap_or(14336),
        num_hidden_layers: r.num_hidden_layers.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: r.rms_norm_eps.unwrap_or(1e-6),
        rope_theta: rope_theta.unwrap_or(10000.0),
        max_position_embeddings: r.max_position_embeddings.unwrap_or(4096 * 32),
        // MistralConfig's default window is 4096; an explicit null disables it (v0.2).
        // (serde maps null to None, so look at the raw value.)
        sliding_window: match raw.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ModelError::config(path, format!("sliding_window {v} is not an integer"))
            })? as usize),
        },
        tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
    };
    if cfg.num_attention_heads == 0
        || cfg.num_key_value_heads == 0
        || !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
    {
        return Err(ModelError::config(
            path,
            format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                cfg.num_attention_heads, cfg.num_key_value_heads
            ),
        ));
    }
    if !cfg.head_dim.is_multiple_of(2) {
        return Err(ModelError::config(path, "head_dim must be even for RoPE"));
    }
    Ok(cfg)
}

#[derive(Deserialize, Default)]
struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    model_type: Option<String>,
}

/// CLIP ViT-L/14-336, LLaVA's tower (also what LlavaConfig builds when vision_config is absent).
fn clip_large_336() -> VisionConfig {
    VisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 336,
        patch_size: 14,
        layer_norm_eps: 1e-5,
        hidden_act: VisionAct::QuickGelu,
    }
}

/// A `CLIPVisionConfig` dict; `llava_default`: missing fields take CLIP-L/14-336 (LlavaConfig's
/// default tower) instead of `CLIPVisionConfig`'s own ViT-B/32 defaults.
pub(crate) fn parse_vision(path: &Path, raw: &Value, llava_default: bool) -> Result<VisionConfig> {
    let r: RawVision = if raw.is_null() {
        RawVision::default()
    } else {
        serde_json::from_value(raw.clone()).map_err(|e| ModelError::config(path, e))?
    };
    if let Some(mt) = &r.model_type {
        if mt != "clip_vision_model" && mt != "clip" {
            return Err(ModelError::config(
                path,
                format!("vision model_type {mt:?} is not supported (CLIP only)"),
            ));
        }
    }
    // CLIPVisionConfig's own defaults are ViT-B/32; LlavaConfig's missing vision_config is L/14-336.
    let d = if llava_default {
        clip_large_336()
    } else {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            layer_norm_eps: 1e-5,
            hidden_act: VisionAct::QuickGelu,
        }
    };
    let hidden_act = match r.hidden_act.as_deref() {
        None => d.hidden_act,
        Some("quick_gelu") => VisionAct::QuickGelu,
        Some("gelu") => VisionAct::Gelu,
        Some(a) => {
            return Err(ModelError::config(
                path,
                format!("vision hidden_act {a:?} is not supported"),
            ))
        }
    };
    let v = VisionConfig {
        hidden_size: r.hidden_size.unwrap_or(d.hidden_size),
        intermediate_size: r.intermediate_size.unwrap_or(d.intermediate_size),
        num_hidden_layers: r.num_hidden_layers.unwrap_or(d.num_hidden_layers),
        num_attention_heads: r.num_attention_heads.unwrap_or(d.num_attention_heads),
        num_channels: r.num_channels.unwrap_or(d.num_channels),
        image_size: r.image_size.unwrap_or(d.image_size),
        patch_size: r.patch_size.unwrap_or(d.patch_size),
        layer_norm_eps: r.layer_norm_eps.unwrap_or(d.layer_norm_eps),
        hidden_act,
    };
    if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
        return Err(ModelError::config(
            path,
            format!(
                "vision image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ),
        ));
    }
    if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
        return Err(ModelError::config(
            path,
            "vision hidden_size must be a multiple of num_attention_heads",
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: &Value) {
        std::fs::write(dir.join(name), serde_json::to_string(v).unwrap()).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tga-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn partial_text_config_takes_mistral_defaults_and_rope_parameters() {
        let d = tmp("partial");
        write(
            &d,
            "config.json",
            &serde_json::json!({
                "model_type": "llava_next",
                "text_config": {"model_type": "mistral", "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": null},
                "image_token_index": 32000
            }),
        );
        let c = LlavaConfig::from_dir(&d, None).unwrap();
        assert_eq!(c.format, CheckpointFormat::HfLlavaNext);
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_key_value_heads, 8);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.text.sliding_window, None);
        assert_eq!(c.vision, clip_large_336());
        assert_eq!(c.vision_layers_needed(), 23);
    }

    #[test]
    fn original_config_needs_a_vision_tower_it_can_find() {
        let d = tmp("orig");
        write(
            &d,
            "config.json",
            &serde_json::json!({
                "model_type": "llava_mistral", "hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "mm_vision_tower": "someone/custom-clip",
                "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad"
            }),
        );
        let err = LlavaConfig::from_dir(&d, None).unwrap_err();
        assert!(matches!(err, ModelError::VisionTowerNeeded(_)), "{err}");
        assert!(err.to_string().contains("--vision-tower"));
        let vt = tmp("orig-vt");
        write(
            &vt,
            "config.json",
            &serde_json::json!({"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4, "image_size": 336, "patch_size": 14, "num_hidden_layers": 2}),
        );
        let c = LlavaConfig::from_dir(&d, Some(&vt)).unwrap();
        assert_eq!(c.format, CheckpointFormat::Original);
        assert_eq!(c.vision.hidden_size, 32);
        assert_eq!(c.vision.num_patches(), 576);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let d = tmp("bad");
        write(
            &d,
            "config.json",
            &serde_json::json!({"model_type": "gpt2"}),
        );
        let e = LlavaConfig::from_dir(&d, None).unwrap_err().to_string();
        assert!(e.contains("unsupported model_type \"gpt2\""), "{e}");
        write(
            &d,
            "config.json",
            &serde_json::json!({"model_type": "llava", "text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}}),
        );
        let e = LlavaConfig::from_dir(&d, None).unwrap_err().to_string();
        assert!(e.contains("multiple of num_key_value_heads"), "{e}");
        std::fs::write(d.join("config.json"), "{not json").unwrap();
        let e = LlavaConfig::from_dir(&d, None).unwrap_err();
        assert!(matches!(e, ModelError::Config { .. }), "{e}");
        let e = LlavaConfig::from_dir(&d.join("nope"), None).unwrap_err();
        assert!(matches!(e, ModelError::Io { .. }), "{e}");
    }
}
