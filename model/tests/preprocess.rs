//! Preprocessing parity with transformers 5.23's PIL image processors and the original LLaVA
//! codebase, against the references tools/make_fixtures.py wrote:
//! - fixtures/reference/preprocess.json: per PNG image and mode, sha256 of the f32 LE pixel values
//!   (whole and per view) and the centre row of each view;
//! - fixtures/reference/token_counts.json: image-token counts for many sizes.
//!
//! Pixel values must be bit-identical (equal sha256); on a mismatch the test reports the largest
//! difference on the stored centre rows.

use std::path::{Path, PathBuf};

use model::image::{
    decode_image, image_token_count, preprocess, AspectMode, ImageLimits, PreprocessConfig,
    ProcessedImage, UnpadRounding,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/make_fixtures.py)", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The four configurations, built the way the server builds them from the fixture directories.
struct Configs {
    next: PreprocessConfig,
    pad: PreprocessConfig,
    orig_anyres: PreprocessConfig,
    orig_pad: PreprocessConfig,
}

fn configs() -> Configs {
    let f = fixtures();
    let next = PreprocessConfig::from_hf_dir(&f.join("tiny-llava-next"))
        .unwrap()
        .expect("tiny-llava-next has an image processor config");
    let pad = PreprocessConfig::from_hf_dir(&f.join("tiny-llava"))
        .unwrap()
        .expect("tiny-llava has an image processor config");
    let clip = PreprocessConfig::from_hf_dir(&f.join("tiny-clip"))
        .unwrap()
        .expect("tiny-clip has preprocessor_config.json");
    let orig = |dir: &str| {
        let p = f.join(dir).join("config.json");
        PreprocessConfig::for_original_llava(&read_json(&p), clip.clone(), &p).unwrap()
    };
    Configs {
        next,
        pad,
        orig_anyres: orig("tiny-llava-orig-anyres"),
        orig_pad: orig("tiny-llava-orig-pad"),
    }
}

fn decode(name: &str) -> image::RgbImage {
    let bytes = std::fs::read(fixtures().join("images").join(name)).unwrap();
    decode_image(&bytes, &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Compares one mode's record; returns a description of every mismatch.
fn compare(
    name: &str,
    mode: &str,
    got: &ProcessedImage,
    rec: &Value,
    center_row: usize,
    failures: &mut Vec<String>,
) {
    let shape: Vec<usize> = rec["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (h, w) = (got.size.0 as usize, got.size.1 as usize);
    let n_views = shape[shape.len() - 4..][0];
    if shape[shape.len() - 3..] != [3, h, w] || n_views != got.n_views {
        failures.push(format!(
            "{name} {mode}: shape {shape:?}, got {} views of 3x{h}x{w}",
            got.n_views
        ));
        return;
    }
    let view_len = 3 * h * w;
    let mut max_diff: Option<f32> = None;
    let mut view_mismatch = vec![];
    for (i, vrec) in rec["views"].as_array().unwrap().iter().enumerate() {
        let view = &got.pixel_values[i * view_len..(i + 1) * view_len];
        if sha256_f32(view) == vrec["sha256"].as_str().unwrap() {
            continue;
        }
        view_mismatch.push(i);
        if let Some(rows) = vrec.get("center_row").and_then(Value::as_array) {
            for (c, row) in rows.iter().enumerate() {
                for (x, want) in row.as_array().unwrap().iter().enumerate() {
                    let g = view[c * h * w + center_row * w + x];
                    let d = (g - want.as_f64().unwrap() as f32).abs();
                    max_diff = Some(max_diff.map_or(d, |m| m.max(d)));
                }
            }
        }
    }
    let whole = sha256_f32(&got.pixel_values) == rec["sha256"].as_str().unwrap();
    if !whole || !view_mismatch.is_empty() {
        failures.push(format!(
            "{name} {mode}: views {view_mismatch:?} differ; max |diff| on the centre rows: {}",
            max_diff.map_or("(no rows stored)".to_string(), |d| format!("{d:e}"))
        ));
    }
}

#[test]
fn pixel_values_are_bit_identical_to_the_references() {
    let reference = read_json(&fixtures().join("reference/preprocess.json"));
    let center_row = reference["center_row"].as_u64().unwrap() as usize;
    let cfg = configs();
    assert!(matches!(cfg.next.aspect, AspectMode::Anyres { .. }));
    assert_eq!(cfg.pad.aspect, AspectMode::PadToSquare);
    assert_eq!(cfg.orig_pad.aspect, AspectMode::PadToSquare);
    let pad_colour: Vec<u8> = reference["pad_colour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(cfg.pad.pad_colour().to_vec(), pad_colour);

    let mut failures = vec![];
    let images = reference["images"].as_object().unwrap();
    assert!(
        images.len() >= 8,
        "expected the PNG set, got {}",
        images.len()
    );
    let mut compared = 0;
    for (name, e) in images {
        let img = decode(name);
        let hw = (
            e["height"].as_u64().unwrap() as u32,
            e["width"].as_u64().unwrap() as u32,
        );
        assert_eq!((img.height(), img.width()), hw, "{name}");

        let anyres = &e["anyres"];
        let got = preprocess(&img, &cfg.next).unwrap();
        assert_eq!(got.original_hw, hw);
        let grid: Vec<u32> = anyres["grid_rows_cols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got.grid, Some((grid[0], grid[1])), "{name} grid");
        assert_eq!(
            image_token_count(hw.0, hw.1, &cfg.next, 24) as u64,
            anyres["image_tokens"].as_u64().unwrap(),
            "{name} anyres tokens"
        );
        compare(name, "anyres", &got, anyres, center_row, &mut failures);

        let got = preprocess(&img, &cfg.pad).unwrap();
        assert_eq!(image_token_count(hw.0, hw.1, &cfg.pad, 24), 576);
        compare(name, "pad", &got, &e["pad"], center_row, &mut failures);

        // Original LLaVA codebase: pad is the same computation; anyres reads pinpoints as (w, h).
        let got = preprocess(&img, &cfg.orig_pad).unwrap();
        compare(
            name,
            "pad_original",
            &got,
            &e["pad_original"],
            center_row,
            &mut failures,
        );
        let orig = &e["anyres_original"];
        let got = preprocess(&img, &cfg.orig_anyres).unwrap();
        let grid: Vec<u32> = orig["grid_rows_cols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got.grid, Some((grid[0], grid[1])), "{name} original grid");
        assert_eq!(
            image_token_count(hw.0, hw.1, &cfg.orig_anyres, 24) as u64,
            orig["image_tokens"].as_u64().unwrap(),
            "{name} original anyres tokens"
        );
        compare(
            name,
            "anyres_original",
            &got,
            orig,
            center_row,
            &mut failures,
        );
        compared += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{compared} images x 4 modes bit-identical");
}

#[test]
fn token_counts_match_the_processor_for_every_size() {
    let rows = read_json(&fixtures().join("reference/token_counts.json"));
    let cfg = configs();
    match &cfg.orig_anyres.aspect {
        AspectMode::Anyres { unpad, .. } => assert_eq!(*unpad, UnpadRounding::Truncate),
        other => panic!("original anyres config parsed as {other:?}"),
    }
    let rows = rows.as_array().unwrap();
    assert!(rows.len() >= 12);
    for r in rows {
        let (h, w) = (
            r["height"].as_u64().unwrap() as u32,
            r["width"].as_u64().unwrap() as u32,
        );
        assert_eq!(
            image_token_count(h, w, &cfg.next, 24) as u64,
            r["count"].as_u64().unwrap(),
            "transformers count for {h}x{w}"
        );
        if let Some(c) = r.get("count_original_llava").and_then(Value::as_u64) {
            assert_eq!(
                image_token_count(h, w, &cfg.orig_anyres, 24) as u64,
                c,
                "original LLaVA count for {h}x{w}"
            );
        }
    }
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let s: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    s as f64 / a.as_raw().len() as f64
}

#[test]
fn every_format_decodes_to_the_same_picture() {
    let reference = read_json(&fixtures().join("reference/preprocess.json"));
    let files = reference["files"].as_object().unwrap();
    let mut checked = 0;
    for (name, meta) in files {
        let img = decode(name);
        let hw = (
            meta["height"].as_u64().unwrap() as u32,
            meta["width"].as_u64().unwrap() as u32,
        );
        assert_eq!(
            (img.height(), img.width()),
            hw,
            "{name}: decoded size (EXIF applied)"
        );
        let Some(same) = meta.get("same_picture_as").and_then(Value::as_str) else {
            continue;
        };
        let png = decode(same);
        let d = mean_abs_diff(&img, &png);
        match meta["format"].as_str().unwrap() {
            // Lossless containers: exactly the PNG's pixels.
            "BMP" | "WEBP" => assert_eq!(img, png, "{name} differs from {same}"),
            // Lossy JPEG (also the EXIF-rotated one) and the 256-colour GIF: close, and for the
            // GIF the first frame (the second is the negative, ~128 away on average).
            _ => assert!(d < 8.0, "{name}: mean |diff| {d} vs {same}"),
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} non-PNG files");
}
