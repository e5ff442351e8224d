//! The engine thread's loop: receive, drop cancelled, admit (prefill), decode one step, repeat.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{self, error::TryRecvError};

use model::sampling::StopMatcher;
use model::tokenizer::IncrementalDetokenizer;

use super::sequence::{Sequence, SequenceDiagnosis};
use super::{Command, EngineConfig, Event, FinishReason, GenerationError, Job, Usage};
use crate::backend::{BackendError, ModelBackend};
use crate::firehose::Firehose;
use crate::metrics::Metrics;

pub(super) struct Worker<B: ModelBackend> {
    backend: B,
    config: EngineConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    metrics: Arc<Metrics>,
    firehose: Arc<Firehose>,
    waiting: VecDeque<Job>,
    running: Vec<Sequence<B>>,
    /// Set once shutdown began: running sequences are cut when it passes.
    deadline: Option<Instant>,
}

impl<B: ModelBackend> Worker<B> {
    pub(super) fn new(
        backend: B,
        config: EngineConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        metrics: Arc<Metrics>,
        firehose: Arc<Firehose>,
    ) -> Self {
        Self {
            backend,
            config,
            commands,
            metrics,
            firehose,
            waiting: VecDeque::new(),
            running: Vec::new(),
            deadline: None,
        }
    }

    pub(super) fn run(mut self) {
        tracing::info!(
            max_num_seqs = self.config.max_num_seqs,
            max_waiting = self.config.max_waiting,
            max_batch_tokens = self.config.max_batch_tokens,
            "engine started"
        );
        while self.receive() {
            self.drop_disconnected();
            self.cut_at_deadline();
            self.admit();
            if !self.running.is_empty() {
                self.decode_step();
            }
        }
        // Submissions that raced with shutdown are answered rather than dropped unanswered.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Submit(job) = command {
                self.metrics.waiting.dec();
                let _ = job
                    .events
                    .send(Event::Failed(GenerationError::ShuttingDown));
            }
        }
        self.metrics.running.set(0);
        tracing::info!("engine stopped");
    }

    /// Takes every pending command; blocks only while there is nothing to do. Returns false when
    /// the engine should exit: idle and either shutting down or abandoned by every handle.
    fn receive(&mut self) -> bool {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let command = if idle {
                if self.deadline.is_some() {
                    return false;
                }
                match self.commands.blocking_recv() {
                    Some(command) => command,
                    None => return false,
                }
            } else {
                match self.commands.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
                }
            };
            match command {
                Command::Submit(job) if self.deadline.is_some() => {
                    self.metrics.waiting.dec();
                    let _ = job
                        .events
                        .send(Event::Failed(GenerationError::ShuttingDown));
                }
                Command::Submit(job) => self.waiting.push_back(*job),
                Command::Shutdown { deadline } => {
                    tracing::info!(
                        running = self.running.len(),
                        waiting = self.waiting.len(),
                        "engine shutting down"
                    );
                    self.deadline = Some(deadline);
                    for job in self.waiting.drain(..) {
                        self.metrics.waiting.dec();
                        let _ = job
                            .events
                            .send(Event::Failed(GenerationError::ShuttingDown));
                    }
                }
            }
        }
    }

    /// Frees the slots of requests whose client went away (their event receiver was dropped).
    fn drop_disconnected(&mut self) {
        let metrics = &self.metrics;
        self.waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                metrics.waiting.dec();
                metrics.client_disconnects.inc();
                tracing::info!(request_id = %job.request.request_id, "client disconnected while waiting");
            }
            !gone
        });
        self.running.retain(|seq| {
            let gone = seq.events.is_closed();
            if gone {
                metrics.running.dec();
                metrics.client_disconnects.inc();
                tracing::info!(request_id = %seq.request_id, generated = seq.usage.completion_tokens, "client disconnected");
            }
            !gone
        });
    }

    fn cut_at_deadline(&mut self) {
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            for seq in self.running.drain(..) {
                tracing::warn!(request_id = %seq.request_id, "cut at the shutdown deadline");
                seq.fail(GenerationError::ShuttingDown, &self.metrics);
            }
        }
    }

    /// Prefills waiting requests, oldest first, while there are free sequence slots and the
    /// step's prefill-token budget lasts.
    fn admit(&mut self) {
        let mut budget = self.config.max_batch_tokens;
        let mut admitted = 0;
        while self.running.len() < self.config.max_num_seqs && self.deadline.is_none() {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let prompt_len = front.request.prompt.len();
            if admitted > 0 && prompt_len > budget {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.metrics.waiting.dec();
            budget = budget.saturating_sub(prompt_len);
            admitted += 1;
            if let Some(seq) = self.prefill(job) {
                self.running.push(seq);
            }
        }
    }

    /// Runs one request's prompt and samples its first token; `None` if it already ended.
    fn prefill(&mut self, job: Job) -> Option<Sequence<B>> {
        let Job {
            request,
            events,
            permit,
        } = job;
        let started = Instant::now();
        self.metrics
            .queue_time
            .observe((started - request.arrived).as_secs_f64());
        let mut cache = self.backend.new_cache();
        let backend = &mut self.backend;
        let result = catch_unwind(AssertUnwindSafe(|| match &request.diagnose {
            Some(plan) => backend
                .prefill_diagnosed(&request.prompt, plan, &mut cache)
                .map(|(logits, diagnosis)| (logits, Some(diagnosis))),
            None => backend
                .prefill(&request.prompt, &mut cache)
                .map(|logits| (logits, None)),
        }))
        .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))));
        let (logits, diagnosis) = match result {
            Ok(out) => out,
            Err(err) => {
                tracing::error!(request_id = %request.request_id, error = %err, "prefill failed");
                let _ = events.send(Event::Failed(GenerationError::Internal(err.0)));
                return None;
            }
        };
        let prompt = &request.prompt;
        self.metrics.prompt_tokens.inc_by(prompt.len() as u64);
        self.metrics
            .image_tokens
            .inc_by(prompt.image_tokens() as u64);
        self.metrics.images.inc_by(prompt.images.len() as u64);
        tracing::debug!(
            request_id = %request.request_id,
            prompt_tokens = prompt.len(),
            prefill_ms = started.elapsed().as_millis() as u64,
            "prefilled"
        );
        let diagnosis = match (&request.diagnose, diagnosis) {
            (Some(plan), Some(diagnosis)) => {
                if plan.deliver {
                    let _ = events.send(Event::Diagnosed(Box::new(diagnosis.clone())));
                }
                Some(Box::new(SequenceDiagnosis {
                    plan: plan.clone(),
                    diagnosis,
                    answer: String::new(),
                }))
            }
            _ => None,
        };
        // Counted as running from here; every way out of the batch uncounts it before telling
        // the client, so the gauge is never behind what a client has seen.
        self.metrics.running.inc();
        let seq = Sequence {
            request_id: request.request_id,
            sampler: self
                .backend
                .sampler(&request.sampling, &request.prompt.token_ids),
            want_logprobs: request.sampling.logprobs,
            events,
            _permit: permit,
            cache,
            last_token: 0,
            max_new_tokens: request.stopping.max_new_tokens,
            detokenizer: IncrementalDetokenizer::new(),
            stops: StopMatcher::new(request.stopping.stop)
                .including_stop(request.sampling.include_stop_str_in_output),
            pending_logprobs: Default::default(),
            usage: Usage {
                prompt_tokens: request.prompt.token_ids.len(),
                completion_tokens: 0,
                image_tokens: request.prompt.image_tokens(),
            },
            arrived: request.arrived,
            last_token_at: started,
            diagnosis,
        };
        // `max_tokens: 0` (the diagnose endpoint): the prompt pass was the whole point.
        if seq.max_new_tokens == 0 {
            self.finish(seq, FinishReason::Length);
            return None;
        }
        self.advance(seq, &logits)
    }

    /// Finishes `seq` (the judge, the safety metrics and the firehose for a diagnosed one) under
    /// the panic guard.
    fn finish(&self, seq: Sequence<B>, reason: FinishReason) {
        let request_id = seq.request_id.clone();
        let finished = catch_unwind(AssertUnwindSafe(|| {
            seq.finish(reason, &self.metrics, &self.firehose)
        }));
        if let Err(panic) = finished {
            // The sequence was dropped while unwinding: its client sees the stream end without a
            // finish (a 500), and its slot is free.
            tracing::error!(request_id = %request_id, error = %panic_message(&panic), "finishing failed");
        }
    }

    /// Samples `seq`'s next token from `logits` and moves it on: back into the batch (`Some`),
    /// finished or failed. Sampling, detokenizing, stop matching and finishing all run under the
    /// panic guard, so a fault fails this request (a 500 naming its id in the log) and the batch
    /// goes on.
    fn advance(&self, mut seq: Sequence<B>, logits: &[f32]) -> Option<Sequence<B>> {
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            seq.on_logits(logits, &self.backend, &self.metrics)
        }))
        .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))));
        match stepped {
            Ok(None) => Some(seq),
            Ok(Some(reason)) => {
                self.finish(seq, reason);
                None
            }
            Err(err) => {
                tracing::error!(request_id = %seq.request_id, error = %err, "sampling failed");
                seq.fail(GenerationError::Internal(err.0), &self.metrics);
                None
            }
        }
    }

    /// One decode step for the whole running batch.
    fn decode_step(&mut self) {
        let tokens: Vec<u32> = self.running.iter().map(|seq| seq.last_token).collect();
        self.metrics.batch_size.observe(tokens.len() as f64);
        let backend = &mut self.backend;
        let mut caches: Vec<&mut B::Cache> =
            self.running.iter_mut().map(|seq| &mut seq.cache).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            backend.decode_batch(&tokens, &mut caches)
        }))
        .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))));
        drop(caches);
        let all_logits = match result {
            Ok(logits) if logits.len() == tokens.len() => logits,
            Ok(logits) => {
                return self.fail_all(BackendError(format!(
                    "decode_batch returned {} logit rows for {} sequences",
                    logits.len(),
                    tokens.len()
                )))
            }
            Err(err) => return self.fail_all(err),
        };
        let running = std::mem::take(&mut self.running);
        for (seq, logits) in running.into_iter().zip(all_logits) {
            if let Some(seq) = self.advance(seq, &logits) {
                self.running.push(seq);
            }
        }
    }

    /// A failed decode step loses every running sequence (their caches are in an unknown state);
    /// waiting requests are unaffected.
    fn fail_all(&mut self, err: BackendError) {
        tracing::error!(error = %err, sequences = self.running.len(), "decode step failed");
        for seq in self.running.drain(..) {
            seq.fail(GenerationError::Internal(err.0.clone()), &self.metrics);
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("model panicked: {what}")
}
