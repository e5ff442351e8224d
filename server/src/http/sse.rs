//! Server-sent event frames, the one way every streaming route writes them (public for the
//! `sse` fuzz target).

use axum::response::sse::Event as SseEvent;
use serde::Serialize;

use crate::error::ApiError;

/// A `data: {json}` frame.
pub fn json_frame<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).expect("wire types serialise"))
}

/// An `event: {name}` frame with `data: {json}`.
pub fn named_frame<T: Serialize>(name: &str, value: &T) -> SseEvent {
    SseEvent::default()
        .event(name)
        .data(serde_json::to_string(value).expect("wire types serialise"))
}

/// The stream's end, as OpenAI writes it.
pub fn done_frame() -> SseEvent {
    SseEvent::default().data("[DONE]")
}

/// An error after the stream started: OpenAI's error object as a data frame (vLLM does this).
pub fn error_frame(err: &ApiError) -> SseEvent {
    if err.status().is_server_error() {
        tracing::error!(code = err.code.as_str(), message = %err.message, "request failed mid-stream");
    }
    json_frame(&err.body())
}
