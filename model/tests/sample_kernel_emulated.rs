//! The device sampler's CUDA kernel (model/cuda/sample.cu) run on the host: compiled with the
//! system's C++ compiler against model/cuda/host_emulation.h (one thread per CUDA thread, real
//! barriers, warp shuffles through memory), on rows of awkward lengths under every kind of draw,
//! and held to the kernel's Rust model (`device_sampling::reference_row`) as the GPU's start-up
//! check holds it. A barrier that not every thread reaches hangs, and the timeout fails the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use model::device_sampling::{
    check_against_reference, kernel_params, test_draws, test_logits, tokens_of, TEST_DRAW_KINDS,
};
use model::sampling::DrawSpec;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The emulated kernel as a program under the test's temporary directory (built once): with
/// the kernel's 512 threads a row, or with 64 (two warps: every cross-warp step still runs) for
/// the wide matrix of cases, as 512 host threads a row make each barrier slow.
fn build(threads: u32) -> PathBuf {
    static EXE: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    EXE[usize::from(threads == 512)]
        .get_or_init(|| compile(threads))
        .clone()
}

fn compile(threads: u32) -> PathBuf {
    let cuda = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let exe =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sample_kernel_emulated_{threads}"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let status = Command::new(&cxx)
        .args(["-O2", "-std=c++17", "-pthread", "-Wall", "-Werror"])
        .arg(format!("-DTHREADS={threads}"))
        .arg("-o")
        .arg(&exe)
        .arg(cuda.join("sample_host_main.cpp"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx}: {e}"));
    assert!(status.success(), "{cxx} failed on sample_host_main.cpp");
    exe
}

/// Runs the emulated kernel over `logits` (`rows × vocab`) with `specs`; its raw output. One
/// run at a time: each is 512 threads.
fn run(exe: &Path, logits: &[f32], vocab: usize, limit: usize, specs: &[DrawSpec]) -> Vec<f32> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut input = Vec::new();
    for v in [specs.len() as i32, vocab as i32, limit as i32] {
        input.extend(v.to_le_bytes());
    }
    input.extend(logits.iter().flat_map(|x| x.to_le_bytes()));
    for s in specs {
        input.extend(kernel_params(s).iter().flat_map(|x| x.to_le_bytes()));
    }
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the emulated kernel");
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let reader = {
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut buf).map(|_| buf)
        })
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            panic!("the emulated kernel hung (a barrier not every thread reaches?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "emulated kernel: {status}");
    let bytes = reader.join().unwrap().unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Every kind of draw on rows of awkward lengths, `per_kind` rows each; the number compared.
fn draws_match(threads: u32, lengths: &[usize], per_kind: usize) -> usize {
    let exe = build(threads);
    let mut rng = StdRng::seed_from_u64(12 + u64::from(threads));
    let mut compared = 0;
    for &n in lengths {
        // The limit below the row's width on some lengths (a padded vocabulary).
        let limit = if n > 16 { n - 3 } else { n };
        let specs = test_draws(&mut rng, TEST_DRAW_KINDS.len() * per_kind);
        let rows: Vec<Vec<f32>> = specs.iter().map(|_| test_logits(&mut rng, n)).collect();
        let out = run(&exe, &rows.concat(), n, limit, &specs);
        assert_eq!(out.len(), specs.len() * model::device_sampling::OUT_COLS);
        for ((x, spec), got) in rows.iter().zip(&specs).zip(tokens_of(&out, &specs, limit)) {
            let got = got.unwrap_or_else(|e| panic!("{threads} threads, n {n} {spec:?}: {e}"));
            check_against_reference(&x[..limit], spec, &got)
                .unwrap_or_else(|e| panic!("{threads} threads, n {n}: {e}"));
            compared += 1;
        }
    }
    compared
}

#[test]
fn the_kernel_draws_what_its_reference_draws() {
    let lengths = [1, 15, 16, 17, 63, 64, 65, 511, 512, 513, 3000];
    assert_eq!(draws_match(64, &lengths, 2), lengths.len() * 16);
}

#[test]
fn the_kernel_at_its_own_block_size_draws_what_its_reference_draws() {
    assert_eq!(draws_match(512, &[3000], 1), 8);
}

#[test]
fn the_kernel_reports_rows_it_cannot_sample() {
    let exe = build(64);
    let spec = DrawSpec {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.9,
        min_p: 0.0,
        top_logprobs: 2,
        u: 0.5,
    };
    let logits = [
        0.0f32,
        f32::NAN,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        2.0,
        3.0,
    ];
    let out = run(&exe, &logits, 2, 2, &[spec; 4]);
    let tokens = tokens_of(&out, &[spec; 4], 2);
    assert!(tokens[0].is_err(), "NaN");
    assert!(tokens[1].is_err(), "+inf");
    assert!(tokens[2].is_err(), "no finite logit");
    check_against_reference(&logits[6..8], &spec, tokens[3].as_ref().unwrap()).unwrap();
}
