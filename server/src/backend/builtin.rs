//! The models built into the binary, so that `tga-serve serve` answers at once on a fresh machine.
//! Each is written to a private temporary directory and loaded by the same code as any checkpoint.
//!
//! - `builtin:tga` (the default): the toy-scale TGA-aligned LLaVA-Mistral trained by
//!   `tools/toy_tga/` (bench/TOY_TGA.md): a text model with a real refusal mechanism, aligned to
//!   a toy CLIP with the retrieval prefix and the guide loss; served with its retrieval corpus.
//! - `builtin:baseline`: the same start aligned with the plain LLaVA recipe.
//! - `builtin:tiny`: the tiny random-weight LLaVA-NeXT-Mistral test fixture
//!   (`fixtures/tiny-llava-next`); its answers are noise.

use std::path::PathBuf;

macro_rules! files {
    ($dir:literal: $($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../../", $dir, "/", $name)) as &[u8])),*]
    };
}

const TINY: &[(&str, &[u8])] = files!(
    "fixtures/tiny-llava-next":
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
);
const TGA: &[(&str, &[u8])] = files!(
    "builtin/tga":
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
);
const BASELINE: &[(&str, &[u8])] = files!(
    "builtin/baseline":
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
);
const CLIP: &[(&str, &[u8])] = files!(
    "builtin/clip":
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.model",
);
/// The toy TGA's retrieval corpus (captions that hold almost no harmful text, TOY_TGA.md).
pub const CORPUS: &[u8] = include_bytes!("../../../builtin/corpus.txt");

/// A built-in model, named `builtin:<name>` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Tga,
    Baseline,
    Tiny,
}

/// A built-in model written out: its checkpoint directory and, for the toy models, their CLIP.
pub struct Materialized {
    pub dir: PathBuf,
    pub vision_tower: Option<PathBuf>,
    root: PathBuf,
}

impl Materialized {
    /// Removes the written copy (once loaded, the weights stay mapped).
    pub fn remove(&self) -> std::io::Result<()> {
        std::fs::remove_dir_all(&self.root)
    }
}

impl Builtin {
    pub const DEFAULT: Builtin = Builtin::Tga;
    pub const ALL: [Builtin; 3] = [Builtin::Tga, Builtin::Baseline, Builtin::Tiny];

    /// `builtin:tga`, `builtin:baseline`, `builtin:tiny`; `None` for anything else (a path).
    pub fn parse(model: &str) -> Option<Result<Self, String>> {
        let name = model.strip_prefix("builtin:")?;
        Some(
            Self::ALL
                .into_iter()
                .find(|b| b.name() == name)
                .ok_or_else(|| {
                    format!("unknown built-in model `{model}`: use builtin:tga, builtin:baseline or builtin:tiny")
                }),
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tga => "tga",
            Self::Baseline => "baseline",
            Self::Tiny => "tiny",
        }
    }

    /// The served model id.
    pub fn id(self) -> &'static str {
        match self {
            Self::Tga => "toy-tga",
            Self::Baseline => "toy-baseline",
            Self::Tiny => "tga-tiny-llava-next",
        }
    }

    /// The chat template it was trained with (the toy models: TGA's `llava_llama_2`).
    pub fn template(self) -> Option<&'static str> {
        match self {
            Self::Tga | Self::Baseline => Some("llava_llama_2"),
            Self::Tiny => None,
        }
    }

    /// Whether it is served with TGA retrieval over [`CORPUS`] by default.
    pub fn retrieval(self) -> bool {
        self == Self::Tga
    }

    fn files(self) -> &'static [(&'static str, &'static [u8])] {
        match self {
            Self::Tga => TGA,
            Self::Baseline => BASELINE,
            Self::Tiny => TINY,
        }
    }

    /// Writes the model (and its CLIP) to a fresh directory under the system temp dir.
    pub fn materialize(self) -> std::io::Result<Materialized> {
        let root = std::env::temp_dir().join(format!(
            "tga-serve-builtin-{}-{}-{}",
            self.name(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let write = |dir: &PathBuf, files: &[(&str, &[u8])]| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            for (name, bytes) in files {
                std::fs::write(dir.join(name), bytes)?;
            }
            Ok(())
        };
        let dir = root.join("model");
        write(&dir, self.files())?;
        let vision_tower = match self {
            Self::Tga | Self::Baseline => {
                let clip = root.join("clip");
                write(&clip, CLIP)?;
                Some(clip)
            }
            Self::Tiny => None,
        };
        Ok(Materialized {
            dir,
            vision_tower,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_are_refused() {
        for b in Builtin::ALL {
            assert_eq!(
                Builtin::parse(&format!("builtin:{}", b.name())),
                Some(Ok(b))
            );
        }
        assert!(Builtin::parse("builtin:gpt").unwrap().is_err());
        assert_eq!(Builtin::parse("/models/llava"), None);
    }

    #[test]
    fn every_builtin_model_is_written_out_whole() {
        for b in Builtin::ALL {
            let m = b.materialize().unwrap();
            assert!(m.dir.join("config.json").is_file());
            assert!(m.dir.join("model.safetensors").is_file());
            if let Some(clip) = &m.vision_tower {
                assert!(clip.join("config.json").is_file());
            }
            m.remove().unwrap();
        }
    }
}
