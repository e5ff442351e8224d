//! The load tester against the real `tga-serve` binary serving its built-in tiny model: a short
//! mixed text/image run has no errors, and the server's counts (requests, prompt and generated
//! tokens, images) agree with the client's.
//!
//! The server binary is the one cargo builds in the same workspace run (`cargo test --workspace`
//! builds every package's binaries), next to this test's own target directory; set
//! `TGA_SERVE_BIN` to use another.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::report::Report;
use loadtest::server_metrics::Verdict;

/// `target/<profile>/tga-serve`, from this test's path `target/<profile>/deps/real_server-…`.
fn server_binary() -> PathBuf {
    let binary = match std::env::var_os("TGA_SERVE_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("the test knows its own path");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("test binaries live in target/<profile>/deps");
            profile_dir.join(format!("tga-serve{}", std::env::consts::EXE_SUFFIX))
        }
    };
    assert!(
        binary.is_file(),
        "{} is missing: build the server first (`cargo build -p tga-serve`, or run the tests \
         with `cargo test --workspace`, which builds it), or point TGA_SERVE_BIN at one",
        binary.display()
    );
    binary
}

/// Kills the server however the test ends.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `tga-serve serve --model builtin:tiny` (the built-in tiny model) and waits for `/ready`.
fn start_server(binary: &std::path::Path, dir: &std::path::Path) -> Server {
    let port = free_port();
    let log = dir.join("tga-serve.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary)
        .args([
            "serve",
            "--model",
            "builtin:tiny",
            "--host",
            "127.0.0.1",
            "--port",
        ])
        .arg(port.to_string())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("tga-serve starts");
    let mut server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let ready = runtime.block_on(async {
            client
                .get(format!("{}/ready", server.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        });
        if ready {
            return server;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "tga-serve exited with {status}: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "tga-serve was not ready within 60 s: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_short_mixed_run_against_tga_serve_has_no_errors_and_agreeing_counts() {
    let binary = server_binary();
    let dir = common::temp_dir("real");
    let server = start_server(&binary, &dir);
    let out = dir.join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tga-loadtest"))
        .args([
            "run",
            "--url",
            &server.url,
            "-n",
            "20",
            "-c",
            "4",
            "--image-size",
            "336x336,200x300",
            "--image-ratio",
            "0.5",
            "--max-tokens",
            "uniform:4:12",
            "--seed",
            "1",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "exit {:?}; server log: {}",
        output.status.code(),
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );

    let report = Report::read_json(&out).unwrap();
    assert_eq!(report.requests.sent, 20);
    assert_eq!(report.requests.failed, 0, "{:?}", report.errors.examples);
    assert!((1..20).contains(&report.requests.with_images));
    assert_eq!(
        report.settings.model.as_deref(),
        Some("tga-tiny-llava-next")
    );
    // Every answer streamed and was counted from the usage chunk.
    assert_eq!(report.tokens.counted_from_usage, 20);
    assert!(report.latency_ms.ttft.is_some() && report.latency_ms.e2e.is_some());
    // An image adds hundreds of prompt positions (LLaVA-NeXT's base view plus tiles).
    let prompt = |with_images: bool| {
        report
            .records
            .iter()
            .filter(|r| (r.images > 0) == with_images)
            .map(|r| r.prompt_tokens.unwrap())
            .min()
            .unwrap()
    };
    assert!(
        prompt(true) > prompt(false) + 500,
        "{} vs {}",
        prompt(true),
        prompt(false)
    );

    let counts = report
        .server_counts
        .as_ref()
        .expect("tga-serve has /metrics");
    assert_eq!(counts.dialect.as_deref(), Some("tga"));
    let quantities: Vec<&str> = counts.checks.iter().map(|c| c.quantity.as_str()).collect();
    assert_eq!(
        quantities,
        vec![
            "requests /v1/chat/completions",
            "prompt tokens",
            "generation tokens",
            "images"
        ]
    );
    assert!(
        counts.checks.iter().all(|c| c.verdict == Verdict::Agree),
        "{:#?}",
        counts.checks
    );
    assert_eq!(counts.checks[0].client, Some(20));
    assert_eq!(counts.checks[3].client, Some(report.requests.with_images));
    assert!(report.passed());
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
