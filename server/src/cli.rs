//! The `tga-serve` command line. Every flag is also an environment variable (`TGA_…`), as
//! container deployments of vLLM and TGI expect.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::{HttpConfig, ServingConfig};
use crate::engine::EngineConfig;
use crate::media::{MediaConfig, MediaHost};
use crate::validation::diagnostics::DiagnosticsConfig;

#[derive(Debug, Parser)]
#[command(
    name = "tga-serve",
    version,
    about = "OpenAI-compatible multimodal chat server for LLaVA-Mistral"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the chat-completions API.
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI document that `/openapi.json` serves.
    Openapi,
    /// Cross-modal safety evaluation: every item as image prompt and as caption-as-text prompt,
    /// DSR per category, refusal layers and per-layer curves (report.json, report.md).
    Eval(Box<EvalArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// JSONL dataset, one `{"image", "caption", "instruction", "category"}` per line (`image`: a
    /// path relative to the file, an http(s) URL or a data URI).
    #[arg(long)]
    pub data: PathBuf,
    /// Directory for report.json, report.md, records.jsonl and the plots curves.png and dsr.png
    /// (default: `eval-<data name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also run the image prompts with their states aligned to the caption's (add) after blocks
    /// `LO..HI` (the paper's Figure 5).
    #[arg(long, value_parser = parse_band)]
    pub align_layers: Option<(usize, usize)>,
    /// Also run the text prompts with the caption masked from attention at blocks `LO..HI` (the
    /// paper's Figure 3).
    #[arg(long, value_parser = parse_band)]
    pub mask_layers: Option<(usize, usize)>,
    /// Longest greedy answer, in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The logit lens's refusal set: a preset (`apology`, `tga`) or comma-separated words
    /// resolved through the served tokenizer (e.g. `I,sorry,cannot`).
    #[arg(long)]
    pub refusal_tokens: Option<String>,
    /// Evaluate through a running server (or a fleet behind a load balancer) at this base URL,
    /// with its OpenAI API and diagnose endpoint, instead of loading the model here.
    #[arg(long)]
    pub url: Option<String>,
    /// Runs in flight at once (default: --max-num-seqs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Option<u32>,
    /// The API key of the server at --url.
    #[arg(long, env = "TGA_EVAL_API_KEY", hide_env_values = true)]
    pub url_api_key: Option<String>,
    /// The model and engine settings, as for `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl EvalArgs {
    pub fn eval_config(&self) -> crate::eval::EvalConfig {
        let out = self.out.clone().unwrap_or_else(|| {
            let stem = self
                .data
                .file_stem()
                .map_or_else(|| "data".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from(format!("eval-{stem}"))
        });
        crate::eval::EvalConfig {
            data: self.data.clone(),
            out,
            align_layers: self.align_layers,
            mask_layers: self.mask_layers,
            max_tokens: self.max_tokens,
            refusal_tokens: self.refusal_tokens.as_ref().map(|t| {
                use crate::openai::diagnostics::RefusalTokensOption;
                if t.contains(',') {
                    RefusalTokensOption::Words(
                        t.split(',')
                            .map(|w| w.trim().to_string())
                            .filter(|w| !w.is_empty())
                            .collect(),
                    )
                } else {
                    RefusalTokensOption::Preset(t.trim().to_string())
                }
            }),
            concurrency: self.concurrency.unwrap_or(self.serve.max_num_seqs) as usize,
            progress: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// bf16 on CUDA (tensor cores), f32 on the CPU (candle's CPU bf16 matmuls are slow).
    Auto,
    F32,
    Bf16,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// The compute dtype on `device` (`auto` resolved).
    pub fn resolve(self, device: &candle_core::Device) -> Self {
        match self {
            Self::Auto if device.is_cuda() => Self::Bf16,
            Self::Auto => Self::F32,
            other => other,
        }
    }
}

/// How the decoder's linear weights are stored (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Weights {
    Compute,
    Checkpoint,
    Bf16,
    F16,
}

impl Weights {
    pub fn linear_weights(self) -> model::llava::LinearWeights {
        use model::llava::LinearWeights;
        match self {
            Self::Compute => LinearWeights::Compute,
            Self::Checkpoint => LinearWeights::Checkpoint,
            Self::Bf16 => LinearWeights::Dtype(candle_core::DType::BF16),
            Self::F16 => LinearWeights::Dtype(candle_core::DType::F16),
        }
    }
}

/// The compute device (`--device`): `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let value = value.trim().to_ascii_lowercase();
        match value.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => value
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{value}` (use cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. A CUDA device in a binary built without the `cuda` feature is a clear
    /// error at start-up rather than a silent fall-back to the CPU.
    pub fn open(self) -> Result<candle_core::Device, String> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(ordinal) => {
                // One stream for all of the model's CUDA work (model::device::open_cuda).
                let device = model::device::open_cuda(ordinal)
                    .map_err(|err| format!("cannot open CUDA device {ordinal}: {err}"))?;
                tracing::info!(
                    event_tracking = model::device::event_tracking(&device),
                    "CUDA device {ordinal}: one stream for all work"
                );
                // A pool that hands memory back at every sync costs each step fresh pages
                // (model::device); failing to set it is slower, not wrong.
                if std::env::var("TGA_CUDA_POOL_RELEASE").as_deref() != Ok("1") {
                    match model::device::retain_freed_memory(&device) {
                        Ok(_) => tracing::info!("CUDA memory pool keeps freed memory"),
                        Err(err) => tracing::warn!(error = %err, "CUDA memory pool left as is"),
                    }
                }
                Ok(device)
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => Err(format!(
                "--device {self}: this tga-serve was built without CUDA support; rebuild it with \
                 `cargo build --release -p tga-serve --features cuda` (needs nvcc, see \
                 docker/README.md)"
            )),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Checkpoint directory (HF llava / llava_next, or original LLaVA), or a built-in model:
    /// `builtin:tga` (the default: the toy-scale TGA model trained by tools/toy_tga),
    /// `builtin:baseline` (the same, LLaVA recipe) or `builtin:tiny` (a random-weight fixture).
    #[arg(long, env = "TGA_MODEL")]
    pub model: Option<PathBuf>,
    /// Serve a model with random weights drawn on the device instead of a checkpoint: a preset
    /// (`llava-v1.6-mistral-7b`: the real shapes, 7.57 B parameters; `tiny`: builtin:tiny's
    /// shapes) or an HF llava_next config.json. It uses builtin:tiny's tokenizer and chat
    /// template; its answers are noise. For benchmarks and tests.
    #[arg(long, env = "TGA_RANDOM_WEIGHTS", conflicts_with_all = ["model", "vision_tower"])]
    pub random_weights: Option<String>,
    /// The seed of --random-weights (the same seed draws the same weights on the same device).
    #[arg(long, env = "TGA_RANDOM_SEED", default_value_t = 0)]
    pub random_seed: u64,
    /// CLIP vision tower directory, for original-LLaVA checkpoints that name one outside.
    #[arg(long, env = "TGA_VISION_TOWER")]
    pub vision_tower: Option<PathBuf>,
    /// TGA retrieval: captions, one a line, searched by the CLIP embedding of each user turn's
    /// image (builtin:tga has its own corpus built in); a bad line stops start-up with its number.
    #[arg(long, env = "TGA_RETRIEVAL_CORPUS")]
    pub retrieval_corpus: Option<PathBuf>,
    /// The corpus's embeddings (f16, memory-mapped): opened when it matches the corpus and the
    /// CLIP, else built there (default: a temporary file, built at start-up).
    #[arg(long, env = "TGA_RETRIEVAL_INDEX")]
    pub retrieval_index: Option<PathBuf>,
    /// The CLIPModel (both towers) that embeds images and captions for retrieval (default: the
    /// vision tower directory).
    #[arg(long, env = "TGA_RETRIEVAL_CLIP")]
    pub retrieval_clip: Option<PathBuf>,
    /// Chat template name (default: the checkpoint's own).
    #[arg(long, env = "TGA_TEMPLATE")]
    pub template: Option<String>,
    /// Compute dtype: `auto` is bf16 on CUDA and f32 on the CPU; f32 on CUDA is the parity
    /// mode (exact FP32 GEMMs).
    #[arg(long, env = "TGA_DTYPE", value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Storage of the decoder's linear weights (nearly all parameters): `compute` converts them
    /// to the compute dtype at load; `checkpoint` keeps a bf16/f16 checkpoint's 16-bit weights
    /// under f32 compute on the CPU (widened in registers: the same results from half the
    /// memory, and faster decode); `bf16`/`f16` round them to that dtype (CPU, f32 compute).
    #[arg(long, env = "TGA_WEIGHTS", value_enum, default_value_t = Weights::Compute)]
    pub weights: Weights,
    /// Compute device: `cpu`, `cuda` or `cuda:N` (CUDA needs a binary built with `--features cuda`).
    #[arg(long, env = "TGA_DEVICE", default_value_t = DeviceSpec::Cpu)]
    pub device: DeviceSpec,
    /// Model id in the API (default: the checkpoint directory's name).
    #[arg(long, env = "TGA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    #[arg(long, env = "TGA_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "TGA_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Sequences decoded together in one step.
    #[arg(long, env = "TGA_MAX_NUM_SEQS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// Accepted requests waiting for a slot; beyond it, 429.
    #[arg(long, env = "TGA_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: u32,
    /// Tokens one scheduler step computes while sequences decode (vLLM's
    /// max_num_batched_tokens): a decode token per running sequence, the rest prompt chunks, so
    /// a long (image) prompt is prefilled in chunks between decode steps instead of freezing
    /// every stream for its whole prefill (with nothing decoding, chunks of at least 2048).
    /// Default: 2048 on CUDA, 16 on the CPU (there, p99 inter-token latency under arriving
    /// image prompts ≤ 3× the idle step; larger values favour the image's TTFT;
    /// bench/RESULTS.md).
    #[arg(long, env = "TGA_MAX_BATCH_TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_tokens: Option<u32>,
    /// Token positions per KV cache block (vLLM's block size).
    #[arg(long, env = "TGA_BLOCK_SIZE", default_value_t = model::mistral::DEFAULT_BLOCK_SIZE as u32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,
    /// Memory for the paged KV cache, e.g. `2MiB`, `512MB`, `24GiB` (or bytes). Default: on
    /// CUDA, what `--gpu-memory-utilization` leaves after the weights; on the CPU, a quarter of
    /// the RAM available after loading (at most what `--max-num-seqs` full-context sequences
    /// need).
    #[arg(long, env = "TGA_KV_CACHE_MEMORY", value_parser = parse_size)]
    pub kv_cache_memory: Option<u64>,
    /// On CUDA, the share of the device's memory the server may use, weights included (vLLM's
    /// meaning); the KV cache gets what is left after loading. Ignored with --kv-cache-memory.
    #[arg(long, env = "TGA_GPU_MEMORY_UTILIZATION", default_value_t = 0.9, value_parser = parse_utilization)]
    pub gpu_memory_utilization: f64,
    /// Lowers the model's context length (prompt + completion tokens).
    #[arg(long, env = "TGA_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Accepted API key (repeat for several; the variable takes a comma-separated list, spaces
    /// around each key ignored).
    #[arg(
        long = "api-key",
        env = "TGA_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Also require the API key for /health, /ready, /metrics and /openapi.json.
    #[arg(long, env = "TGA_PROTECT_PUBLIC_ROUTES")]
    pub protect_public_routes: bool,
    /// Generation requests read and validated at once (before they reach the engine's queue);
    /// beyond it a 429 "Model is overloaded" before the body is read.
    #[arg(long, env = "TGA_MAX_CONCURRENT_REQUESTS", default_value_t = crate::app::DEFAULT_MAX_CONCURRENT_REQUESTS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
    /// A Host name to serve besides localhost, 127.0.0.1 and [::1] when bound to a loopback
    /// address (repeat for several); other names get 421 (DNS-rebinding defence).
    #[arg(
        long = "allowed-host",
        env = "TGA_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Allowed CORS origin (repeat for several; `*` for any).
    #[arg(long = "cors", env = "TGA_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Open connections at most; one beyond is closed at once.
    #[arg(long, env = "TGA_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client has to send a request head (also the idle limit of a keep-alive
    /// connection).
    #[arg(long, env = "TGA_HEADER_READ_TIMEOUT", default_value_t = 30.0)]
    pub header_read_timeout: f64,
    /// Seconds a client has to send a request body (a 400 naming the timeout beyond).
    #[arg(long, env = "TGA_BODY_READ_TIMEOUT", default_value_t = 60.0)]
    pub body_read_timeout: f64,
    /// Largest request body in bytes.
    #[arg(long, env = "TGA_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Allow image URLs that resolve to loopback, private or link-local addresses.
    #[arg(long, env = "TGA_ALLOW_PRIVATE_IMAGE_URLS")]
    pub allow_private_image_urls: bool,
    /// One origin `HOST:PORT` (an internal image store) whose image URLs are fetched although
    /// its addresses are not public (repeat for several). Only that host on that port: a
    /// redirect from it to any other non-public address is refused like any other.
    #[arg(
        long = "allowed-media-host",
        env = "TGA_ALLOWED_MEDIA_HOSTS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub allowed_media_hosts: Vec<MediaHost>,
    #[arg(long, env = "TGA_MAX_IMAGES_PER_REQUEST", default_value_t = crate::validation::DEFAULT_MAX_IMAGES_PER_REQUEST)]
    pub max_images_per_request: usize,
    /// Pixels (width × height) summed over one request's images, checked from their headers
    /// before any is decoded.
    #[arg(long, env = "TGA_MAX_REQUEST_PIXELS", default_value_t = crate::validation::DEFAULT_MAX_REQUEST_PIXELS)]
    pub max_request_pixels: u64,
    /// Largest image in bytes (URL or data URI).
    #[arg(long, env = "TGA_MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Time limit for fetching one image URL, in seconds.
    #[arg(long, env = "TGA_IMAGE_FETCH_TIMEOUT", default_value_t = 10.0)]
    pub image_fetch_timeout: f64,

    /// On SIGTERM, seconds running requests get to finish before they are cut.
    #[arg(long, env = "TGA_SHUTDOWN_GRACE", default_value_t = 30.0)]
    pub shutdown_grace: f64,

    /// Share (0 to 1) of ordinary chat requests diagnosed in the background (lens and
    /// attention, no caption pass) for the safety metrics and /v1/safety/events.
    #[arg(long, env = "TGA_DIAGNOSE_SAMPLE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub diagnose_sample_rate: f64,
    /// Layers `LO..HI` (inclusive) whose mean image-text cosine feeds the safety metrics and
    /// the firehose (default: the middle third of the model's layers).
    #[arg(long, env = "TGA_SAFETY_BAND", value_parser = parse_band)]
    pub safety_band: Option<(usize, usize)>,
    /// The layer whose logit-lens refusal probability feeds the safety metrics and the firehose
    /// (default: the upper end of the safety band).
    #[arg(long, env = "TGA_SAFETY_LAYER")]
    pub safety_layer: Option<usize>,
}

/// `2MiB`, `512MB`, `24GiB`, `1.5GiB`, `1024` (bytes): binary (KiB, MiB, GiB, TiB) and
/// decimal (KB, MB, GB, TB) units, case-insensitive, an optional `B`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a size like 2MiB, 512MB or 24GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {value:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{value:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

fn parse_utilization(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{value:?} is not a share in (0, 1]")),
    }
}

fn parse_rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "the sample rate must be between 0 and 1, got {rate}"
        ))
    }
}

/// `LO..HI` or `LO,HI`.
pub fn parse_band(value: &str) -> Result<(usize, usize), String> {
    let (lo, hi) = value
        .split_once("..")
        .or_else(|| value.split_once(','))
        .ok_or_else(|| format!("expected LO..HI, got {value:?}"))?;
    let parse = |s: &str| s.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        return Err(format!(
            "the band's low end {lo} is above its high end {hi}"
        ));
    }
    Ok((lo, hi))
}

impl ServeArgs {
    pub fn address(&self) -> String {
        // A bare IPv6 host needs brackets to be joined with a port.
        match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    pub fn http_config(&self) -> HttpConfig {
        HttpConfig {
            api_keys: self
                .api_keys
                .iter()
                .map(|k| k.trim())
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect(),
            protect_public_routes: self.protect_public_routes,
            cors_origins: self.cors_origins.clone(),
            max_body_bytes: self.max_body_bytes,
            max_concurrent_requests: self.max_concurrent_requests as usize,
            connections: crate::app::ConnectionLimits {
                max_connections: self.max_connections as usize,
                header_read_timeout: seconds(self.header_read_timeout),
                body_read_timeout: seconds(self.body_read_timeout),
                keep_alive: true,
            },
            loopback_only: self.binds_loopback(),
            allowed_hosts: self
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
        }
    }

    /// Whether `--host` is a loopback address (or `localhost`).
    pub fn binds_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    pub fn serving_config(&self) -> ServingConfig {
        ServingConfig {
            engine: EngineConfig {
                max_num_seqs: self.max_num_seqs as usize,
                max_batch_tokens: self.max_batch_tokens() as usize,
                max_waiting: self.max_waiting as usize,
                idle_batch_tokens: crate::engine::DEFAULT_IDLE_BATCH_TOKENS,
            },
            media: MediaConfig {
                max_image_bytes: self.max_image_bytes,
                fetch_timeout: seconds(self.image_fetch_timeout),
                allow_private: self.allow_private_image_urls,
                allowed_hosts: self.allowed_media_hosts.clone(),
            },
            max_model_len: self.max_model_len,
            max_images_per_request: self.max_images_per_request,
            max_request_pixels: self.max_request_pixels,
            diagnostics: DiagnosticsConfig {
                sample_rate: self.diagnose_sample_rate,
                band: self.safety_band,
                safety_layer: self.safety_layer,
            },
        }
    }

    /// `--max-batch-tokens`, or the device's default.
    pub fn max_batch_tokens(&self) -> u32 {
        self.max_batch_tokens.unwrap_or(match self.device {
            DeviceSpec::Cpu => 16,
            _ => 2048,
        })
    }

    pub fn shutdown_grace(&self) -> Duration {
        seconds(self.shutdown_grace)
    }
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("512mb"), Ok(512_000_000));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn dtype_auto_is_f32_on_the_cpu() {
        assert_eq!(Dtype::Auto.resolve(&candle_core::Device::Cpu), Dtype::F32);
        assert_eq!(Dtype::Bf16.resolve(&candle_core::Device::Cpu), Dtype::Bf16);
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_serve_flag_has_an_environment_variable() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            if arg.get_long().is_some() && !["help", "version"].contains(&arg.get_id().as_str()) {
                let env = arg
                    .get_env()
                    .unwrap_or_else(|| panic!("--{} has no env", arg.get_id()));
                assert!(env.to_string_lossy().starts_with("TGA_"));
            }
        }
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["tga-serve", "serve"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Serve(args) => *args,
            Command::Openapi | Command::Eval(_) => unreachable!(),
        }
    }

    #[test]
    fn flags_map_to_settings() {
        let args = serve(&[
            "--port",
            "9000",
            "--max-num-seqs",
            "4",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--cors",
            "*",
            "--allow-private-image-urls",
            "--max-model-len",
            "512",
            "--dtype",
            "bf16",
            "--host",
            "::1",
        ]);
        assert_eq!(args.address(), "[::1]:9000");
        assert_eq!(args.dtype, Dtype::Bf16);
        assert_eq!(args.http_config().api_keys, vec!["a", "b"]);
        let serving = args.serving_config();
        assert_eq!(serving.engine.max_num_seqs, 4);
        assert!(serving.media.allow_private);
        assert_eq!(serving.max_model_len, Some(512));
        assert!(Cli::try_parse_from(["tga-serve", "serve", "--max-num-seqs", "0"]).is_err());
    }

    #[test]
    fn keys_are_trimmed_and_loopback_binds_check_the_host() {
        let args = serve(&["--api-key", " a", "--api-key", "b ", "--api-key", " "]);
        assert_eq!(args.http_config().api_keys, vec!["a", "b"]);
        for (host, loopback) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("[::1]", true),
            ("localhost", true),
            ("0.0.0.0", false),
            ("192.168.1.2", false),
        ] {
            assert_eq!(
                serve(&["--host", host]).binds_loopback(),
                loopback,
                "{host}"
            );
        }
        let http = serve(&[
            "--allowed-host",
            "box.lan",
            "--max-concurrent-requests",
            "3",
        ])
        .http_config();
        assert!(http.loopback_only);
        assert_eq!(http.allowed_hosts, vec!["box.lan"]);
        assert_eq!(http.max_concurrent_requests, 3);
        assert!(
            Cli::try_parse_from(["tga-serve", "serve", "--max-concurrent-requests", "0"]).is_err()
        );
    }

    #[test]
    fn device_flag() {
        assert_eq!(serve(&[]).device, DeviceSpec::Cpu);
        assert_eq!(serve(&["--device", "cuda"]).device, DeviceSpec::Cuda(0));
        assert_eq!(serve(&["--device", "CUDA:3"]).device, DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        for bad in ["cuda:", "cuda:x", "metal", "cuda:-1"] {
            assert!(
                Cli::try_parse_from(["tga-serve", "serve", "--device", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn eval_takes_the_dataset_layers_and_the_serve_flags() {
        let cli = Cli::try_parse_from([
            "tga-serve",
            "eval",
            "--data",
            "sets/hod.jsonl",
            "--align-layers",
            "10..18",
            "--mask-layers",
            "16,24",
            "--max-num-seqs",
            "4",
        ])
        .unwrap();
        let Command::Eval(args) = cli.command else {
            panic!("eval expected")
        };
        let config = args.eval_config();
        assert_eq!(config.align_layers, Some((10, 18)));
        assert_eq!(config.mask_layers, Some((16, 24)));
        assert_eq!(config.out, PathBuf::from("eval-hod"));
        assert_eq!(config.concurrency, 4);
        let words = Cli::try_parse_from([
            "tga-serve",
            "eval",
            "--data",
            "d.jsonl",
            "--refusal-tokens",
            "I, sorry,cannot",
            "--concurrency",
            "3",
        ])
        .unwrap();
        let Command::Eval(args) = words.command else {
            unreachable!()
        };
        let config = args.eval_config();
        assert_eq!(
            config.refusal_tokens,
            Some(crate::openai::diagnostics::RefusalTokensOption::Words(
                vec!["I".into(), "sorry".into(), "cannot".into()]
            ))
        );
        assert_eq!(config.concurrency, 3);
        assert!(
            Cli::try_parse_from(["tga-serve", "eval", "--data", "x", "--mask-layers", "5..2"])
                .is_err()
        );
        let args = serve(&["--diagnose-sample-rate", "0.25", "--safety-band", "10..18"]);
        let diagnostics = args.serving_config().diagnostics;
        assert_eq!(diagnostics.sample_rate, 0.25);
        assert_eq!(diagnostics.band, Some((10, 18)));
        assert!(
            Cli::try_parse_from(["tga-serve", "serve", "--diagnose-sample-rate", "2"]).is_err()
        );
    }

    #[test]
    fn random_weights_take_a_preset_and_exclude_a_checkpoint() {
        let args = serve(&["--random-weights", "tiny", "--random-seed", "3"]);
        assert_eq!(args.random_weights.as_deref(), Some("tiny"));
        assert_eq!(args.random_seed, 3);
        assert_eq!(serve(&[]).random_seed, 0);
        let both = ["--random-weights", "tiny", "--model", "builtin:tiny"];
        assert!(Cli::try_parse_from(["tga-serve", "serve"].iter().chain(&both)).is_err());
    }

    #[test]
    fn defaults_serve_on_loopback_without_auth() {
        let args = serve(&[]);
        assert_eq!(args.address(), "127.0.0.1:8000");
        assert!(args.model.is_none());
        assert!(args.http_config().api_keys.is_empty());
        assert!(!args.serving_config().media.allow_private);
        assert!(args.serving_config().media.allowed_hosts.is_empty());
    }

    #[test]
    fn allowed_media_hosts_are_host_and_port() {
        let args = serve(&[
            "--allowed-media-host",
            "images.internal:8080",
            "--allowed-media-host",
            "10.0.0.5:80,127.0.0.1:9000",
        ]);
        let hosts: Vec<String> = (args.serving_config().media.allowed_hosts.iter())
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            hosts,
            ["images.internal:8080", "10.0.0.5:80", "127.0.0.1:9000"]
        );
        for bad in ["images.internal", "10.0.0.5:x", "10.0.0.0/8:80"] {
            assert!(
                Cli::try_parse_from(["tga-serve", "serve", "--allowed-media-host", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
