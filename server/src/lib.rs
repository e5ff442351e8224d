//! tga-serve: an OpenAI-compatible multimodal chat server with continuous batching.
//!
//! Data flows one way: [`http`] (routes, SSE, errors) → [`validation`] (raw request to a typed
//! [`validation::ValidRequest`], images fetched by [`media`]) → [`engine`] (one thread owning the
//! model, continuous batching) → a [`engine::ModelBackend`]. The model sits behind the traits of
//! [`engine::backend`], so the HTTP layer and the engine are tested with a scripted fake.
//!
//! - [`openai`]: wire types (also the OpenAPI schemas).
//! - [`error`]: every error status and OpenAI error JSON, in one place.
//! - [`metrics`]: the serving metrics, in a registry owned by the app.
//! - [`app`]: shared state, the loaded model, serving with graceful shutdown.
//! - [`cli`]: the `tga-serve` command line (every flag also an environment variable).
//! - [`diagnose`]: the safety-diagnostics options, their validation into a plan the engine runs,
//!   and the report; [`events`]: the firehose of diagnosed requests and the safety metrics' feed.
//! - [`eval`]: `tga-serve eval`, the cross-modal safety evaluation (DSR image vs text);
//!   [`eval_plots`]: its PNG plots.
//! - [`llava`]: the `model` crate's LLaVA-Mistral behind the engine seam; [`builtin`]: the tiny
//!   model embedded in the binary.

pub mod app;
pub mod builtin;
pub mod cli;
pub mod diagnose;
pub mod engine;
pub mod error;
pub mod eval;
pub mod eval_plots;
pub mod events;
pub mod http;
pub mod llava;
pub mod media;
pub mod metrics;
pub mod openai;
pub mod validation;
