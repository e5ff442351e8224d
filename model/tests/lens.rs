//! Fixture parity of the logit lens (DIAGNOSTICS.md §1): our lens, refusal-set rule and layer
//! rules applied to the reference hidden states reproduce the quantities tools/make_fixtures.py
//! computed with transformers' taps and torch, for every reference case and both lens modes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use model::diagnostics::{LensMode, LensReport, LogitLens, RefusalSet, APOLOGY_WORDS};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Final-norm weight and unembedding names of the three checkpoint layouts: llava-hf as written
/// by transformers 4.x (`language_model.model.*`) and 5.x (`model.language_model.*`), and the
/// original LLaVA layout (`model.*`).
const NORM_NAMES: [&str; 3] = [
    "language_model.model.norm.weight",
    "model.language_model.norm.weight",
    "model.norm.weight",
];
const LM_HEAD_NAMES: [&str; 2] = ["language_model.lm_head.weight", "lm_head.weight"];

struct Checkpoint {
    lens: LogitLens,
    tokenizer: tokenizers::Tokenizer,
}

fn load_checkpoint(model_dir: &Path) -> Checkpoint {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for entry in std::fs::read_dir(model_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    let pick = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| tensors.get(*n).cloned())
            .unwrap_or_else(|| panic!("none of {names:?} in {}", model_dir.display()))
    };
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let eps = config
        .get("text_config")
        .unwrap_or(&config)
        .get("rms_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-5);
    // The original-format checkpoints ship only a SentencePiece `tokenizer.model`;
    // make_fixtures.py asserts that its vocabulary resolves the refusal words to the same ids as
    // the llava-hf tokenizer.json, so that file stands in for them.
    let tokenizer_json = [
        model_dir.join("tokenizer.json"),
        fixtures().join("tiny-llava-next/tokenizer.json"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap();
    Checkpoint {
        lens: LogitLens::new(pick(&NORM_NAMES), eps, pick(&LM_HEAD_NAMES)).unwrap(),
        tokenizer: tokenizers::Tokenizer::from_file(tokenizer_json).unwrap(),
    }
}

/// `[N+1, H]` at the lens position: h[0..N] from `hidden_states` (HF's entries), h[N] from
/// `last_block_raw` (before the final norm; HF's entry N is already normed).
fn lens_hidden(case: &Value, tensors: &HashMap<String, Tensor>) -> Tensor {
    let n = case["n_layers"].as_u64().unwrap() as usize;
    let position = case["lens_position"].as_u64().unwrap();
    let index = case["hidden_positions"]
        .as_array()
        .unwrap()
        .iter()
        .position(|p| p.as_u64() == Some(position))
        .expect("lens position among hidden_positions");
    let hidden = &tensors["hidden_states"];
    let raw = &tensors["last_block_raw"];
    let below = hidden
        .narrow(0, 0, n)
        .unwrap()
        .get_on_dim(1, index)
        .unwrap();
    let top = raw.get(index).unwrap().unsqueeze(0).unwrap();
    Tensor::cat(&[below, top], 0).unwrap()
}

fn layer_index(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

/// Checks one `lens`/`lens_explicit` block: the refusal ids our rule resolves, then every
/// quantity in both modes.
fn check_block(
    label: &str,
    block: &Value,
    words: &[String],
    hidden: &Tensor,
    ckpt: &Checkpoint,
) -> usize {
    let set = RefusalSet::from_words(words, &ckpt.tokenizer).unwrap();
    let mut ours = set.ids.clone();
    ours.sort_unstable();
    let mut checked = 0;
    for mode in [LensMode::FinalNorm, LensMode::Raw] {
        let want = &block[mode.as_str()];
        let label = format!("{label} {}", mode.as_str());
        let want_ids: Vec<u32> = serde_json::from_value(want["refusal_ids"].clone()).unwrap();
        assert_eq!(ours, want_ids, "{label}: refusal ids for {words:?}");
        let report: LensReport = ckpt.lens.report(hidden, mode, &set).unwrap();
        let top: Vec<u32> = report.layers.iter().map(|l| l.top_token).collect();
        let want_top: Vec<u32> = serde_json::from_value(want["top_token"].clone()).unwrap();
        assert_eq!(top, want_top, "{label}: top_token");
        let delta: Vec<Option<u32>> = report.layers.iter().map(|l| l.top_delta_token).collect();
        let want_delta: Vec<Option<u32>> =
            serde_json::from_value(want["top_delta_token"].clone()).unwrap();
        assert_eq!(delta, want_delta, "{label}: top_delta_token");
        for (j, l) in report.layers.iter().enumerate() {
            let p = want["p_refusal"][j].as_f64().unwrap();
            assert!(
                (l.p_refusal - p).abs() <= 1e-5,
                "{label}: p_refusal[{j}] {} vs {p}",
                l.p_refusal
            );
            let odds = want["refusal_log_odds"][j].as_f64().unwrap();
            assert!(
                (l.refusal_log_odds - odds).abs() <= 1e-3,
                "{label}: refusal_log_odds[{j}] {} vs {odds}",
                l.refusal_log_odds
            );
            match (l.d_refusal, want["d_refusal"][j].as_f64()) {
                (None, None) => {}
                (Some(d), Some(w)) => assert!((d - w).abs() <= 1e-3, "{label}: d_refusal[{j}]"),
                other => panic!("{label}: d_refusal[{j}] {other:?}"),
            }
        }
        assert_eq!(
            report.activation_layer,
            layer_index(&want["activation_layer"]),
            "{label}: activation_layer"
        );
        assert_eq!(
            report.start_layer,
            layer_index(&want["start_layer"]),
            "{label}: start_layer"
        );
        assert_eq!(
            report.end_layer,
            layer_index(&want["end_layer"]),
            "{label}: end_layer"
        );
        checked += 1;
    }
    checked
}

#[test]
fn lens_matches_reference_for_every_case_and_mode() {
    let reference = fixtures().join("reference");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&reference)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/make_fixtures.py)", reference.display()))
        .flat_map(|variant| {
            std::fs::read_dir(variant.unwrap().path())
                .into_iter()
                .flatten()
        })
        .map(|e| e.unwrap().path())
        // Forward-pass cases come as a json + safetensors pair (other reference dirs, such as
        // the server's diagnostics cases, hold json only).
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json") && p.with_extension("safetensors").is_file()
        })
        .collect();
    cases.sort();
    let mut checkpoints: HashMap<String, Checkpoint> = HashMap::new();
    let (mut blocks, mut non_null_layers) = (0, 0);
    for json_path in &cases {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
        let model_dir = case["model_dir"].as_str().unwrap().to_string();
        let ckpt = checkpoints
            .entry(model_dir.clone())
            .or_insert_with(|| load_checkpoint(&fixtures().join(&model_dir)));
        let tensors =
            candle_core::safetensors::load(json_path.with_extension("safetensors"), &Device::Cpu)
                .unwrap();
        let hidden = lens_hidden(&case, &tensors);
        let label = json_path
            .strip_prefix(&reference)
            .unwrap()
            .display()
            .to_string();

        // The default words are the `apology` preset: one definition, shared with the generator.
        let words: Vec<String> = serde_json::from_value(case["refusal_words"].clone()).unwrap();
        assert_eq!(words, APOLOGY_WORDS, "{label}: refusal_words");
        blocks += check_block(&label, &case["lens"], &words, &hidden, ckpt);

        let explicit = &case["lens_explicit"];
        if !explicit.is_null() {
            let words: Vec<String> =
                serde_json::from_value(explicit["refusal_words"].clone()).unwrap();
            blocks += check_block(
                &format!("{label} explicit"),
                explicit,
                &words,
                &hidden,
                ckpt,
            );
            for mode in ["final_norm", "raw"] {
                non_null_layers += ["activation_layer", "start_layer", "end_layer"]
                    .iter()
                    .filter(|k| !explicit[mode][**k].is_null())
                    .count();
            }
        }
    }
    assert!(cases.len() >= 4, "only {} reference cases", cases.len());
    // The fixtures must exercise found layers, not only nulls, or the rules go untested.
    assert!(
        non_null_layers >= 6,
        "{non_null_layers} non-null layer indices"
    );
    eprintln!(
        "checked {blocks} lens blocks over {} cases ({non_null_layers} non-null layer indices)",
        cases.len()
    );
}

#[test]
fn tga_preset_resolves_on_the_fixture_tokenizer() {
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tiny-llava-next/tokenizer.json"))
        .unwrap();
    let set = RefusalSet::preset("tga", &tok).unwrap();
    assert!(!set.ids.is_empty());
    for (id, piece) in set.ids.iter().zip(&set.strings) {
        assert_eq!(tok.id_to_token(*id).as_deref(), Some(piece.as_str()));
        assert!(
            ["sorry", "I"].contains(&piece.trim_start_matches(['\u{2581}', '\u{0120}'])),
            "{piece} is not a form of the tga words"
        );
    }
    assert!(RefusalSet::preset("nope", &tok).is_err());
}
