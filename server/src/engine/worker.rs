//! The engine thread's loop: receive, drop cancelled, plan the step in KV blocks (room for every
//! decoding sequence, preempting the youngest when there is none), prefill chunks of admitted
//! prompts under the step's token budget, decode one step, repeat.
//!
//! Memory is planned in blocks of the backend's paged KV pool (vLLM's scheduler): a request is
//! admitted only when its prompt's blocks fit beside a small watermark; a decoding sequence that
//! needs a block when none is free preempts the youngest sequence, whose blocks are freed and
//! which is recomputed later from its prompt and the tokens it had generated (so its stream
//! neither repeats nor loses a token); prompts are prefilled in chunks of at most
//! `max_batch_tokens` per step, between decode steps of the running batch; full prompt blocks
//! are shared by content hash (automatic prefix caching).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{self, error::TryRecvError};

use model::kv::{prefix_hashes, KvBlocks};
use model::sampling::{SampledToken, StopMatcher};
use model::tokenizer::IncrementalDetokenizer;
use rayon::prelude::*;

use super::request::Prompt;
use super::sequence::{Phase, Sequence, SequenceDiagnosis};
use super::{Command, EngineConfig, Event, FinishReason, GenerationError, Job, Usage};
use crate::backend::{
    BackendError, ModelBackend, PrefillInput, SequenceCache, StepRow, TokenSampler,
};
use crate::firehose::Firehose;
use crate::metrics::Metrics;

/// A request waiting for blocks: new (with its prompt's shareable prefix hashes, computed once
/// on arrival: they hash every pixel), or preempted (its generation so far kept).
enum Waiting<B: ModelBackend> {
    New(Box<Job>, Vec<u64>),
    Resumed(Box<Sequence<B>>),
}

impl<B: ModelBackend> Waiting<B> {
    /// Every client of the request went away.
    fn abandoned(&self) -> bool {
        match self {
            Waiting::New(job, _) => job.abandoned(),
            Waiting::Resumed(seq) => seq.abandoned(),
        }
    }

    /// Tells every client of the request that it failed.
    fn reject(&self, error: GenerationError) {
        match self {
            Waiting::New(job, _) => job.reject(error),
            Waiting::Resumed(seq) => seq.notify_failed(error),
        }
    }

    /// Sequences the request needs in the batch: its choices not split off yet, or one.
    fn sequences(&self) -> usize {
        1 + match self {
            Waiting::New(job, _) => job.siblings.len(),
            Waiting::Resumed(seq) => seq.siblings.len(),
        }
    }
}

pub(super) struct Worker<B: ModelBackend> {
    backend: B,
    kv: KvBlocks,
    config: EngineConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    metrics: Arc<Metrics>,
    firehose: Arc<Firehose>,
    waiting: VecDeque<Waiting<B>>,
    /// Admitted sequences, oldest first (the last is the first to be preempted).
    running: Vec<Sequence<B>>,
    /// The choices of a request of several, split off in this step: they join `running` at its
    /// end, so that their first writes (copies of the blocks they share) get room from
    /// `reserve_decode_room` like every other write, before later admissions can take it.
    joining: Vec<Sequence<B>>,
    /// Set once shutdown began: running sequences are cut when it passes.
    deadline: Option<Instant>,
    /// Prefix-cache counters already exported.
    prefix_seen: model::kv::PrefixStats,
}

impl<B: ModelBackend> Worker<B> {
    pub(super) fn new(
        backend: B,
        config: EngineConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        metrics: Arc<Metrics>,
        firehose: Arc<Firehose>,
    ) -> Self {
        let kv = backend.kv_blocks();
        Self {
            backend,
            kv,
            config,
            commands,
            metrics,
            firehose,
            waiting: VecDeque::new(),
            running: Vec::new(),
            joining: Vec::new(),
            deadline: None,
            prefix_seen: Default::default(),
        }
    }

    pub(super) fn run(mut self) {
        let pool = self.kv.config();
        tracing::info!(
            max_num_seqs = self.config.max_num_seqs,
            max_waiting = self.config.max_waiting,
            max_batch_tokens = self.config.max_batch_tokens,
            kv_blocks = pool.num_blocks,
            block_size = pool.block_size,
            "engine started"
        );
        self.export_kv();
        while self.receive() {
            self.drop_disconnected();
            self.cut_at_deadline();
            self.step();
            self.export_kv();
        }
        // Submissions that raced with shutdown are answered rather than dropped unanswered.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Submit(job) = command {
                self.metrics.waiting.dec();
                job.reject(GenerationError::ShuttingDown);
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
                    job.reject(GenerationError::ShuttingDown);
                }
                Command::Submit(job) => {
                    let hashes = shareable_hashes(&job, self.kv.config().block_size);
                    self.waiting.push_back(Waiting::New(job, hashes));
                }
                Command::Shutdown { deadline } => {
                    tracing::info!(
                        running = self.running.len(),
                        waiting = self.waiting.len(),
                        "engine shutting down"
                    );
                    self.deadline = Some(deadline);
                    // New requests are refused; preempted ones were running and may finish
                    // within the grace period like the others.
                    let metrics = &self.metrics;
                    self.waiting.retain(|w| match w {
                        Waiting::New(job, _) => {
                            metrics.waiting.dec();
                            job.reject(GenerationError::ShuttingDown);
                            false
                        }
                        Waiting::Resumed(_) => true,
                    });
                }
            }
        }
    }

    /// Frees the slots (and blocks) of requests whose client went away (their event receiver
    /// was dropped).
    fn drop_disconnected(&mut self) {
        let metrics = &self.metrics;
        self.waiting.retain(|w| {
            let gone = w.abandoned();
            if gone {
                metrics.waiting.dec();
                metrics.client_disconnects.inc();
                tracing::info!("client disconnected while waiting");
            }
            !gone
        });
        self.running.retain(|seq| {
            let gone = seq.abandoned();
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
            for w in self.waiting.drain(..) {
                self.metrics.waiting.dec();
                w.reject(GenerationError::ShuttingDown);
            }
        }
    }

    /// The KV gauges and prefix-cache counters, from the pool's allocator.
    fn export_kv(&mut self) {
        let pool = self.kv.lock();
        let (used, total) = (pool.used(), pool.config().num_blocks);
        let stats = pool.prefix_stats();
        let block_size = pool.config().block_size as u64;
        drop(pool);
        self.metrics.kv_blocks_used.set(used as i64);
        self.metrics.kv_blocks_free.set((total - used) as i64);
        self.metrics
            .kv_cache_usage
            .set(used as f64 / total.max(1) as f64);
        let seen = self.prefix_seen;
        self.metrics
            .prefix_cache_queries
            .inc_by((stats.queried - seen.queried) * block_size);
        self.metrics
            .prefix_cache_hits
            .inc_by((stats.hit - seen.hit) * block_size);
        self.prefix_seen = stats;
    }

    /// Blocks kept free beyond an admitted prompt's, so that running sequences can still grow
    /// a little (vLLM's 1 % watermark).
    fn watermark(&self) -> usize {
        self.kv.config().num_blocks.div_ceil(100)
    }

    /// One scheduler step: room for the decode batch, prefill chunks, admissions, one decode.
    fn step(&mut self) {
        self.reserve_decode_room();
        let decoding = self
            .running
            .iter()
            .filter(|s| s.phase == Phase::Decode)
            .count();
        // At least one prompt token per step, so that prompts progress even under a full batch.
        // With nothing decoding there is no stream to keep flowing: prompts then go in chunks of
        // at least `idle_batch_tokens` (each chunk streams the weights once more).
        let mut budget = match decoding {
            0 => self
                .config
                .max_batch_tokens
                .max(self.config.idle_batch_tokens),
            _ => self.config.max_batch_tokens.saturating_sub(decoding).max(1),
        };
        let mut prefilled_any = false;
        // Sequences already admitted continue their prompts, oldest first.
        let running = std::mem::take(&mut self.running);
        for seq in running {
            if budget == 0 || seq.phase == Phase::Decode {
                self.running.push(seq);
                continue;
            }
            if let Some(seq) = self.prefill_step(seq, &mut budget, &mut prefilled_any) {
                self.running.push(seq);
            }
        }
        self.admit(&mut budget, &mut prefilled_any);
        if self.running.iter().any(|s| s.phase == Phase::Decode) {
            self.decode_step();
        }
        self.running.append(&mut self.joining);
    }

    /// Every decoding sequence gets room for its next token (and a block for the copy when it
    /// writes into a block it shares with other choices of its request); where the pool has
    /// none, the youngest sequence is preempted (possibly the one asking), until it fits.
    fn reserve_decode_room(&mut self) {
        // Free blocks the step's copy-on-write writes will take (an upper bound: the last
        // holder of a shared block writes in place).
        let mut copies = 0;
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].phase != Phase::Decode {
                i += 1;
                continue;
            }
            let len = self.running[i].cache.len();
            let table = self.running[i].cache.table_mut();
            let shared = table.shared_blocks(len..len + 1);
            let fits = self.kv.lock().available() >= copies + shared + table.blocks_needed(len + 1);
            if fits && table.reserve(len + 1).is_ok() {
                copies += shared;
                i += 1;
                continue;
            }
            // No room: the youngest goes back to the queue. When that is this sequence, it
            // waits too, and the loop ends with the older ones served.
            let victim = self.running.pop().expect("running holds sequence i");
            self.preempt(victim);
        }
    }

    /// Frees `seq`'s blocks and queues it at the front, to be recomputed from its prompt and
    /// generated tokens when blocks are free again.
    fn preempt(&mut self, mut seq: Sequence<B>) {
        self.metrics.preemptions.inc();
        self.metrics.running.dec();
        self.metrics.waiting.inc();
        tracing::info!(
            request_id = %seq.request_id,
            generated = seq.generated.len(),
            "preempted: KV cache full, recomputed later"
        );
        seq.cache = self.backend.new_cache();
        seq.phase = Phase::Prefill {
            target: seq.prompt.len() + seq.generated.len().saturating_sub(1),
            diagnosed: seq.diagnose.is_some(),
        };
        self.waiting.push_front(Waiting::Resumed(Box::new(seq)));
    }

    /// Blocks a waiting request takes out of the available ones when admitted: its whole
    /// prefill and first decode token, less the prefix blocks it reuses (those no one holds are
    /// taken too), a block for each further choice's first token (a copy of the prompt's last
    /// block, or a new one), plus room for a diagnosed request's caption passes.
    fn blocks_to_admit(&self, w: &Waiting<B>) -> (usize, usize) {
        let block_size = self.kv.config().block_size;
        let (tokens, hashes, extra) = match w {
            Waiting::New(job, hashes) => {
                let prompt = &job.request.prompt;
                let extra = job
                    .request
                    .diagnose
                    .as_ref()
                    .map_or(0, |plan| caption_tokens(plan, prompt));
                (prompt.len() + 1, hashes.as_slice(), extra)
            }
            Waiting::Resumed(seq) => {
                let Phase::Prefill { target, .. } = seq.phase else {
                    unreachable!("a waiting sequence is prefilling")
                };
                let extra = seq
                    .diagnose
                    .as_ref()
                    .map_or(0, |plan| caption_tokens(plan, &seq.prompt));
                (target + 1, seq.prefix_hashes.as_slice(), extra)
            }
        };
        let (cached, idle) = self.kv.lock().cached_prefix(hashes);
        (
            tokens.div_ceil(block_size) - cached + idle + w.sequences() - 1,
            extra.div_ceil(block_size),
        )
    }

    /// Admits waiting requests, oldest first (preempted ones are at the front), while there
    /// are sequence slots, step budget and free blocks, and runs their first prefill chunk.
    fn admit(&mut self, budget: &mut usize, prefilled_any: &mut bool) {
        loop {
            let in_batch = self.running.len() + self.joining.len();
            let Some(front) = self.waiting.front() else {
                break;
            };
            // A request's choices join the batch together (validation keeps `n` within
            // `max_num_seqs`; alone, a request always goes).
            if *budget == 0
                || (in_batch > 0 && in_batch + front.sequences() > self.config.max_num_seqs)
            {
                break;
            }
            if self.deadline.is_some() && matches!(front, Waiting::New(..)) {
                break;
            }
            let (need, extra) = self.blocks_to_admit(front);
            let available = self.kv.lock().available();
            // The watermark and a diagnosed request's room for its caption passes only hold a
            // request back while others run: alone, a request that fits the pool (validation
            // checks it) always goes, so the queue cannot stall on it.
            let reserve = match in_batch {
                0 => 0,
                _ => self.watermark() + extra,
            };
            if need + reserve > available {
                break;
            }
            let seq = match self.waiting.pop_front().expect("front exists") {
                Waiting::New(job, hashes) => self.start(*job, hashes),
                Waiting::Resumed(seq) => *seq,
            };
            self.metrics.waiting.dec();
            // Counted as running from here; every way out of the batch uncounts it before
            // telling the client, so the gauge is never behind what a client has seen.
            self.metrics.running.inc();
            let Some(seq) = self.place(seq) else {
                break;
            };
            if let Some(seq) = self.prefill_step(seq, budget, prefilled_any) {
                self.running.push(seq);
            }
        }
    }

    /// A new request becomes a sequence (not yet in the batch).
    fn start(&mut self, job: Job, prefix_hashes: Vec<u64>) -> Sequence<B> {
        let Job {
            request,
            events,
            permit,
            siblings,
        } = job;
        self.metrics
            .queue_time
            .observe(request.arrived.elapsed().as_secs_f64());
        let prompt = Arc::new(request.prompt);
        Sequence {
            request_id: request.request_id,
            sampler: self.backend.sampler(&request.sampling, &prompt.token_ids),
            constraint: request.constraint,
            want_logprobs: request.sampling.logprobs,
            events,
            _permit: permit,
            cache: self.backend.new_cache(),
            phase: Phase::Prefill {
                target: prompt.len(),
                diagnosed: request.diagnose.is_some(),
            },
            diagnose: request.diagnose,
            prefix_hashes,
            generated: Vec::new(),
            last_token: 0,
            max_new_tokens: request.stopping.max_new_tokens,
            detokenizer: IncrementalDetokenizer::new(),
            stops: StopMatcher::new(request.stopping.stop)
                .including_stop(request.sampling.include_stop_str_in_output),
            pending_logprobs: Default::default(),
            usage: Usage {
                prompt_tokens: prompt.token_ids.len(),
                completion_tokens: 0,
                image_tokens: prompt.image_tokens(),
            },
            prompt,
            siblings,
            arrived: request.arrived,
            last_token_at: Instant::now(),
            diagnosis: None,
        }
    }

    /// Gives an admitted sequence its blocks: the cached prefix it can reuse, then the rest of
    /// its prefill and its first decode token. `None` if they are not there after all (checked
    /// at admission, so it should not happen): it goes back to the front of the queue.
    fn place(&mut self, mut seq: Sequence<B>) -> Option<Sequence<B>> {
        let Phase::Prefill { target, .. } = seq.phase else {
            return Some(seq);
        };
        if !seq.prefix_hashes.is_empty() && seq.cache.is_empty() {
            seq.cache.reuse_prefix(&seq.prefix_hashes);
        }
        match seq.cache.table_mut().reserve(target + 1) {
            Ok(()) => Some(seq),
            Err(err) => {
                tracing::warn!(request_id = %seq.request_id, error = %err, "admitted without room; waiting again");
                seq.cache = self.backend.new_cache();
                self.metrics.running.dec();
                self.metrics.waiting.inc();
                self.waiting.push_front(Waiting::Resumed(Box::new(seq)));
                None
            }
        }
    }

    /// Runs the next prefill chunk of `seq` within `budget` (the diagnosed pass whole); when
    /// its prefill is complete it samples the first token (a new request) or rejoins the
    /// decode batch (a recomputed one). `None` once it has ended.
    fn prefill_step(
        &mut self,
        mut seq: Sequence<B>,
        budget: &mut usize,
        prefilled_any: &mut bool,
    ) -> Option<Sequence<B>> {
        let Phase::Prefill { target, diagnosed } = seq.phase else {
            return Some(seq);
        };
        let start = seq.cache.len();
        // A diagnosed pass covers the prompt (its taps and interventions, chunk by chunk); the
        // tokens generated before a preemption follow as plain chunks.
        let end = match diagnosed {
            true => seq.prompt.len(),
            false => target,
        }
        .min(start + *budget);
        if end <= start {
            return Some(seq);
        }
        *budget -= end - start;
        *prefilled_any = true;
        if diagnosed {
            return self.diagnosed_prefill(seq, end);
        }
        let started = Instant::now();
        let generated = seq.generated.len().saturating_sub(1);
        let backend = &mut self.backend;
        let result = {
            let input = PrefillInput {
                prompt: &seq.prompt,
                generated: &seq.generated[..generated],
            };
            let cache = &mut seq.cache;
            catch_unwind(AssertUnwindSafe(|| backend.prefill(&input, end, cache)))
                .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))))
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                tracing::error!(request_id = %seq.request_id, error = %err, "prefill failed");
                seq.fail(GenerationError::Internal(err.0), &self.metrics);
                return None;
            }
        };
        tracing::debug!(
            request_id = %seq.request_id,
            positions = end - start,
            prefill_ms = started.elapsed().as_millis() as u64,
            "prefill chunk"
        );
        if end < target {
            return Some(seq);
        }
        seq.phase = Phase::Decode;
        if !seq.prefix_hashes.is_empty() {
            seq.cache.table().publish(&seq.prefix_hashes);
        }
        if !seq.generated.is_empty() {
            // Recomputed after a preemption: its next input is the token it last sampled.
            return Some(seq);
        }
        self.count_prompt(&seq.prompt);
        match logits {
            Some(logits) => self.first_tokens(seq, &logits),
            // `max_tokens: 0` needs none.
            None if seq.max_new_tokens == 0 => self.first_tokens(seq, &[]),
            None => {
                seq.fail(
                    GenerationError::Internal("the last prefill chunk gave no logits".into()),
                    &self.metrics,
                );
                None
            }
        }
    }

    /// A new request's prompt is prefilled: its other choices split off, and every choice
    /// samples its first token from `logits`. Returns the first choice if it goes on (and the
    /// request has one choice: several join the batch after this step).
    fn first_tokens(&mut self, mut seq: Sequence<B>, logits: &[f32]) -> Option<Sequence<B>> {
        let choices = seq.split_choices(&self.backend);
        if choices.is_empty() {
            return self.first_token(seq, logits);
        }
        self.metrics.running.add(choices.len() as i64);
        for choice in std::iter::once(seq).chain(choices) {
            if let Some(choice) = self.first_token(choice, logits) {
                self.joining.push(choice);
            }
        }
        None
    }

    fn first_token(&self, seq: Sequence<B>, logits: &[f32]) -> Option<Sequence<B>> {
        // `max_tokens: 0` (an echoed completion, the diagnose endpoint): the prompt pass was the
        // whole request.
        if seq.max_new_tokens == 0 {
            self.finish(seq, FinishReason::Length);
            return None;
        }
        self.advance(seq, logits)
    }

    fn count_prompt(&self, prompt: &Prompt) {
        self.metrics.prompt_tokens.inc_by(prompt.len() as u64);
        self.metrics
            .image_tokens
            .inc_by(prompt.image_tokens() as u64);
        self.metrics.images.inc_by(prompt.images.len() as u64);
    }

    /// A chunk of the diagnosed prompt pass, up to `end`. Once the prompt is done, a new request
    /// delivers its diagnosis and samples the first token; one recomputed after a preemption
    /// has only refilled its cache (the same interventions), and the tokens it had generated
    /// are prefilled after it.
    fn diagnosed_prefill(&mut self, mut seq: Sequence<B>, end: usize) -> Option<Sequence<B>> {
        let plan = seq
            .diagnose
            .clone()
            .expect("a diagnosed sequence has a plan");
        let started = Instant::now();
        let backend = &mut self.backend;
        let (prompt, cache) = (&seq.prompt, &mut seq.cache);
        let result = catch_unwind(AssertUnwindSafe(|| {
            backend.prefill_diagnosed(prompt, &plan, end, cache)
        }))
        .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))));
        let (logits, diagnosis) = match result {
            Ok(Some(out)) => out,
            Ok(None) => return Some(seq),
            Err(err) => {
                tracing::error!(request_id = %seq.request_id, error = %err, "prefill failed");
                seq.fail(GenerationError::Internal(err.0), &self.metrics);
                return None;
            }
        };
        tracing::debug!(
            request_id = %seq.request_id,
            prompt_tokens = seq.prompt.len(),
            last_chunk_ms = started.elapsed().as_millis() as u64,
            "prefilled with diagnostics"
        );
        let Phase::Prefill { target, .. } = seq.phase else {
            unreachable!("prefilling")
        };
        if !seq.generated.is_empty() {
            seq.phase = match target > seq.prompt.len() {
                true => Phase::Prefill {
                    target,
                    diagnosed: false,
                },
                false => Phase::Decode,
            };
            return Some(seq);
        }
        seq.phase = Phase::Decode;
        self.count_prompt(&seq.prompt);
        if plan.deliver {
            let _ = seq
                .events
                .send(Event::Diagnosed(Box::new(diagnosis.clone())));
        }
        seq.diagnosis = Some(Box::new(SequenceDiagnosis {
            plan,
            diagnosis,
            answer: String::new(),
        }));
        self.first_tokens(seq, &logits)
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
        self.settled(seq, stepped)
    }

    /// [`Worker::advance`] for a token already drawn (or a failed draw).
    fn settle(
        &self,
        mut seq: Sequence<B>,
        drawn: Result<SampledToken, BackendError>,
    ) -> Option<Sequence<B>> {
        let stepped = drawn.and_then(|sampled| {
            catch_unwind(AssertUnwindSafe(|| {
                seq.on_sampled(sampled, &self.backend, &self.metrics)
            }))
            .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))))
        });
        self.settled(seq, stepped)
    }

    fn settled(
        &self,
        seq: Sequence<B>,
        stepped: Result<Option<FinishReason>, BackendError>,
    ) -> Option<Sequence<B>> {
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

    /// One decode step for the sequences in the decode phase (room for each was reserved).
    fn decode_step(&mut self) {
        let (mut batch, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.phase == Phase::Decode);
        let tokens: Vec<u32> = batch.iter().map(|seq| seq.last_token).collect();
        self.metrics.batch_size.observe(tokens.len() as f64);
        // Each draw's random number is taken now, whichever side then draws.
        let specs: Vec<_> = batch.iter_mut().map(|seq| seq.device_draw()).collect();
        let backend = &mut self.backend;
        let mut caches: Vec<&mut B::Cache> = batch.iter_mut().map(|seq| &mut seq.cache).collect();
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            backend.decode_batch_sampled(&tokens, &mut caches, &specs)
        }))
        .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))));
        drop(caches);
        // The batch keeps its age order: prefilling sequences are younger than most decoding
        // ones, but preemption only needs "youngest last" approximately, so the prefilling ones
        // go after.
        self.running = rest;
        let rows = match result {
            Ok(rows) if rows.len() == tokens.len() => rows,
            Ok(rows) => {
                return self.fail_batch(
                    batch,
                    BackendError(format!(
                        "decode_batch returned {} rows for {} sequences",
                        rows.len(),
                        tokens.len()
                    )),
                )
            }
            Err(err) => return self.fail_batch(batch, err),
        };
        let sampling = Instant::now();
        let stage = |name: &str| self.metrics.decode_step.with_label_values(&[name]);
        stage("forward").observe((sampling - started).as_secs_f64());
        // Each draw reads the whole vocabulary (an f64 log-normaliser, the draw): ~0.3 ms a
        // sequence, which at 64 sequences would outlast a GPU's step; they run in parallel, each
        // under its own panic guard, and the rest of each step in batch order.
        let mut parts: Vec<_> = batch.iter_mut().map(|seq| seq.draw_parts()).collect();
        let draws: Vec<Result<SampledToken, BackendError>> = parts
            .par_iter_mut()
            .zip(rows.par_iter().zip(specs.par_iter()))
            .with_min_len(4)
            .map(|((sampler, constraint), (row, spec))| {
                catch_unwind(AssertUnwindSafe(|| match (row, spec) {
                    (StepRow::Sampled(token), Some(_)) => {
                        sampler.accept(token);
                        Ok(token.clone())
                    }
                    // A grammar or a logit processor needs the host's draw.
                    (StepRow::Sampled(_), None) => Err(BackendError::new(
                        "the backend sampled a row that the engine keeps on the host",
                    )),
                    (StepRow::Logits(logits), Some(spec)) => sampler.sample_with(logits, spec),
                    (StepRow::Logits(logits), None) => {
                        super::sequence::draw(&mut **sampler, constraint, logits)
                    }
                }))
                .unwrap_or_else(|panic| Err(BackendError::new(panic_message(&panic))))
            })
            .collect();
        drop(parts);
        let mut decoded = Vec::with_capacity(batch.len());
        for (seq, drawn) in batch.into_iter().zip(draws) {
            if let Some(seq) = self.settle(seq, drawn) {
                decoded.push(seq);
            }
        }
        self.metrics
            .decode_step
            .with_label_values(&["sample"])
            .observe(sampling.elapsed().as_secs_f64());
        decoded.append(&mut self.running);
        self.running = decoded;
    }

    /// A failed decode step loses the sequences in it (their caches are in an unknown state);
    /// prefilling and waiting requests are unaffected.
    fn fail_batch(&mut self, batch: Vec<Sequence<B>>, err: BackendError) {
        tracing::error!(error = %err, sequences = batch.len(), "decode step failed");
        for seq in batch {
            seq.fail(GenerationError::Internal(err.0.clone()), &self.metrics);
        }
    }
}

/// The prefix hashes of a request's prompt blocks that may be shared: every full block before
/// the last prompt position (which is always computed, for its logits), images' pixels mixed
/// into the blocks they cover. A diagnosed request neither shares nor publishes: its taps need
/// every position computed, and its interventions change the states of later layers.
fn shareable_hashes(job: &Job, block_size: usize) -> Vec<u64> {
    let request = &job.request;
    if request.diagnose.is_some() {
        return Vec::new();
    }
    prompt_hashes(&request.prompt, block_size)
}

fn prompt_hashes(prompt: &Prompt, block_size: usize) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let image_hashes: Vec<u64> = prompt
        .images
        .iter()
        .map(|img| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            img.pixel_values.len().hash(&mut h);
            for x in &img.pixel_values {
                x.to_bits().hash(&mut h);
            }
            img.image_size.hash(&mut h);
            h.finish()
        })
        .collect();
    let shareable = prompt.len().saturating_sub(1);
    prefix_hashes(&prompt.token_ids[..shareable], block_size, |blk| {
        // The images whose positions this block holds.
        let mut h = 0u64;
        for (span, ih) in prompt.image_spans.iter().zip(&image_hashes) {
            if span.start < blk.end && blk.start < span.end {
                h = h.rotate_left(7) ^ ih;
            }
        }
        h
    })
}

/// Tokens a diagnosed request's caption passes may hold in the pool beside its prompt: the
/// caption prompt, and for the model's own caption its describe prompt (about the request's
/// length) and the caption generated.
fn caption_tokens(plan: &super::plan::DiagnosePlan, prompt: &Prompt) -> usize {
    use super::plan::CaptionPlan;
    match &plan.caption {
        CaptionPlan::None => 0,
        CaptionPlan::Given(_) => plan
            .caption_prompt
            .as_ref()
            .map_or(prompt.len(), |c| c.ids.len()),
        CaptionPlan::Model { max_tokens } => 2 * (prompt.len() + max_tokens),
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
