//! Preprocessing configuration: transformers' image-processor dicts and the original LLaVA
//! codebase's `image_aspect_ratio`, unified into [`PreprocessConfig`].

use std::path::Path;

use serde_json::Value;

use super::resample::Resample;
use crate::error::{ModelError, Result};

/// OpenAI CLIP normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `image_grid_pinpoints` of llava-v1.6 (and `LlavaNextImageProcessor`'s default), as (h, w).
pub const LLAVA_NEXT_PINPOINTS: [(u32, u32); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// The processor's `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// `{"shortest_edge": n}`: shorter side to n, longer side `int(n * long / short)`.
    ShortestEdge(u32),
    /// `{"height": h, "width": w}`.
    Exact { height: u32, width: u32 },
}

/// How unpad rounds `original * scale` (the only place the two codebases' anyres arithmetic
/// differs besides the pinpoint order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpadRounding {
    /// transformers: `int(round(x, 7))`.
    Round7,
    /// original LLaVA (`llava_arch.unpad_image`): `int(x)`.
    Truncate,
}

/// How an image becomes views of the vision tower's input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AspectMode {
    /// CLIP: resize the shortest edge, centre crop (HF `llava` without `do_pad`).
    ResizeCrop,
    /// LLaVA-1.5 `expand2square` with the mean colour, then resize + centre crop.
    PadToSquare,
    /// LLaVA-NeXT: a base view of the whole image plus the tiles of the best pinpoint canvas.
    /// `pinpoints` are (height, width) in the order the checkpoint lists them (ties go to the
    /// first); original-format (width, height) lists are swapped on load.
    Anyres {
        pinpoints: Vec<(u32, u32)>,
        unpad: UnpadRounding,
    },
}

#[doc(alias = "ImagePreprocessor")]
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub size: SizeSpec,
    /// (height, width).
    pub crop_size: (u32, u32),
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// Kept in f64 as transformers multiplies in float64 before casting to float32.
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub resample: Resample,
    pub aspect: AspectMode,
}

impl PreprocessConfig {
    /// `CLIPImageProcessor` defaults for a vision tower of `image_size` (what an original-format
    /// checkpoint gets when its CLIP directory has no preprocessor_config.json).
    pub fn clip_defaults(image_size: u32) -> Self {
        Self {
            size: SizeSpec::ShortestEdge(image_size),
            crop_size: (image_size, image_size),
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: 1.0 / 255.0,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            resample: Resample::Bicubic,
            aspect: AspectMode::ResizeCrop,
        }
    }

    /// From an HF image-processor dict (`preprocessor_config.json`, or the `image_processor`
    /// entry of a transformers 5 `processor_config.json`). The mode follows the processor class:
    /// `LlavaNextImageProcessor` (or any dict with `image_grid_pinpoints`) → anyres;
    /// `LlavaImageProcessor` with `do_pad: true` → pad to square; otherwise resize + crop.
    /// `source` names the file in error messages.
    pub fn from_hf_preprocessor(json: &Value, source: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::config(source, msg);
        let obj = json
            .as_object()
            .ok_or_else(|| bad("image processor config is not an object".into()))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let flag = |k: &str, default: bool| -> Result<bool> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(format!("`{k}` is not a bool"))),
            }
        };
        let kind = get("image_processor_type")
            .and_then(Value::as_str)
            .unwrap_or("CLIPImageProcessor");
        let is_next = kind.starts_with("LlavaNext") || get("image_grid_pinpoints").is_some();
        let default_side = 224; // the processors' class defaults
        let size = match get("size") {
            None => SizeSpec::ShortestEdge(default_side),
            // get_size_dict(int, default_to_square=False) → shortest_edge
            Some(v) => parse_size(v, false).map_err(|m| bad(format!("`size`: {m}")))?,
        };
        let crop_size = match get("crop_size") {
            None => (default_side, default_side),
            Some(v) => match parse_size(v, true).map_err(|m| bad(format!("`crop_size`: {m}")))? {
                SizeSpec::Exact { height, width } => (height, width),
                SizeSpec::ShortestEdge(_) => {
                    return Err(bad("`crop_size` needs height and width".into()))
                }
            },
        };
        let triple = |k: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match get(k) {
                None => Ok(default),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    Ok([x; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, v) in out.iter_mut().zip(a) {
                        *o = v
                            .as_f64()
                            .ok_or_else(|| bad(format!("`{k}` has a non-number")))?;
                    }
                    Ok(out)
                }
                Some(_) => Err(bad(format!("`{k}` must be a number or 3 numbers"))),
            }
        };
        let resample = match get("resample") {
            None => Resample::Bicubic,
            Some(v) => v.as_i64().and_then(Resample::from_pil).ok_or_else(|| {
                bad(format!(
                    "unsupported `resample` {v} (2 bilinear, 3 bicubic)"
                ))
            })?,
        };
        let rescale_factor = match get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("`rescale_factor` is not a number".into()))?,
        };
        let aspect = if is_next {
            let pinpoints = match get("image_grid_pinpoints") {
                None => LLAVA_NEXT_PINPOINTS.to_vec(),
                Some(v) => {
                    parse_pinpoints(v).map_err(|m| bad(format!("`image_grid_pinpoints`: {m}")))?
                }
            };
            AspectMode::Anyres {
                pinpoints,
                unpad: UnpadRounding::Round7,
            }
        } else if kind.starts_with("LlavaImageProcessor") && flag("do_pad", false)? {
            AspectMode::PadToSquare
        } else {
            AspectMode::ResizeCrop
        };
        let cfg = Self {
            size,
            crop_size,
            do_resize: flag("do_resize", true)?,
            do_center_crop: flag("do_center_crop", true)?,
            do_rescale: flag("do_rescale", true)?,
            do_normalize: flag("do_normalize", true)?,
            rescale_factor,
            image_mean: triple("image_mean", CLIP_MEAN)?,
            image_std: triple("image_std", CLIP_STD)?,
            resample,
            aspect,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Reads `dir/preprocessor_config.json`, else the `image_processor` entry of
    /// `dir/processor_config.json` (what transformers 5 `save_pretrained` writes).
    /// `Ok(None)` when neither holds an image processor.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let v = crate::config::read_json(&pre)?;
            return Self::from_hf_preprocessor(&v, &pre).map(Some);
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let v = crate::config::read_json(&proc)?;
            if let Some(ip) = v.get("image_processor") {
                return Self::from_hf_preprocessor(ip, &proc).map(Some);
            }
        }
        Ok(None)
    }

    /// An original-format (LLaVA codebase) checkpoint: `clip` is the vision tower's CLIP
    /// processor (from its preprocessor_config.json or [`Self::clip_defaults`]); the model
    /// config's `image_aspect_ratio` picks the mode as `llava.mm_utils.process_images` does:
    /// "pad" → pad to square, "anyres" → anyres with `image_grid_pinpoints` (read as (w, h) there,
    /// swapped to (h, w) here, order kept) and LLaVA's truncating unpad; anything else (absent,
    /// "square") → the plain CLIP processor.
    pub fn for_original_llava(model_config: &Value, mut clip: Self, source: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::config(source, msg);
        let ratio = model_config
            .get("image_aspect_ratio")
            .and_then(Value::as_str)
            .unwrap_or("square");
        clip.aspect = match ratio {
            "pad" => AspectMode::PadToSquare,
            "anyres" => {
                let v = model_config
                    .get("image_grid_pinpoints")
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| {
                        bad("image_aspect_ratio \"anyres\" needs image_grid_pinpoints".into())
                    })?;
                let wh =
                    parse_pinpoints(v).map_err(|m| bad(format!("`image_grid_pinpoints`: {m}")))?;
                AspectMode::Anyres {
                    pinpoints: wh.into_iter().map(|(w, h)| (h, w)).collect(),
                    unpad: UnpadRounding::Truncate,
                }
            }
            r if r.starts_with("anyres") => {
                return Err(bad(format!(
                    "image_aspect_ratio {r:?} is not supported (only \"anyres\", \"pad\")"
                )))
            }
            _ => AspectMode::ResizeCrop,
        };
        clip.validate().map_err(bad)?;
        Ok(clip)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (ch, cw) = self.crop_size;
        if ch == 0 || cw == 0 {
            return Err("crop_size must be positive".into());
        }
        match self.size {
            SizeSpec::ShortestEdge(0) => return Err("size must be positive".into()),
            SizeSpec::Exact { height, width } if height == 0 || width == 0 => {
                return Err("size must be positive".into())
            }
            _ => {}
        }
        if let AspectMode::Anyres { pinpoints, .. } = &self.aspect {
            if pinpoints.is_empty() || pinpoints.iter().any(|&(h, w)| h == 0 || w == 0) {
                return Err(
                    "image_grid_pinpoints must be a non-empty list of positive sizes".into(),
                );
            }
        }
        if self.image_std.contains(&0.0) {
            return Err("image_std must be non-zero".into());
        }
        Ok(())
    }

    /// (height, width) of every view [`preprocess`](super::preprocess()) produces.
    pub fn view_size(&self) -> (u32, u32) {
        if self.do_center_crop {
            self.crop_size
        } else {
            match self.size {
                SizeSpec::ShortestEdge(s) => (s, s),
                SizeSpec::Exact { height, width } => (height, width),
            }
        }
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)` = (122, 116, 104) for CLIP.
    pub fn pad_colour(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// transformers' llava_next `patch_size`: the crop height (crop_size is always set here).
    pub(super) fn tile_size(&self) -> u32 {
        self.crop_size.0
    }

    /// The base view's size: (size.height, size.width), or (shortest_edge, shortest_edge).
    pub(super) fn base_size(&self) -> (u32, u32) {
        match self.size {
            SizeSpec::ShortestEdge(s) => (s, s),
            SizeSpec::Exact { height, width } => (height, width),
        }
    }
}

fn as_u32(v: &Value) -> std::result::Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{v} is not a positive integer"))
}

/// transformers' `get_size_dict`: an int is a shortest edge (size) or a square (crop_size); a
/// dict holds `shortest_edge` or `height`/`width`; a 2-list is (height, width).
fn parse_size(v: &Value, int_is_square: bool) -> std::result::Result<SizeSpec, String> {
    match v {
        Value::Number(_) => {
            let n = as_u32(v)?;
            Ok(if int_is_square {
                SizeSpec::Exact {
                    height: n,
                    width: n,
                }
            } else {
                SizeSpec::ShortestEdge(n)
            })
        }
        Value::Array(a) if a.len() == 2 => Ok(SizeSpec::Exact {
            height: as_u32(&a[0])?,
            width: as_u32(&a[1])?,
        }),
        Value::Object(o) => {
            let field = |k: &str| o.get(k).filter(|v| !v.is_null());
            if let (Some(h), Some(w)) = (field("height"), field("width")) {
                Ok(SizeSpec::Exact {
                    height: as_u32(h)?,
                    width: as_u32(w)?,
                })
            } else if let Some(s) = field("shortest_edge") {
                if field("longest_edge").is_some() {
                    return Err("shortest_edge with longest_edge is not supported".into());
                }
                Ok(SizeSpec::ShortestEdge(as_u32(s)?))
            } else {
                Err(format!("unsupported size {v}"))
            }
        }
        _ => Err(format!("unsupported size {v}")),
    }
}

/// A list of 2-lists, or the LLaVA codebase's string form "[(336, 672), (672, 336)]"
/// (it runs `ast.literal_eval` on strings). Pairs are returned as written.
fn parse_pinpoints(v: &Value) -> std::result::Result<Vec<(u32, u32)>, String> {
    let pairs: Vec<(u32, u32)> = match v {
        Value::Array(items) => items
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([a, b]) => Ok((as_u32(a)?, as_u32(b)?)),
                _ => Err(format!("{p} is not a pair")),
            })
            .collect::<std::result::Result<_, _>>()?,
        Value::String(s) => {
            if s.contains('x') {
                return Err(format!("grid-range form {s:?} is not supported"));
            }
            let nums: Vec<u32> = s
                .split(|c: char| !c.is_ascii_digit())
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<u32>().map_err(|e| e.to_string()))
                .collect::<std::result::Result<_, _>>()?;
            let pairs = nums.chunks_exact(2);
            if !pairs.remainder().is_empty() {
                return Err(format!("{s:?} does not hold pairs"));
            }
            pairs.map(|p| (p[0], p[1])).collect()
        }
        _ => return Err(format!("unsupported value {v}")),
    };
    if pairs.is_empty() || pairs.iter().any(|&(a, b)| a == 0 || b == 0) {
        return Err("needs at least one pair of positive sizes".into());
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::anyres::{image_token_count, select_best_resolution};
    use crate::image::test_support::hf_next;

    #[test]
    fn configs_from_both_checkpoint_formats() {
        let src = Path::new("test");
        // Ints: size is a shortest edge, crop_size a square (transformers' get_size_dict).
        let clip = serde_json::json!({"crop_size": 336, "size": 336, "resample": 3});
        let clip = PreprocessConfig::from_hf_preprocessor(&clip, src).unwrap();
        assert_eq!(clip.size, SizeSpec::ShortestEdge(336));
        assert_eq!(clip.crop_size, (336, 336));
        assert_eq!(clip.aspect, AspectMode::ResizeCrop);
        assert_eq!(clip, PreprocessConfig::clip_defaults(336));
        // HF llava: pads only with do_pad.
        let llava =
            serde_json::json!({"image_processor_type": "LlavaImageProcessor", "do_pad": true});
        let llava = PreprocessConfig::from_hf_preprocessor(&llava, src).unwrap();
        assert_eq!(llava.aspect, AspectMode::PadToSquare);
        let bad = serde_json::json!({"resample": 0});
        assert!(PreprocessConfig::from_hf_preprocessor(&bad, src).is_err());

        // Original format: pinpoints are (w, h) there; a string form is accepted.
        let orig = serde_json::json!({
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": "[(336, 672), (672, 336), (672, 672)]"
        });
        let cfg = PreprocessConfig::for_original_llava(&orig, clip.clone(), src).unwrap();
        assert_eq!(
            cfg.aspect,
            AspectMode::Anyres {
                pinpoints: vec![(672, 336), (336, 672), (672, 672)],
                unpad: UnpadRounding::Truncate
            }
        );
        // Small images tie on the first two canvases: LLaVA stacks 2 tiles (672 high) where
        // transformers puts them side by side (counts from fixtures/reference/token_counts.json).
        assert_eq!(
            select_best_resolution(300, 200, &[(672, 336), (336, 672)]),
            (672, 336)
        );
        assert_eq!(image_token_count(300, 200, &cfg, 24), 1476);
        assert_eq!(image_token_count(300, 200, &hf_next(), 24), 984);
        let pad = serde_json::json!({"image_aspect_ratio": "pad", "image_grid_pinpoints": null});
        let pad = PreprocessConfig::for_original_llava(&pad, clip.clone(), src).unwrap();
        assert_eq!(pad.aspect, AspectMode::PadToSquare);
        let none = PreprocessConfig::for_original_llava(&serde_json::json!({}), clip.clone(), src);
        assert_eq!(none.unwrap().aspect, AspectMode::ResizeCrop);
        let odd = serde_json::json!({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),...,(6x6)"});
        assert!(PreprocessConfig::for_original_llava(&odd, clip, src).is_err());
    }
}
