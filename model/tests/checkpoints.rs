//! Malformed checkpoints are refused with errors that name the problem: a missing, extra or
//! mis-shaped tensor (with expected and found shapes), a truncated safetensors file, a bad config,
//! a missing vision tower.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use model::llava::{LlavaModel, LoadOptions};
use model::ModelError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A writable copy of tiny-llava-next whose weights `edit` may change.
fn broken_copy(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = fixtures().join("tiny-llava-next");
    let dst = std::env::temp_dir().join(format!("tga-broken-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    let st = dst.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    dst
}

fn load(dir: &Path) -> Result<LlavaModel, ModelError> {
    LlavaModel::load(dir, &LoadOptions::default(), &Device::Cpu)
}

const Q0: &str = "language_model.model.layers.0.self_attn.q_proj.weight";

#[test]
fn missing_tensor_is_named_with_its_expected_shape() {
    let dir = broken_copy("missing", |t| {
        t.remove(Q0);
    });
    match load(&dir) {
        Err(ModelError::MissingTensor { name, expected }) => {
            assert_eq!(name, Q0);
            assert_eq!(expected, vec![32, 32]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a checkpoint without {Q0} loaded"),
    }
}

#[test]
fn mis_shaped_tensor_reports_expected_and_found_shapes() {
    let dir = broken_copy("shape", |t| {
        t.insert(
            Q0.into(),
            Tensor::zeros((32, 16), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load(&dir).err().expect("mis-shaped checkpoint loaded");
    match &err {
        ModelError::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, Q0);
            assert_eq!(expected, &vec![32, 32]);
            assert_eq!(found, &vec![32, 16]);
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(Q0) && msg.contains("[32, 32]") && msg.contains("[32, 16]"),
        "{msg}"
    );
}

#[test]
fn extra_tensor_is_reported() {
    let dir = broken_copy("extra", |t| {
        t.insert(
            "language_model.model.layers.7.mlp.up_proj.weight".into(),
            Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load(&dir) {
        Err(ModelError::UnexpectedTensor { name, found }) => {
            assert!(
                name.starts_with("language_model.model.layers.7.mlp.up_proj.weight"),
                "{name}"
            );
            assert_eq!(found, vec![4, 4]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a checkpoint with an extra tensor loaded"),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = broken_copy("truncated", |_| {});
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    match load(&dir) {
        Err(ModelError::Safetensors { path, msg }) => {
            assert_eq!(path, st);
            assert!(!msg.is_empty());
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a truncated checkpoint loaded"),
    }
}

#[test]
fn bad_config_is_a_config_error() {
    let dir = broken_copy("config", |_| {});
    std::fs::write(
        dir.join("config.json"),
        "{\"model_type\": \"llava_next\", \"text_config\": [",
    )
    .unwrap();
    let err = load(&dir).err().expect("bad config loaded");
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn missing_shard_named_by_the_index_is_an_io_error() {
    let src = fixtures().join("tiny-llava");
    let dst = std::env::temp_dir().join(format!("tga-broken-shard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if !p
            .to_string_lossy()
            .ends_with("model-00002-of-00002.safetensors")
        {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    match load(&dst) {
        Err(ModelError::Io { path, .. }) => {
            assert!(
                path.ends_with("model-00002-of-00002.safetensors"),
                "{}",
                path.display()
            )
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("loaded without a shard"),
    }
}

#[test]
fn original_checkpoint_without_tower_asks_for_vision_tower() {
    let err = load(&fixtures().join("tiny-llava-orig-pad"))
        .err()
        .expect("loaded without a tower");
    assert!(matches!(err, ModelError::VisionTowerNeeded(_)), "{err}");
    assert!(err.to_string().contains("--vision-tower"), "{err}");
}

#[test]
fn checkpoint_weights_win_over_the_vision_tower_directory() {
    // orig-anyres carries its own (different) tower weights and names ../tiny-clip for the config.
    let f = fixtures();
    let own = LlavaModel::load(
        &f.join("tiny-llava-orig-anyres"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let next = LlavaModel::load(
        &f.join("tiny-llava-next"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let pv = Tensor::rand(-1f32, 1f32, (1, 3, 336, 336), &Device::Cpu).unwrap();
    let img = model::llava::ImageInput {
        pixel_values: Tensor::cat(&[&pv; 3], 0).unwrap(),
        original_hw: (336, 600),
    };
    let a = own.encode_image(&img).unwrap();
    let b = next.encode_image(&img).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        d, 0.0,
        "orig-anyres must compute exactly what tiny-llava-next computes"
    );
}
