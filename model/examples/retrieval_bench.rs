//! Exact-search speed and memory of a TGA retrieval index on a generated corpus (issue 15 item 3:
//! "state its speed and memory on a generated corpus of 1M rows").
//!
//!     cargo run --release -p tga-model --example retrieval_bench -- [ROWS [DIMS [QUERIES [PATH]]]]
//!
//! Defaults: 1 000 000 rows of 768 dims (CLIP ViT-L/14's projection width), 100 queries, the
//! index at /tmp/tga-retrieval-bench.idx (deleted at the end). Rows and queries are random unit
//! vectors (seeded). Reports the build time, the file size, the median / p90 / max query time
//! over the queries after 3 warm-up queries (the file is then in the page cache: the steady state
//! of a server), and the process's resident memory before opening, after opening and after the
//! queries (VmRSS and its file-backed part RssFile, from /proc/self/status).

use std::path::PathBuf;
use std::time::Instant;

use model::retrieval::{CorpusId, IndexWriter, RetrievalIndex};
use rand::{Rng, SeedableRng};

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mem(label: &str) {
    let mb = |k: Option<u64>| k.map_or("?".into(), |k| format!("{:.0} MB", k as f64 / 1024.0));
    println!(
        "{label}: VmRSS {}, RssFile {}, RssAnon {}",
        mb(status_kb("VmRSS:")),
        mb(status_kb("RssFile:")),
        mb(status_kb("RssAnon:"))
    );
}

fn unit(rng: &mut impl Rng, dims: usize) -> Vec<f32> {
    // Gaussian-like entries (sum of uniforms) so directions are spread over the sphere.
    let v: Vec<f32> = (0..dims)
        .map(|_| rng.random::<f32>() + rng.random::<f32>() - 1.0)
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn main() -> model::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| -> usize {
        args.get(i)
            .map(|a| a.replace('_', "").parse().expect("a number"))
            .unwrap_or(d)
    };
    let (rows, dims, queries) = (num(0, 1_000_000), num(1, 768), num(2, 100));
    let path = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/tga-retrieval-bench.idx"));
    println!(
        "rows {rows}, dims {dims}, queries {queries}, threads {}, index {}",
        rayon::current_num_threads(),
        path.display()
    );
    mem("start");

    // The corpus is synthetic: the header records its line count; bytes and hash are unused.
    let corpus = CorpusId {
        lines: rows as u64,
        bytes: 0,
        hash: 0,
    };
    let t = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut w = IndexWriter::create(&path, dims, corpus, 0)?;
    for _ in 0..rows {
        w.push(&unit(&mut rng, dims))?;
    }
    w.finish()?;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote the index in {:.1} s: {size} bytes ({:.2} GB)",
        t.elapsed().as_secs_f64(),
        size as f64 / 1e9
    );
    mem("after writing");

    let t = Instant::now();
    let index = RetrievalIndex::open(&path, &corpus, None)?;
    println!("opened (mmap) in {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    mem("after opening");

    let qs: Vec<Vec<f32>> = (0..queries + 3).map(|_| unit(&mut rng, dims)).collect();
    let mut times = Vec::with_capacity(queries);
    let mut best = 0f32;
    for (i, q) in qs.iter().enumerate() {
        let t = Instant::now();
        let (_, cos) = index.nearest(q)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if i < 3 {
            println!("warm-up query {i}: {ms:.1} ms");
        } else {
            times.push(ms);
        }
        best = best.max(cos);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "query: median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms over {} queries ({:.1} GB/s of index), best cosine seen {best:.3}",
        pct(0.5),
        pct(0.9),
        times[0],
        times[times.len() - 1],
        times.len(),
        size as f64 / 1e9 / (pct(0.5) / 1e3)
    );
    mem("after the queries");
    drop(index);
    if args.get(3).is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
