//! The load tester against a stub server whose timing and counts are known: measured TTFT, ITL,
//! TPOT, e2e and throughput within 10 % of the scripted truth; open-loop sends on the seeded
//! schedule; errors counted by status and code; the binary's exit status when the server's
//! counts disagree; the markdown report and `compare`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use clap::Parser;
use common::{Script, Stub, CHAT, MODEL};
use loadtest::cli::{Cli, Command as Sub, EXIT_FAILED_CHECK};
use loadtest::report::Report;
use loadtest::run::run;
use loadtest::server_metrics::Verdict;

/// The tests measure wall-clock latencies; one at a time keeps them off each other's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A run in-process, on a runtime of its own (the stub has another).
fn load(args: &[&str]) -> Report {
    let cli = Cli::try_parse_from(["tga-loadtest", "run"].iter().chain(args)).unwrap();
    let Sub::Run(args) = cli.command else {
        unreachable!()
    };
    let config = args.config(false).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    runtime.block_on(run(&config, stop)).unwrap()
}

fn within(measured: f64, truth: f64, tolerance: f64) -> bool {
    (measured / truth - 1.0).abs() <= tolerance
}

fn assert_all_counts_agree(report: &Report) {
    let counts = report.server_counts.as_ref().expect("metrics were scraped");
    assert_eq!(counts.dialect.as_deref(), Some("tga"));
    assert!(
        counts.checks.iter().all(|c| c.verdict == Verdict::Agree),
        "{:#?}",
        counts.checks
    );
    assert!(report.passed(), "{:?}", report.failures);
}

#[test]
fn measured_latencies_and_throughput_match_the_scripted_truth() {
    let _guard = serial();
    let script = Script {
        ttft: Duration::from_millis(200),
        itl: Duration::from_millis(20),
        tokens: 10,
        ..Script::default()
    };
    let stub = Stub::start(script.clone());
    let (concurrency, requests) = (4, 16);
    let report = load(&[
        "--url",
        &stub.url,
        "-c",
        &concurrency.to_string(),
        "-n",
        &requests.to_string(),
        "--max-tokens",
        "10",
        "--slo",
        "ttft=250ms,tpot=30ms",
    ]);

    assert_eq!(report.settings.model.as_deref(), Some(MODEL));
    assert_eq!(report.requests.succeeded, requests);
    assert_eq!(report.tokens.output, requests * script.tokens);
    assert_eq!(report.tokens.counted_from_usage, requests);
    let ttft = 200.0;
    let itl = 20.0;
    let e2e = ttft + itl * (script.tokens - 1) as f64;
    let l = &report.latency_ms;
    let (t, i, p, e) = (
        l.ttft.unwrap(),
        l.itl.unwrap(),
        l.tpot.unwrap(),
        l.e2e.unwrap(),
    );
    eprintln!(
        "TTFT mean {:.2} p99 {:.2} | ITL mean {:.2} p50 {:.2} | TPOT mean {:.2} | E2E mean {:.2} | {:.2} tok/s, {:.3} req/s in {:.3} s",
        t.mean, t.p99, i.mean, i.p50, p.mean, e.mean,
        report.throughput.output_tokens_per_s, report.throughput.requests_per_s, report.duration_s
    );
    assert!(within(t.mean, ttft, 0.10), "TTFT mean {}", t.mean);
    assert!(within(t.p99, ttft, 0.10), "TTFT p99 {}", t.p99);
    assert_eq!(i.count as u64, requests * (script.tokens - 1));
    assert!(within(i.mean, itl, 0.10), "ITL mean {}", i.mean);
    assert!(within(i.p50, itl, 0.10), "ITL p50 {}", i.p50);
    assert!(within(p.mean, itl, 0.10), "TPOT mean {}", p.mean);
    assert!(within(e.mean, e2e, 0.10), "E2E mean {}", e.mean);
    // Closed loop: `requests / concurrency` rounds of one e2e each.
    let duration = (requests / concurrency) as f64 * e2e / 1e3;
    let tokens_per_s = (requests * script.tokens) as f64 / duration;
    assert!(
        within(report.throughput.output_tokens_per_s, tokens_per_s, 0.10),
        "{} tok/s, truth {tokens_per_s}",
        report.throughput.output_tokens_per_s
    );
    assert!(within(
        report.throughput.requests_per_s,
        requests as f64 / duration,
        0.10
    ));
    // Every request meets TTFT ≤ 250 ms and TPOT ≤ 30 ms.
    assert_eq!(report.throughput.good_requests, Some(requests));
    assert_all_counts_agree(&report);
    assert_eq!(stub.counters.requests(CHAT, 200), requests);
}

#[test]
fn without_usage_output_is_counted_from_content_chunks() {
    let _guard = serial();
    let stub = Stub::start(Script {
        usage: false,
        tokens: 6,
        ..Script::default()
    });
    let report = load(&["--url", &stub.url, "-c", "3", "-n", "6"]);
    assert_eq!(report.requests.succeeded, 6);
    assert_eq!(report.tokens.output, 36);
    assert_eq!(report.tokens.counted_from_chunks, 6);
    assert_eq!(report.tokens.prompt, None);
    let checks = &report.server_counts.as_ref().unwrap().checks;
    // Requests still agree; token counts cannot be checked without usage, and say so.
    assert_eq!(checks[0].verdict, Verdict::Agree);
    assert!(checks[1..].iter().all(|c| c.verdict == Verdict::Unknown));
    assert!(report.passed());
}

#[test]
fn refusals_are_counted_by_status_and_code_and_diagnose_is_timed() {
    let _guard = serial();
    let stub = Stub::start(Script {
        reject_every: Some(3),
        diagnose_delay: Duration::from_millis(60),
        ..Script::default()
    });
    let report = load(&[
        "--url",
        &stub.url,
        "-c",
        "2",
        "-n",
        "40",
        "--diagnose-ratio",
        "0.25",
        "--image-size",
        "32x24",
        "--image-ratio",
        "0.5",
        "--seed",
        "5",
    ]);
    let chat = report.requests.chat;
    let rejected = chat / 3;
    assert!(report.requests.diagnose > 0 && report.requests.with_images > 0);
    assert_eq!(report.requests.failed, rejected);
    assert_eq!(report.errors.by_status["429"], rejected);
    assert_eq!(report.errors.by_kind["http"], rejected);
    assert_eq!(report.errors.by_code["queue_full"], rejected);
    let diagnose = report.latency_ms.diagnose_e2e.unwrap();
    assert_eq!(diagnose.count as u64, report.requests.diagnose);
    assert!(within(diagnose.mean, 60.0, 0.25), "{}", diagnose.mean);
    // The server counted the 429s too, and the diagnose route separately.
    let checks = &report.server_counts.as_ref().unwrap().checks;
    let quantities: Vec<&str> = checks.iter().map(|c| c.quantity.as_str()).collect();
    assert_eq!(
        quantities,
        vec![
            "requests /v1/chat/completions",
            "requests /v1/safety/diagnose",
            "prompt tokens",
            "generation tokens"
        ]
    );
    assert_all_counts_agree(&report);
    assert!(report.render_text().contains("code queue_full"));
}

#[test]
fn open_loop_sends_on_the_seeded_schedule() {
    let _guard = serial();
    let stub = Stub::start(Script::default());
    let args = |seed: &'static str| {
        [
            "--url",
            &stub.url,
            "-r",
            "40",
            "-n",
            "40",
            "--seed",
            seed,
            "--no-metrics",
        ]
        .map(String::from)
    };
    let a = load(&args("11").each_ref().map(String::as_str));
    let b = load(&args("11").each_ref().map(String::as_str));
    let c = load(&args("12").each_ref().map(String::as_str));
    let schedule =
        |r: &Report| -> Vec<f64> { r.records.iter().map(|r| r.scheduled_s.unwrap()).collect() };
    assert_eq!(schedule(&a), schedule(&b));
    assert_ne!(schedule(&a), schedule(&c));
    for report in [&a, &b, &c] {
        assert_eq!(report.requests.succeeded, 40);
        assert!(report.server_counts.is_none());
        for record in &report.records {
            let late = record.start_s - record.scheduled_s.unwrap();
            assert!(
                (-1e-3..0.03).contains(&late),
                "request {} sent {late} s late",
                record.index
            );
        }
        // Poisson at 40 req/s: 39 gaps of mean 25 ms (a loose check; the dispersion test on
        // 20 000 arrivals is in `arrivals`).
        let last = report.records.last().unwrap().scheduled_s.unwrap();
        assert!(within(last / 39.0, 0.025, 0.5), "mean gap {}", last / 39.0);
    }
}

#[test]
fn a_duration_limit_stops_sending_and_waits_for_requests_in_flight() {
    let _guard = serial();
    // 20 ms + 3 × 5 ms = 35 ms a request.
    let stub = Stub::start(Script::default());
    for mode in [&["-c", "2"][..], &["-r", "50"]] {
        let mut args = vec!["--url", &stub.url, "--duration", "300ms", "--seed", "3"];
        args.extend_from_slice(mode);
        let report = load(&args);
        assert_eq!(report.settings.num_requests, None);
        assert!(
            report.requests.sent >= 5,
            "{mode:?}: {}",
            report.requests.sent
        );
        assert_eq!(report.requests.failed, 0);
        assert!(report.records.iter().all(|r| r.start_s < 0.3 + 0.01));
        let last_end = report.records.iter().map(|r| r.end_s).fold(0.0, f64::max);
        assert!(
            report.duration_s >= last_end && last_end > 0.3 - 0.05,
            "{mode:?}"
        );
        assert_all_counts_agree(&report);
    }
}

fn loadtest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tga-loadtest"))
}

fn run_binary(url: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let output = loadtest()
        .args(["run", "--url", url, "-o"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

#[test]
fn disagreeing_server_counts_fail_the_run_with_a_non_zero_exit() {
    let _guard = serial();
    let dir = common::temp_dir("disagree");
    // A server that counts tokens it never sent, and one that counts a request twice.
    for (script, quantity) in [
        (
            Script {
                phantom_generation_tokens: 3,
                ..Script::default()
            },
            "generation tokens",
        ),
        (
            Script {
                double_count_request: Some(2),
                ..Script::default()
            },
            "requests /v1/chat/completions",
        ),
    ] {
        let stub = Stub::start(script);
        let out = dir.join("report.json");
        let output = run_binary(&stub.url, &out, &["-n", "4", "-c", "2"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.code(),
            Some(EXIT_FAILED_CHECK as i32),
            "{stdout}"
        );
        assert!(
            stdout.contains("DISAGREE") && stdout.contains("FAIL:"),
            "{stdout}"
        );
        let report = Report::read_json(&out).unwrap();
        assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
        assert!(
            report.failures[0].contains(quantity),
            "{:?}",
            report.failures
        );
        assert_eq!(report.requests.failed, 0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_passing_run_writes_markdown_charts_and_compare_reads_two_reports() {
    let _guard = serial();
    let dir = common::temp_dir("reports");
    let stub = Stub::start(Script::default());
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    let markdown = dir.join("b.md");
    let output = run_binary(&stub.url, &a, &["-n", "8", "-c", "1", "--label", "c1"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Output token throughput (tok/s)") && stdout.contains("PASS"),
        "{stdout}"
    );
    let output = run_binary(
        &stub.url,
        &b,
        &[
            "-n",
            "8",
            "-c",
            "4",
            "--label",
            "c4",
            "--markdown",
            markdown.to_str().unwrap(),
        ],
    );
    assert!(output.status.success());

    let md = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        md.contains("# Load test: c4") && md.contains("| TTFT |"),
        "{md}"
    );
    for chart in ["b-latency-cdf.png", "b-throughput.png"] {
        assert!(md.contains(&format!("]({chart})")), "{md}");
        let image = image::open(dir.join(chart)).unwrap();
        assert_eq!((image.width(), image.height()), (1200, 800));
    }

    let output = loadtest().arg("compare").arg(&a).arg(&b).output().unwrap();
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let (ra, rb) = (
        Report::read_json(&a).unwrap(),
        Report::read_json(&b).unwrap(),
    );
    let line = table
        .lines()
        .find(|l| l.starts_with("output throughput (tok/s)"))
        .unwrap_or_else(|| panic!("{table}"));
    let ratio = rb.throughput.output_tokens_per_s / ra.throughput.output_tokens_per_s;
    assert!(
        line.ends_with(&format!("{ratio:.2} ↑")),
        "{line} vs {ratio}"
    );
    // Four in flight instead of one: about four times the throughput from a stub that does not
    // slow down under load.
    assert!((3.0..4.5).contains(&ratio), "{ratio}");
    assert!(
        table.contains("A = c1") && table.contains("TTFT p99 (ms)"),
        "{table}"
    );

    let output = loadtest()
        .args(["compare", "--markdown"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&output.stdout);
    assert!(md.starts_with("| metric | c1 | c4 | ratio (B/A) |"), "{md}");
    std::fs::remove_dir_all(&dir).unwrap();
}
