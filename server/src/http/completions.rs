//! `POST /v1/completions` (OpenAI's legacy completions): validate the raw prompt, submit it to
//! the engine, and map its event stream to one `text_completion` or to SSE frames of that shape.
//! Nothing here touches the model.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::chat::{engine_vanished, unix_now};
use super::sse::{done_frame, error_frame, json_frame};
use super::ApiJson;
use crate::app::AppState;
use crate::engine::{self, Event, Generation};
use crate::error::ApiError;
use crate::openai::completions::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
};
use crate::openai::sse::CompletionStreamFrame;
use crate::openai::{ErrorResponse, FinishReason, Usage};
use crate::validation::completions::CompletionOptions;

pub const COMPLETIONS_ROUTE: &str = "/v1/completions";

/// Creates a completion of a raw prompt (no chat template; streamed as server-sent events with
/// `stream: true`).
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion. With `stream: true`, `text/event-stream` of \
            `data: {text_completion}` frames: with `echo` the first carries the prompt, then the \
            generated text as it comes, the last choice frame `finish_reason`, an optional usage \
            frame (empty `choices`) follows, then `data: [DONE]`. An error after the stream \
            started is an OpenAI error object in a data frame.",
            content(
                (CompletionResponse = "application/json"),
                (CompletionStreamFrame = "text/event-stream")
            )
        ),
        (status = 400, description = "Malformed JSON, schema violation, a field this route refuses \
            (suffix, n out of range, best_of other than n, echo with logprobs, penalties, logit_bias, \
            messages), a batch of prompts, an out-of-vocabulary token id, the image placeholder \
            token in the prompt, or prompt + max_tokens over the context \
            (`context_length_exceeded`)", body = ErrorResponse),
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
pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let model = state.model()?;
    let request_id = super::request_id(&headers).to_string();
    let (valid, options) = model
        .validator
        .validate_completion(request, request_id, arrived)
        .await?;
    let events = model.engine.submit(valid)?;
    let completion = TextCompletion {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        offsets: vec![
            options
                .echo
                .as_deref()
                .map_or(0, |echo| echo.chars().count());
            events.len()
        ],
        finished: 0,
        usage: engine::Usage::default(),
        options,
    };
    Ok(if completion.options.stream {
        stream_response(events, completion).into_response()
    } else {
        Json(completion.collect(events).await?).into_response()
    })
}

/// What every response of one completion shares, and where its text stands.
struct TextCompletion {
    id: String,
    created: u64,
    options: CompletionOptions,
    /// Per choice, characters of text so far (the echoed prompt included): the next token's
    /// `text_offset`.
    offsets: Vec<usize>,
    /// Choices finished so far.
    finished: usize,
    /// The prompt once, and every finished choice's completion tokens.
    usage: engine::Usage,
}

impl TextCompletion {
    /// Counts a finished choice; true once it was the last.
    fn choice_finished(&mut self, usage: engine::Usage) -> bool {
        self.usage = self.usage.with_choice(usage);
        self.finished += 1;
        self.finished == self.offsets.len()
    }

    /// The legacy logprobs of choice `index`'s `tokens`, if the request asked for them; advances
    /// its offset.
    fn logprobs(
        &mut self,
        index: usize,
        tokens: Vec<engine::TokenLogprob>,
    ) -> Option<CompletionLogprobs> {
        self.options.logprobs?;
        let offset = &mut self.offsets[index];
        let mut out = CompletionLogprobs::default();
        for token in tokens {
            out.text_offset.push(*offset);
            *offset += token.token.chars().count();
            // OpenAI's legacy shape: the k most likely tokens, and always the sampled one.
            let mut top: std::collections::BTreeMap<String, f32> = token
                .top
                .into_iter()
                .map(|(text, _, logprob)| (text, logprob))
                .collect();
            top.insert(token.token.clone(), token.logprob);
            out.top_logprobs.push(top);
            out.token_logprobs.push(token.logprob);
            out.tokens.push(token.token);
        }
        Some(out)
    }

    fn response(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.options.model.clone(),
            choices,
            usage,
        }
    }

    /// A frame of choice `index`.
    fn frame(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> SseEvent {
        let choice = CompletionChoice {
            index: index as u32,
            text,
            logprobs,
            finish_reason,
        };
        json_frame(&self.response(vec![choice], None))
    }

    async fn collect(mut self, events: Generation) -> Result<CompletionResponse, ApiError> {
        let echo = self.options.echo.clone().unwrap_or_default();
        let mut choices: Vec<CompletionChoice> = (0..events.len())
            .map(|index| CompletionChoice {
                index: index as u32,
                text: echo.clone(),
                logprobs: self.options.logprobs.map(|_| CompletionLogprobs::default()),
                finish_reason: None,
            })
            .collect();
        let mut events = events.merged();
        while let Some((index, event)) = events.next().await {
            match event {
                Event::Delta {
                    text: delta,
                    logprobs: tokens,
                } => {
                    let more = self.logprobs(index, tokens);
                    let choice = &mut choices[index];
                    choice.text.push_str(&delta);
                    if let (Some(all), Some(more)) = (&mut choice.logprobs, more) {
                        all.tokens.extend(more.tokens);
                        all.token_logprobs.extend(more.token_logprobs);
                        all.top_logprobs.extend(more.top_logprobs);
                        all.text_offset.extend(more.text_offset);
                    }
                }
                Event::Finished { reason, usage } => {
                    choices[index].finish_reason = Some(reason.into());
                    if self.choice_finished(usage) {
                        return Ok(self.response(choices, Some(self.usage.into())));
                    }
                }
                Event::Failed(err) => return Err(err.into()),
                // Completions are never diagnosed.
                Event::Diagnosed(_) | Event::Judged(_) => {}
            }
        }
        Err(engine_vanished())
    }

    /// The SSE frames for one engine event of choice `index`, and whether it was the last.
    fn frames(&mut self, event: Option<(usize, Event)>) -> (Vec<SseEvent>, bool) {
        let (index, event) = match event {
            Some((index, event)) => (index, Some(event)),
            None => (0, None),
        };
        match event {
            Some(Event::Delta { text, logprobs }) => {
                let logprobs = self.logprobs(index, logprobs);
                if text.is_empty() && logprobs.is_none() {
                    return (Vec::new(), false);
                }
                (vec![self.frame(index, text, logprobs, None)], false)
            }
            Some(Event::Finished { reason, usage }) => {
                let mut frames = vec![self.frame(index, String::new(), None, Some(reason.into()))];
                if !self.choice_finished(usage) {
                    return (frames, false);
                }
                if self.options.include_usage {
                    frames.push(json_frame(
                        &self.response(Vec::new(), Some(self.usage.into())),
                    ));
                }
                frames.push(done_frame());
                (frames, true)
            }
            Some(Event::Failed(err)) => {
                let err: ApiError = err.into();
                (vec![error_frame(&err), done_frame()], true)
            }
            None => (vec![error_frame(&engine_vanished()), done_frame()], true),
            Some(Event::Diagnosed(_) | Event::Judged(_)) => (Vec::new(), false),
        }
    }
}

/// SSE: the echoed prompt first (with `echo`, once per choice), then the engine's events of
/// every choice as frames, in the order they come. Dropping the response body (the client went
/// away) drops `events`, which cancels the request in the engine.
fn stream_response(
    events: Generation,
    mut completion: TextCompletion,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let echo: Vec<SseEvent> = match completion.options.echo.take() {
        Some(echo) => (0..events.len())
            .map(|index| completion.frame(index, echo.clone(), None, None))
            .collect(),
        None => Vec::new(),
    };
    let body = stream::unfold(Some((events.merged(), completion)), |state| async move {
        let (mut events, mut completion) = state?;
        let (frames, last) = completion.frames(events.next().await);
        let next = (!last).then_some((events, completion));
        Some((stream::iter(frames), next))
    })
    .flatten();
    let frames = stream::iter(echo).chain(body).map(Ok::<_, Infallible>);
    Sse::new(frames).keep_alive(KeepAlive::default())
}
