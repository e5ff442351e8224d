//! One sequence in the running batch: its sampler, detokenizer, stop matcher and the events it
//! sends; what happens to a sampled token.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::OwnedSemaphorePermit;

use model::sampling::{SampledToken, StopMatcher};
use model::tokenizer::IncrementalDetokenizer;

use super::plan::{DiagnosePlan, Diagnosis};
use super::request::Prompt;
use super::{Event, FinishReason, GenerationError, Sibling, TokenLogprob, Usage};
use crate::backend::{BackendError, ModelBackend, SequenceCache, TokenSampler};
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
    /// Kept for a recompute after a preemption (images included); shared by a request's choices.
    pub(super) prompt: Arc<Prompt>,
    /// The request's other choices while its prompt is prefilled (then they are split off).
    pub(super) siblings: Vec<Sibling>,
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
    pub(super) pending_logprobs: PendingLogprobs,
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

/// Logprobs not sent yet, and what was sent, to keep them spelling the content when a stop string
/// cuts it.
#[derive(Default)]
pub(super) struct PendingLogprobs {
    entries: Vec<TokenLogprob>,
    /// Bytes of the entries sent so far.
    sent_entry_bytes: usize,
    /// Bytes of the text sent so far.
    sent_text_bytes: usize,
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
    /// Splits the request's other choices off this one, whose prompt has just been prefilled:
    /// each shares every KV block (copy-on-write), starts from the same grammar state, and
    /// samples with the request's seed plus its index (a fresh random seed without one).
    pub(super) fn split_choices(&mut self, backend: &B) -> Vec<Sequence<B>> {
        let params = self.sampler.params().clone();
        std::mem::take(&mut self.siblings)
            .into_iter()
            .map(|sibling| {
                let mut params = params.clone();
                params.seed = params
                    .seed
                    .map(|seed| seed.wrapping_add(sibling.index as u64));
                Sequence {
                    request_id: self.request_id.clone(),
                    events: sibling.events,
                    _permit: sibling.permit,
                    cache: self.cache.fork(),
                    sampler: backend.sampler(&params, &self.prompt.token_ids),
                    constraint: self.constraint.clone(),
                    prompt: self.prompt.clone(),
                    siblings: Vec::new(),
                    diagnose: self.diagnose.clone(),
                    prefix_hashes: self.prefix_hashes.clone(),
                    phase: self.phase,
                    generated: Vec::new(),
                    last_token: 0,
                    max_new_tokens: self.max_new_tokens,
                    detokenizer: IncrementalDetokenizer::new(),
                    // Nothing was fed to the first choice's matcher yet.
                    stops: self.stops.clone(),
                    want_logprobs: self.want_logprobs,
                    pending_logprobs: Default::default(),
                    usage: self.usage,
                    arrived: self.arrived,
                    last_token_at: self.last_token_at,
                    // The diagnosis (of the shared prompt) is judged on the first choice.
                    diagnosis: None,
                }
            })
            .collect()
    }

    /// Every client of this sequence (its choice and those not split off yet) went away.
    pub(super) fn abandoned(&self) -> bool {
        super::abandoned(&self.events, &self.siblings)
    }

    /// Samples from `logits` and emits the text it completes; `Some` when the sequence is done.
    ///
    /// Stopping follows vLLM: EOS (unless `ignore_eos`) and `stop_token_ids` end the sequence
    /// without their text (with it under `include_stop_str_in_output`), and neither they nor stop
    /// strings end it before `min_tokens` tokens have been generated (the sampler masks the stop
    /// tokens until then; stop strings count from the next token on).
    pub(super) fn on_logits(
        &mut self,
        logits: &[f32],
        backend: &B,
        metrics: &Metrics,
    ) -> Result<Option<FinishReason>, BackendError> {
        let sampled = self.draw(logits)?;
        self.on_sampled(sampled, backend, metrics)
    }

    /// Draws the next token from `logits` (the constraint's mask applied, the token committed
    /// to it): the part of a step that reads the whole vocabulary, and touches nothing but this
    /// sequence's sampler and constraint, so a batch's draws can run in parallel.
    pub(super) fn draw(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError> {
        draw(&mut self.sampler, &mut self.constraint, logits)
    }

    /// The spec of a draw the backend may make on its device this step: none under a
    /// constraint (its mask is applied on the host) or a logit processor.
    pub(super) fn device_draw(&mut self) -> Option<model::sampling::DrawSpec> {
        match self.constraint {
            Some(_) => None,
            None => self.sampler.device_draw(),
        }
    }

    /// The parts [`Sequence::draw`] uses, borrowed apart from the rest of the sequence.
    pub(super) fn draw_parts(
        &mut self,
    ) -> (&mut B::Sampler, &mut Option<model::constraint::Constraint>) {
        (&mut self.sampler, &mut self.constraint)
    }

    /// What follows a drawn token: latency metrics, stops, detokenizing and streaming.
    pub(super) fn on_sampled(
        &mut self,
        sampled: SampledToken,
        backend: &B,
        metrics: &Metrics,
    ) -> Result<Option<FinishReason>, BackendError> {
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

        let params = self.sampler.params();
        let (min_tokens, include_stop) = (params.min_tokens, params.include_stop_str_in_output);
        let id = sampled.id;
        let is_eos = !params.ignore_eos && backend.stop_token_ids().contains(&id);
        let is_stop_token = (is_eos || params.stop_token_ids.binary_search(&id).is_ok())
            && self.usage.completion_tokens >= min_tokens;
        // Stop strings count once min_tokens tokens came before (vLLM's `> min_tokens`).
        let armed = self.usage.completion_tokens > min_tokens;
        if is_stop_token {
            let mut text = String::new();
            if include_stop {
                self.record_logprobs(&sampled, backend);
                let decode = self.decoder(backend);
                text = self
                    .detokenizer
                    .push_token(id, backend.is_byte_token(id), decode);
            }
            // vLLM checks no stop string on the step a stop token ends.
            self.emit_rest(backend, text, false);
            return Ok(Some(FinishReason::Stop));
        }
        self.last_token = id;
        self.generated.push(id);
        self.record_logprobs(&sampled, backend);
        let decode = self.decoder(backend);
        let delta = self
            .detokenizer
            .push_token(id, backend.is_byte_token(id), decode);
        let out = self.stops.push_armed(&delta, armed);
        let text = out.text;
        if out.stopped {
            self.emit(text, true, true);
            return Ok(Some(FinishReason::Stop));
        }
        // A grammar that admits no further token: done without another step.
        if self.constraint.as_ref().is_some_and(|c| c.is_finished()) {
            self.emit(text, false, false);
            self.emit_rest(backend, String::new(), armed);
            return Ok(Some(FinishReason::Stop));
        }
        if self.usage.completion_tokens >= self.max_new_tokens {
            self.emit(text, false, false);
            return Ok(Some(if self.emit_rest(backend, String::new(), armed) {
                FinishReason::Stop
            } else {
                FinishReason::Length
            }));
        }
        self.emit(text, false, false);
        Ok(None)
    }

    /// The request's detokenization: special tokens skipped or kept as it says.
    fn decoder<'a>(&self, backend: &'a B) -> impl Fn(&[u32]) -> String + 'a {
        let skip = self.sampler.params().skip_special_tokens;
        move |ids| {
            if skip {
                backend.decode_text(ids)
            } else {
                backend.decode_text_with_special(ids)
            }
        }
    }

    /// Queues the logprobs of `sampled` (asked for), each token's text being what it adds to the
    /// output in context (a SentencePiece `▁help` after a word is `" help"`, not `"help"` as
    /// decoded alone), its bytes those of that text; a byte-fallback piece has its own byte (its
    /// text alone is U+FFFD unless the byte is ASCII). So the bytes of the tokens concatenate to
    /// the output's bytes wherever the generated bytes are valid UTF-8 (an invalid byte run is
    /// U+FFFD per byte in the text, as transformers decodes it, and its raw bytes in `bytes`).
    fn record_logprobs(&mut self, sampled: &SampledToken, backend: &B) {
        if !self.want_logprobs {
            return;
        }
        let mut ids = Vec::with_capacity(1 + sampled.top_logprobs.len());
        ids.push(sampled.id);
        ids.extend(sampled.top_logprobs.iter().map(|&(id, _)| id));
        let texts = self.detokenizer.next_texts(&ids, self.decoder(backend));
        let mut pieces = ids.iter().zip(texts).map(|(&id, text)| {
            if backend.is_byte_token(id) {
                let bytes = backend.token_bytes(id);
                (String::from_utf8_lossy(&bytes).into_owned(), bytes)
            } else {
                let bytes = text.as_bytes().to_vec();
                (text, bytes)
            }
        });
        let (token, bytes) = pieces.next().expect("the sampled token is first");
        let top = pieces
            .zip(&sampled.top_logprobs)
            .map(|((text, bytes), &(_, logprob))| (text, bytes, logprob))
            .collect();
        self.pending_logprobs.entries.push(TokenLogprob {
            token,
            bytes,
            logprob: sampled.logprob,
            top,
        });
    }

    /// Emits `delta` and the text still held by the detokenizer and the stop matcher; true if it
    /// completed a stop string after all (only when `armed`).
    fn emit_rest(&mut self, backend: &B, mut delta: String, armed: bool) -> bool {
        let decode = self.decoder(backend);
        delta.push_str(&self.detokenizer.flush(decode));
        let out = self.stops.push_armed(&delta, armed);
        let mut text = out.text;
        if !out.stopped {
            text.push_str(&self.stops.finish());
        }
        self.emit(text, true, out.stopped);
        out.stopped
    }

    /// Sends `text` with the pending logprobs; `cut`: a stop string ended the output in it, and
    /// the tokens whose text lies wholly past the cut (the stop string's, after it) are left out,
    /// so that the logprobs still spell the content.
    fn emit(&mut self, text: String, last: bool, cut: bool) {
        let pending = &mut self.pending_logprobs;
        if cut {
            let content_end = pending.sent_text_bytes + text.len();
            let mut start = pending.sent_entry_bytes;
            pending.entries.retain(|entry| {
                let keep = start < content_end;
                start += entry.bytes.len();
                keep
            });
        }
        // An empty delta is only worth sending to deliver the last tokens' logprobs.
        let flush_logprobs = last && !pending.entries.is_empty();
        if text.is_empty() && !flush_logprobs {
            return;
        }
        if let Some(diagnosis) = &mut self.diagnosis {
            diagnosis.answer.push_str(&text);
        }
        let logprobs = std::mem::take(&mut pending.entries);
        pending.sent_entry_bytes += logprobs.iter().map(|e| e.bytes.len()).sum::<usize>();
        pending.sent_text_bytes += text.len();
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
        self.notify_failed(error);
    }

    /// Tells the clients of this sequence and of the choices not split off yet that it failed.
    pub(super) fn notify_failed(&self, error: GenerationError) {
        super::notify_failed(&self.events, &self.siblings, error);
    }
}

/// [`Sequence::draw`] on its parts.
pub(super) fn draw<S: TokenSampler>(
    sampler: &mut S,
    constraint: &mut Option<model::constraint::Constraint>,
    logits: &[f32],
) -> Result<SampledToken, BackendError> {
    Ok(match constraint {
        None => sampler.sample(logits)?,
        Some(constraint) => {
            let mut masked = logits.to_vec();
            constraint
                .mask_logits(&mut masked)
                .map_err(BackendError::new)?;
            let sampled = sampler.sample(&masked)?;
            constraint.commit(sampled.id).map_err(BackendError::new)?;
            sampled
        }
    })
}
