//! The `model` crate behind the engine seam: [`LlavaProcessor`] (template, tokenizer, images; runs
//! on the blocking pool) and [`LlavaBackend`] (prefill, batched decode, sampling; runs on the
//! engine thread). Both share one [`LlavaModel`]; the processor only reads its configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use model::config::CheckpointFormat;
use model::image::{decode_image, preprocess, ImageLimits};
use model::llava::{LlavaModel, LoadOptions};
use model::mistral::{KvCache, LayerTaps};
use model::template::{build_prompt, ChatMessage, ChatTemplate, ContentPart, PromptMode};
use model::tokenizer::Tokenizer;
use model::ModelError;

use crate::engine::backend::{
    BackendError, ChatTurn, ImageInput, ModelBackend, ProcessError, Prompt, PromptProcessor, Role,
    SampledToken, SamplingParams, TokenSampler, TurnPart,
};

/// Everything loaded from a checkpoint directory.
pub struct LoadedModel {
    pub model: Arc<LlavaModel>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
}

/// Loads model, tokenizer and chat template. `template` names a built-in template or overrides
/// the checkpoint's; original-format checkpoints default to `mistral_instruct` (LLaVA-1.6's
/// conversation mode; TGA checkpoints were trained with `llava_llama_2`).
pub fn load(
    dir: &Path,
    vision_tower: Option<PathBuf>,
    dtype: Option<DType>,
    template: Option<&str>,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let model = LlavaModel::load(
        dir,
        &LoadOptions {
            vision_tower,
            dtype,
        },
        device,
    )?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let template = match template {
        Some(name) => ChatTemplate::by_name(name)?,
        None => match ChatTemplate::from_dir(dir)? {
            Some(t) => t,
            None if model.config().format == CheckpointFormat::Original => {
                tracing::info!("no chat template in the checkpoint: using mistral_instruct (pass --template llava_llama_2 for TGA checkpoints)");
                ChatTemplate::MistralInstruct
            }
            None => {
                return Err(ModelError::Template(format!(
                    "{} has no chat template; pass --template mistral_instruct or llava_llama_2",
                    dir.display()
                )))
            }
        },
    };
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
        template,
    })
}

/// Validation-side half: images → pixel values and token counts, messages → prompt ids.
pub struct LlavaProcessor {
    model: Arc<LlavaModel>,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    limits: ImageLimits,
}

impl LlavaProcessor {
    pub fn new(loaded: &LoadedModel, limits: ImageLimits) -> Self {
        Self {
            model: loaded.model.clone(),
            tokenizer: loaded.tokenizer.clone(),
            template: loaded.template.clone(),
            limits,
        }
    }
}

impl PromptProcessor for LlavaProcessor {
    fn prepare_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError> {
        let img = decode_image(bytes, &self.limits).map_err(image_error)?;
        let p = preprocess(&img, self.model.preprocess_config()).map_err(image_error)?;
        let (h, w) = p.original_hw;
        let (vh, vw) = p.size;
        Ok(ImageInput {
            image_size: (h, w),
            num_tokens: self.model.image_token_count(h, w),
            shape: vec![p.n_views, 3, vh as usize, vw as usize],
            pixel_values: p.pixel_values,
        })
    }

    fn build_prompt(
        &self,
        turns: &[ChatTurn],
        images: Vec<ImageInput>,
    ) -> Result<Prompt, ProcessError> {
        let messages: Vec<ChatMessage> = turns
            .iter()
            .map(|t| {
                let role = match t.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                let content = t
                    .parts
                    .iter()
                    .map(|p| match p {
                        TurnPart::Text(s) => ContentPart::Text(s.clone()),
                        TurnPart::Image(_) => ContentPart::Image,
                    })
                    .collect();
                ChatMessage::new(role, content)
            })
            .collect();
        let rendered = self
            .template
            .render(&messages, true)
            .map_err(|e| ProcessError::InvalidPrompt(e.to_string()))?;
        // Images appear in the prompt in the order of their parts; the parts index `images`.
        let order: Vec<usize> = turns
            .iter()
            .flat_map(|t| t.parts.iter())
            .filter_map(|p| match p {
                TurnPart::Image(i) => Some(*i),
                TurnPart::Text(_) => None,
            })
            .collect();
        let mut slots: Vec<Option<ImageInput>> = images.into_iter().map(Some).collect();
        let mut ordered = Vec::with_capacity(order.len());
        for i in order {
            let img = slots.get_mut(i).and_then(Option::take).ok_or_else(|| {
                ProcessError::Internal(format!("image part {i} has no (or a reused) image"))
            })?;
            ordered.push(img);
        }
        let counts: Vec<usize> = ordered.iter().map(|i| i.num_tokens).collect();
        let mode = match self.model.config().format {
            CheckpointFormat::Original => PromptMode::Original,
            _ => PromptMode::Hf,
        };
        let tokens = build_prompt(&self.tokenizer, &rendered, &counts, mode)
            .map_err(|e| ProcessError::InvalidPrompt(e.to_string()))?;
        Ok(Prompt {
            token_ids: tokens.ids,
            image_spans: tokens.image_spans,
            images: ordered,
        })
    }
}

fn image_error(e: ModelError) -> ProcessError {
    match e {
        ModelError::UnsupportedImageFormat(_)
        | ModelError::ImageBytesTooLarge { .. }
        | ModelError::ImageTooLarge { .. }
        | ModelError::ImageDecode(_)
        | ModelError::InvalidInput(_) => ProcessError::InvalidImage(e.to_string()),
        other => ProcessError::Internal(other.to_string()),
    }
}

/// Engine-side half.
pub struct LlavaBackend {
    model: Arc<LlavaModel>,
    tokenizer: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
}

impl LlavaBackend {
    pub fn new(loaded: &LoadedModel) -> Self {
        Self {
            model: loaded.model.clone(),
            tokenizer: loaded.tokenizer.clone(),
            stop_ids: loaded.tokenizer.eos_id().into_iter().collect(),
        }
    }

    /// One short text and image request through the whole path, so the first user does not pay
    /// for lazy initialisation.
    pub fn warm_up(&mut self) -> Result<(), BackendError> {
        let mut cache = self.new_cache();
        let bos = self.tokenizer.bos_id().unwrap_or(1);
        let logits = self.prefill(
            &Prompt {
                token_ids: vec![bos, bos],
                image_spans: vec![],
                images: vec![],
            },
            &mut cache,
        )?;
        let tok = argmax(&logits);
        self.decode_batch(&[tok], &mut [&mut cache])?;
        Ok(())
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn internal(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(e)
}

impl ModelBackend for LlavaBackend {
    type Cache = KvCache;
    type Sampler = LlavaSampler;

    fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    fn prefill(&mut self, prompt: &Prompt, cache: &mut KvCache) -> Result<Vec<f32>, BackendError> {
        let mut images = Vec::with_capacity(prompt.images.len());
        for (img, span) in prompt.images.iter().zip(&prompt.image_spans) {
            let pv = Tensor::from_slice(&img.pixel_values, img.shape.as_slice(), &Device::Cpu)
                .map_err(internal)?;
            let feats = self
                .model
                .encode_image(&model::llava::ImageInput {
                    pixel_values: pv,
                    original_hw: img.image_size,
                })
                .map_err(internal)?;
            images.push((span.clone(), feats));
        }
        let out = self
            .model
            .prefill(&prompt.token_ids, &images, cache, &LayerTaps::default())
            .map_err(internal)?;
        out.logits
            .i(0)
            .and_then(|r| r.to_vec1::<f32>())
            .map_err(internal)
    }

    fn decode_batch(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        self.model
            .decode_step(tokens, caches)
            .map_err(internal)?
            .to_vec2::<f32>()
            .map_err(internal)
    }

    fn sampler(&self, params: &SamplingParams) -> LlavaSampler {
        LlavaSampler(model::sampling::Sampler::new(
            model::sampling::SamplingParams {
                temperature: params.temperature,
                top_p: params.top_p,
                top_k: params.top_k.unwrap_or(0),
                seed: params.seed,
                max_tokens: None,
                stop: vec![],
                logprobs: params.logprobs.is_some(),
                top_logprobs: params.logprobs.unwrap_or(0),
            },
        ))
    }

    fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    fn decode_text(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}

pub struct LlavaSampler(model::sampling::Sampler);

impl TokenSampler for LlavaSampler {
    fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError> {
        let t = self.0.sample_logits(logits).map_err(internal)?;
        Ok(SampledToken {
            id: t.id,
            logprob: t.logprob,
            top_logprobs: t.top_logprobs,
        })
    }
}
