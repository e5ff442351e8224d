//! The model crate's one error type. The server maps these to OpenAI error JSON in one place.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("unexpected tensor `{name}` (shape {found:?}) in checkpoint")]
    UnexpectedTensor { name: String, found: Vec<usize> },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("safetensors file {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{0}")]
    VisionTowerNeeded(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),

    #[error("unsupported image format{}", .0.as_deref().map(|f| format!(" ({f})")).unwrap_or_default())]
    UnsupportedImageFormat(Option<String>),
    #[error("image is {bytes} bytes, over the limit of {max} bytes")]
    ImageBytesTooLarge { bytes: usize, max: usize },
    #[error("image is {width}x{height} pixels, over the limit of {max_side} per side / {max_pixels} pixels")]
    ImageTooLarge {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("cannot decode image: {0}")]
    ImageDecode(String),

    /// A retrieval corpus line that cannot be a caption; `line` is 1-based.
    #[error("caption corpus {path}, line {line}: {msg}")]
    Corpus {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A retrieval index file that is malformed or does not match its corpus / CLIP model.
    #[error("retrieval index {path}: {msg}")]
    Index { path: PathBuf, msg: String },

    /// Weights that would not fit in the memory available, refused before any is allocated.
    #[error("not enough memory: {0}")]
    InsufficientMemory(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The paged KV cache has no room for a forward (a scheduler reserves ahead to avoid it).
    #[error(transparent)]
    OutOfBlocks(#[from] crate::kv::OutOfBlocks),
    /// Logits the sampler cannot draw from (NaN, +inf, or all −inf): a model fault, not bad input.
    #[error("sampling: {0}")]
    Sampling(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Self::Config {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
