//! Memory bandwidth by a large copy, for the decode bound in bench/RESULTS.md.
//!
//! Decode at batch 1 streams every weight once per token, so `weight bytes / bandwidth` bounds its
//! speed. The bandwidth is measured as STREAM's "Copy" does: bytes read plus bytes written per second,
//! on buffers far larger than the caches, split over the same threads the model uses
//! (`RAYON_NUM_THREADS`, else all CPUs). A read-only pass (sum) is measured too, as a cross-check:
//! decode only reads its weights.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Per buffer; two buffers (source, destination) are allocated.
const BYTES: usize = 512 << 20;

fn bandwidth(c: &mut Criterion) {
    let n = BYTES / 4;
    let t = common::threads();
    // Written (not just allocated) so that every page is mapped before timing.
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n.div_ceil(t);

    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    // STREAM counts a copy of N bytes as 2N bytes of traffic (read + write).
    g.throughput(Throughput::Bytes(2 * BYTES as u64));
    g.bench_function(format!("copy_{t}t"), |b| {
        b.iter(|| {
            common::copy(&src, &mut dst, t);
            black_box(&dst);
        })
    });
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.bench_function(format!("read_{t}t"), |b| {
        b.iter(|| {
            let total: f32 = std::thread::scope(|s| {
                let hs: Vec<_> = src
                    .chunks(chunk)
                    .map(|sr| {
                        s.spawn(move || {
                            // 64 accumulators: several independent vector add chains, so the
                            // loop is limited by memory, not by the latency of one chain.
                            let mut acc = [0f32; 64];
                            for v in sr.chunks_exact(64) {
                                for (a, x) in acc.iter_mut().zip(v) {
                                    *a += x;
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("reader thread"))
                    .sum()
            });
            black_box(total)
        })
    });
    g.finish();
}

criterion_group!(benches, bandwidth);
criterion_main!(benches);
