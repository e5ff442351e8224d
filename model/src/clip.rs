//! CLIP ViT vision tower, as transformers' `CLIPVisionTransformer` computes it, run only up to the
//! feature layer LLaVA reads (`vision_feature_layer` / `mm_vision_select_layer`, −2 by default).
//!
//! Written here rather than taken from candle-transformers because LLaVA needs hidden state −2 with
//! HF's indexing (entry 0 = embeddings after `pre_layrnorm`), which candle's model does not give.
//! The encoder layer is shared with the CLIP text tower (`clip_embed`), which runs it causally.

use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use crate::config::{VisionAct, VisionConfig};
use crate::cpu;

/// The shape of one pre-LN CLIP encoder layer (the vision and text towers differ only in these).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: VisionAct,
}

impl From<&VisionConfig> for LayerDims {
    fn from(cfg: &VisionConfig) -> Self {
        Self {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        }
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: LayerDims, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.heads,
            head_dim: h / cfg.heads,
        })
    }

    /// `causal`: query i sees keys 0..=i only (the text tower).
    fn forward(&self, xs: &Tensor, causal: bool) -> candle_core::Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(xs)? * scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let keys = if causal {
            // Scores are [heads, n, n] per sequence: row r is the query at position r % n.
            cpu::KeyRange::Causal {
                q0: 0,
                rows_per_head: n,
                kbeg: 0,
                window: None,
            }
        } else {
            cpu::KeyRange::All
        };
        // One image (view) at a time: all views' scores at once (B × heads × n × n, 40 MB for
        // five anyres views of a small tower) would miss the caches and page-fault on every op.
        let mut outs = Vec::with_capacity(b);
        for i in 0..b {
            let scores = q.get(i)?.matmul(&k.get(i)?.t()?)?;
            let w = match cpu::masked_softmax(&scores, 1.0, keys)? {
                Some(w) => w,
                None if causal => {
                    let mask: Vec<f32> = (0..n * n)
                        .map(|r| {
                            if r % n > r / n {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (n, n), scores.device())?
                        .to_dtype(scores.dtype())?;
                    candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?
                }
                None => candle_nn::ops::softmax_last_dim(&scores)?,
            };
            outs.push(w.matmul(&v.get(i)?)?);
        }
        let o = Tensor::stack(&outs, 0)?
            .transpose(1, 2)?
            .reshape((b, n, h))?;
        self.out_proj.forward(&o)
    }
}

pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: VisionAct,
}

impl EncoderLayer {
    pub(crate) fn new(cfg: LayerDims, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            layer_norm1: layer_norm(h, cfg.eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(h, cfg.eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate, h, vb.pp("mlp").pp("fc2"))?,
            act: cfg.act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, causal: bool) -> candle_core::Result<Tensor> {
        let xs = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, causal)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = match self.act {
            // transformers' QuickGELUActivation: x * sigmoid(1.702 x).
            VisionAct::QuickGelu => match cpu::quick_gelu(&h)? {
                Some(a) => a,
                None => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            },
            VisionAct::Gelu => h.gelu_erf()?,
        };
        xs + self.fc2.forward(&h)?
    }
}

/// The vision tower up to the selected feature layer.
pub struct VisionTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    patch: usize,
    channels: usize,
}

impl VisionTower {
    /// `vb` points at `vision_model`; `layers_needed` is how many encoder layers the feature layer
    /// reads (HF hidden_states index: 0 = embeddings, k = after layer k).
    pub fn new(
        cfg: &VisionConfig,
        layers_needed: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..layers_needed)
            .map(|i| EncoderLayer::new(cfg.into(), vb.pp("encoder").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding: emb.get(
                (h, cfg.num_channels, cfg.patch_size, cfg.patch_size),
                "patch_embedding.weight",
            )?,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((cfg.num_patches() + 1, h), "position_embedding.weight")?,
            pre_layrnorm: layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            patch: cfg.patch_size,
            channels: cfg.num_channels,
        })
    }

    /// `pixel_values` [B, C, S, S] → hidden state of the feature layer [B, 1 + patches, hidden].
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        cpu::on_pool_for(pixel_values.device(), || self.forward_on_pool(pixel_values))
    }

    fn forward_on_pool(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, hgt, wid) = pixel_values.dims4()?;
        let p = self.patch;
        let (gh, gw) = (hgt / p, wid / p);
        let hidden = self.class_embedding.dim(0)?;
        // The stride-p, kernel-p convolution is a matmul over flattened (c, ky, kx) patches.
        let patches = pixel_values
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        let w = self
            .patch_embedding
            .reshape((hidden, self.channels * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&w.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let xs = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        let xs = xs.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, false)?;
        }
        Ok(xs)
    }
}

/// LLaVA's 2-layer GELU projector (`multi_modal_projector` / `mm_projector`).
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    pub fn new(
        vision_hidden: usize,
        text_hidden: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(vision_hidden, text_hidden, vb.pp("linear_1"))?,
            linear_2: linear(text_hidden, text_hidden, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // projector_hidden_act "gelu" is the exact erf GELU.
        self.linear_2
            .forward(&self.linear_1.forward(xs)?.gelu_erf()?)
    }
}
