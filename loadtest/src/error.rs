//! The crate's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// A flag or setting that cannot be used as given.
    #[error("{0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A prompts file line that is not one of the accepted shapes.
    #[error("{}:{line}: {message}", path.display())]
    Prompts {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("image {name}: {message}")]
    Image { name: String, message: String },
    /// A JSON report that cannot be read back (`compare`).
    #[error("report {}: {message}", path.display())]
    Report { path: PathBuf, message: String },
    #[error("chart {}: {message}", path.display())]
    Chart { path: PathBuf, message: String },
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl LoadtestError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, LoadtestError>;
