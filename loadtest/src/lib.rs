//! `tga-loadtest`: measures an OpenAI-compatible chat server with the vocabulary of vLLM's
//! `bench serve` (SERVING.md, "Load-test vocabulary"): TTFT, ITL, TPOT, e2e, output tokens/s,
//! requests/s and goodput, under closed-loop or open-loop (Poisson / Gamma) load, and checks the
//! server's own `/metrics` counts against the client's.

pub mod arrivals;
pub mod charts;
pub mod cli;
pub mod client;
pub mod compare;
pub mod error;
pub mod report;
pub mod run;
pub mod server_metrics;
pub mod settings;
pub mod sse;
pub mod stats;
pub mod workload;

pub use error::{LoadtestError, Result};
