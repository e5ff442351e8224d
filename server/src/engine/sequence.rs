//! One sequence in the running batch: its sampler, detokenizer, stop matcher and the events it
//! sends; what happens to a sampled token.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;

use model::sampling::StopMatcher;
use model::tokenizer::IncrementalDetokenizer;

use super::plan::{DiagnosePlan, Diagnosis};
use super::request::Prompt;
use super::{Event, FinishReason, GenerationError, TokenLogprob, Usage};
use crate::backend::{BackendError, ModelBackend, TokenSampler};
use crate::firehose::Firehose;
use crate::metrics::Metrics;

/// One request in the running batch.
pub(super) struct Sequence<B: ModelBackend> {
    pub(super) request_id: String,
    pub(super) events: mpsc::UnboundedSender<Event>,
    /// Released (slot freed) when the sequence is dropped.
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) cache: B::Cache,
    pub(super) sampler: B::Sampler,
    /// Structured outputs: masks the logits before every draw and follows the tokens drawn.
    pub(super) constraint: Option<model::constraint::Constraint>,
    /// Kept for a recompute after a preemption (images included).
    pub(super) prompt: Prompt,
    /// The safety diagnostics of the first prefill (a recompute runs the same interventions).
    pub(super) diagnose: Option<Arc<DiagnosePlan>>,
    /// Content hashes of the prompt's full blocks for prefix sharing (empty: not shared).
    pub(super) prefix_hashes: Vec<u64>,
    pub(super) phase: Phase,
    /// Sampled tokens (stop tokens excepted): the last one is the next decode step's input.
    pub(super) generated: Vec<u32>,
    /// Input of the next decode step.
    pub(super) last_token: u32,
    pub(super) max_new_tokens: usize,
    pub(super) detokenizer: IncrementalDetokenizer,
    pub(super) stops: StopMatcher,
    pub(super) want_logprobs: bool,
    /// Logprobs of tokens whose text is still held back; they go out with that text.
    pub(super) pending_logprobs: Vec<TokenLogprob>,
    pub(super) usage: Usage,
    pub(super) arrived: Instant,
    pub(super) last_token_at: Instant,
    /// Set for a diagnosed request: its report, completed with the judged answer at the end.
    pub(super) diagnosis: Option<Box<SequenceDiagnosis>>,
}

/// Where a sequence is in its life in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Filling its cache up to `target` positions: the prompt, or after a preemption the
    /// prompt and every generated token but the last. `diagnosed` while the whole-prompt
    /// diagnosed pass is still to run.
    Prefill { target: usize, diagnosed: bool },
    /// In the decode batch.
    Decode,
}

/// A diagnosed sequence's measurements while its answer is generated.
pub(super) struct SequenceDiagnosis {
    pub(super) plan: Arc<DiagnosePlan>,
    pub(super) diagnosis: Diagnosis,
    /// The answer so far (what the client was shown), for the refusal judge.
    pub(super) answer: String,
}

impl SequenceDiagnosis {
    /// Judges the answer (if one was generated), feeds the safety metrics and the firehose, and
    /// tells the client the final summary if it asked for diagnostics.
    fn complete(
        self,
        request_id: &str,
        generated: bool,
        metrics: &Metrics,
        firehose: &Firehose,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let Self {
            plan,
            mut diagnosis,
            answer,
        } = self;
        if generated {
            diagnosis.summary.judge_answer(&answer);
        }
        record_diagnosed(metrics, firehose, request_id, &plan, &diagnosis);
        if plan.deliver {
            let _ = events.send(Event::Judged(Box::new(diagnosis.summary)));
        }
    }
}

/// Feeds the safety metrics and the firehose with one finished diagnosed request.
fn record_diagnosed(
    metrics: &Metrics,
    firehose: &Firehose,
    request_id: &str,
    plan: &DiagnosePlan,
    diagnosis: &Diagnosis,
) {
    let summary = &diagnosis.summary;
    let p_refusal = diagnosis.p_refusal_at(plan.safety_layer);
    let cos_band_mean = diagnosis.band_mean_cos(plan.metrics_band);
    if let Some(safety) = metrics.safety() {
        safety.observe(
            summary.modality,
            summary.refused,
            summary.activation_layer,
            p_refusal,
            cos_band_mean,
        );
    }
    firehose.publish(crate::firehose::SafetyEvent::new(
        request_id,
        summary,
        plan.safety_layer,
        p_refusal,
        plan.metrics_band,
        cos_band_mean,
        !plan.deliver,
    ));
}

impl<B: ModelBackend> Sequence<B> {
    /// Samples from `logits` and emits the text it completes; `Some` when the sequence is done.
    pub(super) fn on_logits(
        &mut self,
        logits: &[f32],
        backend: &B,
        metrics: &Metrics,
    ) -> Result<Option<FinishReason>, BackendError> {
        let sampled = match &mut self.constraint {
            None => self.sampler.sample(logits)?,
            Some(constraint) => {
                let mut masked = logits.to_vec();
                constraint
                    .mask_logits(&mut masked)
                    .map_err(BackendError::new)?;
                let sampled = self.sampler.sample(&masked)?;
                constraint.commit(sampled.id).map_err(BackendError::new)?;
                sampled
            }
        };
        let now = Instant::now();
        if self.usage.completion_tokens == 0 {
            metrics
                .time_to_first_token
                .observe((now - self.arrived).as_secs_f64());
        } else {
            metrics
                .inter_token_latency
                .observe((now - self.last_token_at).as_secs_f64());
        }
        self.last_token_at = now;
        self.usage.completion_tokens += 1;
        metrics.generation_tokens.inc();

        if backend.stop_token_ids().contains(&sampled.id) {
            self.emit_rest(backend);
            return Ok(Some(FinishReason::Stop));
        }
        self.last_token = sampled.id;
        self.generated.push(sampled.id);
        if self.want_logprobs {
            let text = |id: u32| backend.decode_text(&[id]);
            self.pending_logprobs.push(TokenLogprob {
                token: text(sampled.id),
                bytes: backend.token_bytes(sampled.id),
                logprob: sampled.logprob,
                top: sampled
                    .top_logprobs
                    .iter()
                    .map(|&(id, logprob)| (text(id), backend.token_bytes(id), logprob))
                    .collect(),
            });
        }
        let delta =
            self.detokenizer
                .push_token(sampled.id, backend.is_byte_token(sampled.id), |ids| {
                    backend.decode_text(ids)
                });
        let out = self.stops.push(&delta);
        let text = out.text;
        if out.stopped {
            self.emit(text, true);
            return Ok(Some(FinishReason::Stop));
        }
        // A grammar that admits no further token: done without another step.
        if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            self.emit(text, false);
            self.emit_rest(backend);
            return Ok(Some(FinishReason::Stop));
        }
        if self.usage.completion_tokens >= self.max_new_tokens {
            self.emit(text, false);
            return Ok(Some(if self.emit_rest(backend) {
                FinishReason::Stop
            } else {
                FinishReason::Length
            }));
        }
        self.emit(text, false);
        Ok(None)
    }

    /// Emits the text still held by the detokenizer and the stop matcher; true if it completed a
    /// stop string after all.
    fn emit_rest(&mut self, backend: &B) -> bool {
        let delta = self.detokenizer.flush(|ids| backend.decode_text(ids));
        let out = self.stops.push(&delta);
        let mut text = out.text;
        if !out.stopped {
            text.push_str(&self.stops.finish());
        }
        self.emit(text, true);
        out.stopped
    }

    fn emit(&mut self, text: String, last: bool) {
        // An empty delta is only worth sending to deliver the last tokens' logprobs.
        let flush_logprobs = last && !self.pending_logprobs.is_empty();
        if text.is_empty() && !flush_logprobs {
            return;
        }
        if let Some(diagnosis) = &mut self.diagnosis {
            diagnosis.answer.push_str(&text);
        }
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        // A closed receiver is noticed before the next step (`drop_disconnected`).
        let _ = self.events.send(Event::Delta { text, logprobs });
    }

    pub(super) fn finish(mut self, reason: FinishReason, metrics: &Metrics, firehose: &Firehose) {
        metrics.running.dec();
        metrics
            .request_duration
            .observe(self.arrived.elapsed().as_secs_f64());
        if let Some(diagnosis) = self.diagnosis.take() {
            let generated = self.usage.completion_tokens > 0;
            diagnosis.complete(&self.request_id, generated, metrics, firehose, &self.events);
        }
        tracing::debug!(request_id = %self.request_id, ?reason, completion_tokens = self.usage.completion_tokens, "finished");
        let _ = self.events.send(Event::Finished {
            reason,
            usage: self.usage,
        });
    }

    pub(super) fn fail(self, error: GenerationError, metrics: &Metrics) {
        metrics.running.dec();
        let _ = self.events.send(Event::Failed(error));
    }
}
