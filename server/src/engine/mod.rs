//! The engine: one OS thread owns the model and runs continuous batching over it; the async side
//! talks to it only through channels, so no request handler ever waits on model work.
//!
//! Scheduling follows vLLM / TGI: between two decode steps the engine admits waiting requests
//! (each is prefilled alone, then joins the running batch) up to `max_num_seqs` sequences and
//! `max_batch_tokens` prefilled tokens per step; a sequence that finishes, fails or whose client
//! went away leaves the batch before the next step. A request of `n` choices is prefilled once;
//! its choices then split into `n` sequences over the same KV blocks (copy-on-write), each with
//! its own event stream.

pub mod plan;
pub mod request;
mod sequence;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use model::sampling::SamplingParams;

use crate::backend::ModelBackend;
use crate::firehose::Firehose;
use crate::metrics::Metrics;
use plan::DiagnosePlan;
use request::Prompt;

/// When generation ends besides the model's stop tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppingCriteria {
    pub max_new_tokens: usize,
    /// Stop strings (not part of the output).
    pub stop: Vec<String>,
}

/// A request the engine can run as it is: every limit checked, images preprocessed, the prompt
/// tokenized, the diagnostics planned.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stopping: StoppingCriteria,
    /// When the request arrived (start of its TTFT and queue time).
    pub arrived: Instant,
    /// Safety diagnostics to run with the prefill (asked for, or sampled).
    pub diagnose: Option<Arc<DiagnosePlan>>,
    /// Structured outputs: the grammar that masks every sampled token.
    pub constraint: Option<model::constraint::Constraint>,
    /// Choices (`n`, at least 1): they share the prompt's prefill and its KV blocks
    /// (copy-on-write), and choice `i` samples with `seed + i`.
    pub n: usize,
}

/// [`EngineConfig::idle_batch_tokens`] by default.
pub const DEFAULT_IDLE_BATCH_TOKENS: usize = 2048;

/// Scheduler limits (SERVING.md's `max_num_seqs`, `max_batch_tokens`, `max_waiting`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_num_seqs: usize,
    /// Prompt tokens prefilled between two decode steps (one request is always admitted, however
    /// long, so a long prompt cannot starve).
    pub max_batch_tokens: usize,
    /// Accepted requests waiting for a slot; beyond it, submissions are refused (429).
    pub max_waiting: usize,
    /// Prompt tokens per step while no sequence decodes (when larger than `max_batch_tokens`):
    /// small chunks keep running streams flowing, and with none running they only cost.
    pub idle_batch_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 16,
            max_batch_tokens: 8192,
            max_waiting: 64,
            idle_batch_tokens: DEFAULT_IDLE_BATCH_TOKENS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Token counts of one finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt positions taken by images (part of `prompt_tokens`).
    pub image_tokens: usize,
}

impl Usage {
    /// A request's usage once `choice` (one of its choices) finished: the prompt counted once,
    /// the completion tokens of every choice summed (OpenAI's `n`).
    pub fn with_choice(self, choice: Usage) -> Usage {
        Usage {
            prompt_tokens: choice.prompt_tokens,
            completion_tokens: self.completion_tokens + choice.completion_tokens,
            image_tokens: choice.image_tokens,
        }
    }
}

/// The log-probability of one generated token and of its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    /// [`ModelBackend::token_bytes`] of the token.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely alternatives: text, bytes, logprob.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Why a request failed once accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    /// A fault in the model; the request is lost, other requests are not.
    #[error("internal model error: {0}")]
    Internal(String),
    /// The server shut down before the request finished.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What the engine reports about one request, in order: for a diagnosed request `Diagnosed`,
/// then deltas, then (diagnosed) `Judged`, then exactly one of `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (never splitting a character; may be empty while a stop string is undecided)
    /// and the logprobs of the tokens that produced it, if they were asked for.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(GenerationError),
    /// A diagnosed request's measurements, right after its prefill (before any delta); its
    /// summary is not judged yet. Only sent when the client asked for diagnostics.
    Diagnosed(Box<plan::Diagnosis>),
    /// The diagnosed request's final summary, the answer judged, right before `Finished`.
    Judged(Box<model::diagnostics::Summary>),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the waiting queue is full")]
    QueueFull,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// The events of one request. Dropping it cancels the request: the engine frees its slot before
/// the next step and counts a client disconnect.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<Event>,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl futures_util::Stream for GenerationStream {
    type Item = Event;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

/// The event streams of one request's choices, in index order. Dropping them all cancels the
/// request.
#[derive(Debug)]
pub struct Generation {
    choices: Vec<GenerationStream>,
}

impl Generation {
    /// Choices (the request's `n`).
    pub fn len(&self) -> usize {
        self.choices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.choices.is_empty()
    }

    /// The events of a one-choice request (validation gives the diagnose endpoint and
    /// evaluations `n = 1`).
    pub fn single(self) -> GenerationStream {
        debug_assert_eq!(self.choices.len(), 1, "a request of several choices");
        self.choices
            .into_iter()
            .next()
            .expect("a request has at least one choice")
    }

    /// Every choice's events as they come, tagged with the choice's index; the stream ends when
    /// every choice's has.
    pub fn merged(self) -> impl futures_util::Stream<Item = (usize, Event)> + Send + Unpin {
        use futures_util::StreamExt;
        futures_util::stream::select_all(
            self.choices
                .into_iter()
                .enumerate()
                .map(|(index, events)| events.map(move |event| (index, event))),
        )
    }
}

/// An accepted request on its way to the engine thread. It holds its admission permits (one
/// per choice) until the engine lets go of it (finished, failed or cancelled), which bounds
/// running + waiting sequences.
struct Job {
    request: ValidRequest,
    /// The first choice's events and permit.
    events: mpsc::UnboundedSender<Event>,
    permit: OwnedSemaphorePermit,
    /// Choices 1.., split off the first once the shared prompt is prefilled.
    siblings: Vec<Sibling>,
}

/// A choice of a request of several (`n`) not yet split off from the first.
struct Sibling {
    index: usize,
    events: mpsc::UnboundedSender<Event>,
    permit: OwnedSemaphorePermit,
}

impl Job {
    /// Tells every choice's client that the request failed (it was never admitted).
    fn reject(&self, error: GenerationError) {
        notify_failed(&self.events, &self.siblings, error);
    }

    /// Every choice's client went away.
    fn abandoned(&self) -> bool {
        abandoned(&self.events, &self.siblings)
    }
}

/// Sends `error` to a choice's client and to those of the choices not split off from it yet.
fn notify_failed(
    events: &mpsc::UnboundedSender<Event>,
    siblings: &[Sibling],
    error: GenerationError,
) {
    for sibling in siblings {
        let _ = sibling.events.send(Event::Failed(error.clone()));
    }
    let _ = events.send(Event::Failed(error));
}

/// The clients of a choice and of the choices not split off from it yet all went away.
fn abandoned(events: &mpsc::UnboundedSender<Event>, siblings: &[Sibling]) -> bool {
    events.is_closed() && siblings.iter().all(|s| s.events.is_closed())
}

enum Command {
    Submit(Box<Job>),
    Shutdown { deadline: Instant },
}

/// Handle to the engine thread. Cheap to share behind an `Arc`; dropping the last handle lets an
/// idle engine thread exit.
pub struct Engine {
    commands: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    accepting: AtomicBool,
    stopped: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Moves `backend` onto a new OS thread named `tga-engine` and starts scheduling. Every
    /// finished diagnosed request feeds the safety metrics of `metrics` and the `firehose`.
    pub fn start<B: ModelBackend>(
        backend: B,
        config: EngineConfig,
        metrics: Arc<Metrics>,
        firehose: Arc<Firehose>,
    ) -> std::io::Result<Self> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = watch::channel(false);
        // One permit per sequence (choice): `max_num_seqs` running, `max_waiting` waiting.
        let permits = Arc::new(Semaphore::new(config.max_num_seqs + config.max_waiting));
        let worker = worker::Worker::new(backend, config, receiver, metrics.clone(), firehose);
        std::thread::Builder::new()
            .name("tga-engine".into())
            .spawn(move || {
                worker.run();
                // Also sent when the thread unwinds: the sender is dropped then, which
                // `stopped()` treats the same.
                let _ = stopped_tx.send(true);
            })?;
        Ok(Self {
            commands,
            permits,
            accepting: AtomicBool::new(true),
            stopped,
            metrics,
        })
    }

    /// Queues a validated request. Never blocks: it either takes a slot (running or waiting)
    /// for each of its `n` choices or fails at once.
    pub fn submit(&self, request: ValidRequest) -> Result<Generation, SubmitError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let n = request.n.max(1);
        let mut permit = u32::try_from(n)
            .ok()
            .and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok())
            .ok_or(SubmitError::QueueFull)?;
        let (events, receiver) = mpsc::unbounded_channel();
        let mut choices = vec![GenerationStream { events: receiver }];
        let siblings = (1..n)
            .map(|index| {
                let (events, receiver) = mpsc::unbounded_channel();
                choices.push(GenerationStream { events: receiver });
                let permit = permit.split(1).expect("one permit per choice");
                Sibling {
                    index,
                    events,
                    permit,
                }
            })
            .collect();
        self.metrics.waiting.inc();
        let job = Box::new(Job {
            request,
            events,
            permit,
            siblings,
        });
        if self.commands.send(Command::Submit(job)).is_err() {
            self.metrics.waiting.dec();
            return Err(SubmitError::ShuttingDown);
        }
        Ok(Generation { choices })
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// False once the engine thread has ended (shut down, or unwound by a fault no guard caught):
    /// `/health` and `/ready` then answer 503 instead of a server that can no longer serve.
    pub fn is_alive(&self) -> bool {
        // The sender is dropped when the thread exits, normally or by unwinding.
        !*self.stopped.borrow() && self.stopped.has_changed().is_ok()
    }

    /// Stops admitting (new submissions get `ShuttingDown`, waiting ones fail with it); running
    /// sequences may finish until `grace` has passed, then they are cut.
    pub fn shutdown(&self, grace: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown {
            deadline: Instant::now() + grace,
        });
    }

    /// Resolves once the engine thread has exited.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the sender is gone: the thread exited (or unwound).
        let _ = stopped.wait_for(|done| *done).await;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.accepting.store(false, Ordering::SeqCst);
    }
}
