//! The `data:` payloads of each streaming route, for the OpenAPI document only (the handlers
//! write the frames with `http::sse`): every frame a client can meet, the error object that ends
//! a stream which has already started, and the literal `[DONE]` that ends every stream.

use serde::Serialize;
use utoipa::openapi::schema::{OneOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};
use utoipa::ToSchema;

use super::completions::CompletionResponse;
use super::diagnostics::{
    DiagnosticsMeta, FinishEvent, LayerRecordSchema, SummarySchema, TokenEvent,
};
use super::{ChatCompletionChunk, ErrorResponse};

/// The last `data:` payload of every stream: the text `[DONE]` (not JSON).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum StreamDone {
    #[serde(rename = "[DONE]")]
    Done,
}

/// One `data:` payload of `POST /v1/chat/completions` with `stream: true`: chunks (the first
/// carries `delta.role`, the last choice chunk `finish_reason`; with
/// `stream_options.include_usage` a chunk with empty `choices` and the usage follows), an error
/// object if the request fails after the stream started, then `[DONE]`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ChatCompletionStreamFrame {
    Chunk(ChatCompletionChunk),
    Error(ErrorResponse),
    Done(StreamDone),
}

/// One `data:` payload of `POST /v1/completions` with `stream: true`: `text_completion` objects
/// (with `echo` the first carries the prompt; the last choice frame `finish_reason`; with
/// `stream_options.include_usage` one with empty `choices` and the usage follows), an error object
/// if the request fails after the stream started, then `[DONE]`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum CompletionStreamFrame {
    Chunk(CompletionResponse),
    Error(ErrorResponse),
    Done(StreamDone),
}

/// One frame of `POST /v1/safety/diagnose` with `stream: true`, by its SSE `event:` name:
/// `meta` (one `DiagnosticsMeta`), `layer` (one `LayerRecord` per layer 0..=N), `summary` (the
/// `Summary`), `token` (`TokenEvent`s, the answer in order), `finish` (`FinishEvent`); an error
/// object (no event name) if the request fails after the stream started; then `data: [DONE]`.
pub struct DiagnoseStreamFrame;

// By hand: the report's schema types describe model-crate types and are not serialisable, so
// the untagged enum the other routes derive cannot be written here.
impl utoipa::PartialSchema for DiagnoseStreamFrame {
    fn schema() -> RefOr<Schema> {
        let mut frames = OneOfBuilder::new().description(Some(
            "One `data:` payload of the diagnose stream; its SSE `event:` name says which: \
             `meta`, `layer` (one per layer 0..=N), `summary`, `token` (the answer in order), \
             `finish`; an error object (no event name) if the request fails after the stream \
             started; then `[DONE]`.",
        ));
        for name in [
            DiagnosticsMeta::name(),
            LayerRecordSchema::name(),
            SummarySchema::name(),
            TokenEvent::name(),
            FinishEvent::name(),
            ErrorResponse::name(),
            StreamDone::name(),
        ] {
            frames = frames.item(Ref::from_schema_name(name));
        }
        frames.into()
    }
}

impl ToSchema for DiagnoseStreamFrame {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        fn add<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            schemas.push((T::name().into(), T::schema()));
            T::schemas(schemas);
        }
        add::<DiagnosticsMeta>(schemas);
        add::<LayerRecordSchema>(schemas);
        add::<SummarySchema>(schemas);
        add::<TokenEvent>(schemas);
        add::<FinishEvent>(schemas);
        add::<ErrorResponse>(schemas);
        add::<StreamDone>(schemas);
    }
}
