//! One load-test run: find the model, warm up, scrape `/metrics`, send the workload (closed loop
//! at a fixed concurrency, or open-loop arrivals), scrape again, and build the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::arrivals::ArrivalTimes;
use crate::client::{self, RequestRecord, Target};
use crate::error::{LoadtestError, Result};
use crate::report::{Report, Settings};
use crate::server_metrics::{self, ClientCounts, Scrape, ServerCounts};
use crate::settings::SloTarget;
use crate::workload::{mix, Workload};

/// Salt of the arrival-time random stream, so that it is independent of the requests' contents.
const ARRIVAL_STREAM: u64 = 0xa441_7a15;
/// Warm-up requests take indexes from here, apart from the measured ones.
const WARMUP_INDEX_BASE: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Each of `concurrency` workers sends its next request when its previous one is answered.
    Closed { concurrency: usize },
    /// Requests at Gamma-process times (Poisson for burstiness 1), however the server keeps up;
    /// `max_concurrency` caps requests in flight (later ones wait, and are late).
    Open {
        rate: f64,
        burstiness: f64,
        max_concurrency: Option<usize>,
    },
}

impl Arrivals {
    pub fn describe(&self) -> String {
        match *self {
            Self::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Self::Open {
                rate,
                burstiness,
                max_concurrency,
            } => {
                let process = if rate.is_infinite() {
                    "all at once".to_string()
                } else if burstiness == 1.0 {
                    format!("Poisson, {rate} req/s")
                } else {
                    format!("Gamma (burstiness {burstiness}), {rate} req/s")
                };
                match max_concurrency {
                    Some(n) => format!("{process}, at most {n} in flight"),
                    None => process,
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Without a trailing slash, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    /// `None`: the first model of `/v1/models`, or no `model` field if that fails.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub arrivals: Arrivals,
    /// Stop after this many requests, or
    pub num_requests: Option<u64>,
    /// stop sending after this long (whichever comes first).
    pub duration: Option<Duration>,
    pub workload: Workload,
    pub temperature: f64,
    pub ignore_eos: bool,
    /// Sent as `response_format` with every chat request.
    pub response_format: Option<serde_json::Value>,
    pub slo: Vec<SloTarget>,
    pub timeout: Duration,
    /// Unmeasured requests sent one by one before the run (and before the first scrape).
    pub warmup: u64,
    /// `None`: no server-count comparison.
    pub metrics_url: Option<String>,
    pub label: String,
    pub progress: bool,
}

impl RunConfig {
    pub fn validate(&self) -> Result<()> {
        self.workload.validate()?;
        if self.num_requests.is_none() && self.duration.is_none() {
            return Err(LoadtestError::Config(
                "give a number of requests or a duration".into(),
            ));
        }
        if self.num_requests == Some(0) {
            return Err(LoadtestError::Config(
                "--num-requests must be at least 1".into(),
            ));
        }
        match self.arrivals {
            Arrivals::Closed { concurrency: 0 } => {
                return Err(LoadtestError::Config(
                    "--concurrency must be at least 1".into(),
                ))
            }
            Arrivals::Open {
                rate,
                burstiness,
                max_concurrency,
            } => {
                ArrivalTimes::new(rate, burstiness, 0).map_err(LoadtestError::Config)?;
                if rate.is_infinite() && self.num_requests.is_none() {
                    return Err(LoadtestError::Config(
                        "an infinite --request-rate needs --num-requests".into(),
                    ));
                }
                if max_concurrency == Some(0) {
                    return Err(LoadtestError::Config(
                        "--max-concurrency must be at least 1".into(),
                    ));
                }
            }
            Arrivals::Closed { .. } => {}
        }
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return Err(LoadtestError::Config(
                "--temperature must be non-negative".into(),
            ));
        }
        Ok(())
    }

    fn settings(&self, model: Option<String>) -> Settings {
        let (concurrency, request_rate, burstiness, max_concurrency) = match self.arrivals {
            Arrivals::Closed { concurrency } => (Some(concurrency), None, None, None),
            Arrivals::Open {
                rate,
                burstiness,
                max_concurrency,
            } => (
                None,
                rate.is_finite().then_some(rate),
                Some(burstiness),
                max_concurrency,
            ),
        };
        let w = &self.workload;
        Settings {
            base_url: self.base_url.clone(),
            model,
            arrivals: self.arrivals.describe(),
            concurrency,
            request_rate,
            burstiness,
            max_concurrency,
            num_requests: self.num_requests,
            duration_limit_s: self.duration.map(|d| d.as_secs_f64()),
            seed: w.seed,
            prompts: w.prompts.describe(),
            images: w
                .images
                .as_ref()
                .map(|set| format!("{} ({} images)", set.source, set.assets.len())),
            image_ratio: w.image_ratio,
            images_per_request: w.images_per_request,
            diagnose_ratio: w.diagnose_ratio,
            max_tokens: w.max_tokens.to_string(),
            prompt_words: w.prompt_words.map(|d| d.to_string()),
            temperature: self.temperature,
            ignore_eos: self.ignore_eos,
            response_format: self.response_format.as_ref().map(|v| v.to_string()),
            slo: self.slo.clone(),
            timeout_s: self.timeout.as_secs_f64(),
            warmup: self.warmup,
        }
    }
}

/// The first model id of `/v1/models`.
async fn discover_model(target: &Target) -> Option<String> {
    let response = target
        .client
        .get(target.url("/v1/models"))
        .headers(target.headers())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?;
    let list: Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
    list["data"][0]["id"].as_str().map(String::from)
}

async fn scrape(target: &Target, url: &str) -> std::result::Result<Scrape, String> {
    let response = target
        .client
        .get(url)
        .headers(target.headers())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url}: status {status}"));
    }
    let text = response
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    Scrape::parse(&text).map_err(|e| format!("{url}: {e}"))
}

fn progress_bar(config: &RunConfig) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = match config.num_requests {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} requests {msg} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{elapsed_precise} {spinner} {pos} requests {msg}")
                .expect("valid template"),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs the load test. Setting `stop` to true (Ctrl-C) stops sending; requests in flight finish.
pub async fn run(config: &RunConfig, stop: watch::Receiver<bool>) -> Result<Report> {
    config.validate()?;
    let max_in_flight = match config.arrivals {
        Arrivals::Closed { concurrency } => concurrency,
        Arrivals::Open {
            max_concurrency, ..
        } => max_concurrency.unwrap_or(256),
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(max_in_flight)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let mut target = Target {
        client,
        base_url: config.base_url.trim_end_matches('/').to_string(),
        api_key: config.api_key.clone(),
        model: config.model.clone(),
        temperature: config.temperature,
        ignore_eos: config.ignore_eos,
        response_format: config.response_format.clone(),
        timeout: config.timeout,
    };
    if target.model.is_none() {
        target.model = discover_model(&target).await;
        match &target.model {
            Some(model) => tracing::info!(%model, "model from /v1/models"),
            None => tracing::warn!("/v1/models named no model: requests leave `model` out"),
        }
    }

    for i in 0..config.warmup {
        let spec = config.workload.request(WARMUP_INDEX_BASE + i);
        let record = client::send(&target, &spec, Instant::now(), None).await;
        if let Some(error) = &record.error {
            tracing::warn!(request = i, kind = error.kind.as_str(), message = %error.message, "warm-up request failed");
        }
    }

    let before = match &config.metrics_url {
        Some(url) => Some(scrape(&target, url).await),
        None => None,
    };

    let bar = progress_bar(config);
    let records = Arc::new(Mutex::new(Vec::<RequestRecord>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let target = Arc::new(target);
    let workload = Arc::new(config.workload.clone());
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let start = Instant::now();
    let deadline = config.duration.map(|d| start + d);

    let finish = {
        let records = records.clone();
        let errors = errors.clone();
        let bar = bar.clone();
        move |record: RequestRecord| {
            if record.error.is_some() {
                let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
                bar.set_message(format!("({n} errors)"));
            }
            bar.inc(1);
            records.lock().expect("no panics while held").push(record);
        }
    };

    let mut tasks = JoinSet::new();
    match config.arrivals {
        Arrivals::Closed { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            for _ in 0..concurrency {
                let (target, workload, next, stop, finish) = (
                    target.clone(),
                    workload.clone(),
                    next.clone(),
                    stop.clone(),
                    finish.clone(),
                );
                let limit = config.num_requests;
                tasks.spawn(async move {
                    loop {
                        if *stop.borrow() || deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if limit.is_some_and(|n| i >= n) {
                            break;
                        }
                        let spec = workload.request(i);
                        finish(client::send(&target, &spec, start, None).await);
                    }
                });
            }
        }
        Arrivals::Open {
            rate,
            burstiness,
            max_concurrency,
        } => {
            let slots = max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
            let times = ArrivalTimes::new(rate, burstiness, mix(workload.seed, ARRIVAL_STREAM))
                .map_err(LoadtestError::Config)?;
            let mut stop = stop.clone();
            for (i, at) in times.enumerate() {
                let i = i as u64;
                if config.num_requests.is_some_and(|n| i >= n)
                    || config.duration.is_some_and(|d| at >= d.as_secs_f64())
                    || *stop.borrow()
                {
                    break;
                }
                let when = start + Duration::from_secs_f64(at);
                tokio::select! {
                    () = tokio::time::sleep_until(when.into()) => {}
                    _ = stop.changed() => break,
                }
                let permit = match &slots {
                    Some(slots) => Some(
                        slots
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("the semaphore is never closed"),
                    ),
                    None => None,
                };
                let (target, workload, finish) = (target.clone(), workload.clone(), finish.clone());
                tasks.spawn(async move {
                    let spec = workload.request(i);
                    finish(client::send(&target, &spec, start, Some(at)).await);
                    drop(permit);
                });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined {
            tracing::error!(error = %err, "a request task failed");
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let interrupted = *stop.borrow();
    let records = std::mem::take(&mut *records.lock().expect("no panics while held"));

    let server_counts = match (&config.metrics_url, before) {
        (Some(url), Some(before)) => {
            let after = scrape(&target, url).await;
            Some(match (before, after) {
                (Ok(before), Ok(after)) => server_metrics::compare(
                    url,
                    &before,
                    &after,
                    &ClientCounts::from_records(&records),
                ),
                (Err(e), _) => ServerCounts::unavailable(url, format!("before the run: {e}")),
                (_, Err(e)) => ServerCounts::unavailable(url, format!("after the run: {e}")),
            })
        }
        _ => None,
    };

    let settings = config.settings(target.model.clone());
    Ok(Report::build(
        config.label.clone(),
        started_unix_s,
        settings,
        duration_s,
        interrupted,
        records,
        server_counts,
    ))
}

/// Chart files beside a markdown report `dir/name.md`: `dir/name-latency-cdf.png` and
/// `dir/name-throughput.png`.
pub fn chart_paths(markdown: &Path) -> (PathBuf, PathBuf) {
    let stem = markdown
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let dir = markdown.parent().unwrap_or(Path::new(""));
    (
        dir.join(format!("{stem}-latency-cdf.png")),
        dir.join(format!("{stem}-throughput.png")),
    )
}

/// Writes the JSON report and, if asked, the markdown report with its two charts.
pub fn write_outputs(report: &Report, json: Option<&Path>, markdown: Option<&Path>) -> Result<()> {
    if let Some(path) = json {
        report.write_json(path)?;
    }
    if let Some(path) = markdown {
        let (cdf, throughput) = chart_paths(path);
        crate::charts::latency_cdfs(&report.records, &cdf)?;
        crate::charts::throughput_over_time(&report.records, report.duration_s, &throughput)?;
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let charts = vec![
            ("Latency CDFs".to_string(), name(&cdf)),
            ("Throughput over time".to_string(), name(&throughput)),
        ];
        std::fs::write(path, report.render_markdown(&charts))
            .map_err(|e| LoadtestError::io(path, e))?;
    }
    Ok(())
}
