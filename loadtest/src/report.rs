//! The run's report: what vLLM's `bench serve` prints (throughputs, goodput, TTFT/TPOT/ITL/e2e
//! statistics), errors by status and kind, and the server's counts beside the client's. The same
//! struct is written as JSON, read back by `compare`, and rendered as a text table or markdown.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::client::{RequestRecord, TokenSource};
use crate::error::{LoadtestError, Result};
use crate::server_metrics::{ServerCounts, Verdict};
use crate::settings::{SloMetric, SloTarget};
use crate::stats::{summarize, Summary};
use crate::workload::RequestKind;

/// The settings of the run, echoed for whoever reads the report later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub base_url: String,
    pub model: Option<String>,
    /// In words: "closed loop, concurrency 4" or "Poisson, 5 req/s".
    pub arrivals: String,
    pub concurrency: Option<usize>,
    /// `None` with open-loop arrivals means an infinite rate (all at once).
    pub request_rate: Option<f64>,
    pub burstiness: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub num_requests: Option<u64>,
    pub duration_limit_s: Option<f64>,
    pub seed: u64,
    pub prompts: String,
    pub images: Option<String>,
    pub image_ratio: f64,
    pub images_per_request: usize,
    pub diagnose_ratio: f64,
    pub max_tokens: String,
    pub prompt_words: Option<String>,
    pub temperature: f64,
    pub ignore_eos: bool,
    /// The `response_format` sent with chat requests, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<String>,
    pub slo: Vec<SloTarget>,
    pub timeout_s: f64,
    pub warmup: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub chat: u64,
    pub diagnose: u64,
    pub with_images: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenTotals {
    /// Output tokens of the successful requests.
    pub output: u64,
    /// Prompt tokens of the successful requests, when every one reported usage.
    pub prompt: Option<u64>,
    /// Successful requests whose output was counted from the usage chunk / from content chunks.
    pub counted_from_usage: u64,
    pub counted_from_chunks: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: Option<f64>,
    /// Requests per second meeting every SLO (only with `--slo`).
    pub goodput_requests_per_s: Option<f64>,
    pub good_requests: Option<u64>,
}

/// Milliseconds. TTFT, TPOT and e2e over successful chat requests, ITL over all their gaps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub ttft: Option<Summary>,
    pub tpot: Option<Summary>,
    pub itl: Option<Summary>,
    pub e2e: Option<Summary>,
    pub diagnose_e2e: Option<Summary>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorSummary {
    /// Failed requests by HTTP status (`none` when no status was received).
    pub by_status: BTreeMap<String, u64>,
    /// Failed requests by kind (`http`, `timeout`, `stream_error`, ...).
    pub by_kind: BTreeMap<String, u64>,
    /// Failed requests by the server's error code, where it sent one.
    pub by_code: BTreeMap<String, u64>,
    /// The first few messages, one per distinct (kind, status, code).
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub label: String,
    pub started_unix_s: f64,
    pub settings: Settings,
    /// From the first send to the last answer.
    pub duration_s: f64,
    #[serde(default)]
    pub interrupted: bool,
    pub requests: RequestCounts,
    pub tokens: TokenTotals,
    pub throughput: Throughput,
    pub latency_ms: Latencies,
    pub errors: ErrorSummary,
    pub server_counts: Option<ServerCounts>,
    /// Why the run failed (non-zero exit); empty when it passed.
    pub failures: Vec<String>,
    pub records: Vec<RequestRecord>,
}

const MAX_ERROR_EXAMPLES: usize = 10;

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        label: String,
        started_unix_s: f64,
        settings: Settings,
        duration_s: f64,
        interrupted: bool,
        mut records: Vec<RequestRecord>,
        server_counts: Option<ServerCounts>,
    ) -> Self {
        records.sort_by_key(|r| r.index);
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.succeeded()).collect();
        let ok_chat: Vec<&RequestRecord> = ok
            .iter()
            .copied()
            .filter(|r| r.kind == RequestKind::Chat)
            .collect();

        let requests = RequestCounts {
            sent: records.len() as u64,
            succeeded: ok.len() as u64,
            failed: (records.len() - ok.len()) as u64,
            chat: records
                .iter()
                .filter(|r| r.kind == RequestKind::Chat)
                .count() as u64,
            diagnose: records
                .iter()
                .filter(|r| r.kind == RequestKind::Diagnose)
                .count() as u64,
            with_images: records.iter().filter(|r| r.images > 0).count() as u64,
        };

        let tokens = TokenTotals {
            output: ok.iter().filter_map(|r| r.output_tokens).sum(),
            prompt: ok
                .iter()
                .map(|r| r.prompt_tokens)
                .sum::<Option<u64>>()
                .filter(|_| !ok.is_empty()),
            counted_from_usage: ok
                .iter()
                .filter(|r| r.output_tokens_source == Some(TokenSource::Usage))
                .count() as u64,
            counted_from_chunks: ok
                .iter()
                .filter(|r| r.output_tokens_source == Some(TokenSource::Chunks))
                .count() as u64,
        };

        let per_s = |n: f64| {
            if duration_s > 0.0 {
                n / duration_s
            } else {
                0.0
            }
        };
        let good_requests = (!settings.slo.is_empty())
            .then(|| ok.iter().filter(|r| meets_slo(r, &settings.slo)).count() as u64);
        let throughput = Throughput {
            requests_per_s: per_s(ok.len() as f64),
            output_tokens_per_s: per_s(tokens.output as f64),
            total_tokens_per_s: tokens.prompt.map(|p| per_s((p + tokens.output) as f64)),
            goodput_requests_per_s: good_requests.map(|n| per_s(n as f64)),
            good_requests,
        };

        let values = |f: &dyn Fn(&RequestRecord) -> Option<f64>, set: &[&RequestRecord]| {
            set.iter().filter_map(|r| f(r)).collect::<Vec<f64>>()
        };
        let ok_diagnose: Vec<&RequestRecord> = ok
            .iter()
            .copied()
            .filter(|r| r.kind == RequestKind::Diagnose)
            .collect();
        let itl: Vec<f64> = ok_chat
            .iter()
            .flat_map(|r| r.itl_s.iter().copied())
            .collect();
        let latency_ms = Latencies {
            ttft: summarize(&values(&|r| r.ttft_s, &ok_chat), 1e3),
            tpot: summarize(&values(&|r| r.tpot_s(), &ok_chat), 1e3),
            itl: summarize(&itl, 1e3),
            e2e: summarize(&values(&|r| r.e2e_s, &ok_chat), 1e3),
            diagnose_e2e: summarize(&values(&|r| r.e2e_s, &ok_diagnose), 1e3),
        };

        let mut errors = ErrorSummary::default();
        let mut seen = Vec::new();
        for record in &records {
            let Some(error) = &record.error else {
                continue;
            };
            let status = record
                .status
                .map_or_else(|| "none".to_string(), |s| s.to_string());
            *errors.by_status.entry(status.clone()).or_default() += 1;
            *errors
                .by_kind
                .entry(error.kind.as_str().into())
                .or_default() += 1;
            if let Some(code) = &error.code {
                *errors.by_code.entry(code.clone()).or_default() += 1;
            }
            let key = (error.kind, record.status, error.code.clone());
            if !seen.contains(&key) && errors.examples.len() < MAX_ERROR_EXAMPLES {
                seen.push(key);
                errors.examples.push(format!(
                    "request {} ({}): {} status {status}{}: {}",
                    record.index,
                    record.kind.as_str(),
                    error.kind.as_str(),
                    error
                        .code
                        .as_ref()
                        .map(|c| format!(" code {c}"))
                        .unwrap_or_default(),
                    error.message
                ));
            }
        }

        let failures = server_counts
            .iter()
            .flat_map(|counts| counts.disagreements())
            .map(|check| {
                format!(
                    "server and client counts disagree on {}: client {}, server {}{}",
                    check.quantity,
                    check.client.map_or("?".into(), |n| n.to_string()),
                    check.server.map_or("absent".into(), |n| n.to_string()),
                    check
                        .note
                        .as_ref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                )
            })
            .collect();

        Self {
            tool: "tga-loadtest".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            label,
            started_unix_s,
            settings,
            duration_s,
            interrupted,
            requests,
            tokens,
            throughput,
            latency_ms,
            errors,
            server_counts,
            failures,
            records,
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("reports serialise");
        std::fs::write(path, text + "\n").map_err(|e| LoadtestError::io(path, e))
    }

    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadtestError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| LoadtestError::Report {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The final table printed after a run.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let title = format!(" tga-loadtest: {} ", self.label);
        let _ = writeln!(out, "{title:=^72}");
        for (name, value) in self.headline() {
            let _ = writeln!(out, "{name:<40}{value}");
        }
        let _ = writeln!(out, "{:-^72}", " Latency (ms) ");
        let _ = writeln!(
            out,
            "{:<14}{:>7}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "n", "mean", "std", "p50", "p90", "p99", "max"
        );
        for (name, summary) in self.latency_rows() {
            let _ = match summary {
                Some(s) => writeln!(
                    out,
                    "{name:<14}{:>7}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                    s.count, s.mean, s.std, s.p50, s.p90, s.p99, s.max
                ),
                None => writeln!(out, "{name:<14}{:>7}", "-"),
            };
        }
        if self.requests.failed > 0 {
            let _ = writeln!(out, "{:-^72}", " Errors ");
            for (status, n) in &self.errors.by_status {
                let _ = writeln!(out, "{:<40}{n}", format!("status {status}"));
            }
            for (kind, n) in &self.errors.by_kind {
                let _ = writeln!(out, "{:<40}{n}", format!("kind {kind}"));
            }
            for (code, n) in &self.errors.by_code {
                let _ = writeln!(out, "{:<40}{n}", format!("code {code}"));
            }
            for example in &self.errors.examples {
                let _ = writeln!(out, "  {example:.300}");
            }
        }
        if let Some(counts) = &self.server_counts {
            let dialect = counts.dialect.as_deref().unwrap_or("unavailable");
            let _ = writeln!(
                out,
                "{:-^72}",
                format!(" Server metrics ({dialect}) vs client ")
            );
            if !counts.checks.is_empty() {
                let _ = writeln!(
                    out,
                    "{:<34}{:>12}{:>12}  verdict",
                    "quantity", "client", "server"
                );
            }
            for check in &counts.checks {
                let _ = writeln!(
                    out,
                    "{:<34}{:>12}{:>12}  {}",
                    check.quantity,
                    check.client.map_or("?".into(), |n| n.to_string()),
                    check.server.map_or("absent".into(), |n| n.to_string()),
                    verdict_word(check.verdict)
                );
                if let Some(note) = &check.note {
                    let _ = writeln!(out, "    {note}");
                }
            }
            if let Some(note) = &counts.note {
                let _ = writeln!(out, "{note}");
            }
        }
        let _ = writeln!(out, "{}", "=".repeat(72));
        if self.failures.is_empty() {
            let _ = writeln!(out, "PASS");
        } else {
            for failure in &self.failures {
                let _ = writeln!(out, "FAIL: {failure}");
            }
        }
        out
    }

    /// A markdown report; `charts` are (caption, relative path) of PNGs to link.
    pub fn render_markdown(&self, charts: &[(String, String)]) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# Load test: {}\n", self.label);
        let _ = writeln!(out, "| | |\n|---|---|");
        for (name, value) in self.headline() {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        let _ = writeln!(
            out,
            "\n## Latency (ms)\n\n| | n | mean | std | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (name, summary) in self.latency_rows() {
            let _ = match summary {
                Some(s) => writeln!(
                    out,
                    "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    s.count, s.mean, s.std, s.p50, s.p90, s.p99, s.max
                ),
                None => writeln!(out, "| {name} | 0 | | | | | | |"),
            };
        }
        if self.requests.failed > 0 {
            let _ = writeln!(out, "\n## Errors\n\n| | count |\n|---|---:|");
            for (status, n) in &self.errors.by_status {
                let _ = writeln!(out, "| status {status} | {n} |");
            }
            for (kind, n) in &self.errors.by_kind {
                let _ = writeln!(out, "| kind {kind} | {n} |");
            }
            for (code, n) in &self.errors.by_code {
                let _ = writeln!(out, "| code {code} | {n} |");
            }
            for example in &self.errors.examples {
                let _ = writeln!(out, "\n- {}", example.replace('|', "\\|"));
            }
        }
        if let Some(counts) = &self.server_counts {
            let dialect = counts.dialect.as_deref().unwrap_or("unavailable");
            let _ = writeln!(out, "\n## Server metrics ({dialect}) vs client\n");
            if !counts.checks.is_empty() {
                let _ = writeln!(
                    out,
                    "| quantity | client | server | verdict | note |\n|---|---:|---:|---|---|"
                );
            }
            for check in &counts.checks {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    check.quantity,
                    check.client.map_or("?".into(), |n| n.to_string()),
                    check.server.map_or("absent".into(), |n| n.to_string()),
                    verdict_word(check.verdict),
                    check.note.as_deref().unwrap_or("").replace('|', "\\|")
                );
            }
            if let Some(note) = &counts.note {
                let _ = writeln!(out, "{note}");
            }
        }
        if !charts.is_empty() {
            let _ = writeln!(out, "\n## Charts\n");
            for (caption, path) in charts {
                let _ = writeln!(out, "![{caption}]({path})\n");
            }
        }
        let _ = writeln!(
            out,
            "\n**{}**",
            if self.failures.is_empty() {
                "PASS".to_string()
            } else {
                format!("FAIL: {}", self.failures.join("; "))
            }
        );
        out
    }

    fn headline(&self) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        let mut rows = vec![
            ("Target", s.base_url.clone()),
            ("Model", s.model.clone().unwrap_or_else(|| "(not named)".into())),
            ("Arrivals", s.arrivals.clone()),
            (
                "Workload",
                format!(
                    "prompts {}; images {} (ratio {}, {} per request); max_tokens {}; diagnose ratio {}; seed {}",
                    s.prompts,
                    s.images.as_deref().unwrap_or("none"),
                    s.image_ratio,
                    s.images_per_request,
                    s.max_tokens,
                    s.diagnose_ratio,
                    s.seed
                ),
            ),
            (
                "Sampling",
                format!(
                    "temperature {}; ignore_eos {}; response_format {}",
                    s.temperature,
                    s.ignore_eos,
                    s.response_format.as_deref().unwrap_or("none")
                ),
            ),
            (
                "Requests sent (chat/diagnose/images)",
                format!(
                    "{} ({}/{}/{})",
                    self.requests.sent,
                    self.requests.chat,
                    self.requests.diagnose,
                    self.requests.with_images
                ),
            ),
            ("Successful requests", self.requests.succeeded.to_string()),
            ("Failed requests", self.requests.failed.to_string()),
            ("Benchmark duration (s)", format!("{:.2}", self.duration_s)),
            ("Total output tokens", self.tokens.output.to_string()),
            (
                "Total prompt tokens",
                self.tokens
                    .prompt
                    .map_or("(no usage)".into(), |n| n.to_string()),
            ),
            (
                "Output counted from usage/chunks",
                format!(
                    "{}/{}",
                    self.tokens.counted_from_usage, self.tokens.counted_from_chunks
                ),
            ),
            (
                "Request throughput (req/s)",
                format!("{:.2}", self.throughput.requests_per_s),
            ),
            (
                "Output token throughput (tok/s)",
                format!("{:.2}", self.throughput.output_tokens_per_s),
            ),
        ];
        if let Some(total) = self.throughput.total_tokens_per_s {
            rows.push(("Total token throughput (tok/s)", format!("{total:.2}")));
        }
        if let (Some(goodput), Some(good)) = (
            self.throughput.goodput_requests_per_s,
            self.throughput.good_requests,
        ) {
            let slo: Vec<String> = s
                .slo
                .iter()
                .map(|t| format!("{}≤{}ms", t.metric.as_str(), t.max_ms))
                .collect();
            rows.push((
                "Goodput (req/s)",
                format!("{goodput:.2} ({good} requests meet {})", slo.join(", ")),
            ));
        }
        if self.interrupted {
            rows.push(("Interrupted", "yes (Ctrl-C)".into()));
        }
        rows
    }

    fn latency_rows(&self) -> Vec<(&'static str, Option<Summary>)> {
        let l = &self.latency_ms;
        let mut rows = vec![
            ("TTFT", l.ttft),
            ("TPOT", l.tpot),
            ("ITL", l.itl),
            ("E2E", l.e2e),
        ];
        if self.requests.diagnose > 0 {
            rows.push(("Diagnose E2E", l.diagnose_e2e));
        }
        rows
    }
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Agree => "agree",
        Verdict::Disagree => "DISAGREE",
        Verdict::Unknown => "unknown",
    }
}

/// vLLM's goodput rule: every stated bound holds (inclusive); a bound that does not apply to the
/// request (TPOT of a one-token answer, TTFT of a diagnose request) does not count against it.
pub fn meets_slo(record: &RequestRecord, slo: &[SloTarget]) -> bool {
    record.succeeded()
        && slo.iter().all(|target| {
            let value = match target.metric {
                SloMetric::Ttft => record.ttft_s,
                SloMetric::Tpot => record.tpot_s(),
                SloMetric::E2e => record.e2e_s,
            };
            value.is_none_or(|v| v * 1e3 <= target.max_ms)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ErrorKind, RequestError};
    use crate::workload::RequestSpec;

    pub(crate) fn settings(slo: Vec<SloTarget>) -> Settings {
        Settings {
            base_url: "http://127.0.0.1:1".into(),
            model: None,
            arrivals: "closed loop, concurrency 1".into(),
            concurrency: Some(1),
            request_rate: None,
            burstiness: None,
            max_concurrency: None,
            num_requests: Some(3),
            duration_limit_s: None,
            seed: 0,
            prompts: "synthetic".into(),
            images: None,
            image_ratio: 0.0,
            images_per_request: 1,
            diagnose_ratio: 0.0,
            max_tokens: "4".into(),
            prompt_words: None,
            temperature: 0.0,
            ignore_eos: false,
            response_format: None,
            slo,
            timeout_s: 10.0,
            warmup: 0,
        }
    }

    fn chat(index: u64, ttft: f64, itl: f64, tokens: u64) -> RequestRecord {
        let spec = RequestSpec {
            index,
            kind: RequestKind::Chat,
            messages: serde_json::json!([]),
            images: vec![],
            max_tokens: tokens as u32,
            seed: 0,
        };
        let mut r = RequestRecord::new(&spec, None, 0.0);
        r.status = Some(200);
        r.ttft_s = Some(ttft);
        r.itl_s = vec![itl; tokens as usize - 1];
        r.e2e_s = Some(ttft + itl * (tokens - 1) as f64);
        r.output_tokens = Some(tokens);
        r.output_tokens_source = Some(TokenSource::Usage);
        r.prompt_tokens = Some(10);
        r.content_chunks = tokens;
        r
    }

    #[test]
    fn throughput_goodput_and_errors_follow_vllm_definitions() {
        let mut failed = chat(2, 0.1, 0.01, 2);
        failed.error = Some(RequestError {
            kind: ErrorKind::Http,
            code: Some("queue_full".into()),
            message: "busy".into(),
        });
        failed.status = Some(429);
        let records = vec![chat(0, 0.2, 0.02, 11), chat(1, 3.0, 0.02, 11), failed];
        let slo: crate::settings::Slo = "ttft=2s,tpot=100ms".parse().unwrap();
        let report = Report::build("t".into(), 0.0, settings(slo.0), 2.0, false, records, None);
        assert_eq!(report.requests.succeeded, 2);
        assert_eq!(report.tokens.output, 22);
        assert_eq!(report.tokens.prompt, Some(20));
        assert!((report.throughput.requests_per_s - 1.0).abs() < 1e-12);
        assert!((report.throughput.output_tokens_per_s - 11.0).abs() < 1e-12);
        assert_eq!(report.throughput.good_requests, Some(1));
        assert!((report.throughput.goodput_requests_per_s.unwrap() - 0.5).abs() < 1e-12);
        let tpot = report.latency_ms.tpot.unwrap();
        assert!((tpot.mean - 20.0).abs() < 1e-9);
        assert_eq!(report.latency_ms.itl.unwrap().count, 20);
        assert_eq!(report.errors.by_status["429"], 1);
        assert_eq!(report.errors.by_kind["http"], 1);
        assert_eq!(report.errors.by_code["queue_full"], 1);
        assert!(report.passed());
        let text = report.render_text();
        assert!(
            text.contains("Goodput (req/s)") && text.contains("PASS"),
            "{text}"
        );

        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.throughput, report.throughput);
        assert_eq!(back.records.len(), 3);
    }
}
