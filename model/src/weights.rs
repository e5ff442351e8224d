//! Safetensors checkpoints: shard discovery, memory mapping, tensor-name generations and validation.
//!
//! Every tensor is addressed by one canonical name, the HF `llava` save format of transformers
//! < 4.52 (`language_model.model.layers.0...`, `vision_tower.vision_model...`,
//! `multi_modal_projector.linear_1...`, `image_newline`), whatever the checkpoint calls it. The
//! model code asks for tensors through a candle `VarBuilder` over [`Checkpoint`]; each request is
//! checked (present, right shape) and recorded, so that afterwards any tensor nobody asked for is
//! reported too. Tensors are read from the mmap straight into their final dtype and device: no
//! second copy of the weights is kept.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::CheckpointFormat;
use crate::error::{ModelError, Result};

/// Where a canonical tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    real_name: String,
    shape: Vec<usize>,
}

struct Inner {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    entries: HashMap<String, Entry>,
    used: Mutex<HashSet<String>>,
    /// Canonical-name prefixes that may stay unread (CLIP layers past the feature layer, ...).
    unused_ok: Mutex<Vec<String>>,
    /// The first precise error met while the model was being built through the VarBuilder.
    first_error: Mutex<Option<ModelError>>,
}

/// An opened checkpoint (plus, for original-format models, a separate vision-tower directory).
#[derive(Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

impl Checkpoint {
    /// Opens every safetensors shard of `dir` (and of `vision_dir`, whose tensors only fill in
    /// what the checkpoint itself lacks, as LLaVA's loader lets checkpoint weights win).
    pub fn open(dir: &Path, format: CheckpointFormat, vision_dir: Option<&Path>) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for path in shard_paths(dir)? {
            add_file(
                &mut files,
                &mut entries,
                path,
                |n| canonical_name(format, n),
                true,
            )?;
        }
        if let Some(vd) = vision_dir {
            for path in shard_paths(vd)? {
                add_file(&mut files, &mut entries, path, clip_dir_name, false)?;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                files,
                entries,
                used: Mutex::new(HashSet::new()),
                unused_ok: Mutex::new(Vec::new()),
                first_error: Mutex::new(None),
            }),
        })
    }

    /// Every tensor's canonical name and shape.
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.inner
            .entries
            .iter()
            .map(|(name, e)| (name.clone(), e.shape.clone()))
            .collect()
    }

    pub fn contains(&self, canonical: &str) -> bool {
        self.inner.entries.contains_key(canonical)
    }

    /// The dtype a tensor is stored in (None: absent, or a dtype candle cannot load).
    pub fn dtype_of(&self, canonical: &str) -> Option<DType> {
        let entry = self.inner.entries.get(canonical)?;
        let view = self.inner.files[entry.file].1.get(&entry.real_name).ok()?;
        match view.dtype() {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F64 => Some(DType::F64),
            _ => None,
        }
    }

    /// A VarBuilder that loads canonical names into `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(Backend {
            inner: self.inner.clone(),
        });
        VarBuilder::from_backend(backend, dtype, device.clone())
    }

    /// Declares that tensors under `prefix` may be present without being read.
    pub fn allow_unused(&self, prefix: impl Into<String>) {
        self.inner.unused_ok.lock().unwrap().push(prefix.into());
    }

    /// Converts an error raised while building the model into the precise one recorded, if any.
    pub fn explain(&self, err: candle_core::Error) -> ModelError {
        self.inner
            .first_error
            .lock()
            .unwrap()
            .take()
            .unwrap_or(ModelError::Candle(err))
    }

    /// After the model is built: every tensor must have been read or declared unused.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.inner.used.lock().unwrap();
        let ok = self.inner.unused_ok.lock().unwrap();
        let mut extra: Vec<(&String, &Entry)> = self
            .inner
            .entries
            .iter()
            .filter(|(name, _)| !used.contains(*name) && !ok.iter().any(|p| name.starts_with(p)))
            .collect();
        extra.sort_by(|a, b| a.0.cmp(b.0));
        match extra.first() {
            None => Ok(()),
            Some((name, e)) => Err(ModelError::UnexpectedTensor {
                name: format!("{} (stored as `{}`)", name, e.real_name),
                found: e.shape.clone(),
            }),
        }
    }
}

struct Backend {
    inner: Arc<Inner>,
}

impl Backend {
    fn fail(&self, e: ModelError) -> candle_core::Error {
        let msg = e.to_string();
        let mut slot = self.inner.first_error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(e);
        }
        candle_core::Error::Msg(msg)
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(entry) = self.inner.entries.get(name) else {
            return Err(self.fail(ModelError::MissingTensor {
                name: name.to_string(),
                expected: vec![],
            }));
        };
        let (path, st) = &self.inner.files[entry.file];
        let view = st.get(&entry.real_name)?;
        // Convert on the target device: a bf16 checkpoint goes to the GPU as bf16 and to the CPU
        // as f32 (candle's CPU bf16 matmul widens the weights on every call: CANDLE.md).
        let t = candle_core::safetensors::Load::load(&view, dev).map_err(|e| {
            self.fail(ModelError::Safetensors {
                path: path.clone(),
                msg: format!("tensor `{}`: {e}", entry.real_name),
            })
        })?;
        self.inner.used.lock().unwrap().insert(name.to_string());
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.inner.entries.get(name) {
            None => Err(self.fail(ModelError::MissingTensor {
                name: name.to_string(),
                expected: s.dims().to_vec(),
            })),
            Some(e) if e.shape != s.dims() => Err(self.fail(ModelError::ShapeMismatch {
                name: if e.real_name == name {
                    name.to_string()
                } else {
                    format!("{name} (stored as `{}`)", e.real_name)
                },
                expected: s.dims().to_vec(),
                found: e.shape.clone(),
            })),
            Some(_) => self.load(name, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }
}

fn add_file(
    files: &mut Vec<(PathBuf, MmapedSafetensors)>,
    entries: &mut HashMap<String, Entry>,
    path: PathBuf,
    map: impl Fn(&str) -> Option<String>,
    wins: bool,
) -> Result<()> {
    if !path.is_file() {
        return Err(ModelError::Io {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "shard file not found"),
            path,
        });
    }
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on nobody
    // truncating checkpoint files while the server runs.
    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| ModelError::Safetensors {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let idx = files.len();
    for (real, view) in st.tensors() {
        let Some(canonical) = map(&real) else {
            continue;
        };
        if !wins && entries.contains_key(&canonical) {
            continue;
        }
        if wins {
            if let Some(prev) = entries.get(&canonical) {
                if prev.file != idx {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        msg: format!(
                            "tensor `{real}` is also stored in {} (as `{}`)",
                            files[prev.file].0.display(),
                            prev.real_name
                        ),
                    });
                }
            }
        }
        entries.insert(
            canonical,
            Entry {
                file: idx,
                real_name: real.clone(),
                shape: view.shape().to_vec(),
            },
        );
    }
    files.push((path, st));
    Ok(())
}

/// The safetensors files of a checkpoint directory: the index's shards, else `model.safetensors`,
/// else every `*.safetensors` file.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = crate::config::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::config(&index, "no weight_map object"))?;
        let files: std::collections::BTreeSet<&str> =
            map.values().filter_map(|f| f.as_str()).collect();
        if files.is_empty() {
            return Err(ModelError::config(&index, "weight_map is empty"));
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        let has_bin = dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists();
        return Err(ModelError::Safetensors {
            path: dir.to_path_buf(),
            msg: if has_bin {
                "only pytorch_model.bin weights found; convert them to safetensors first".into()
            } else {
                "no *.safetensors files found".into()
            },
        });
    }
    Ok(found)
}

/// Maps a checkpoint tensor name to the canonical one; `None` for tensors that carry no weights
/// (rotary caches, position-id buffers).
pub fn canonical_name(format: CheckpointFormat, name: &str) -> Option<String> {
    if name.ends_with("rotary_emb.inv_freq") || name.ends_with("embeddings.position_ids") {
        return None;
    }
    let rules: &[(&str, &str)] = match format {
        // transformers >= 4.52 writes `model.language_model.*` etc.; older files the legacy names.
        CheckpointFormat::HfLlava | CheckpointFormat::HfLlavaNext => &[
            ("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"),
            ("lm_head.", "language_model.lm_head."),
        ],
        CheckpointFormat::Original => &[
            ("model.vision_tower.vision_tower.", "vision_tower."),
            ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
            ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
            ("model.image_newline", "image_newline"),
            ("model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
        ],
    };
    let mapped = rules
        .iter()
        .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .unwrap_or_else(|| name.to_string());
    // transformers 5.x saves CLIPVisionModel weights without the `vision_model.` level.
    match mapped.strip_prefix("vision_tower.") {
        Some(rest) if !rest.starts_with("vision_model.") => {
            Some(format!("vision_tower.vision_model.{rest}"))
        }
        _ => Some(mapped),
    }
}

/// Names inside a CLIP checkpoint directory (`CLIPVisionModel` or a full `CLIPModel`).
fn clip_dir_name(name: &str) -> Option<String> {
    if name.ends_with("embeddings.position_ids") {
        return None;
    }
    // A full CLIPModel also holds the text tower and projections, which LLaVA does not use.
    if name.starts_with("text_model.")
        || name.starts_with("text_projection")
        || name.starts_with("visual_projection")
        || name == "logit_scale"
    {
        return None;
    }
    let rest = name.strip_prefix("vision_model.").unwrap_or(name);
    Some(format!("vision_tower.vision_model.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hf_generations_and_the_original_format_map_to_one_name() {
        let hf = CheckpointFormat::HfLlavaNext;
        let orig = CheckpointFormat::Original;
        let q = "language_model.model.layers.3.self_attn.q_proj.weight";
        assert_eq!(canonical_name(hf, q).unwrap(), q);
        assert_eq!(
            canonical_name(hf, "model.language_model.layers.3.self_attn.q_proj.weight").unwrap(),
            q
        );
        assert_eq!(
            canonical_name(orig, "model.layers.3.self_attn.q_proj.weight").unwrap(),
            q
        );
        assert_eq!(
            canonical_name(hf, "lm_head.weight").unwrap(),
            "language_model.lm_head.weight"
        );
        assert_eq!(
            canonical_name(orig, "model.mm_projector.2.bias").unwrap(),
            "multi_modal_projector.linear_2.bias"
        );
        assert_eq!(
            canonical_name(
                orig,
                "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight"
            )
            .unwrap(),
            "vision_tower.vision_model.pre_layrnorm.weight"
        );
        assert_eq!(
            canonical_name(orig, "model.image_newline").unwrap(),
            "image_newline"
        );
        assert_eq!(
            canonical_name(hf, "model.image_newline").unwrap(),
            "image_newline"
        );
        assert!(canonical_name(orig, "model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
        assert_eq!(
            clip_dir_name("text_model.embeddings.token_embedding.weight"),
            None
        );
        assert_eq!(
            clip_dir_name("embeddings.class_embedding").unwrap(),
            "vision_tower.vision_model.embeddings.class_embedding"
        );
        assert_eq!(
            canonical_name(hf, "vision_tower.encoder.layers.0.mlp.fc1.weight").unwrap(),
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
        );
    }
}
