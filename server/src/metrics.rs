//! The serving metrics of SERVING.md (vLLM's set with our `tga_` prefix), in a registry owned by
//! the app so that several servers can live in one process (tests do).

use std::sync::OnceLock;

use model::diagnostics::Modality;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric names, the one definition that code and tests share.
pub mod names {
    pub const REQUESTS_TOTAL: &str = "tga_requests_total";
    pub const REQUEST_DURATION_SECONDS: &str = "tga_request_duration_seconds";
    pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tga_time_to_first_token_seconds";
    pub const INTER_TOKEN_LATENCY_SECONDS: &str = "tga_inter_token_latency_seconds";
    pub const REQUEST_QUEUE_TIME_SECONDS: &str = "tga_request_queue_time_seconds";
    pub const REQUESTS_RUNNING: &str = "tga_requests_running";
    pub const REQUESTS_WAITING: &str = "tga_requests_waiting";
    pub const PROMPT_TOKENS_TOTAL: &str = "tga_prompt_tokens_total";
    pub const GENERATION_TOKENS_TOTAL: &str = "tga_generation_tokens_total";
    pub const IMAGE_TOKENS_TOTAL: &str = "tga_image_tokens_total";
    pub const IMAGES_TOTAL: &str = "tga_images_total";
    pub const BATCH_SIZE: &str = "tga_batch_size";
    pub const DECODE_STEP_SECONDS: &str = "tga_decode_step_seconds";
    pub const REQUESTS_REJECTED_TOTAL: &str = "tga_requests_rejected_total";
    pub const CLIENT_DISCONNECTS_TOTAL: &str = "tga_client_disconnects_total";
    pub const MODEL_INFO: &str = "tga_model_info";
    // The paged KV cache (vLLM's kv_cache_usage_perc, num_preemptions, prefix_cache_*).
    pub const KV_CACHE_USAGE_RATIO: &str = "tga_kv_cache_usage_ratio";
    pub const KV_CACHE_BLOCKS_USED: &str = "tga_kv_cache_blocks_used";
    pub const KV_CACHE_BLOCKS_FREE: &str = "tga_kv_cache_blocks_free";
    pub const PREEMPTIONS_TOTAL: &str = "tga_preemptions_total";
    pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "tga_prefix_cache_queries_total";
    pub const PREFIX_CACHE_HITS_TOTAL: &str = "tga_prefix_cache_hits_total";
    // Safety diagnostics (SERVING.md).
    pub const SAFETY_REQUESTS_TOTAL: &str = "tga_safety_requests_total";
    pub const SAFETY_REFUSALS_TOTAL: &str = "tga_safety_refusals_total";
    pub const SAFETY_ACTIVATION_LAYER: &str = "tga_safety_activation_layer";
    pub const SAFETY_REFUSAL_PROBABILITY: &str = "tga_safety_refusal_probability";
    pub const SAFETY_IMAGE_TEXT_COSINE: &str = "tga_safety_image_text_cosine";
    pub const DIAGNOSTICS_EVENTS_DROPPED_TOTAL: &str = "tga_diagnostics_events_dropped_total";
}

/// `tga_safety_refusal_probability` buckets: log-spaced near 0 (an aligned model's refusal mass
/// on a harmless prompt is tiny), linear above.
pub const REFUSAL_PROBABILITY_BUCKETS: &[f64] = &[
    1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99,
    1.0,
];

/// `tga_safety_image_text_cosine` buckets: −1 to 1 in steps of 0.1.
pub fn cosine_buckets() -> Vec<f64> {
    (-10..=10).map(|i| f64::from(i) / 10.0).collect()
}

/// The `modality` label.
pub fn modality_label(modality: Modality) -> &'static str {
    match modality {
        Modality::Text => "text",
        Modality::Image => "image",
        Modality::Mixed => "mixed",
    }
}

/// The safety metrics of SERVING.md. They exist once a model that supports diagnostics is
/// loaded, because the activation-layer histogram has one bucket per layer of that model.
pub struct SafetyMetrics {
    pub requests: IntCounterVec,
    pub refusals: IntCounterVec,
    pub activation_layer: HistogramVec,
    pub refusal_probability: HistogramVec,
    pub image_text_cosine: Histogram,
}

impl SafetyMetrics {
    /// One finished diagnosed request.
    pub fn observe(
        &self,
        modality: Modality,
        refused: Option<bool>,
        activation_layer: Option<usize>,
        p_refusal: Option<f64>,
        cos_band_mean: Option<f64>,
    ) {
        let label = [modality_label(modality)];
        self.requests.with_label_values(&label).inc();
        // Touched for every modality seen, so a zero is a real zero on the dashboard.
        let refusals = self.refusals.with_label_values(&label);
        if refused == Some(true) {
            refusals.inc();
        }
        if let Some(layer) = activation_layer {
            self.activation_layer
                .with_label_values(&label)
                .observe(layer as f64);
        }
        if let Some(p) = p_refusal.filter(|p| p.is_finite()) {
            self.refusal_probability
                .with_label_values(&label)
                .observe(p);
        }
        if let Some(c) = cos_band_mean.filter(|c| c.is_finite()) {
            self.image_text_cosine.observe(c);
        }
    }
}

/// vLLM's `time_to_first_token_seconds` buckets: up to 2560 s, because an image prefill of
/// thousands of tokens on a CPU takes minutes.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's `inter_token_latency_seconds` buckets (a CPU decode step of a full batch can take
/// seconds).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's `e2e_request_latency_seconds` buckets, reaching two hours.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Sequences per decode step.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// `tga_decode_step_seconds` buckets: a GPU step of the 7B takes milliseconds, a CPU one up to
/// seconds.
pub const STEP_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The `route` label of requests that matched no route (keeps the label set bounded).
pub const UNMATCHED_ROUTE: &str = "unmatched";

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub queue_time: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub image_tokens: IntCounter,
    pub images: IntCounter,
    pub batch_size: Histogram,
    /// By `stage`: `forward` (the model's step, logits on the host), `sample` (sampling and
    /// streaming the step's tokens).
    pub decode_step: HistogramVec,
    pub rejected: IntCounterVec,
    pub client_disconnects: IntCounter,
    pub model_info: IntGaugeVec,
    pub diagnostics_events_dropped: IntCounter,
    pub kv_cache_usage: Gauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub preemptions: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    safety: OnceLock<SafetyMetrics>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let metric = Histogram::with_opts(opts).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let model_info = IntGaugeVec::new(
            Opts::new(names::MODEL_INFO, "The served model (value is always 1)."),
            &["model", "arch", "dtype", "device"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(model_info.clone()))
            .expect("unique metric");

        Self {
            requests: counter_vec(
                names::REQUESTS_TOTAL,
                "HTTP requests by route and status code.",
                &["route", "status"],
            ),
            request_duration: histogram(
                names::REQUEST_DURATION_SECONDS,
                "End-to-end time of finished generation requests, from arrival to the last token.",
                REQUEST_BUCKETS,
            ),
            time_to_first_token: histogram(
                names::TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from arrival to the first generated token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                names::INTER_TOKEN_LATENCY_SECONDS,
                "Time between consecutive generated tokens of one request.",
                ITL_BUCKETS,
            ),
            queue_time: histogram(
                names::REQUEST_QUEUE_TIME_SECONDS,
                "Time from arrival to the start of prefill.",
                TTFT_BUCKETS,
            ),
            running: gauge(names::REQUESTS_RUNNING, "Sequences in the running batch."),
            waiting: gauge(
                names::REQUESTS_WAITING,
                "Accepted requests waiting to be prefilled.",
            ),
            prompt_tokens: counter(
                names::PROMPT_TOKENS_TOTAL,
                "Prefilled prompt tokens (image positions included).",
            ),
            generation_tokens: counter(names::GENERATION_TOKENS_TOTAL, "Generated tokens."),
            image_tokens: counter(
                names::IMAGE_TOKENS_TOTAL,
                "Prompt positions taken by images.",
            ),
            images: counter(names::IMAGES_TOTAL, "Images prefilled."),
            batch_size: histogram(
                names::BATCH_SIZE,
                "Sequences per decode step.",
                BATCH_SIZE_BUCKETS,
            ),
            decode_step: {
                let opts = HistogramOpts::new(
                    names::DECODE_STEP_SECONDS,
                    "Time of one decode step of the running batch, by stage: forward (the model, \
                     logits on the host) and sample (sampling and streaming the tokens).",
                )
                .buckets(STEP_BUCKETS.to_vec());
                let metric = HistogramVec::new(opts, &["stage"]).expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("unique metric");
                metric
            },
            rejected: counter_vec(
                names::REQUESTS_REJECTED_TOTAL,
                "Generation requests refused before generating, by error code.",
                &["reason"],
            ),
            client_disconnects: counter(
                names::CLIENT_DISCONNECTS_TOTAL,
                "Requests whose client went away before the end.",
            ),
            model_info,
            diagnostics_events_dropped: counter(
                names::DIAGNOSTICS_EVENTS_DROPPED_TOTAL,
                "Safety events a slow /v1/safety/events subscriber lost.",
            ),
            kv_cache_usage: {
                let metric = Gauge::new(
                    names::KV_CACHE_USAGE_RATIO,
                    "Share of the paged KV cache's blocks held by sequences (0 to 1).",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("unique metric");
                metric
            },
            kv_blocks_used: gauge(
                names::KV_CACHE_BLOCKS_USED,
                "KV cache blocks held by sequences.",
            ),
            kv_blocks_free: gauge(
                names::KV_CACHE_BLOCKS_FREE,
                "KV cache blocks free or holding a reusable cached prefix.",
            ),
            preemptions: counter(
                names::PREEMPTIONS_TOTAL,
                "Sequences preempted (blocks freed, recomputed later) because decode ran out of KV cache blocks.",
            ),
            prefix_cache_queries: counter(
                names::PREFIX_CACHE_QUERIES_TOTAL,
                "Prompt tokens in full blocks looked up in the prefix cache.",
            ),
            prefix_cache_hits: counter(
                names::PREFIX_CACHE_HITS_TOTAL,
                "Prompt tokens found in the prefix cache (not recomputed).",
            ),
            safety: OnceLock::new(),
            registry,
        }
    }

    /// Registers the safety metrics for a model of `n_layers` decoder blocks (once; later calls
    /// keep the first).
    pub fn init_safety(&self, n_layers: usize) {
        self.safety.get_or_init(|| {
            let register = |m: Box<dyn prometheus::core::Collector>| {
                self.registry.register(m).expect("unique metric");
            };
            let by_modality = |name: &str, help: &str| {
                let m = IntCounterVec::new(Opts::new(name, help), &["modality"])
                    .expect("valid metric");
                register(Box::new(m.clone()));
                m
            };
            let histogram_vec = |name: &str, help: &str, buckets: Vec<f64>| {
                let opts = HistogramOpts::new(name, help).buckets(buckets);
                let m = HistogramVec::new(opts, &["modality"]).expect("valid metric");
                register(Box::new(m.clone()));
                m
            };
            let cosine = Histogram::with_opts(
                HistogramOpts::new(
                    names::SAFETY_IMAGE_TEXT_COSINE,
                    "Mean image-caption hidden-state cosine over the configured layer band, per diagnosed request with a caption pass.",
                )
                .buckets(cosine_buckets()),
            )
            .expect("valid metric");
            register(Box::new(cosine.clone()));
            let safety = SafetyMetrics {
                requests: by_modality(
                    names::SAFETY_REQUESTS_TOTAL,
                    "Diagnosed requests (asked for or sampled), by modality.",
                ),
                refusals: by_modality(
                    names::SAFETY_REFUSALS_TOTAL,
                    "Diagnosed requests whose answer the refusal judge counts as a refusal.",
                ),
                // One bucket per layer: `le = j` holds activations at layers <= j.
                activation_layer: histogram_vec(
                    names::SAFETY_ACTIVATION_LAYER,
                    "Refusal activation layer (logit lens, the paper's Algorithm 1) of diagnosed requests.",
                    (0..=n_layers).map(|j| j as f64).collect(),
                ),
                refusal_probability: histogram_vec(
                    names::SAFETY_REFUSAL_PROBABILITY,
                    "Logit-lens refusal probability at the configured safety layer.",
                    REFUSAL_PROBABILITY_BUCKETS.to_vec(),
                ),
                image_text_cosine: cosine,
            };
            // Every family with every modality from the start, at zero: dashboards and
            // docker/check.sh find the series before the first diagnosed request (a labelled
            // family without children is not exposed at all).
            for modality in [Modality::Text, Modality::Image, Modality::Mixed] {
                let label = [modality_label(modality)];
                safety.requests.with_label_values(&label);
                safety.refusals.with_label_values(&label);
                safety.activation_layer.with_label_values(&label);
                safety.refusal_probability.with_label_values(&label);
            }
            safety
        });
    }

    /// The safety metrics, once a diagnosable model is loaded.
    pub fn safety(&self) -> Option<&SafetyMetrics> {
        self.safety.get()
    }

    /// Publishes `tga_model_info{model,arch,dtype,device} 1`.
    pub fn set_model_info(&self, model: &str, arch: &str, dtype: &str, device: &str) {
        self.model_info
            .with_label_values(&[model, arch, dtype, device])
            .set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serving_metric_is_exposed_once_touched() {
        let metrics = Metrics::new();
        metrics
            .requests
            .with_label_values(&["/health", "200"])
            .inc();
        metrics.rejected.with_label_values(&["queue_full"]).inc();
        metrics.set_model_info("m", "llava_next", "f32", "cpu");
        let text = metrics.render();
        for name in [
            names::REQUESTS_TOTAL,
            names::REQUEST_DURATION_SECONDS,
            names::TIME_TO_FIRST_TOKEN_SECONDS,
            names::INTER_TOKEN_LATENCY_SECONDS,
            names::REQUEST_QUEUE_TIME_SECONDS,
            names::REQUESTS_RUNNING,
            names::REQUESTS_WAITING,
            names::PROMPT_TOKENS_TOTAL,
            names::GENERATION_TOKENS_TOTAL,
            names::IMAGE_TOKENS_TOTAL,
            names::IMAGES_TOTAL,
            names::BATCH_SIZE,
            names::REQUESTS_REJECTED_TOTAL,
            names::CLIENT_DISCONNECTS_TOTAL,
            names::MODEL_INFO,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text
            .contains(r#"tga_model_info{arch="llava_next",device="cpu",dtype="f32",model="m"} 1"#));
    }

    #[test]
    fn latency_buckets_reach_minutes() {
        for buckets in [TTFT_BUCKETS, ITL_BUCKETS, REQUEST_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
            assert!(*buckets.last().unwrap() >= 60.0);
        }
        let metrics = Metrics::new();
        metrics.time_to_first_token.observe(300.0);
        assert!(metrics
            .render()
            .contains(r#"tga_time_to_first_token_seconds_bucket{le="640"} 1"#));
    }

    #[test]
    fn safety_metrics_appear_with_a_diagnosable_model_and_bucket_each_layer() {
        let metrics = Metrics::new();
        assert!(metrics.safety().is_none());
        assert!(metrics
            .render()
            .contains(names::DIAGNOSTICS_EVENTS_DROPPED_TOTAL));
        metrics.init_safety(4);
        let safety = metrics.safety().unwrap();
        safety.observe(Modality::Image, Some(true), Some(3), Some(0.42), Some(0.25));
        safety.observe(Modality::Text, Some(false), None, Some(1e-7), None);
        let text = metrics.render();
        for name in [
            names::SAFETY_REQUESTS_TOTAL,
            names::SAFETY_REFUSALS_TOTAL,
            names::SAFETY_ACTIVATION_LAYER,
            names::SAFETY_REFUSAL_PROBABILITY,
            names::SAFETY_IMAGE_TEXT_COSINE,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        for j in 0..=4 {
            assert!(text.contains(&format!(
                "tga_safety_activation_layer_bucket{{modality=\"image\",le=\"{j}\"}}"
            )));
        }
        assert!(text.contains(r#"tga_safety_activation_layer_bucket{modality="image",le="2"} 0"#));
        assert!(text.contains(r#"tga_safety_activation_layer_bucket{modality="image",le="3"} 1"#));
        assert!(text.contains(r#"tga_safety_refusals_total{modality="image"} 1"#));
        assert!(text.contains(r#"tga_safety_refusals_total{modality="text"} 0"#));
        assert!(text.contains(r#"tga_safety_requests_total{modality="text"} 1"#));
        assert!(text.contains(r#"tga_safety_image_text_cosine_bucket{le="0.3"} 1"#));
        assert!(text.contains(r#"tga_safety_image_text_cosine_bucket{le="0.2"} 0"#));
        // A second model (or a second call) keeps the first registration.
        metrics.init_safety(32);
        assert!(!metrics
            .render()
            .contains(r#"tga_safety_activation_layer_bucket{modality="image",le="32"}"#));
    }

    #[test]
    fn safety_families_are_exposed_at_zero_before_any_diagnosed_request() {
        let metrics = Metrics::new();
        metrics.init_safety(3);
        let text = metrics.render();
        for modality in ["text", "image", "mixed"] {
            for series in [
                format!(r#"tga_safety_requests_total{{modality="{modality}"}} 0"#),
                format!(r#"tga_safety_refusals_total{{modality="{modality}"}} 0"#),
                format!(r#"tga_safety_activation_layer_bucket{{modality="{modality}",le="3"}} 0"#),
                format!(r#"tga_safety_refusal_probability_count{{modality="{modality}"}} 0"#),
            ] {
                assert!(text.contains(&series), "{series} missing");
            }
        }
        assert!(text.contains("tga_safety_image_text_cosine_count 0"));
    }

    #[test]
    fn two_apps_have_independent_registries() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.generation_tokens.inc_by(5);
        assert_eq!(a.generation_tokens.get(), 5);
        assert_eq!(b.generation_tokens.get(), 0);
    }
}
