//! The application: its shared state (no globals, so a test process can run several) and the
//! model it serves once loaded. [`crate::http::serve`] serves it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::backend::{ModelBackend, PromptProcessor};
use crate::engine::{Engine, EngineConfig};
use crate::error::{ApiError, ErrorCode};
use crate::firehose::Firehose;
use crate::media::{MediaConfig, MediaFetcher};
use crate::metrics::Metrics;
use crate::validation::diagnostics::DiagnosticsConfig;
use crate::validation::{
    Limits, Validator, DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_PIXELS,
};

/// What `/v1/models` and `tga_model_info` say about the served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    /// Unix seconds (when the checkpoint was loaded).
    pub created: u64,
    pub owned_by: String,
    /// Prompt + completion tokens (the model's limit, lowered by `--max-model-len`).
    pub max_model_len: usize,
    pub supports_images: bool,
    /// The tiny model embedded in the binary.
    pub builtin: bool,
    pub arch: String,
    pub dtype: String,
    pub device: String,
}

/// Requests read and validated at once unless `--max-concurrent-requests` says otherwise (TGI's
/// `max_concurrent_requests` default).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 128;

/// The HTTP layer's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Accepted `Authorization: Bearer` keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Also require a key for `/health`, `/ready`, `/metrics` and `/openapi.json`.
    pub protect_public_routes: bool,
    /// Allowed CORS origins (`*` for any); empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Generation requests (chat, diagnose) between arrival and their place in the engine's
    /// queue: the permit is taken before the body is read (429 beyond).
    pub max_concurrent_requests: usize,
    /// Whether the server listens on a loopback address only: then the Host header must be a
    /// loopback name or one of `allowed_hosts` (against DNS rebinding from a browser).
    pub loopback_only: bool,
    /// Extra Host names served when `loopback_only` (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    pub connections: ConnectionLimits,
}

/// Per-connection bounds of the accept loop (`crate::http::serve`).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at most; one beyond is closed at once.
    pub max_connections: usize,
    /// A request head (or, on a keep-alive connection, the next one) must arrive within it.
    pub header_read_timeout: Duration,
    /// A request body must arrive within it (a 400 naming the timeout beyond).
    pub body_read_timeout: Duration,
    /// HTTP/1.1 keep-alive.
    pub keep_alive: bool,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            keep_alive: true,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            protect_public_routes: false,
            cors_origins: Vec::new(),
            max_body_bytes: 32 * 1024 * 1024,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            loopback_only: false,
            allowed_hosts: Vec::new(),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Settings of the model-facing side: scheduling, request limits, image fetching.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    pub engine: EngineConfig,
    pub media: MediaConfig,
    /// Lowers the model's own context length.
    pub max_model_len: Option<usize>,
    pub max_images_per_request: usize,
    /// Pixels summed over one request's images (`--max-request-pixels`).
    pub max_request_pixels: u64,
    /// Safety diagnostics: sample rate of ordinary requests, the metrics' band and layer.
    pub diagnostics: DiagnosticsConfig,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            media: MediaConfig::default(),
            max_model_len: None,
            max_images_per_request: DEFAULT_MAX_IMAGES_PER_REQUEST,
            max_request_pixels: DEFAULT_MAX_REQUEST_PIXELS,
            diagnostics: DiagnosticsConfig::default(),
        }
    }
}

/// A loaded model, ready to serve: its card, the validator in front of it, and its engine.
pub struct ServingModel {
    pub card: ModelCard,
    /// Tokens the backend's paged KV cache holds over all sequences: also the longest
    /// sequence that can run.
    pub kv_cache_tokens: usize,
    pub validator: Validator,
    pub engine: Engine,
}

impl ServingModel {
    /// Starts the engine thread for `backend`, with `processor` validating in front of it; the
    /// engine reports diagnosed requests to `metrics` and the `firehose`.
    pub fn start<B: ModelBackend>(
        backend: B,
        processor: Arc<dyn PromptProcessor>,
        mut card: ModelCard,
        config: &ServingConfig,
        metrics: Arc<Metrics>,
        firehose: Arc<Firehose>,
    ) -> std::io::Result<Self> {
        if let Some(limit) = config.max_model_len {
            card.max_model_len = card.max_model_len.min(limit);
        }
        let kv_cache_tokens = backend.kv_blocks().config().capacity_tokens();
        let mut limits = Limits::new(card.max_model_len);
        limits.kv_cache_tokens = kv_cache_tokens;
        limits.max_images_per_request = config.max_images_per_request;
        limits.max_request_pixels = config.max_request_pixels;
        limits.max_choices = crate::validation::MAX_CHOICES.min(config.engine.max_num_seqs);
        let media = MediaFetcher::new(config.media.clone()).map_err(std::io::Error::other)?;
        if let Some(dx) = processor.diagnostics() {
            metrics.init_safety(dx.num_layers());
        }
        let validator = Validator::new(
            processor,
            media,
            limits,
            card.id.clone(),
            card.supports_images,
        )
        .with_diagnostics(config.diagnostics.clone());
        let engine = Engine::start(backend, config.engine.clone(), metrics, firehose)?;
        Ok(Self {
            card,
            kv_cache_tokens,
            validator,
            engine,
        })
    }
}

pub struct AppState {
    pub http: HttpConfig,
    /// Permits for generation requests being read and validated (`max_concurrent_requests`).
    pub(crate) admission: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
    /// The firehose of diagnosed requests (`GET /v1/safety/events`); the engine publishes.
    pub firehose: Arc<Firehose>,
    model: OnceLock<ServingModel>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(http: HttpConfig, metrics: Arc<Metrics>, firehose: Arc<Firehose>) -> Arc<Self> {
        Arc::new(Self {
            admission: Arc::new(tokio::sync::Semaphore::new(
                http.max_concurrent_requests.max(1),
            )),
            http,
            metrics,
            firehose,
            model: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Publishes the loaded model: `/ready` turns 200 and chat requests are accepted.
    pub fn set_model(&self, model: ServingModel) {
        let card = &model.card;
        self.metrics
            .set_model_info(&card.id, &card.arch, &card.dtype, &card.device);
        tracing::info!(
            model = %card.id,
            builtin = card.builtin,
            max_model_len = card.max_model_len,
            "model ready"
        );
        if self.model.set(model).is_err() {
            tracing::warn!("a model was already set; the new one is ignored");
        }
    }

    /// The served model, or why there is none to use (503).
    pub fn model(&self) -> Result<&ServingModel, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        }
        let model = self.model.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotReady,
                "the model is still loading; retry later",
            )
        })?;
        self.check_engine()?;
        Ok(model)
    }

    /// `Err` once the loaded model's engine thread has ended (the process can no longer serve).
    pub fn check_engine(&self) -> Result<(), ApiError> {
        match self.model.get() {
            Some(model) if !model.engine.is_alive() => Err(ApiError::new(
                ErrorCode::EngineStopped,
                "the engine thread has stopped; the server must be restarted",
            )),
            _ => Ok(()),
        }
    }

    /// Stops accepting requests (503) and lets running ones finish within `grace`.
    pub fn begin_shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Open /v1/safety/events streams end, so they do not hold the drain.
        self.firehose.close();
        if let Some(model) = self.model.get() {
            model.engine.shutdown(grace);
        }
    }

    /// Resolves when the engine thread (if any) has exited.
    pub async fn engine_stopped(&self) {
        if let Some(model) = self.model.get() {
            model.engine.stopped().await;
        }
    }
}
