//! The `tga-loadtest` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::Result;
use crate::run::{Arrivals, RunConfig};
use crate::settings::{parse_duration, ImageSize, IntDistribution, Slo};
use crate::workload::{ImageSet, PromptSet, Workload};

/// Exit status when the run went through but failed a check (server counts disagree).
pub const EXIT_FAILED_CHECK: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "tga-loadtest",
    version,
    about = "Load tester for OpenAI-compatible chat servers (tga-serve, vLLM, llama.cpp), reporting vLLM bench-serve metrics",
    after_help = "Exit status: 0 passed, 1 could not run, 2 the server's counts disagree with the client's."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a workload and measure TTFT, ITL, TPOT, e2e, throughput and goodput.
    Run(Box<RunArgs>),
    /// Set two JSON reports side by side, with B/A ratios.
    Compare(CompareArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The server's base URL (routes /v1/chat/completions, /v1/safety/diagnose, /v1/models).
    #[arg(
        long,
        env = "TGA_LOADTEST_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,
    /// Model id to request (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Requests to send (default 100 when --duration is not given either).
    #[arg(short = 'n', long)]
    pub num_requests: Option<u64>,
    /// Stop sending after this long (e.g. 60s, 5m); with -n, whichever comes first.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Closed loop: this many requests in flight, each worker sending its next request when
    /// the previous one is answered (default 1 when --request-rate is not given).
    #[arg(short = 'c', long, conflicts_with = "request_rate")]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second (`inf`: all at once), Poisson unless --burstiness.
    #[arg(short = 'r', long)]
    pub request_rate: Option<f64>,
    /// Open loop: Gamma shape of the gaps; 1 is Poisson, < 1 burstier, > 1 more even
    /// (coefficient of variation 1/√burstiness, vLLM's definition).
    #[arg(long, default_value_t = 1.0, requires = "request_rate")]
    pub burstiness: f64,
    /// Open loop: at most this many requests in flight; later ones wait for a slot.
    #[arg(long, requires = "request_rate")]
    pub max_concurrency: Option<usize>,
    /// Fixes the requests' contents, mix and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// JSONL prompts: {"prompt": "..."} or {"messages": [...]}, optional "max_tokens"
    /// (default: a built-in synthetic set).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Filler words put before each text prompt: N, uniform:LO:HI or normal:MEAN:STD.
    #[arg(long)]
    pub prompt_words: Option<IntDistribution>,
    /// Images from this folder (png, jpg, webp, gif, bmp).
    #[arg(long, conflicts_with = "image_sizes")]
    pub image_dir: Option<PathBuf>,
    /// Synthetic PNG images of these sizes, WIDTHxHEIGHT (repeat or comma-separate).
    #[arg(long = "image-size", value_delimiter = ',')]
    pub image_sizes: Vec<ImageSize>,
    /// Share of requests with images, 0..1 (default 1 when images are given, else 0).
    #[arg(long)]
    pub image_ratio: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub images_per_request: usize,
    /// max_tokens of each request: N, uniform:LO:HI or normal:MEAN:STD.
    #[arg(long, default_value = "128")]
    pub max_tokens: IntDistribution,
    /// Ask for exactly max_tokens tokens (vLLM's `ignore_eos`; other servers ignore it).
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// OpenAI's `response_format` for every chat request (structured outputs), as JSON, e.g.
    /// '{"type": "json_object"}', or @FILE holding it.
    #[arg(long, value_parser = parse_response_format)]
    pub response_format: Option<serde_json::Value>,
    /// Share of requests sent to /v1/safety/diagnose (not streamed), 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub diagnose_ratio: f64,

    /// Goodput targets, e.g. ttft=2s,tpot=100ms,e2e=10s.
    #[arg(long)]
    pub slo: Option<Slo>,
    /// Limit for one request, from send to its last byte.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Unmeasured requests sent one by one first.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,

    /// Prometheus endpoint scraped before and after (default: <url>/metrics).
    #[arg(long, conflicts_with = "no_metrics")]
    pub metrics_url: Option<String>,
    /// Do not compare the server's counts.
    #[arg(long)]
    pub no_metrics: bool,

    /// Write the JSON report here.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Write a markdown report here, with PNG charts beside it (<name>-latency-cdf.png,
    /// <name>-throughput.png).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Names the run in reports and comparisons (default: the arrivals in words).
    #[arg(long)]
    pub label: Option<String>,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// `--response-format`: inline JSON or `@path` to a JSON file; an object.
fn parse_response_format(arg: &str) -> std::result::Result<serde_json::Value, String> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => arg.to_string(),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("response_format must be a JSON object".into());
    }
    Ok(value)
}

impl RunArgs {
    /// The run's settings; loads prompts and images (or draws the synthetic ones).
    pub fn config(&self, terminal: bool) -> Result<RunConfig> {
        let base_url = self.url.trim_end_matches('/').to_string();
        let prompts = match &self.prompts {
            Some(path) => PromptSet::from_jsonl(path)?,
            None => PromptSet::Synthetic,
        };
        let images = match (&self.image_dir, self.image_sizes.is_empty()) {
            (Some(dir), _) => Some(ImageSet::from_dir(dir)?),
            (None, false) => Some(ImageSet::synthetic(&self.image_sizes, self.seed)?),
            (None, true) => None,
        };
        let image_ratio = self
            .image_ratio
            .unwrap_or(if images.is_some() { 1.0 } else { 0.0 });
        let arrivals = match self.request_rate {
            Some(rate) => Arrivals::Open {
                rate,
                burstiness: self.burstiness,
                max_concurrency: self.max_concurrency,
            },
            None => Arrivals::Closed {
                concurrency: self.concurrency.unwrap_or(1),
            },
        };
        let num_requests = match (self.num_requests, self.duration) {
            (None, None) => Some(100),
            (n, _) => n,
        };
        let config = RunConfig {
            metrics_url: (!self.no_metrics).then(|| {
                self.metrics_url
                    .clone()
                    .unwrap_or_else(|| format!("{base_url}/metrics"))
            }),
            base_url,
            model: self.model.clone(),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            arrivals,
            num_requests,
            duration: self.duration,
            workload: Workload {
                prompts,
                images,
                image_ratio,
                images_per_request: self.images_per_request,
                diagnose_ratio: self.diagnose_ratio,
                max_tokens: self.max_tokens,
                prompt_words: self.prompt_words,
                seed: self.seed,
            },
            temperature: self.temperature,
            ignore_eos: self.ignore_eos,
            response_format: self.response_format.clone(),
            slo: self.slo.clone().map(|s| s.0).unwrap_or_default(),
            timeout: self.timeout,
            warmup: self.warmup,
            label: self.label.clone().unwrap_or_else(|| arrivals.describe()),
            progress: terminal && !self.no_progress,
        };
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The baseline report (JSON from `run --output`).
    pub a: PathBuf,
    /// The report compared with it.
    pub b: PathBuf,
    /// Print a markdown table.
    #[arg(long)]
    pub markdown: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["tga-loadtest", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            Command::Compare(_) => unreachable!(),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_a_closed_loop_of_100_text_requests() {
        let config = run_args(&[]).config(false).unwrap();
        assert_eq!(config.arrivals, Arrivals::Closed { concurrency: 1 });
        assert_eq!(config.num_requests, Some(100));
        assert_eq!(config.workload.image_ratio, 0.0);
        assert_eq!(
            config.metrics_url.as_deref(),
            Some("http://127.0.0.1:8000/metrics")
        );
        assert!(!config.progress);
    }

    #[test]
    fn open_loop_flags_and_images() {
        let config = run_args(&[
            "--url",
            "http://h:1/",
            "-r",
            "inf",
            "-n",
            "5",
            "--image-size",
            "16x8,8x16",
            "--image-ratio",
            "0.5",
            "--slo",
            "ttft=2s,tpot=100ms",
            "--no-metrics",
        ])
        .config(true)
        .unwrap();
        assert_eq!(config.base_url, "http://h:1");
        assert!(matches!(
            config.arrivals,
            Arrivals::Open { rate, burstiness, max_concurrency: None } if rate.is_infinite() && burstiness == 1.0
        ));
        assert_eq!(config.workload.images.as_ref().unwrap().assets.len(), 8);
        assert_eq!(config.workload.image_ratio, 0.5);
        assert_eq!(config.slo.len(), 2);
        assert!(config.metrics_url.is_none());
        assert!(config.progress);
    }

    #[test]
    fn contradictory_or_impossible_settings_are_refused() {
        for args in [
            &["-c", "2", "-r", "3"][..],
            &["--burstiness", "2"],
            &["--image-dir", "x", "--image-size", "2x2"],
        ] {
            assert!(
                Cli::try_parse_from(["tga-loadtest", "run"].iter().chain(args)).is_err(),
                "{args:?}"
            );
        }
        for args in [
            &["-r", "inf", "--duration", "1s"][..],
            &["--image-ratio", "0.5"],
            &["-c", "0"],
            &["--diagnose-ratio", "1.5"],
        ] {
            assert!(run_args(args).config(false).is_err(), "{args:?}");
        }
    }
}
