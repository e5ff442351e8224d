//! Tokenizer loading against transformers 5.23 and the sentencepiece library.
//!
//! fixtures/reference/tokenizer_cases.json (tools/make_tokenizer_cases.py) holds, for awkward
//! strings, the ids of python sentencepiece for the fixtures' `tokenizer.model` and the ids /
//! decodes transformers gives for several tokenizer directories (a base file plus a config).
//! Each directory is rebuilt here and loaded with `Tokenizer::from_dir`.

use std::path::{Path, PathBuf};

use model::sentencepiece::SpmModel;
use model::tokenizer::{IncrementalDetokenizer, Tokenizer};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cases() -> Value {
    let path = repo_root().join("fixtures/reference/tokenizer_cases.json");
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
            return Self(resolve(variant["dir"].as_str().unwrap()), false);
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
            failures.push(format!(
                "decode {text:?}: got {got_text:?}, sentencepiece {want_text:?}"
            ));
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
                failures.push(format!(
                    "[{name}] {text:?}: got {got:?}, transformers {want:?}"
                ));
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
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
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
            // What the engine does: the served backend's decode (special tokens skipped or
            // not) drives the one detokenizer.
            let decode = |ids: &[u32]| tok.decode(ids, skip).unwrap();
            let mut dec = IncrementalDetokenizer::new();
            let mut streamed = String::new();
            for &id in &ids {
                let piece = dec.push(id, decode);
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{text:?}: partial char in {piece:?}"
                );
                streamed += &piece;
            }
            streamed += &dec.flush(decode);
            assert_eq!(streamed, tok.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prompts: fixtures/reference/<variant>/<case>.json (tools/make_fixtures.py) hold the messages,
// the rendered prompt and the input ids transformers / the LLaVA code fed the model.

use model::template::{build_prompt, ChatMessage, ChatTemplate, ContentPart, PromptMode};

fn messages_of(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let content = match &m["content"] {
                Value::String(s) => vec![ContentPart::Text(s.clone())],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "text" => ContentPart::Text(p["text"].as_str().unwrap().to_string()),
                        "image" => ContentPart::Image,
                        other => panic!("part type {other}"),
                    })
                    .collect(),
                other => panic!("content {other}"),
            };
            ChatMessage::new(m["role"].as_str().unwrap(), content)
        })
        .collect()
}

#[test]
fn reference_prompts_render_and_tokenize_like_the_fixtures() {
    let variants = [
        ("llava_next", "fixtures/tiny-llava-next", PromptMode::Hf),
        ("llava", "fixtures/tiny-llava", PromptMode::Hf),
        (
            "orig_anyres",
            "fixtures/tiny-llava-orig-anyres",
            PromptMode::Original,
        ),
        (
            "orig_pad",
            "fixtures/tiny-llava-orig-pad",
            PromptMode::Original,
        ),
    ];
    let mut checked = 0;
    for (variant, dir, mode) in variants {
        let dir = repo_root().join(dir);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let ref_dir = repo_root().join("fixtures/reference").join(variant);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&ref_dir)
            .unwrap_or_else(|e| panic!("{}: {e}", ref_dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no cases in {}", ref_dir.display());
        for file in files {
            let case: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let name = format!("{variant}/{}", file.file_stem().unwrap().to_string_lossy());
            let template = match case["template"].as_str().unwrap() {
                "chat_template" => ChatTemplate::from_dir(&dir)
                    .unwrap()
                    .expect("HF dir template"),
                builtin => ChatTemplate::by_name(builtin).unwrap(),
            };
            let messages = messages_of(&case["messages"]);
            let prompt = template.render(&messages, true).unwrap();
            assert_eq!(
                prompt,
                case["prompt"].as_str().unwrap(),
                "{name}: rendered prompt"
            );

            let spans: Vec<(usize, usize)> = case["image_spans"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s[0].as_u64().unwrap() as usize,
                        s[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            let counts: Vec<usize> = spans.iter().map(|(a, b)| b - a).collect();
            let built = build_prompt(&tok, &prompt, &counts, mode).unwrap();
            let want: Vec<i64> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let got_spans: Vec<(usize, usize)> =
                built.image_spans.iter().map(|r| (r.start, r.end)).collect();
            assert_eq!(got_spans, spans, "{name}: image spans");
            assert_eq!(built.ids.len(), want.len(), "{name}: length");
            assert_eq!(built.offsets.len(), built.ids.len(), "{name}: offsets");
            let image_id = case["image_token_id"].as_i64().unwrap();
            for (i, (&got, &want)) in built.ids.iter().zip(&want).enumerate() {
                let in_image = built.image_spans.iter().any(|s| s.contains(&i));
                if in_image {
                    assert_eq!(want, image_id, "{name}: position {i}");
                    if mode == PromptMode::Hf {
                        assert_eq!(i64::from(got), image_id, "{name}: position {i}");
                    }
                } else {
                    assert_eq!(
                        i64::from(got),
                        want,
                        "{name}: id at {i}\n{:?}\n{:?}",
                        built.ids,
                        want
                    );
                }
            }

            // The last user message's text maps to tokens that decode back to it.
            let question = messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .unwrap()
                .joined_text();
            let span = built.find_text(&prompt, &question).expect("question span");
            let text = tok.decode(&built.ids[span.clone()], false).unwrap();
            assert_eq!(
                text.trim(),
                question.trim(),
                "{name}: question span {span:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} reference cases");
}

/// Multi-turn conversations through the HF dirs' processors
/// (`apply_chat_template(add_generation_prompt=True, tokenize=True)`), in tokenizer_cases.json.
#[test]
fn processor_conversations_match_transformers() {
    let doc = cases();
    let chats = doc["chat_cases"].as_array().unwrap();
    assert!(chats.len() >= 4, "too few chat cases");
    for (n, case) in chats.iter().enumerate() {
        let dir = resolve(case["dir"].as_str().unwrap());
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let template = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        let prompt = template
            .render(&messages_of(&case["messages"]), true)
            .unwrap();
        assert_eq!(prompt, case["prompt"].as_str().unwrap(), "chat case {n}");
        let counts: Vec<usize> = case["image_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[1].as_u64().unwrap() - s[0].as_u64().unwrap()) as usize)
            .collect();
        let built = build_prompt(&tok, &prompt, &counts, PromptMode::Hf).unwrap();
        assert_eq!(built.ids, ids_of(&case["input_ids"]), "chat case {n}");
    }
}
