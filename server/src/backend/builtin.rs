//! The built-in model: the tiny random-weight LLaVA-NeXT-Mistral test fixture
//! (`fixtures/tiny-llava-next`, ~0.7 MB), embedded so that `tga-serve serve` answers at once on a
//! fresh machine. It is written to a private temporary directory and loaded by the same code as
//! any checkpoint. Its answers are noise: it exists to try the API, not to chat.

use std::path::PathBuf;

/// The served id of the built-in model.
pub const BUILTIN_MODEL_ID: &str = "tga-tiny-llava-next";

macro_rules! fixture_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../../fixtures/tiny-llava-next/", $name)) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = fixture_files!(
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
);

/// Writes the embedded checkpoint to a fresh directory under the system temp dir.
pub fn materialize() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tga-serve-builtin-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in FILES {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(dir)
}
