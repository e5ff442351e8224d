//! Logits to tokens: logit bias, penalties, greedy, temperature, top-k, top-p, min-p, seeds,
//! logprobs, and stop strings.
//!
//! Semantics follow the OpenAI API as vLLM implements it (vLLM's `SamplingParams` and its
//! sampler are the reference for every vLLM extension):
//! - The logits of one step go through, in this order: **`logit_bias`** (added to the logits),
//!   the **`min_tokens`** mask (EOS and `stop_token_ids` at −inf while fewer than `min_tokens`
//!   tokens have been generated), the **repetition penalty** (transformers' and vLLM's: every
//!   token of the prompt or of the output so far has its logit divided by the penalty when
//!   positive, multiplied by it otherwise), then the **frequency and presence penalties**
//!   (OpenAI's formula over the output so far: `logit[j] -= count[j] * frequency_penalty +
//!   (count[j] > 0) * presence_penalty`). vLLM applies bias and the `min_tokens` mask before its
//!   penalties, and repetition before frequency/presence, as here.
//! - `temperature` 0 (vLLM: below 1e-5) is greedy: the argmax of the processed logits, lowest id
//!   on ties (`torch.argmax`).
//! - Otherwise the processed logits go through transformers' `LogitsWarper` order:
//!   **temperature, then top-k, then top-p, then min-p**, then one draw from what is left
//!   ([`choose`]: one uniform number against the kept weights' running sum in id order, which a
//!   device can compute with one prefix sum). The order matters for top-p: the nucleus is taken
//!   from the temperature-scaled distribution.
//!   (vLLM's V1 sampler applies min-p before top-k/top-p; the two orders only differ when both
//!   `top_p` < 1 and `min_p` > 0 are set.)
//! - top-k keeps every token whose logit is at least the k-th largest (ties at the boundary kept,
//!   like vLLM's and transformers' threshold masks); `top_k` 0 disables it (vLLM's 0 / −1).
//! - top-p keeps the smallest prefix of the tokens sorted by probability whose mass reaches `top_p`
//!   (vLLM's `probs_sum <= 1 - p` mask on the ascending cumulative sum), always at least one token.
//! - min-p keeps the tokens whose probability is at least `min_p` times that of the most likely
//!   one (vLLM's and transformers' `MinPLogitsWarper`), which is always kept.
//! - `logprob` and `top_logprobs` are taken from the *unmodified* distribution,
//!   `log_softmax(logits)`, before logit bias, penalties, temperature, top-k, top-p and min-p
//!   (vLLM's default `logprobs_mode = "raw_logprobs"`), so they do not depend on the sampling
//!   settings.
//! - A seeded sampler draws the same tokens from the same logits; an unseeded one draws a random
//!   seed (reported by [`Sampler::seed`]). Each sequence owns its sampler, its random stream and
//!   its token counts, so the output does not depend on which other requests share the batch. The
//!   generator is rand 0.9's `StdRng` (ChaCha12); its stream is fixed by the lock file's rand
//!   version.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// vLLM's `_SAMPLING_EPS`: temperatures below it are treated as greedy.
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;
/// OpenAI's (and vLLM's default `max_logprobs`) upper bound on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// OpenAI's upper bound on `temperature`.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// OpenAI's bound on `|presence_penalty|` and `|frequency_penalty|`.
pub const MAX_PENALTY: f32 = 2.0;
/// OpenAI's bound on a `logit_bias` value's magnitude.
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// OpenAI's bound on the number of `logit_bias` entries.
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;

/// One request's sampling settings, already mapped from the OpenAI request fields (vLLM's
/// `SamplingParams`, less `max_tokens` and the stop strings, which the engine's stopping
/// criteria hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy. OpenAI's default is 1.
    pub temperature: f32,
    /// Nucleus mass in [0, 1] (OpenAI's range); 1 disables it, 0 keeps only the most likely
    /// token (the nucleus always holds one).
    pub top_p: f32,
    /// Number of highest logits kept; 0 disables it.
    pub top_k: usize,
    /// In [0, 1]: tokens less likely than `min_p` × the most likely one's probability are
    /// dropped; 0 disables it.
    pub min_p: f32,
    /// In [−2, 2]; subtracted once from the logit of every token the output already holds.
    pub presence_penalty: f32,
    /// In [−2, 2]; subtracted from a token's logit once per time the output already holds it.
    pub frequency_penalty: f32,
    /// Greater than 0; 1 disables it. Over the prompt and the output: positive logits are
    /// divided by it, the others multiplied.
    pub repetition_penalty: f32,
    /// Added to the logits of these ids before anything else, each in [−100, 100]; sorted by
    /// id, at most one entry an id.
    pub logit_bias: Vec<(u32, f32)>,
    /// EOS and `stop_token_ids` cannot be drawn, and stop strings do not match, until this many
    /// tokens have been generated.
    pub min_tokens: usize,
    /// Generation goes on through the model's EOS (it is then an ordinary token).
    pub ignore_eos: bool,
    /// More tokens that end generation, like EOS (even with `ignore_eos`); sorted, unique.
    pub stop_token_ids: Vec<u32>,
    /// The matched stop string (or the text of the stop token) ends the output instead of being
    /// cut from it.
    pub include_stop_str_in_output: bool,
    /// Special tokens (control and added tokens) are left out of the text; `false` keeps them.
    pub skip_special_tokens: bool,
    /// `None` draws a random seed.
    pub seed: Option<u64>,
    /// Return the chosen token's logprob.
    pub logprobs: bool,
    /// Also return this many most likely tokens with their logprobs (0..=20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    /// OpenAI's and vLLM's defaults: temperature 1, top_p 1, no top-k, no min-p, no penalties
    /// (repetition 1), no bias, no seed, no logprobs, special tokens skipped.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            seed: None,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// A sampling setting out of its range: the request field it came from and the client's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSampling {
    /// The OpenAI request field (`temperature`, `top_p`, `top_logprobs`, ...).
    pub param: &'static str,
    pub message: String,
}

impl SamplingParams {
    /// Greedy settings (temperature 0), e.g. for the diagnostics' self-caption pass.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether a draw is the argmax: temperature below vLLM's epsilon, or top-k of 1 (as
    /// [`DrawSpec::is_greedy`]).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS || self.top_k == 1
    }

    /// Whether any logit processor before the draw is active (bias, penalties, `min_tokens`).
    fn processes_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.min_tokens > 0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// The ranges the server enforces (the one definition of them): temperature in
    /// [0, [`MAX_TEMPERATURE`]], top_p and min_p in [0, 1], presence and frequency penalties in
    /// [−[`MAX_PENALTY`], [`MAX_PENALTY`]], repetition_penalty > 0, at most
    /// [`MAX_LOGIT_BIAS_ENTRIES`] logit_bias entries each in
    /// [−[`MAX_LOGIT_BIAS`], [`MAX_LOGIT_BIAS`]], top_logprobs at most [`MAX_TOP_LOGPROBS`] and
    /// only with logprobs. `vocab_size`, when known, bounds the ids of `logit_bias` and
    /// `stop_token_ids`.
    pub fn validate(&self, vocab_size: Option<usize>) -> std::result::Result<(), InvalidSampling> {
        let bad = |param, message: String| Err(InvalidSampling { param, message });
        let within = |x: f32, lo: f32, hi: f32| x.is_finite() && (lo..=hi).contains(&x);
        if !within(self.temperature, 0.0, MAX_TEMPERATURE) {
            return bad(
                "temperature",
                format!(
                    "temperature must be between 0 and {MAX_TEMPERATURE}, got {}",
                    self.temperature
                ),
            );
        }
        if !within(self.top_p, 0.0, 1.0) {
            return bad(
                "top_p",
                format!("top_p must be between 0 and 1, got {}", self.top_p),
            );
        }
        if !within(self.min_p, 0.0, 1.0) {
            return bad(
                "min_p",
                format!("min_p must be between 0 and 1, got {}", self.min_p),
            );
        }
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !within(value, -MAX_PENALTY, MAX_PENALTY) {
                return bad(
                    param,
                    format!(
                        "{param} must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {value}"
                    ),
                );
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be greater than 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS_ENTRIES {
            return bad(
                "logit_bias",
                format!(
                    "logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {}",
                    self.logit_bias.len()
                ),
            );
        }
        if let Some(&(id, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, bias)| !within(*bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS))
        {
            return bad(
                "logit_bias",
                format!(
                    "logit_bias values must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, got {bias} for token {id}"
                ),
            );
        }
        if let Some(vocab) = vocab_size {
            let unknown = |ids: &[u32]| ids.iter().copied().find(|&id| id as usize >= vocab);
            let biased: Vec<u32> = self.logit_bias.iter().map(|b| b.0).collect();
            if let Some(id) = unknown(&biased) {
                return bad(
                    "logit_bias",
                    format!("logit_bias names token {id}, which is not in the model's vocabulary of {vocab} tokens"),
                );
            }
            if let Some(id) = unknown(&self.stop_token_ids) {
                return bad(
                    "stop_token_ids",
                    format!("stop_token_ids names token {id}, which is not in the model's vocabulary of {vocab} tokens"),
                );
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(
                "top_logprobs",
                format!(
                    "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            );
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return bad(
                "top_logprobs",
                "top_logprobs requires logprobs to be true".into(),
            );
        }
        Ok(())
    }
}

/// One sampled token. `logprob` and `top_logprobs` are from the unmodified distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first (ties: lower id first); empty
    /// unless requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Draws tokens for one sequence; owns its settings, its random stream and the token counts the
/// penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    /// Tokens of the prompt (only kept for a repetition penalty).
    prompt: HashSet<u32>,
    /// How often each token occurs in the output so far.
    counts: HashMap<u32, u32>,
    generated: usize,
    /// What `min_tokens` masks: the model's EOS tokens and `stop_token_ids`.
    stop_ids: Vec<u32>,
}

impl Sampler {
    /// Seeds from `params.seed`, or from a fresh random seed when there is none. No prompt and
    /// no EOS: see [`Self::for_sequence`].
    pub fn new(params: SamplingParams) -> Self {
        Self::for_sequence(params, &[], &[])
    }

    /// The sampler of one sequence: `prompt` is what the repetition penalty counts besides the
    /// output, `eos_ids` the model's end tokens that `min_tokens` holds back.
    pub fn for_sequence(params: SamplingParams, prompt: &[u32], eos_ids: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let prompt = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let mut stop_ids: Vec<u32> = eos_ids
            .iter()
            .chain(&params.stop_token_ids)
            .copied()
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Self {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            prompt,
            counts: HashMap::new(),
            generated: 0,
            stop_ids,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the request's, or the one drawn for it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Samples from one row of logits `[V]` (or `[1, V]`), any dtype, any device.
    pub fn sample(&mut self, logits: &Tensor) -> Result<SampledToken> {
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.sample_logits(&row)
    }

    /// Samples the next token of the sequence from one row of logits, and counts it.
    pub fn sample_logits(&mut self, logits: &[f32]) -> Result<SampledToken> {
        let spec = self.next_draw();
        self.sample_logits_with(logits, &spec)
    }

    /// The draw a device can make for this sequence ([`crate::device_sampling`]): `None` when a
    /// logit processor (bias, penalties, `min_tokens`) is active, which needs the host. The
    /// uniform number is taken from the sequence's stream now, so the token then equals
    /// [`Self::sample_logits`]'s from the same logits and seed; the device's token goes back
    /// through [`Self::accept`], or the logits through [`Self::sample_logits_with`].
    pub fn device_draw(&mut self) -> Option<DrawSpec> {
        (!self.params.processes_logits()).then(|| self.next_draw())
    }

    /// Counts a token drawn elsewhere with a spec from [`Self::device_draw`].
    pub fn accept(&mut self, token: &SampledToken) {
        *self.counts.entry(token.id).or_insert(0) += 1;
        self.generated += 1;
    }

    /// [`Self::sample_logits`] with a spec already taken from the stream (a device that handed
    /// the row back to the host).
    pub fn sample_logits_with(&mut self, logits: &[f32], spec: &DrawSpec) -> Result<SampledToken> {
        let log_z = log_normalizer(logits)?;
        let processed;
        let row = if self.params.processes_logits() {
            let mut copy = logits.to_vec();
            self.process(&mut copy);
            processed = copy;
            &processed
        } else {
            logits
        };
        let id = choose(row, spec);
        let logprob = (f64::from(logits[id]) - log_z) as f32;
        let top_logprobs = top_n(logits, spec.top_logprobs)
            .into_iter()
            .map(|i| (i as u32, (f64::from(logits[i]) - log_z) as f32))
            .collect();
        let token = SampledToken {
            id: id as u32,
            logprob,
            top_logprobs,
        };
        self.accept(&token);
        Ok(token)
    }

    /// The next draw's settings; a non-greedy draw takes one number from the stream.
    fn next_draw(&mut self) -> DrawSpec {
        let p = &self.params;
        let mut spec = DrawSpec {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            top_logprobs: p.top_logprobs,
            u: 0.0,
        };
        if !spec.is_greedy() {
            spec.u = self.rng.random::<f64>();
        }
        spec
    }

    /// The logit processors before the draw, in vLLM's order (module docs): bias, the
    /// `min_tokens` mask, the repetition penalty, the frequency and presence penalties.
    fn process(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(x) = logits.get_mut(id as usize) {
                *x += bias;
            }
        }
        if self.generated < p.min_tokens {
            for &id in &self.stop_ids {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            let r = p.repetition_penalty;
            // Each token of prompt ∪ output once (vLLM's mask is the union).
            let output_only = self.counts.keys().filter(|id| !self.prompt.contains(id));
            for &id in self.prompt.iter().chain(output_only) {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x = if *x > 0.0 { *x / r } else { *x * r };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&id, &count) in &self.counts {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x -= count as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }
}

/// The settings of one draw, as a device sampler takes them ([`Sampler::device_draw`]): what is
/// left of [`SamplingParams`] when no logit processor is active, and the draw's uniform number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawSpec {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// How many most likely tokens to report with their logprobs.
    pub top_logprobs: usize,
    /// In [0, 1): where the draw falls in the kept mass; unused (0) by a greedy draw.
    pub u: f64,
}

impl DrawSpec {
    /// The argmax: temperature below vLLM's epsilon, or top-k of 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS || self.top_k == 1
    }
}

/// The token `spec` draws from processed `logits` (finite or −inf): the argmax when greedy;
/// otherwise temperature, top-k, top-p and min-p (module docs) choose the kept tokens, and the
/// token is the first, in id order, at which the kept weights' running sum passes `u` × their
/// total. The draw walks the kept tokens in id order (not by probability) so that a device can
/// make it with one prefix sum; the distribution is the same. This is the definition the device
/// sampler (`device_sampling`) is tested against.
pub fn choose(logits: &[f32], spec: &DrawSpec) -> usize {
    if spec.is_greedy() {
        return argmax(logits);
    }
    let temperature = f64::from(spec.temperature);
    let max = f64::from(logits[argmax(logits)]);
    let k = spec.top_k;
    let threshold = if k > 0 && k < logits.len() {
        kth_largest(logits, k)
    } else {
        f32::NEG_INFINITY
    };
    // Weights exp((x - max) / T): the temperature-scaled softmax, unnormalised.
    let mut candidates: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &x)| x >= threshold && x > f32::NEG_INFINITY)
        .map(|(i, &x)| (i, ((f64::from(x) - max) / temperature).exp()))
        .collect();
    let mut total: f64 = candidates.iter().map(|c| c.1).sum();
    let top_p = f64::from(spec.top_p);
    if top_p < 1.0 {
        let order = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let target = top_p * total;
        // Sort only as long a head of the order as the nucleus needs (usually a few dozen of
        // the 32k): the same prefix, in the same order, as sorting everything.
        let mut head = 64.min(candidates.len());
        let keep = loop {
            if head < candidates.len() {
                candidates.select_nth_unstable_by(head - 1, order);
            }
            candidates[..head].sort_by(order);
            let mut before = 0.0;
            let found = candidates[..head].iter().position(|c| {
                before += c.1;
                before >= target
            });
            match found {
                Some(last) => break last + 1,
                None if head == candidates.len() => break head,
                None => head = (head * 8).min(candidates.len()),
            }
        };
        candidates.truncate(keep.max(1));
        candidates.sort_unstable_by_key(|c| c.0);
        total = candidates.iter().map(|c| c.1).sum();
    }
    let min_p = f64::from(spec.min_p);
    if min_p > 0.0 {
        // The most likely token has weight exp(0) = 1: min-p keeps weights of at least
        // min_p × 1, relative probabilities being unchanged by top-k and top-p's truncation.
        candidates.retain(|c| c.1 >= min_p);
        total = candidates.iter().map(|c| c.1).sum();
    }
    let u = spec.u * total;
    let mut cumulative = 0.0;
    for &(id, w) in &candidates {
        cumulative += w;
        if u < cumulative {
            return id;
        }
    }
    // Rounding can leave u at the very top of the range: the last candidate owns it.
    candidates.last().map_or(0, |c| c.0)
}

/// Samples row b of `logits [B, V]` with the b-th sampler (one device-to-host copy per batch).
pub fn sample_batch<'a>(
    logits: &Tensor,
    samplers: impl IntoIterator<Item = &'a mut Sampler>,
) -> Result<Vec<SampledToken>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let samplers: Vec<&mut Sampler> = samplers.into_iter().collect();
    if samplers.len() != rows.len() {
        return Err(ModelError::Sampling(format!(
            "{} samplers for {} rows of logits",
            samplers.len(),
            rows.len()
        )));
    }
    samplers
        .into_iter()
        .zip(&rows)
        .map(|(s, row)| s.sample_logits(row))
        .collect()
}

/// `log Σ exp(x)` in f64, refusing NaN, +inf, and rows with no finite logit.
fn log_normalizer(logits: &[f32]) -> Result<f64> {
    if let Some(i) = logits
        .iter()
        .position(|x| x.is_nan() || *x == f32::INFINITY)
    {
        return Err(ModelError::Sampling(format!(
            "logit {i} is {} (model fault)",
            logits[i]
        )));
    }
    if logits.is_empty() {
        return Err(ModelError::Sampling("empty logits".into()));
    }
    let max = f64::from(logits[argmax(logits)]);
    if max == f64::NEG_INFINITY {
        return Err(ModelError::Sampling("every logit is -inf".into()));
    }
    Ok(max + crate::cpu::exp_sum(logits, max as f32).ln())
}

/// Index of the largest value, the lowest index on ties (`torch.argmax`'s documented choice).
/// The one argmax of the project: greedy sampling, the model's own caption, the lens.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The k-th largest value (1-based), for top-k's threshold.
fn kth_largest(values: &[f32], k: usize) -> f32 {
    let mut copy = values.to_vec();
    let (_, kth, _) = copy.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// Indices of the n largest values, largest first, lower index first on ties.
pub(crate) fn top_n(values: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_by(order);
    idx
}

/// What [`StopMatcher::push`] lets out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text safe to send now: never part of an excluded stop string, nothing after a stop.
    pub text: String,
    /// A stop string was found; the sequence is finished (finish reason `stop`).
    pub stopped: bool,
}

/// Finds stop strings in streamed text (vLLM's and OpenAI's behaviour: the text is cut before the
/// first occurrence and the stop string is not emitted; with `include_stop_str_in_output`, vLLM's
/// extension, it is cut after the stop string instead). A tail that could be the start of a stop
/// string is held back until the next chunk decides it, so a stop split across chunks (tokens)
/// never leaks its first part; an included stop needs no holding back, only the emitted tail as
/// context.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    include: bool,
    /// Text not emitted yet (excluded stops) or the emitted tail a stop may start in (included
    /// stops).
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (validation refuses them).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include: false,
            held: String::new(),
            stopped: false,
        }
    }

    /// Ends the output with the matched stop string instead of cutting it
    /// (`include_stop_str_in_output`).
    pub fn including_stop(mut self, include: bool) -> Self {
        self.include = include;
        self
    }

    /// Feeds the next piece of decoded text.
    pub fn push(&mut self, chunk: &str) -> StopOutput {
        self.push_armed(chunk, true)
    }

    /// [`Self::push`]; when `armed` is false (vLLM's `min_tokens` not reached yet) no stop string
    /// that ends in this chunk counts. A stop string counts when it ends in an armed chunk, even
    /// if it began earlier (vLLM searches the text from the new characters back by the stop's
    /// length).
    pub fn push_armed(&mut self, chunk: &str, armed: bool) -> StopOutput {
        if self.stopped {
            return StopOutput {
                text: String::new(),
                stopped: true,
            };
        }
        let mut buffer = std::mem::take(&mut self.held);
        // Bytes before the chunk: held text, which holds no complete stop that may still count.
        let floor = buffer.len();
        buffer.push_str(chunk);
        let found = if armed {
            self.stops
                .iter()
                .filter_map(|s| first_ending_after(&buffer, s, floor).map(|at| (at, s.len())))
                .min()
        } else {
            None
        };
        if let Some((at, len)) = found {
            self.stopped = true;
            let text = if self.include {
                buffer[floor..at + len].to_string()
            } else {
                buffer.truncate(at);
                buffer
            };
            return StopOutput {
                text,
                stopped: true,
            };
        }
        if self.include {
            let text = buffer[floor..].to_string();
            let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
            let mut keep = buffer.len().saturating_sub(longest);
            while !buffer.is_char_boundary(keep) {
                keep -= 1;
            }
            self.held = buffer.split_off(keep);
            return StopOutput {
                text,
                stopped: false,
            };
        }
        let hold_from = self.partial_match_start(&buffer);
        self.held = buffer.split_off(hold_from);
        StopOutput {
            text: buffer,
            stopped: false,
        }
    }

    /// Releases the held-back tail when the sequence ends for another reason (EOS, length).
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.held);
        if self.include {
            // Already emitted: it was only context.
            String::new()
        } else {
            held
        }
    }

    /// Text currently held back as a possible start of a stop string.
    pub fn held_back(&self) -> &str {
        if self.include {
            ""
        } else {
            &self.held
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Start of the longest suffix of `text` that is a proper prefix of some stop string.
    fn partial_match_start(&self, text: &str) -> usize {
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        let earliest = text.len().saturating_sub(longest);
        (earliest..text.len())
            .filter(|&i| text.is_char_boundary(i))
            .find(|&i| {
                let tail = &text[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(text.len())
    }
}

/// Start of the first occurrence of `stop` in `text` that ends after byte `floor`.
fn first_ending_after(text: &str, stop: &str, floor: usize) -> Option<usize> {
    let mut from = (floor + 1).saturating_sub(stop.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    while let Some(i) = text[from..].find(stop) {
        let at = from + i;
        if at + stop.len() > floor {
            return Some(at);
        }
        from = at + text[at..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&x| ((x as f64 - max) / temperature).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[sampler.sample_logits(logits).unwrap().id as usize] += 1;
        }
        c
    }

    /// Pearson's chi-square of observed counts against expected probabilities.
    fn chi_square(observed: &[usize], expected: &[f64]) -> f64 {
        let n: usize = observed.iter().sum();
        observed
            .iter()
            .zip(expected)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&o, &p)| {
                let e = p * n as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample_logits(&[0.1, 2.0, -1.0, 1.9]).unwrap().id, 1);
        assert_eq!(s.sample_logits(&[3.0, 1.0, 3.0]).unwrap().id, 0);
        // Below vLLM's epsilon counts as greedy too.
        let mut s = Sampler::new(params(1e-6, 0, 1.0, 3));
        for _ in 0..50 {
            assert_eq!(s.sample_logits(&[0.0, 0.1, 0.05]).unwrap().id, 1);
        }
    }

    #[test]
    fn same_seed_gives_same_sequence_and_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64)
                .map(|_| s.sample_logits(&logits).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn unseeded_sampler_reports_the_seed_it_drew() {
        let logits = [0.0f32, 0.5, 1.0, 0.2, 0.9, 0.3];
        let mut a = Sampler::new(SamplingParams::default());
        let mut b = Sampler::new(SamplingParams {
            seed: Some(a.seed()),
            ..SamplingParams::default()
        });
        for _ in 0..32 {
            assert_eq!(
                a.sample_logits(&logits).unwrap(),
                b.sample_logits(&logits).unwrap()
            );
        }
    }

    #[test]
    fn top_p_over_a_large_vocabulary_draws_only_from_the_full_sort_nucleus() {
        // A flat-ish 5000-token row makes the partial sort widen its head several times.
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 16) % 1000) as f32 / 400.0)
            .collect();
        for top_p in [0.05f32, 0.5, 0.97] {
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let mut w: Vec<(usize, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i, (f64::from(x) - f64::from(max)).exp()))
                .collect();
            let total: f64 = w.iter().map(|c| c.1).sum();
            w.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut before = 0.0;
            let keep = w
                .iter()
                .position(|c| {
                    before += c.1;
                    before >= f64::from(top_p) * total
                })
                .unwrap()
                + 1;
            let nucleus: std::collections::HashSet<usize> = w[..keep].iter().map(|c| c.0).collect();
            let mut s = Sampler::new(params(1.0, 0, top_p, 5));
            let drawn: std::collections::HashSet<usize> = (0..400)
                .map(|_| s.sample_logits(&logits).unwrap().id as usize)
                .collect();
            assert!(drawn.is_subset(&nucleus), "top_p {top_p}");
            assert!(
                drawn.len() > keep.min(400) / 4,
                "top_p {top_p}: {} of {keep}",
                drawn.len()
            );
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5f32, 0.4, 0.45, 0.49];
        let mut s = Sampler::new(params(2.0, 1, 1.0, 11));
        assert!((0..200).all(|_| s.sample_logits(&logits).unwrap().id == 0));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.5f32, 0.4, 0.6, 0.49];
        let mut s = Sampler::new(params(1.5, 0, 1e-9, 5));
        assert!((0..200).all(|_| s.sample_logits(&logits).unwrap().id == 2));
        let mut s = Sampler::new(params(1.5, 0, 0.0, 5));
        assert!((0..200).all(|_| s.sample_logits(&logits).unwrap().id == 2));
    }

    #[test]
    fn temperature_sampling_matches_the_scaled_softmax() {
        let logits = [2.0f32, 1.0, 0.5, -1.0, 0.0];
        let draws = 40_000;
        let mut s = Sampler::new(params(0.8, 0, 1.0, 1234));
        let observed = counts(&mut s, &logits, draws);
        let chi = chi_square(&observed, &softmax(&logits, 0.8));
        // 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
        assert!(chi < 18.47, "chi-square {chi}, counts {observed:?}");
        // And it is not the unscaled softmax (T = 1): the test can tell temperatures apart.
        let chi_t1 = chi_square(&observed, &softmax(&logits, 1.0));
        assert!(chi_t1 > 100.0, "chi-square vs T=1: {chi_t1}");
    }

    #[test]
    fn top_k_restricts_and_renormalises() {
        let logits = [1.0f32, 3.0, 2.0, 0.0, 2.5];
        let mut s = Sampler::new(params(1.0, 3, 1.0, 99));
        let observed = counts(&mut s, &logits, 30_000);
        assert_eq!(observed[0] + observed[3], 0, "{observed:?}");
        let kept = softmax(&[3.0, 2.0, 2.5], 1.0);
        let expected = [0.0, kept[0], kept[1], 0.0, kept[2]];
        let chi = chi_square(&observed, &expected);
        // 2 degrees of freedom: P(chi2 > 13.82) = 0.001.
        assert!(chi < 13.82, "chi-square {chi}, counts {observed:?}");
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let logits = [1.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 4));
        let observed = counts(&mut s, &logits, 3_000);
        assert!(
            observed[0] > 0 && observed[1] > 0 && observed[2] > 0,
            "{observed:?}"
        );
        assert_eq!(observed[3], 0);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
        // Probabilities 0.5, 0.3, 0.2: p = 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(1.0, 0, 0.75, 21));
        let observed = counts(&mut s, &logits, 20_000);
        assert_eq!(observed[2], 0, "{observed:?}");
        let chi = chi_square(&observed, &[0.625, 0.375, 0.0]);
        // 1 degree of freedom: P(chi2 > 10.83) = 0.001.
        assert!(chi < 10.83, "chi-square {chi}, counts {observed:?}");
    }

    #[test]
    fn temperature_applies_before_top_p() {
        // At T = 0.5 the probabilities 0.5, 0.3, 0.2 become 0.658, 0.237, 0.105: top_p 0.6 keeps
        // token 0 alone. Top-p before temperature would have kept tokens 0 and 1.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(0.5, 0, 0.6, 8));
        assert!((0..500).all(|_| s.sample_logits(&logits).unwrap().id == 0));
    }

    #[test]
    fn logprobs_come_from_the_unmodified_distribution_and_sum_to_one() {
        let logits: Vec<f32> = (0..40).map(|i| (i as f32 * 0.77).sin() * 3.0).collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.3,
            top_k: 5,
            logprobs: true,
            top_logprobs: 40,
            seed: Some(1),
            ..SamplingParams::default()
        });
        let t = s.sample_logits(&logits).unwrap();
        let raw = softmax(&logits, 1.0);
        assert!((t.logprob as f64 - raw[t.id as usize].ln()).abs() < 1e-5);
        let total: f64 = t
            .top_logprobs
            .iter()
            .map(|&(_, lp)| (lp as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "sum {total}");
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(t.top_logprobs[0].0 as usize, argmax(&logits));
        for &(id, lp) in &t.top_logprobs {
            assert!((lp as f64 - raw[id as usize].ln()).abs() < 1e-5);
        }
    }

    #[test]
    fn top_logprobs_returns_exactly_n_most_likely() {
        let logits = [0.0f32, 4.0, 1.0, 3.0, 2.0];
        let mut s = Sampler::new(SamplingParams {
            logprobs: true,
            top_logprobs: 3,
            ..SamplingParams::greedy()
        });
        let t = s.sample_logits(&logits).unwrap();
        let ids: Vec<u32> = t.top_logprobs.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 3, 4]);
        assert_eq!(t.top_logprobs[0].1, t.logprob);
    }

    #[test]
    fn masked_logits_are_never_drawn_and_nan_is_an_error() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.9, 2));
        let observed = counts(&mut s, &logits, 1_000);
        assert_eq!(observed[0] + observed[2], 0);
        assert!(s.sample_logits(&[0.0, f32::NAN]).is_err());
        assert!(s
            .sample_logits(&[f32::NEG_INFINITY, f32::NEG_INFINITY])
            .is_err());
    }

    #[test]
    fn tensor_and_batch_sampling_match_slice_sampling() {
        let rows = [[0.1f32, 0.7, 0.2, 0.4], [1.0, -1.0, 0.5, 0.0]];
        let logits = Tensor::new(&rows, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let mut a = [
            Sampler::new(params(1.0, 0, 1.0, 1)),
            Sampler::new(params(0.7, 0, 1.0, 2)),
        ];
        let mut b = a.clone();
        let batched = sample_batch(&logits, a.iter_mut()).unwrap();
        let row0 = b[0].sample(&logits.get(0).unwrap()).unwrap();
        let row1 = b[1].sample(&logits.get(1).unwrap()).unwrap();
        assert_eq!(batched, [row0, row1]);
        assert!(sample_batch(&logits, b.iter_mut().take(1)).is_err());
    }

    #[test]
    fn validate_refuses_out_of_range_settings() {
        assert!(SamplingParams::default().validate(None).is_ok());
        let bad = [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: 2.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.1,
                ..Default::default()
            },
            SamplingParams {
                logprobs: true,
                top_logprobs: 21,
                ..Default::default()
            },
            SamplingParams {
                top_logprobs: 2,
                ..Default::default()
            },
            SamplingParams {
                top_p: -0.1,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate(None).is_err(), "{p:?}");
        }
    }

    #[test]
    fn validate_refuses_out_of_range_vllm_settings() {
        let ok = SamplingParams {
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            repetition_penalty: 0.01,
            min_p: 1.0,
            logit_bias: vec![(0, -100.0), (9, 100.0)],
            stop_token_ids: vec![9],
            ..Default::default()
        };
        assert!(ok.validate(Some(10)).is_ok());
        let param = |p: SamplingParams| p.validate(Some(10)).unwrap_err().param;
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = ok.clone();
            f(&mut p);
            p
        };
        assert_eq!(
            param(with(|p| p.presence_penalty = 2.01)),
            "presence_penalty"
        );
        assert_eq!(
            param(with(|p| p.frequency_penalty = -2.5)),
            "frequency_penalty"
        );
        assert_eq!(
            param(with(|p| p.frequency_penalty = f32::NAN)),
            "frequency_penalty"
        );
        assert_eq!(
            param(with(|p| p.repetition_penalty = 0.0)),
            "repetition_penalty"
        );
        assert_eq!(
            param(with(|p| p.repetition_penalty = f32::INFINITY)),
            "repetition_penalty"
        );
        assert_eq!(param(with(|p| p.min_p = 1.5)), "min_p");
        assert_eq!(param(with(|p| p.min_p = -0.1)), "min_p");
        assert_eq!(param(with(|p| p.logit_bias[0].1 = -100.5)), "logit_bias");
        assert_eq!(param(with(|p| p.logit_bias[1].0 = 10)), "logit_bias");
        assert_eq!(
            param(with(|p| p.stop_token_ids = vec![10])),
            "stop_token_ids"
        );
        let many = SamplingParams {
            logit_bias: (0..301).map(|id| (id, 1.0)).collect(),
            ..Default::default()
        };
        assert_eq!(param_of(&many), "logit_bias");
        // Without a vocabulary size the ids are not bounded.
        assert!(with(|p| p.stop_token_ids = vec![99]).validate(None).is_ok());
    }

    fn param_of(p: &SamplingParams) -> &'static str {
        p.validate(None).unwrap_err().param
    }

    /// A deterministic pseudo-random row of logits in [-4, 4), some exactly 0.
    fn row(step: u32, vocab: u32) -> Vec<f32> {
        (0..vocab)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ step.wrapping_mul(40503)) >> 7;
                if h.is_multiple_of(17) {
                    0.0
                } else {
                    (h % 800) as f32 / 100.0 - 4.0
                }
            })
            .collect()
    }

    /// The logit processors written naively from their definitions (OpenAI's penalty formula,
    /// transformers' `RepetitionPenaltyLogitsProcessor`, vLLM's `min_tokens` mask), over the
    /// whole vocabulary, in vLLM's order.
    fn reference_processed(
        logits: &[f32],
        p: &SamplingParams,
        prompt: &[u32],
        eos: &[u32],
        output: &[u32],
    ) -> Vec<f32> {
        let mut l = logits.to_vec();
        for &(id, bias) in &p.logit_bias {
            l[id as usize] += bias;
        }
        if output.len() < p.min_tokens {
            for &id in eos.iter().chain(&p.stop_token_ids) {
                l[id as usize] = f32::NEG_INFINITY;
            }
        }
        for (j, x) in l.iter_mut().enumerate() {
            let j = j as u32;
            if prompt.contains(&j) || output.contains(&j) {
                let r = p.repetition_penalty;
                *x = if *x > 0.0 { *x / r } else { *x * r };
            }
        }
        for (j, x) in l.iter_mut().enumerate() {
            let count = output.iter().filter(|&&t| t == j as u32).count() as f32;
            let present = if count > 0.0 { 1.0 } else { 0.0 };
            *x -= count * p.frequency_penalty + present * p.presence_penalty;
        }
        l
    }

    #[test]
    fn logit_processors_match_the_reference_at_every_step() {
        let vocab = 40;
        let prompt = [3u32, 5, 5, 7, 11];
        let eos = [2u32];
        let settings = [
            SamplingParams {
                presence_penalty: 0.7,
                frequency_penalty: 0.4,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                presence_penalty: -1.5,
                frequency_penalty: -0.3,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 1.8,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 0.6,
                frequency_penalty: 1.0,
                logit_bias: vec![(4, 3.0), (9, -2.5), (2, 5.0)],
                min_tokens: 4,
                stop_token_ids: vec![13],
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.9,
                seed: Some(3),
                repetition_penalty: 1.3,
                presence_penalty: 0.5,
                logit_bias: vec![(1, 1.0)],
                ..SamplingParams::default()
            },
        ];
        for params in settings {
            let mut s = Sampler::for_sequence(params.clone(), &prompt, &eos);
            let mut output = Vec::new();
            for step in 0..24 {
                let logits = row(step, vocab);
                let mut ours = logits.clone();
                s.process(&mut ours);
                let expected = reference_processed(&logits, &params, &prompt, &eos, &output);
                for (j, (a, b)) in ours.iter().zip(&expected).enumerate() {
                    assert!(
                        a == b || (a - b).abs() < 1e-5,
                        "{params:?} step {step} token {j}: {a} vs {b}"
                    );
                }
                let t = s.sample_logits(&logits).unwrap();
                if params.is_greedy() {
                    assert_eq!(t.id as usize, argmax(&expected), "step {step}");
                }
                output.push(t.id);
            }
        }
    }

    #[test]
    fn logit_bias_of_100_forces_a_token_and_minus_100_bans_it() {
        let logits = row(1, 50);
        let low = (0..50)
            .min_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(low as u32, 100.0)],
            seed: Some(1),
            ..SamplingParams::default()
        });
        assert!((0..200).all(|_| s.sample_logits(&logits).unwrap().id as usize == low));
        let top = argmax(&logits);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(top as u32, -100.0)],
            ..SamplingParams::greedy()
        });
        let t = s.sample_logits(&logits).unwrap();
        assert_ne!(t.id as usize, top);
        // The reported logprob is the raw one (vLLM's `raw_logprobs`), not the biased one.
        let raw = softmax(&logits, 1.0);
        assert!((t.logprob as f64 - raw[t.id as usize].ln()).abs() < 1e-5);
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_token_ids_until_reached() {
        // EOS (2) is the most likely token, stop token 5 the second.
        let mut logits = vec![0.0f32; 8];
        logits[2] = 9.0;
        logits[5] = 8.0;
        let mut s = Sampler::for_sequence(
            SamplingParams {
                min_tokens: 3,
                stop_token_ids: vec![5],
                ..SamplingParams::greedy()
            },
            &[],
            &[2],
        );
        let ids: Vec<u32> = (0..5)
            .map(|_| s.sample_logits(&logits).unwrap().id)
            .collect();
        assert_eq!(ids, [0, 0, 0, 2, 2]);
    }

    #[test]
    fn min_p_keeps_tokens_at_least_min_p_times_the_top_probability() {
        let logits = [2.0f32, 1.5, 0.2, -0.5, 1.0, -3.0];
        for (temperature, min_p) in [(1.0f64, 0.3f32), (0.7, 0.1), (1.6, 0.5)] {
            let probs = softmax(&logits, temperature);
            let top = probs.iter().cloned().fold(0.0, f64::max);
            let kept: Vec<f64> = probs
                .iter()
                .map(|&p| if p >= f64::from(min_p) * top { p } else { 0.0 })
                .collect();
            let total: f64 = kept.iter().sum();
            let expected: Vec<f64> = kept.iter().map(|p| p / total).collect();
            let mut s = Sampler::new(SamplingParams {
                temperature: temperature as f32,
                min_p,
                seed: Some(17),
                ..SamplingParams::default()
            });
            let observed = counts(&mut s, &logits, 30_000);
            for (o, e) in observed.iter().zip(&expected) {
                assert!(
                    *e > 0.0 || *o == 0,
                    "T {temperature} min_p {min_p}: {observed:?}"
                );
            }
            let dof = expected.iter().filter(|&&p| p > 0.0).count() - 1;
            // P(chi2 > x) = 0.001 for 1..5 degrees of freedom.
            let limit = [10.83, 13.82, 16.27, 18.47, 20.52][dof - 1];
            let chi = chi_square(&observed, &expected);
            assert!(
                chi < limit,
                "T {temperature} min_p {min_p}: chi {chi}, {observed:?}"
            );
        }
    }

    #[test]
    fn min_p_applies_after_top_p() {
        // Probabilities 0.6, 0.25, 0.15. top_p 0.65 keeps {0, 1}; min_p 0.3 (threshold 0.18)
        // then keeps both. Min-p first would drop token 2, and top-p over the renormalised
        // {0.71, 0.29} would keep token 0 alone: the order is visible.
        let logits = [0.6f32.ln(), 0.25f32.ln(), 0.15f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.65,
            min_p: 0.3,
            seed: Some(2),
            ..SamplingParams::default()
        });
        let observed = counts(&mut s, &logits, 4_000);
        assert_eq!(observed[2], 0, "{observed:?}");
        assert!(observed[1] > 900, "{observed:?}");
    }

    /// Cost of the logit processors per token on a 32k vocabulary (run with
    /// `cargo test --release -p tga-model --lib sampling_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn sampling_cost_per_token_on_a_32k_vocabulary() {
        let vocab = 32_064u32;
        let prompt: Vec<u32> = (0..2000).map(|i| (i * 7919) % vocab).collect();
        // Peaked like a language model's rows: a few dozen tokens carry the mass.
        let rows: Vec<Vec<f32>> = (0..8)
            .map(|s| row(s, vocab).iter().map(|x| x * 4.0).collect())
            .collect();
        for (name, params) in [
            ("greedy", SamplingParams::greedy()),
            (
                "greedy + penalties, bias",
                SamplingParams {
                    presence_penalty: 0.5,
                    frequency_penalty: 0.5,
                    repetition_penalty: 1.2,
                    logit_bias: (0..300).map(|i| (i * 101, 1.0)).collect(),
                    ..SamplingParams::greedy()
                },
            ),
            (
                "T=0.7 top_p=0.9",
                SamplingParams {
                    temperature: 0.7,
                    top_p: 0.9,
                    seed: Some(1),
                    ..Default::default()
                },
            ),
            (
                "+ penalties, bias, min_p",
                SamplingParams {
                    temperature: 0.7,
                    top_p: 0.9,
                    min_p: 0.05,
                    presence_penalty: 0.5,
                    frequency_penalty: 0.5,
                    repetition_penalty: 1.2,
                    logit_bias: (0..300).map(|i| (i * 101, 1.0)).collect(),
                    seed: Some(1),
                    ..Default::default()
                },
            ),
        ] {
            let mut s = Sampler::for_sequence(params, &prompt, &[2]);
            let steps = 512;
            let start = std::time::Instant::now();
            for i in 0..steps {
                s.sample_logits(&rows[i % rows.len()]).unwrap();
            }
            let per = start.elapsed().as_secs_f64() / steps as f64 * 1e6;
            eprintln!("{name}: {per:.1} µs per token");
        }
    }

    fn stream(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for c in chunks {
            let o = m.push(c);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_chunks_is_cut_and_not_emitted() {
        assert_eq!(
            stream(&["###"], &["Hello #", "#", "# world"]),
            ("Hello ".into(), true)
        );
        assert_eq!(
            stream(&["</s>", "STOP"], &["a", "b S", "TO", "P c"]),
            ("ab ".into(), true)
        );
    }

    #[test]
    fn partial_match_is_held_back_then_released() {
        let mut m = StopMatcher::new(["abc".to_string()]);
        let o = m.push("xxab");
        assert_eq!(o.text, "xx");
        assert_eq!(m.held_back(), "ab");
        let o = m.push("d");
        assert_eq!((o.text.as_str(), o.stopped), ("abd", false));
        assert_eq!(m.held_back(), "");
        // A held tail is released at the end of the sequence.
        m.push("a");
        assert_eq!(m.finish(), "a");
        assert_eq!(
            stream(&["abc"], &["ab", "ab", "x"]),
            ("ababx".into(), false)
        );
    }

    #[test]
    fn earliest_stop_wins_and_nothing_follows_a_stop() {
        assert_eq!(
            stream(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
        let mut m = StopMatcher::new(["x".to_string()]);
        assert!(m.push("axb").stopped);
        assert_eq!(
            m.push("more"),
            StopOutput {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn stop_matching_respects_utf8_boundaries() {
        assert_eq!(
            stream(&["é!"], &["caf", "é", "!", " ok"]),
            ("caf".into(), true)
        );
        assert_eq!(stream(&["éa"], &["ééb"]), ("ééb".into(), false));
    }

    /// Per-delta output of a matcher fed `deltas`, the flushed tail last unless a stop was hit.
    fn run_stops(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        for delta in deltas {
            let o = matcher.push(delta);
            out.push(o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push(matcher.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_deltas_is_never_shown() {
        let (out, stopped) = run_stops(&["END"], &["abc E", "N", "D tail"]);
        assert!(stopped);
        assert_eq!(out, vec!["abc ", "", ""]);
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let (out, stopped) = run_stops(&["END"], &["abc E", "Nx", " more"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "abc ENx more");
        assert_eq!(out[0], "abc ");
    }

    #[test]
    fn stop_strings_with_multibyte_characters_hold_back_on_boundaries() {
        let (out, stopped) = run_stops(&["éé"], &["caf", "é", "é!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
        let (out, stopped) = run_stops(&["éé"], &["café", " ok"]);
        assert!(!stopped);
        assert_eq!(out, vec!["caf", "é ok", ""]);
    }

    /// Per-chunk output of a matcher fed `(chunk, armed)` pairs, the flushed tail last unless a
    /// stop was hit.
    fn run_gated(stops: &[&str], include: bool, chunks: &[(&str, bool)]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string())).including_stop(include);
        let mut out = String::new();
        for &(chunk, armed) in chunks {
            let o = m.push_armed(chunk, armed);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn included_stop_strings_end_the_output_with_them() {
        assert_eq!(
            run_gated(
                &["END"],
                true,
                &[("abc E", true), ("N", true), ("D tail", true)]
            ),
            ("abc END".into(), true)
        );
        // Nothing is held back: every chunk before the stop is emitted whole.
        let mut m = StopMatcher::new(["END".to_string()]).including_stop(true);
        assert_eq!(m.push("abc E").text, "abc E");
        assert_eq!(m.held_back(), "");
        assert_eq!(
            run_gated(&["xy", "b"], true, &[("aaxyb", true)]),
            ("aaxy".into(), true)
        );
        assert_eq!(
            run_gated(&["zz"], true, &[("a", true), ("b", true)]),
            ("ab".into(), false)
        );
    }

    #[test]
    fn unarmed_chunks_cannot_end_the_output_but_a_stop_ending_later_does() {
        // vLLM's min_tokens: "e" in the first chunks does not count.
        assert_eq!(
            run_gated(
                &["e"],
                false,
                &[("Le", false), ("e a", false), ("nd e", true)]
            ),
            ("Lee and ".into(), true)
        );
        // A stop that starts in unarmed text and ends in armed text counts.
        assert_eq!(
            run_gated(&["END"], false, &[("x EN", false), ("D y", true)]),
            ("x ".into(), true)
        );
        assert_eq!(
            run_gated(&["END"], true, &[("x EN", false), ("D y", true)]),
            ("x END".into(), true)
        );
        // A stop wholly inside unarmed text never counts, even when held back with a longer one.
        assert_eq!(
            run_gated(&["ab", "xaby"], false, &[("xab", false), ("z", true)]),
            ("xabz".into(), false)
        );
    }

    #[test]
    fn no_stop_strings_pass_text_through() {
        let (out, stopped) = run_stops(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}
