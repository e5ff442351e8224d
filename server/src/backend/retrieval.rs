//! TGA retrieval at inference (Xu et al.; TOY_TGA.md): the image's CLIP embedding picks the
//! nearest caption of a corpus by exact cosine search, and the user turn becomes the training
//! format `Retrieved Text: {caption}. <image>\n{instruction}`. The math and the index are the
//! model crate's (`model::clip_embed`, `model::retrieval`); this only wires them to a served model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use model::clip_embed::{l2_normalize, ClipEmbedder};
use model::image::{decode_image, preprocess, AspectMode, ImageLimits, PreprocessConfig};
use model::retrieval::{CaptionCorpus, RetrievalIndex};
use model::ModelError;

/// Where the captions come from and where their embeddings are kept.
#[derive(Debug, Clone)]
pub struct RetrievalConfig {
    /// Captions, one a line.
    pub corpus: PathBuf,
    /// A prebuilt index of the corpus (`--retrieval-index`): opened if it matches the corpus and
    /// the CLIP, else built there; `None` builds one in a temporary file.
    pub index: Option<PathBuf>,
    /// The CLIP (`CLIPModel` with both towers) whose embeddings are searched.
    pub clip: PathBuf,
}

/// The nearest caption of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    pub text: String,
    /// Cosine of the image and caption embeddings.
    pub score: f32,
    /// Row of the caption in the corpus (0-based).
    pub row: usize,
}

/// A caption corpus, its index and the CLIP that embeds queries.
pub struct Retriever {
    embedder: ClipEmbedder,
    corpus: CaptionCorpus,
    index: RetrievalIndex,
    /// The served model's image preprocessing decides the pixels the query sees (pad to square
    /// for LLaVA-1.5 / TGA checkpoints), with the CLIP's own sizes and normalisation.
    pixels: PreprocessConfig,
}

impl std::fmt::Debug for Retriever {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retriever")
            .field("captions", &self.corpus.len())
            .field("dims", &self.index.dims())
            .finish()
    }
}

impl Retriever {
    /// Loads the CLIP and the corpus (refusing a bad line with its number), then opens or builds
    /// the index. `model_aspect` is the served model's image handling.
    pub fn load(config: &RetrievalConfig, model_aspect: &AspectMode) -> Result<Self, ModelError> {
        let started = std::time::Instant::now();
        let embedder = ClipEmbedder::load(&config.clip, &Device::Cpu, DType::F32)?;
        let corpus = CaptionCorpus::load(&config.corpus)?;
        let path = config.index.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "tga-serve-retrieval-{}-{:016x}.idx",
                std::process::id(),
                corpus.id().hash
            ))
        });
        let index = match RetrievalIndex::open(&path, &corpus.id(), Some(embedder.fingerprint())) {
            Ok(index) => index,
            Err(err) => {
                if path.exists() {
                    tracing::info!(index = %path.display(), reason = %err, "rebuilding the retrieval index");
                }
                RetrievalIndex::build(&path, &corpus, &embedder, 64)?
            }
        };
        let mut pixels = embedder.preprocess_config().clone();
        if matches!(model_aspect, AspectMode::PadToSquare) {
            pixels.aspect = AspectMode::PadToSquare;
        }
        tracing::info!(
            captions = corpus.len(),
            dims = index.dims(),
            index = %path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "retrieval corpus ready"
        );
        Ok(Self {
            embedder,
            corpus,
            index,
            pixels,
        })
    }

    pub fn captions(&self) -> usize {
        self.corpus.len()
    }

    /// The nearest caption of the image in `bytes` (decoded with `limits`).
    pub fn retrieve(&self, bytes: &[u8], limits: &ImageLimits) -> Result<Retrieved, ModelError> {
        let img = decode_image(bytes, limits)?;
        let p = preprocess(&img, &self.pixels)?;
        let (h, w) = (p.size.0 as usize, p.size.1 as usize);
        let pv = Tensor::from_vec(p.pixel_values, (p.n_views, 3, h, w), &Device::Cpu)?;
        let mut query = self.embedder.image_features(&pv)?.i(0)?.to_vec1::<f32>()?;
        l2_normalize(&mut query)?;
        let (row, score) = self.index.nearest(&query)?;
        let text = self
            .corpus
            .get(row)
            .ok_or_else(|| ModelError::InvalidInput(format!("index row {row} has no caption")))?
            .to_string();
        Ok(Retrieved { text, score, row })
    }
}

/// The corpus path of a built-in model, written next to its checkpoint.
pub fn write_corpus(dir: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join("retrieval-corpus.txt");
    std::fs::write(&path, bytes)?;
    Ok(path)
}
