//! Tokenizer loading against transformers 5.23 and the sentencepiece library.
//!
//! fixtures/reference/tokenizer_cases.json (tools/make_tokenizer_cases.py) holds, for awkward
//! strings, the ids of python sentencepiece for the fixtures' `tokenizer.model` and the ids /
//! decodes transformers gives for several tokenizer directories (a base file plus a config).
//! Each directory is rebuilt here and loaded with `Tokenizer::from_dir`.

use std::path::{Path, PathBuf};

use model::sentencepiece::SpmModel;
use model::tokenizer::{IncrementalDecoder, Tokenizer};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cases() -> Value {
    let path = std::env::var_os("TGA_TOKENIZER_CASES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("fixtures/reference/tokenizer_cases.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tools/.venv/bin/python tools/make_tokenizer_cases.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn resolve(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        repo_root().join(p)
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A scratch directory with the variant's base file and config (or the fixture dir itself,
/// which is not ours to delete).
struct VariantDir(PathBuf, bool);

impl VariantDir {
    fn new(doc: &Value, variant: &Value) -> Self {
        let name = variant["name"].as_str().unwrap();
        let base = variant["base"].as_str().unwrap();
        if base == "fixture_dir" {
            return Self(resolve(doc["json_dir"].as_str().unwrap()), false);
        }
        let dir = std::env::temp_dir().join(format!("tga-tokcase-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        match base {
            "model" => {
                std::fs::copy(
                    resolve(doc["spm_model"].as_str().unwrap()),
                    dir.join("tokenizer.model"),
                )
                .unwrap();
            }
            "json" => {
                std::fs::copy(
                    resolve(doc["json_dir"].as_str().unwrap()).join("tokenizer.json"),
                    dir.join("tokenizer.json"),
                )
                .unwrap();
            }
            other => panic!("unknown base {other}"),
        }
        if !variant["config"].is_null() {
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::to_string(&variant["config"]).unwrap(),
            )
            .unwrap();
        }
        Self(dir, true)
    }
}

impl Drop for VariantDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn sentencepiece_model_converts_to_the_sentencepiece_ids() {
    let doc = cases();
    let texts: Vec<&str> = doc["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let variant = doc["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "spm_no_config")
        .unwrap();
    let dir = VariantDir::new(&doc, variant);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (i, text) in texts.iter().enumerate() {
        let want = &doc["sentencepiece"][i];
        if want.is_null() {
            continue;
        }
        checked += 1;
        let want = ids_of(want);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, sentencepiece {want:?}"));
        }
        let want_text = doc["sentencepiece_decoded"][i].as_str().unwrap();
        let got_text = tok.decode(&got, false).unwrap();
        if got_text != want_text {
            failures.push(format!("decode {text:?}: got {got_text:?}, sentencepiece {want_text:?}"));
        }
    }
    assert!(checked > 20, "too few sentencepiece cases ({checked})");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // With BOS: the sentencepiece tokenizer starts with <s>.
    let ids = tok.encode("Hello", true).unwrap();
    assert_eq!(Some(ids[0]), tok.bos_id());
    assert_eq!(&ids[1..], &tok.encode("Hello", false).unwrap()[..]);
}

#[test]
fn directories_tokenize_like_transformers() {
    let doc = cases();
    let texts: Vec<&str> = doc["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut failures = Vec::new();
    let mut variants = 0;
    for variant in doc["variants"].as_array().unwrap() {
        let name = variant["name"].as_str().unwrap();
        if variant.get("ids").is_none() {
            continue;
        }
        variants += 1;
        let dir = VariantDir::new(&doc, variant);
        let tok = match Tokenizer::from_dir(&dir.0) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("[{name}] load: {e}"));
                continue;
            }
        };
        for (i, text) in texts.iter().enumerate() {
            let want = ids_of(&variant["ids"][i]);
            let got = tok.encode_hf(text, false).unwrap().ids;
            if got != want {
                failures.push(format!("[{name}] {text:?}: got {got:?}, transformers {want:?}"));
            }
            let want_sp = ids_of(&variant["ids_special"][i]);
            let got_sp = tok.encode_hf(text, true).unwrap().ids;
            if got_sp != want_sp {
                failures.push(format!(
                    "[{name}] {text:?} (special tokens): got {got_sp:?}, transformers {want_sp:?}"
                ));
            }
            for (key, skip) in [("decoded", false), ("decoded_skip", true)] {
                let want_text = variant[key][i].as_str().unwrap();
                let got_text = tok.decode(&want, skip).unwrap();
                if got_text != want_text {
                    failures.push(format!(
                        "[{name}] decode{} {text:?}: got {got_text:?}, transformers {want_text:?}",
                        if skip { " (skip special)" } else { "" }
                    ));
                }
            }
        }
    }
    assert!(variants >= 3, "too few transformers variants ({variants})");
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// The converted `tokenizer.model` and the fixture's `tokenizer.json` agree on the vocabulary.
#[test]
fn sentencepiece_vocabulary_matches_tokenizer_json() {
    let doc = cases();
    let Some(json_dir) = doc["json_dir"].as_str() else {
        return;
    };
    let spm = SpmModel::from_file(resolve(doc["spm_model"].as_str().unwrap())).unwrap();
    let hf = Tokenizer::from_dir(resolve(json_dir)).unwrap();
    for (id, piece) in spm.pieces.iter().enumerate() {
        assert_eq!(
            hf.token_to_id(&piece.piece),
            Some(id as u32),
            "piece {:?}",
            piece.piece
        );
    }
}

/// Streaming every case text's ids piece by piece gives the full decode, and no piece ends
/// inside a UTF-8 character.
#[test]
fn incremental_decoding_of_case_texts() {
    let doc = cases();
    let dir_doc = doc["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "spm_no_config")
        .unwrap();
    let dir = VariantDir::new(&doc, dir_doc);
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    for text in doc["texts"].as_array().unwrap() {
        let text = text.as_str().unwrap();
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let mut dec = IncrementalDecoder::new(skip);
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(piece) = dec.push(&tok, id).unwrap() {
                    assert!(!piece.contains('\u{FFFD}'), "{text:?}: partial char in {piece:?}");
                    streamed += &piece;
                }
            }
            if let Some(rest) = dec.flush(&tok).unwrap() {
                streamed += &rest;
            }
            assert_eq!(streamed, tok.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
}
