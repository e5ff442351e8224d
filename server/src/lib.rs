//! tga-serve: an OpenAI-compatible multimodal chat server with continuous batching.
//!
//! Data flows one way: [`http`] (routes, SSE, errors) → [`validation`] (raw request to a typed
//! [`engine::ValidRequest`], images fetched by [`media`], diagnostics planned) →
//! [`engine`] (one thread owning the model, continuous batching) → a [`backend::ModelBackend`].
//! The model sits behind the traits of [`backend`], so the HTTP layer and the engine are tested
//! with a scripted fake.
//!
//! - [`openai`]: wire types (also the OpenAPI schemas), the diagnostics report among them, and
//!   the one set of engine → wire conversions.
//! - [`validation`]: the request checks; [`validation::diagnostics`] plans the safety diagnostics.
//! - [`engine`]: the scheduler; [`engine::ValidRequest`] (with [`engine::request`]'s prompt and
//!   [`engine::plan`]'s diagnostics) is what it accepts.
//! - [`backend`]: the seam to the model, [`backend::llava`] the `model` crate's LLaVA-Mistral
//!   behind it, [`backend::builtin`] the tiny model embedded in the binary.
//! - [`error`]: every error status and OpenAI error JSON, in one place.
//! - [`metrics`]: the serving metrics, in a registry owned by the app; [`firehose`]: the stream
//!   of diagnosed requests (`/v1/safety/events`).
//! - [`kv_budget`]: the paged KV cache sized in bytes from the flags and the device.
//! - [`app`]: shared state, the loaded model, serving with graceful shutdown.
//! - [`cli`]: the `tga-serve` command line (every flag also an environment variable).
//! - [`eval`]: `tga-serve eval`, the cross-modal safety evaluation (DSR image vs text);
//!   [`eval_plots`]: its PNG plots.

pub mod app;
pub mod backend;
pub mod cli;
pub mod engine;
pub mod error;
pub mod eval;
pub mod eval_plots;
pub mod firehose;
pub mod http;
pub mod kv_budget;
pub mod media;
pub mod metrics;
pub mod openai;
pub mod validation;
