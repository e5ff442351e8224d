//! Layer taps and interventions on the tiny llava_next checkpoint: taps observe without changing
//! the computation, pooled spans are means of the tapped states, key masking and hidden-state
//! edits do exactly what DIAGNOSTICS.md §4 says, and prefill can continue a cache.

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use model::llava::{LlavaModel, LoadOptions};
use model::mistral::{EditMode, KeyMask, LayerTaps, StateEdit};
use model::ModelError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn setup() -> (LlavaModel, Vec<u32>) {
    let m = LlavaModel::load(
        &fixtures().join("tiny-llava-next"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/llava_next/text_system.json")).unwrap(),
    )
    .unwrap();
    let ids = j["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (m, ids)
}

fn run(
    m: &LlavaModel,
    ids: &[u32],
    taps: &LayerTaps,
) -> Result<model::mistral::PrefillOutput, ModelError> {
    let mut cache = m.new_cache();
    m.prefill(ids, &[], &mut cache, taps)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn taps_observe_without_changing_logits_and_pooling_is_the_mean() {
    let (m, ids) = setup();
    let n = ids.len();
    let plain = run(&m, &ids, &LayerTaps::default()).unwrap();
    assert!(plain.taps.hidden.is_none() && plain.taps.attention.is_empty());
    let span = 3..9;
    let taps = LayerTaps {
        hidden_positions: span.clone().collect(),
        attention_queries: vec![n - 1, 4],
        pooled_spans: vec![span.clone(), n - 2..n],
        ..Default::default()
    };
    let out = run(&m, &ids, &taps).unwrap();
    assert_eq!(max_diff(&plain.logits, &out.logits), 0.0);
    let hidden = out.taps.hidden.unwrap(); // [N+1, 6, H]
    let pooled = out.taps.pooled.unwrap(); // [N+1, 2, H]
    assert_eq!(hidden.dims(), &[4, 6, 32]);
    assert_eq!(pooled.dims(), &[4, 2, 32]);
    let mean = hidden.mean(1).unwrap();
    assert!(max_diff(&mean, &pooled.i((.., 0)).unwrap()) < 1e-6);
    // Attention rows: one per block, [heads, queries, keys], rows sum to 1, causal.
    assert_eq!(out.taps.attention.len(), 3);
    for a in &out.taps.attention {
        assert_eq!(a.dims(), &[4, 2, n]);
        let sums = a
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let future = a
            .i((.., 1, 5..))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(future, 0.0, "query 4 attends to later keys");
    }
}

#[test]
fn masked_keys_get_no_attention_only_at_the_chosen_layers() {
    let (m, ids) = setup();
    let n = ids.len();
    let spans = vec![2..5, 7..8];
    let base = LayerTaps {
        attention_queries: vec![n - 1],
        ..Default::default()
    };
    let plain = run(&m, &ids, &base).unwrap();
    let masked = run(
        &m,
        &ids,
        &LayerTaps {
            mask_keys: Some(KeyMask {
                layers: vec![2],
                spans: spans.clone(),
            }),
            ..base.clone()
        },
    )
    .unwrap();
    // Block 1 is untouched; block 2 puts zero mass on the spans and still sums to 1.
    assert_eq!(
        max_diff(&plain.taps.attention[0], &masked.taps.attention[0]),
        0.0
    );
    let a2 = &masked.taps.attention[1];
    for s in &spans {
        let mass = a2
            .i((.., .., s.clone()))
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(mass, 0.0);
    }
    let sums = a2
        .sum(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    assert!(
        max_diff(&plain.logits, &masked.logits) > 1e-4,
        "masking changed nothing"
    );

    // A mask that leaves a query nothing to see is refused, not a NaN.
    let err = run(
        &m,
        &ids,
        &LayerTaps {
            mask_keys: Some(KeyMask {
                layers: vec![1],
                spans: std::iter::once(0..1).collect(),
            }),
            ..Default::default()
        },
    );
    assert!(
        matches!(err, Err(ModelError::InvalidInput(_))),
        "mask of position 0 accepted"
    );
}

#[test]
fn state_edits_add_and_replace_after_the_chosen_block() {
    let (m, ids) = setup();
    let pos = 4..7;
    let taps = LayerTaps {
        hidden_positions: pos.clone().collect(),
        ..Default::default()
    };
    let plain = run(&m, &ids, &taps).unwrap();
    let zero = Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap();
    let v = Tensor::arange(0f32, 32f32, &Device::Cpu)
        .unwrap()
        .affine(0.01, -0.1)
        .unwrap();
    let edit = |vector: &Tensor, mode| LayerTaps {
        state_edits: vec![StateEdit {
            after_layer: 1,
            positions: vec![pos.clone()],
            vector: vector.clone(),
            mode,
        }],
        ..taps.clone()
    };
    let added0 = run(&m, &ids, &edit(&zero, EditMode::Add)).unwrap();
    assert_eq!(max_diff(&plain.logits, &added0.logits), 0.0);

    let replaced = run(&m, &ids, &edit(&v, EditMode::Replace)).unwrap();
    let h1 = replaced.taps.hidden.as_ref().unwrap().i(1).unwrap(); // [3, H]
    assert!(max_diff(&h1, &v.unsqueeze(0).unwrap().broadcast_as((3, 32)).unwrap()) < 1e-7);
    let h0_same = max_diff(
        &replaced.taps.hidden.as_ref().unwrap().i(0).unwrap(),
        &plain.taps.hidden.as_ref().unwrap().i(0).unwrap(),
    );
    assert_eq!(h0_same, 0.0);

    let added = run(&m, &ids, &edit(&v, EditMode::Add)).unwrap();
    let want = (plain
        .taps
        .hidden
        .as_ref()
        .unwrap()
        .i(1)
        .unwrap()
        .broadcast_add(&v)
        .unwrap())
    .clone();
    assert!(max_diff(&added.taps.hidden.as_ref().unwrap().i(1).unwrap(), &want) < 1e-6);
    assert!(max_diff(&plain.logits, &added.logits) > 1e-5);
}

#[test]
fn key_masks_also_hold_for_the_tokens_decoded_after_the_prefill() {
    // DIAGNOSTICS.md §4: "no query may attend" to the masked spans, the answer's tokens included.
    let (m, ids) = setup();
    let mask = KeyMask {
        layers: vec![2, 3],
        spans: vec![2..5, 7..8],
    };
    let masked = LayerTaps {
        mask_keys: Some(mask.clone()),
        ..Default::default()
    };
    let next = [17u32, 29];
    // Decode two tokens after a masked prefill, batched with an unmasked sequence ...
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    m.prefill(&ids, &[], &mut a, &masked).unwrap();
    m.prefill(&ids, &[], &mut b, &LayerTaps::default()).unwrap();
    let mut steps = Vec::new();
    for &t in &next {
        steps.push(m.decode_step(&[t, t], &mut [&mut a, &mut b]).unwrap());
    }
    // ... and compare with masked and plain prefills of the longer sequences.
    for (k, step) in steps.iter().enumerate() {
        let longer: Vec<u32> = ids.iter().chain(&next[..=k]).copied().collect();
        let want_masked = run(&m, &longer, &masked).unwrap().logits;
        let want_plain = run(&m, &longer, &LayerTaps::default()).unwrap().logits;
        assert!(
            max_diff(&step.i(0..1).unwrap(), &want_masked) < 1e-5,
            "step {k}"
        );
        assert!(
            max_diff(&step.i(1..2).unwrap(), &want_plain) < 1e-5,
            "step {k}"
        );
        assert!(
            max_diff(&want_masked, &want_plain) > 1e-4,
            "masking changed nothing"
        );
    }
}

#[test]
fn prefill_can_continue_a_cache() {
    let (m, ids) = setup();
    let whole = run(&m, &ids, &LayerTaps::default()).unwrap();
    let mut cache = m.new_cache();
    let k = ids.len() / 2;
    m.prefill(&ids[..k], &[], &mut cache, &LayerTaps::default())
        .unwrap();
    let rest = m
        .prefill(&ids[k..], &[], &mut cache, &LayerTaps::default())
        .unwrap();
    assert_eq!(cache.len(), ids.len());
    assert!(max_diff(&whole.logits, &rest.logits) < 1e-5);
}

#[test]
fn out_of_vocabulary_ids_and_bad_positions_are_errors() {
    let (m, ids) = setup();
    let mut bad = ids.clone();
    bad[3] = 99_999;
    assert!(matches!(
        run(&m, &bad, &LayerTaps::default()),
        Err(ModelError::InvalidInput(_))
    ));
    let taps = LayerTaps {
        hidden_positions: vec![ids.len()],
        ..Default::default()
    };
    assert!(matches!(
        run(&m, &ids, &taps),
        Err(ModelError::InvalidInput(_))
    ));
}
