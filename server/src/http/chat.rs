//! `POST /v1/chat/completions`: validate, submit to the engine, and map its event stream to one
//! JSON response or to SSE frames. Nothing here touches the model.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::sse::{done_frame, error_frame, json_frame};
use super::ApiJson;
use crate::app::AppState;
use crate::engine::{self, Event, Generation};
use crate::error::ApiError;
use crate::openai::diagnostics::DiagnosticsReport;
use crate::openai::{
    sse::ChatCompletionStreamFrame, AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, Choice, ChoiceLogprobs, ChunkChoice, Delta, ErrorResponse,
    FinishReason, Role, TokenLogprob, Usage,
};
use crate::validation::{Purpose, ResponseOptions};

/// Creates a chat completion (streamed as server-sent events with `stream: true`).
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "chat",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion. With `stream: true`, `text/event-stream` of \
            `data: {chat.completion.chunk}` frames: the first carries `delta.role`, the last choice \
            frame `finish_reason`, an optional usage frame follows, then `data: [DONE]`; an error \
            after the stream started is an OpenAI error object in a data frame.",
            content(
                (ChatCompletionResponse = "application/json"),
                (ChatCompletionStreamFrame = "text/event-stream")
            )
        ),
        (status = 400, description = "Malformed JSON, schema violation (a value out of the ranges \
            stated in the schema, `stream_options` without `stream`, `top_logprobs` without \
            `logprobs`, `n` above `--max-num-seqs` or with diagnostics), a documented field the \
            server cannot honour (`tools` unless `tool_choice` \
            is `none`, `functions`, audio output), bad or unreachable image, too many images or \
            pixels, an image outside a user message, a conversation the template cannot render, \
            or prompt + max_tokens over the context (`context_length_exceeded`)", body = ErrorResponse),
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
pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (events, options) =
        super::validate_and_submit(&state, &headers, request, Purpose::Chat).await?;
    let retrieval = super::retrieval_headers(&options.retrieved);
    let completion = Completion {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        options,
        diagnostics: None,
        choices: events.len(),
        finished: 0,
        usage: engine::Usage::default(),
    };
    let response = if completion.options.stream {
        stream_response(events, completion).into_response()
    } else {
        Json(completion.collect(events).await?).into_response()
    };
    Ok((retrieval, response).into_response())
}

/// What every response of one completion shares.
struct Completion {
    id: String,
    created: u64,
    options: ResponseOptions,
    /// The diagnostics report, once the engine sent it (requests that asked for diagnostics).
    diagnostics: Option<Box<DiagnosticsReport>>,
    /// The request's `n`, and how many of its choices have finished.
    choices: usize,
    finished: usize,
    /// The prompt once, and every finished choice's completion tokens.
    usage: engine::Usage,
}

/// One choice of a non-streamed answer, as its events come.
#[derive(Default)]
struct Collected {
    content: String,
    logprobs: Vec<TokenLogprob>,
    finish_reason: Option<FinishReason>,
}

impl Completion {
    /// Counts a finished choice; true once it was the last.
    fn choice_finished(&mut self, usage: engine::Usage) -> bool {
        self.usage = self.usage.with_choice(usage);
        self.finished += 1;
        self.finished == self.choices
    }

    async fn collect(mut self, events: Generation) -> Result<ChatCompletionResponse, ApiError> {
        let mut choices: Vec<Collected> = (0..events.len()).map(|_| Collected::default()).collect();
        let mut events = events.merged();
        while let Some((index, event)) = events.next().await {
            match event {
                Event::Delta {
                    text,
                    logprobs: token_logprobs,
                } => {
                    let choice = &mut choices[index];
                    choice.content.push_str(&text);
                    choice
                        .logprobs
                        .extend(token_logprobs.into_iter().map(Into::into));
                }
                Event::Finished { reason, usage } => {
                    choices[index].finish_reason = Some(reason.into());
                    if self.choice_finished(usage) {
                        return Ok(self.response(choices));
                    }
                }
                Event::Failed(err) => return Err(err.into()),
                event => self.on_diagnostics(event),
            }
        }
        Err(engine_vanished())
    }

    fn response(&mut self, choices: Vec<Collected>) -> ChatCompletionResponse {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| Choice {
                index: index as u32,
                message: AssistantMessage {
                    role: Role::Assistant,
                    content: choice.content,
                },
                logprobs: self.options.logprobs.then_some(ChoiceLogprobs {
                    content: choice.logprobs,
                }),
                finish_reason: choice.finish_reason.expect("every choice finished"),
            })
            .collect();
        ChatCompletionResponse {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.options.model.clone(),
            choices,
            usage: self.usage.into(),
            diagnostics: self.diagnostics.take(),
        }
    }

    /// Keeps the diagnostics events for the response (the engine sends them only to requests
    /// that asked, whose options carry the report's meta).
    fn on_diagnostics(&mut self, event: Event) {
        match event {
            Event::Diagnosed(diagnosis) => {
                if let Some(meta) = self.options.diagnostics.take() {
                    self.diagnostics = Some(Box::new(DiagnosticsReport::new(*meta, *diagnosis)));
                }
            }
            Event::Judged(summary) => {
                if let Some(report) = &mut self.diagnostics {
                    report.summary = *summary;
                }
            }
            _ => {}
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> SseEvent {
        json_frame(&self.chunk_value(choices, usage))
    }

    fn chunk_value(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.options.model.clone(),
            choices,
            usage,
            diagnostics: None,
        }
    }

    fn delta(&self, index: usize, delta: Delta, logprobs: Option<ChoiceLogprobs>) -> SseEvent {
        self.chunk(
            vec![ChunkChoice {
                index: index as u32,
                delta,
                logprobs,
                finish_reason: None,
            }],
            None,
        )
    }

    /// The SSE frames for one engine event of choice `index`, and whether it was the last.
    fn frames(&mut self, event: Option<(usize, Event)>) -> (Vec<SseEvent>, bool) {
        let (index, event) = match event {
            Some((index, event)) => (index, Some(event)),
            None => (0, None),
        };
        match event {
            Some(Event::Delta { text, logprobs }) => {
                let logprobs = self.options.logprobs.then(|| ChoiceLogprobs {
                    content: logprobs.into_iter().map(Into::into).collect(),
                });
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                (vec![self.delta(index, delta, logprobs)], false)
            }
            Some(Event::Finished { reason, usage }) => {
                // The diagnostics (of a one-choice request) ride on the frame that carries
                // `finish_reason`.
                let mut last = self.chunk_value(
                    vec![ChunkChoice {
                        index: index as u32,
                        delta: Delta::default(),
                        logprobs: None,
                        finish_reason: Some(reason.into()),
                    }],
                    None,
                );
                last.diagnostics = self.diagnostics.take();
                let mut frames = vec![json_frame(&last)];
                if !self.choice_finished(usage) {
                    return (frames, false);
                }
                if self.options.include_usage {
                    frames.push(self.chunk(Vec::new(), Some(self.usage.into())));
                }
                frames.push(done_frame());
                (frames, true)
            }
            Some(Event::Failed(err)) => {
                let err: ApiError = err.into();
                (vec![error_frame(&err), done_frame()], true)
            }
            None => (vec![error_frame(&engine_vanished()), done_frame()], true),
            Some(event) => {
                self.on_diagnostics(event);
                (Vec::new(), false)
            }
        }
    }
}

/// SSE: each choice's role frame at once (so the client sees the stream open while the prompt
/// is prefilled), then the engine's events of every choice as frames, in the order they come.
/// Dropping the response body (the client went away) drops `events`, which cancels the request
/// in the engine.
fn stream_response(
    events: Generation,
    completion: Completion,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let roles: Vec<SseEvent> = (0..events.len())
        .map(|index| {
            let role = Delta {
                role: Some(Role::Assistant),
                content: Some(String::new()),
            };
            completion.delta(index, role, None)
        })
        .collect();
    let body = stream::unfold(Some((events.merged(), completion)), |state| async move {
        let (mut events, mut completion) = state?;
        let (frames, last) = completion.frames(events.next().await);
        let next = (!last).then_some((events, completion));
        Some((stream::iter(frames), next))
    })
    .flatten();
    let frames = stream::iter(roles).chain(body).map(Ok::<_, Infallible>);
    Sse::new(frames).keep_alive(KeepAlive::default())
}

pub(super) fn engine_vanished() -> ApiError {
    ApiError::internal("the engine stopped without finishing the request")
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
