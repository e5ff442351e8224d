//! `POST /v1/safety/diagnose` (one request's safety diagnostics, streamed or as one document) and
//! `GET /v1/safety/events` (the firehose of every diagnosed request). The engine computes; this
//! module only maps its events to SSE frames or JSON.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::broadcast;

use super::sse::{done_frame, error_frame, json_frame, named_frame};
use super::ApiJson;
use crate::app::AppState;
use crate::engine::{Event, GenerationStream};
use crate::error::ApiError;
use crate::error::ErrorCode;
use crate::firehose::{SafetyEvent, MAX_SUBSCRIBERS};
use crate::openai::diagnostics::{
    DiagnoseResponse, DiagnosticsMeta, DiagnosticsReport, FinishEvent, TokenEvent,
};
use crate::openai::sse::DiagnoseStreamFrame;
use crate::openai::{ChatCompletionRequest, ErrorResponse, FinishReason, Usage};
use crate::validation::Purpose;

pub const DIAGNOSE_ROUTE: &str = "/v1/safety/diagnose";

/// Runs one request with safety diagnostics (DIAGNOSTICS.md).
///
/// The body is a chat-completions request with a `diagnostics` object (all of it optional;
/// `max_tokens: 0` skips generation). With `stream: true` the answer is `text/event-stream`:
/// `event: meta` (one `DiagnosticsMeta`), `event: layer` (one `LayerRecord` per layer 0..=N),
/// `event: summary` (the `Summary`, the answer judged), `event: token` (`TokenEvent`s: the
/// answer in order), `event: finish` (`FinishEvent`), then `data: [DONE]`. The summary judges
/// the whole answer, so it and the tokens come once generation has ended; meta and layers come
/// right after the prompt pass. An error after the stream started is an OpenAI error object in
/// a data frame.
#[utoipa::path(
    post,
    path = "/v1/safety/diagnose",
    tag = "safety",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The diagnostics: one JSON document, or with `stream: true` \
            server-sent events meta, layer × (N+1), summary, token …, finish, then `data: [DONE]`.",
            content(
                (DiagnoseResponse = "application/json"),
                (DiagnoseStreamFrame = "text/event-stream")
            )
        ),
        (status = 400, description = "Bad request (as on /v1/chat/completions) or bad diagnostics options: unknown preset, focus span not in the user text, layers out of range, caption without an image, contradictory interventions; a model without diagnostics", body = ErrorResponse),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 429, description = "Waiting queue full, or too many requests being validated", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 500, description = "Internal fault", body = ErrorResponse),
        (status = 503, description = "Not ready, or shutting down", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub(super) async fn diagnose(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (events, options) =
        super::validate_and_submit(&state, &headers, request, Purpose::Diagnose).await?;
    // Validation gives the diagnose purpose one choice.
    let events = events.single();
    let retrieval = super::retrieval_headers(&options.retrieved);
    let collected = Collected {
        meta: options.diagnostics,
        report: None,
        tokens: Vec::new(),
    };
    let response = if options.stream {
        stream_diagnosis(events, collected).into_response()
    } else {
        Json(collect(events, collected).await?).into_response()
    };
    Ok((retrieval, response).into_response())
}

/// What a diagnose request has received from the engine so far.
struct Collected {
    /// The report's meta from validation, until the engine's diagnosis completes it.
    meta: Option<Box<DiagnosticsMeta>>,
    report: Option<Box<DiagnosticsReport>>,
    tokens: Vec<String>,
}

impl Collected {
    /// Takes one engine event; `Some` once the request ended.
    fn take(&mut self, event: Event) -> Option<Result<(FinishReason, Usage), ApiError>> {
        match event {
            Event::Diagnosed(diagnosis) => {
                if let Some(meta) = self.meta.take() {
                    self.report = Some(Box::new(DiagnosticsReport::new(*meta, *diagnosis)));
                }
            }
            Event::Judged(summary) => {
                if let Some(report) = &mut self.report {
                    report.summary = *summary;
                }
            }
            Event::Delta { text, .. } => {
                if !text.is_empty() {
                    self.tokens.push(text);
                }
            }
            Event::Finished { reason, usage } => return Some(Ok((reason.into(), usage.into()))),
            Event::Failed(err) => return Some(Err(err.into())),
        }
        None
    }
}

async fn collect(
    mut events: GenerationStream,
    mut collected: Collected,
) -> Result<DiagnoseResponse, ApiError> {
    while let Some(event) = events.next().await {
        if let Some(end) = collected.take(event) {
            let (finish_reason, usage) = end?;
            let report = collected.report.ok_or_else(|| {
                ApiError::internal("the engine finished a diagnose request without its report")
            })?;
            let DiagnosticsReport {
                meta,
                layers,
                summary,
            } = *report;
            return Ok(DiagnoseResponse {
                meta,
                layers,
                summary,
                answer: collected.tokens.concat(),
                finish_reason,
                usage,
            });
        }
    }
    Err(ApiError::internal(
        "the engine stopped without finishing the request",
    ))
}

/// The frames for one engine event, and whether the stream is over.
fn frames(collected: &mut Collected, event: Option<Event>) -> (Vec<SseEvent>, bool) {
    let Some(event) = event else {
        let err = ApiError::internal("the engine stopped without finishing the request");
        return (vec![error_frame(&err), done_frame()], true);
    };
    if let Event::Diagnosed(_) = &event {
        collected.take(event);
        let Some(report) = &collected.report else {
            return (Vec::new(), false);
        };
        let mut out = vec![named_frame("meta", &report.meta)];
        out.extend(
            report
                .layers
                .iter()
                .map(|layer| named_frame("layer", layer)),
        );
        return (out, false);
    }
    match collected.take(event) {
        None => (Vec::new(), false),
        Some(Err(err)) => (vec![error_frame(&err), done_frame()], true),
        Some(Ok((finish_reason, usage))) => {
            let mut out = Vec::new();
            match &collected.report {
                Some(report) => out.push(named_frame("summary", &report.summary)),
                None => {
                    let err = ApiError::internal(
                        "the engine finished a diagnose request without its report",
                    );
                    return (vec![error_frame(&err), done_frame()], true);
                }
            }
            out.extend(
                collected
                    .tokens
                    .drain(..)
                    .map(|text| named_frame("token", &TokenEvent { text })),
            );
            out.push(named_frame(
                "finish",
                &FinishEvent {
                    finish_reason,
                    usage,
                },
            ));
            out.push(done_frame());
            (out, true)
        }
    }
}

/// Dropping the response body (client gone) drops `events`, which cancels the request.
fn stream_diagnosis(
    events: GenerationStream,
    collected: Collected,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let body = stream::unfold(Some((events, collected)), |state| async move {
        let (mut events, mut collected) = state?;
        let (out, last) = frames(&mut collected, events.next().await);
        let next = (!last).then_some((events, collected));
        Some((stream::iter(out), next))
    })
    .flatten()
    .map(Ok::<_, Infallible>);
    Sse::new(body).keep_alive(KeepAlive::default())
}

/// The firehose: one `SafetyEvent` per finished diagnosed request (asked for or sampled), as
/// `data:` frames of `text/event-stream`. A subscriber that reads too slowly loses the oldest
/// events (counted in `tga_diagnostics_events_dropped_total`); it never slows serving.
#[utoipa::path(
    get,
    path = "/v1/safety/events",
    tag = "safety",
    responses(
        (status = 200, description = "Server-sent events, one `data: {SafetyEvent}` frame per diagnosed request",
            content((SafetyEvent = "text/event-stream"))),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 429, description = "64 subscribers are already open", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("api_key" = []))
)]
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    if state.firehose.subscribers() >= MAX_SUBSCRIBERS {
        return Err(ApiError::new(
            ErrorCode::Overloaded,
            format!(
                "{MAX_SUBSCRIBERS} /v1/safety/events subscribers are already open; retry later"
            ),
        ));
    }
    let receiver = state.firehose.subscribe();
    let body = stream::unfold((receiver, state), |(mut receiver, state)| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => return Some((Ok(json_frame(&*event)), (receiver, state))),
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    tracing::warn!(lost, "a slow /v1/safety/events subscriber lost events");
                    state.metrics.diagnostics_events_dropped.inc_by(lost);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(body).keep_alive(KeepAlive::default()))
}
