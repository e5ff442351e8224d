//! The CLIP embedder against transformers (fixtures/tiny-clip-full, tools/make_clip_fixture.py)
//! and the retrieval index: file round trip against an f64 brute force, staleness, corpus
//! validation, ties.
//!
//! Parity tolerance: 1e-5 absolute on the (unnormalised) f32 features, whose entries are O(1);
//! the largest error seen is printed (run with `--nocapture`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use model::clip_embed::{ClipEmbedder, ClipModelConfig};
use model::image::{decode_image, ImageLimits};
use model::retrieval::{CaptionCorpus, CorpusId, IndexWriter, RetrievalIndex, MAX_CAPTION_BYTES};
use model::ModelError;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    match std::env::var_os("TGA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"),
    }
}

fn clip_dir() -> PathBuf {
    fixtures().join("tiny-clip-full")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(clip_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tga-retrieval-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load() -> ClipEmbedder {
    ClipEmbedder::load(&clip_dir(), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn text_features_match_transformers() {
    let clip = load();
    let r = reference();
    let caps = r["captions"].as_array().unwrap();
    let mut worst = 0f32;
    let mut all_ids = Vec::new();
    for c in caps {
        let text = c["text"].as_str().unwrap();
        let ids = clip.tokenize(text).unwrap();
        let want_ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids, "{text:?}");
        let got = clip
            .text_features(std::slice::from_ref(&ids))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let d = max_diff(&got[0], &floats(&c["text_features"]));
        assert!(d < TOL, "{text:?}: {d}");
        worst = worst.max(d);
        all_ids.push(ids);
    }
    // Batched (right-padded to the longest, 77 tokens) gives the same features.
    let batch = clip
        .text_features(&all_ids)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (c, got) in caps.iter().zip(&batch) {
        let d = max_diff(got, &floats(&c["text_features"]));
        assert!(d < TOL, "batched: {d}");
        worst = worst.max(d);
    }
    // And embed_texts is their normalisation, in input order.
    let texts: Vec<&str> = caps.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let emb = clip.embed_texts(&texts, 2).unwrap();
    for (c, e) in caps.iter().zip(&emb) {
        let want = floats(&c["text_features"]);
        let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        let want: Vec<f32> = want.iter().map(|x| x / norm).collect();
        assert!(max_diff(e, &want) < TOL);
    }
    println!("text features: max |diff| {worst:e} (tolerance {TOL:e})");
}

#[test]
fn image_features_match_transformers() {
    let clip = load();
    let r = reference();
    let mut worst = 0f32;
    for im in r["images"].as_array().unwrap() {
        let file = im["file"].as_str().unwrap();
        let bytes = std::fs::read(fixtures().join(file)).unwrap();
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        let p = model::image::preprocess(&img, clip.preprocess_config()).unwrap();
        let sum: f64 = p.pixel_values.iter().map(|&x| f64::from(x)).sum();
        assert!(
            (sum - im["pixel_sum"].as_f64().unwrap()).abs() < 1e-2,
            "{file}: pixel sum {sum}"
        );
        let (h, w) = (p.size.0 as usize, p.size.1 as usize);
        let pv = candle_core::Tensor::from_vec(p.pixel_values, (1, 3, h, w), &Device::Cpu).unwrap();
        let got = clip.image_features(&pv).unwrap().to_vec2::<f32>().unwrap();
        let want = floats(&im["image_features"]);
        let d = max_diff(&got[0], &want);
        assert!(d < TOL, "{file}: {d}");
        worst = worst.max(d);
        let e = clip.embed_image(&img).unwrap();
        let norm = want.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(max_diff(&e, &want.iter().map(|x| x / norm).collect::<Vec<_>>()) < TOL);
    }
    println!("image features: max |diff| {worst:e} (tolerance {TOL:e})");
}

#[test]
fn config_must_be_a_full_clip_model() {
    let e = ClipModelConfig::from_dir(&fixtures().join("tiny-clip")).unwrap_err();
    assert!(e.to_string().contains("full CLIPModel config"), "{e}");
}

#[test]
fn build_open_and_retrieve_from_the_tiny_clip() {
    let clip = load();
    let r = reference();
    let texts: Vec<String> = r["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let dir = tmp("build");
    let corpus_text = texts.join("\n") + "\n";
    let corpus = CaptionCorpus::from_bytes(corpus_text.into_bytes(), &dir.join("c.txt")).unwrap();
    let path = dir.join("c.idx");
    let index = RetrievalIndex::build(&path, &corpus, &clip, 4).unwrap();
    assert_eq!((index.rows(), index.dims()), (texts.len(), clip.dim()));
    // Each caption's own embedding retrieves it, with cosine 1 up to f16 rounding.
    let emb = clip.embed_texts(&texts, 8).unwrap();
    for (i, e) in emb.iter().enumerate() {
        let (row, cos) = index.nearest(e).unwrap();
        assert_eq!(row, i);
        assert!((cos - 1.0).abs() < 2e-3, "{cos}");
    }
    // Reopening checks the embedder; another fingerprint is stale.
    RetrievalIndex::open(&path, &corpus.id(), Some(clip.fingerprint())).unwrap();
    let e = RetrievalIndex::open(&path, &corpus.id(), Some(clip.fingerprint() ^ 1)).unwrap_err();
    assert!(
        matches!(e, ModelError::Index { .. }) && e.to_string().contains("another CLIP"),
        "{e}"
    );
    drop(index);
    std::fs::remove_dir_all(&dir).ok();
}

fn random_unit_rows(rows: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|_| {
            let v: Vec<f32> = (0..dims).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        })
        .collect()
}

fn fake_corpus(rows: usize) -> CaptionCorpus {
    let text: String = (0..rows).map(|i| format!("caption {i}\n")).collect();
    CaptionCorpus::from_bytes(text.into_bytes(), Path::new("fake.txt")).unwrap()
}

fn write_index(path: &Path, corpus: &CaptionCorpus, rows: &[Vec<f32>]) -> RetrievalIndex {
    let mut w = IndexWriter::create(path, rows[0].len(), corpus.id(), 7).unwrap();
    for r in rows {
        w.push(r).unwrap();
    }
    w.finish().unwrap();
    RetrievalIndex::open(path, &corpus.id(), None).unwrap()
}

#[test]
fn nearest_matches_an_f64_brute_force_on_random_rows() {
    let (n, dims) = (3000, 96);
    let rows = random_unit_rows(n, dims, 1);
    let corpus = fake_corpus(n);
    let dir = tmp("random");
    let path = dir.join("r.idx");
    let index = write_index(&path, &corpus, &rows);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        64 + (n * dims * 2) as u64
    );
    for (qi, q) in random_unit_rows(50, dims, 2).iter().enumerate() {
        // The reference: f64 dot products with the f16-rounded rows the index stores.
        let scores: Vec<f64> = (0..n)
            .map(|r| {
                index
                    .row(r)
                    .unwrap()
                    .iter()
                    .zip(q)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum()
            })
            .collect();
        let (want, want_s) =
            scores
                .iter()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |b, (i, &s)| if s > b.1 { (i, s) } else { b },
                );
        let (got, got_s) = index.nearest(q).unwrap();
        // f32 accumulation may only swap rows whose f64 scores are within rounding of each other.
        if got != want {
            assert!(
                (scores[got] - want_s).abs() < 1e-5,
                "query {qi}: {got} vs {want}"
            );
        }
        assert!((f64::from(got_s) - want_s).abs() < 1e-5, "query {qi}");
    }
    // A query with a stored row's direction retrieves it; the query need not be normalised.
    let q: Vec<f32> = index.row(1234).unwrap().iter().map(|x| x * 3.0).collect();
    assert_eq!(index.nearest(&q).unwrap().0, 1234);
    assert!(index.nearest(&q[..10]).is_err());
    assert!(index.nearest(&vec![0.0; dims]).is_err());
    drop(index);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ties_go_to_the_lowest_row() {
    let dims = 40;
    let mut rows = random_unit_rows(20_000, dims, 3);
    let target = rows[5].clone();
    // The same vector at rows 17, 5000 and 19_999 (in different parallel blocks).
    for r in [17, 5000, 19_999] {
        rows[r] = target.clone();
    }
    rows[5] = rows[6].clone();
    let corpus = fake_corpus(rows.len());
    let dir = tmp("ties");
    let index = write_index(&dir.join("t.idx"), &corpus, &rows);
    assert_eq!(index.nearest(&target).unwrap().0, 17);
    drop(index);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_stale_or_damaged_index_is_refused() {
    let rows = random_unit_rows(10, 8, 4);
    let corpus = fake_corpus(10);
    let dir = tmp("stale");
    let path = dir.join("s.idx");
    write_index(&path, &corpus, &rows);
    let expect_index_error = |id: &CorpusId, what: &str| {
        let e = RetrievalIndex::open(&path, id, None).unwrap_err();
        assert!(matches!(e, ModelError::Index { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    };
    // The same number of lines, one caption edited.
    let edited = (0..10)
        .map(|i| {
            if i == 3 {
                "caption X\n".to_string()
            } else {
                format!("caption {i}\n")
            }
        })
        .collect::<String>();
    let edited = CaptionCorpus::from_bytes(edited.into_bytes(), Path::new("e.txt")).unwrap();
    expect_index_error(&edited.id(), "stale");
    expect_index_error(&fake_corpus(11).id(), "stale");
    // Truncated, bad magic, other version.
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 2]).unwrap();
    expect_index_error(&corpus.id(), "truncated");
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&path, &bad).unwrap();
    expect_index_error(&corpus.id(), "magic");
    let mut bad = good.clone();
    bad[8] = 9;
    std::fs::write(&path, &bad).unwrap();
    expect_index_error(&corpus.id(), "version 9");
    // The writer refuses a row count that does not match the corpus.
    let mut w = IndexWriter::create(&dir.join("short.idx"), 8, corpus.id(), 0).unwrap();
    w.push(&rows[0]).unwrap();
    assert!(w.finish().is_err());
    assert!(!dir.join("short.idx").exists() && !dir.join("short.idx.tmp").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_corpus_lines_are_refused_with_their_line_number() {
    let line_of = |bytes: &[u8]| match CaptionCorpus::from_bytes(bytes.to_vec(), Path::new("c.txt"))
    {
        Err(ModelError::Corpus { line, msg, .. }) => (line, msg),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted {bytes:?}"),
    };
    assert_eq!(line_of(b"one\n\nthree\n").0, 2);
    assert_eq!(line_of(b"one\ntwo\n  \t\n").0, 3);
    assert_eq!(line_of(b"").0, 1);
    assert_eq!(line_of(b"\n").0, 1);
    let (line, msg) = line_of(b"ok\nok\n\xffbad\n");
    assert_eq!(line, 3);
    assert!(msg.contains("UTF-8"), "{msg}");
    let long = format!("ok\n{}\n", "x".repeat(MAX_CAPTION_BYTES + 1));
    let (line, msg) = line_of(long.as_bytes());
    assert_eq!(line, 2);
    assert!(msg.contains("1025 bytes"), "{msg}");
    let e = CaptionCorpus::from_bytes(b"a\n\nb".to_vec(), Path::new("dir/c.txt")).unwrap_err();
    assert!(e.to_string().contains("dir/c.txt, line 2"), "{e}");
    // Accepted: the limit itself, CRLF endings, no final newline, multi-byte UTF-8.
    let ok = format!("{}\r\nzwei \u{e4}\r\nlast", "y".repeat(MAX_CAPTION_BYTES));
    let c = CaptionCorpus::from_bytes(ok.into_bytes(), Path::new("c.txt")).unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c.get(1), Some("zwei \u{e4}"));
    assert_eq!(c.get(2), Some("last"));
    assert_eq!(c.get(3), None);
}
