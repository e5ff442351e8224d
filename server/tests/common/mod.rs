//! A scripted fake model behind the real seam, and an in-process server on a free loopback port.
//!
//! The fake tokenizer is byte-level (token id = byte), so multi-byte characters span several
//! tokens and exercise the no-split rule. The fake model's logits are a pure function of the
//! sequence (prompt and tokens so far), so a request's greedy output does not depend on what else
//! shares its batch — exactly the property continuous batching must preserve.

#![allow(dead_code)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use model::kv::{BlockTable, KvBlocks, KvPoolConfig};
use model::sampling::{DrawSpec, SampledToken, Sampler, SamplingParams};
use server::app::{AppState, HttpConfig, ModelCard, ServingConfig, ServingModel};
use server::backend::{
    BackendError, ModelBackend, PrefillInput, ProcessError, PromptProcessor, SequenceCache,
    StepRow, TokenSampler,
};
use server::engine::request::{ChatTurn, ImageInput, Prompt, PromptLayout, Role, TurnPart};
use server::firehose::Firehose;
use server::metrics::Metrics;

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const IMAGE: u32 = 258;
pub const VOCAB: usize = 259;
/// Prompt positions one image takes.
pub const IMAGE_TOKENS: usize = 8;
/// What the fake model "says": it starts at a prompt-dependent character and walks on.
pub const SCRIPT: &str = "Hello wörld, this is a fake 😀 model speaking. ";
pub const MODEL_ID: &str = "fake-llava";

// ---------------------------------------------------------------------------------------------
// Processor

pub struct FakeProcessor;

impl PromptProcessor for FakeProcessor {
    fn prepare_image(&self, bytes: &[u8]) -> Result<ImageInput, ProcessError> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ProcessError::InvalidImage(e.to_string()))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(8192);
        limits.max_image_height = Some(8192);
        reader.limits(limits);
        if reader.format().is_none() {
            return Err(ProcessError::InvalidImage(
                "not an image in a supported format".into(),
            ));
        }
        let image = reader
            .decode()
            .map_err(|e| ProcessError::InvalidImage(e.to_string()))?
            .to_rgb8();
        let n = (image.width() * image.height()) as f32;
        let mean = |c: usize| image.pixels().map(|p| p.0[c] as f32).sum::<f32>() / n / 255.0;
        Ok(ImageInput {
            image_size: (image.height(), image.width()),
            pixel_values: vec![mean(0), mean(1), mean(2)],
            shape: vec![3],
            num_tokens: IMAGE_TOKENS,
        })
    }

    fn max_token_bytes(&self) -> usize {
        // Byte-level: one token per byte.
        1
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(VOCAB)
    }

    fn build_prompt(
        &self,
        turns: &[ChatTurn],
        images: Vec<ImageInput>,
        _needles: &[String],
    ) -> Result<Prompt, ProcessError> {
        let mut ids = vec![BOS];
        let mut image_spans = Vec::new();
        let push_text = |ids: &mut Vec<u32>, text: &str| {
            ids.extend(text.bytes().map(u32::from));
        };
        for turn in turns {
            let role = match turn.role {
                Role::System => "system: ",
                Role::User => "user: ",
                Role::Assistant => "assistant: ",
            };
            push_text(&mut ids, role);
            for part in &turn.parts {
                match part {
                    TurnPart::Text(text) => push_text(&mut ids, text),
                    TurnPart::Image(i) => {
                        let image = images
                            .get(*i)
                            .ok_or_else(|| ProcessError::Internal(format!("image {i} missing")))?;
                        let start = ids.len();
                        ids.extend(std::iter::repeat_n(IMAGE, image.num_tokens));
                        image_spans.push(start..ids.len());
                    }
                }
            }
            push_text(&mut ids, "\n");
        }
        push_text(&mut ids, "assistant: ");
        Ok(Prompt {
            token_ids: ids,
            image_spans,
            images,
            layout: PromptLayout::default(),
        })
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ProcessError> {
        // The fake tokenizer sees `<image>` as the placeholder token, as the real ones do.
        let mut ids: Vec<u32> = add_special_tokens.then_some(BOS).into_iter().collect();
        for (k, piece) in text.split(FAKE_IMAGE_TEXT).enumerate() {
            if k > 0 {
                ids.push(IMAGE);
            }
            ids.extend(piece.bytes().map(u32::from));
        }
        Ok(ids)
    }

    fn detokenize(&self, ids: &[u32]) -> Result<String, ProcessError> {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                BOS => bytes.extend(b"<s>"),
                EOS => bytes.extend(b"</s>"),
                IMAGE => bytes.extend(FAKE_IMAGE_TEXT.as_bytes()),
                byte => bytes.push(byte as u8),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| match id {
                BOS => "<s>".into(),
                EOS => "</s>".into(),
                IMAGE => FAKE_IMAGE_TEXT.into(),
                b if b < 128 => (b as u8 as char).to_string(),
                b => format!("<0x{b:02X}>"),
            })
            .collect()
    }

    fn tokenizer_vocab_size(&self) -> usize {
        VOCAB
    }

    fn image_token_id(&self) -> Option<u32> {
        Some(IMAGE)
    }
}

/// The text the fake tokenizer reads as the image placeholder token.
pub const FAKE_IMAGE_TEXT: &str = "<image>";

// ---------------------------------------------------------------------------------------------
// Model

/// Blocks decode steps while closed, so a test can hold sequences in the batch.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn closed() -> Self {
        Self(Arc::new((Mutex::new(true), Condvar::new())))
    }

    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = false;
        self.0 .1.notify_all();
    }

    fn wait(&self) {
        let mut closed = self.0 .0.lock().unwrap();
        while *closed {
            closed = self.0 .1.wait(closed).unwrap();
        }
    }
}

/// What the fake model saw, for assertions.
#[derive(Default)]
pub struct Observed {
    pub batch_sizes: Mutex<Vec<usize>>,
    /// Prompts whose prefill completed (chunks and recomputes after preemption included).
    pub prefills: Mutex<usize>,
    /// Positions run by each prefill call (one entry per chunk).
    pub prefill_chunks: Mutex<Vec<usize>>,
    /// The pool, to check that every block is free after a test.
    pub kv: Mutex<Option<KvBlocks>>,
}

#[derive(Clone)]
pub struct FakeOptions {
    pub step_delay: Duration,
    pub gate: Option<Gate>,
    /// The fake's KV pool: blocks of `block_size` positions.
    pub kv_pool: KvPoolConfig,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            step_delay: Duration::ZERO,
            gate: None,
            kv_pool: KvPoolConfig {
                block_size: 16,
                num_blocks: 4096,
            },
        }
    }
}

pub struct FakeModel {
    options: FakeOptions,
    observed: Arc<Observed>,
    kv: KvBlocks,
}

impl FakeModel {
    pub fn new(options: FakeOptions, observed: Arc<Observed>) -> Self {
        let kv = KvBlocks::new(options.kv_pool);
        *observed.kv.lock().unwrap() = Some(kv.clone());
        Self {
            options,
            observed,
            kv,
        }
    }
}

/// The fake's per-sequence state: a real block table (so the engine's planning is checked:
/// every position written must have been reserved) and the tokens the "cache" holds.
pub struct FakeCache {
    table: BlockTable,
    /// Positions computed.
    len: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Generation ends with EOS after this many tokens (prompt marker `EOS@n`).
    eos_after: Option<usize>,
}

/// The token the fake model wants after `cache`: the script from a prompt-dependent start.
fn next_token(cache: &FakeCache) -> u32 {
    script_token(
        &cache.tokens[..cache.prompt_len],
        cache.tokens.len() - cache.prompt_len,
        cache.eos_after,
    )
}

/// The script's token after `prompt` and `generated` tokens (EOS from `eos_after` on).
fn script_token(prompt: &[u32], generated: usize, eos_after: Option<usize>) -> u32 {
    if eos_after.is_some_and(|n| generated >= n) {
        return EOS;
    }
    let script = SCRIPT.as_bytes();
    let starts: Vec<usize> = SCRIPT.char_indices().map(|(i, _)| i).collect();
    let hash = prompt.iter().fold(0xcbf29ce484222325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100000001b3)
    });
    let start = starts[(hash % starts.len() as u64) as usize];
    script[(start + generated) % script.len()] as u32
}

fn logits_for(cache: &FakeCache) -> Vec<f32> {
    target_logits(next_token(cache))
}

fn target_logits(target: u32) -> Vec<f32> {
    let mut logits = vec![-5.0f32; VOCAB];
    logits[target as usize] = 6.0;
    // A close second, so temperature sampling visibly depends on the seed.
    logits[((target as usize) + 1) % 256] = 5.0;
    logits
}

/// The fake model's logits after `prompt` and `generated` tokens (they depend on the count
/// only), for tests that replay a request by hand.
pub fn fake_logits(prompt: &[u32], generated: usize) -> Vec<f32> {
    let eos_after = prompt_marker(prompt, "EOS@").and_then(|n| n.parse().ok());
    target_logits(script_token(prompt, generated, eos_after))
}

fn prompt_marker(prompt: &[u32], marker: &str) -> Option<String> {
    let text: String = prompt
        .iter()
        .filter(|&&t| t < 256)
        .map(|&t| t as u8 as char)
        .collect();
    let at = text.find(marker)?;
    Some(
        text[at + marker.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect(),
    )
}

impl SequenceCache for FakeCache {
    fn table(&self) -> &BlockTable {
        &self.table
    }
    fn table_mut(&mut self) -> &mut BlockTable {
        &mut self.table
    }
    fn len(&self) -> usize {
        self.len
    }
    fn reuse_prefix(&mut self, hashes: &[u64]) -> usize {
        self.len = self.table.reuse_prefix(hashes) * self.table.block_size();
        self.len
    }
    fn fork(&self) -> Self {
        FakeCache {
            table: self.table.fork(),
            len: self.len,
            tokens: self.tokens.clone(),
            prompt_len: self.prompt_len,
            eos_after: self.eos_after,
        }
    }
}

impl FakeCache {
    /// What the real model does before writing positions `range`: shared blocks are copied
    /// (a free block each), which the engine must have kept room for.
    fn prepare_write(&mut self, range: std::ops::Range<usize>) {
        let shared = self.table.shared_blocks(range.clone());
        self.table.prepare_write(range).unwrap_or_else(|err| {
            panic!("the engine left no free block for the copy of {shared} shared block(s): {err}")
        });
    }
}

impl ModelBackend for FakeModel {
    type Cache = FakeCache;
    type Sampler = FakeSampler;

    fn kv_blocks(&self) -> KvBlocks {
        self.kv.clone()
    }

    fn new_cache(&self) -> FakeCache {
        FakeCache {
            table: self.kv.table(),
            len: 0,
            tokens: Vec::new(),
            prompt_len: 0,
            eos_after: None,
        }
    }

    fn prefill(
        &mut self,
        input: &PrefillInput,
        end: usize,
        cache: &mut FakeCache,
    ) -> Result<Option<Vec<f32>>, BackendError> {
        let prompt = input.prompt;
        assert!(cache.len < end && end <= input.len(), "prefill range");
        assert!(
            cache.table.capacity() > end,
            "the engine reserves the prefill and the first decode position ({} < {})",
            cache.table.capacity(),
            end + 1
        );
        self.observed
            .prefill_chunks
            .lock()
            .unwrap()
            .push(end - cache.len);
        cache.prepare_write(cache.len..end);
        // The fake "cache" is the token list (a reused prefix's tokens come from the input).
        cache.tokens = (0..end).map(|p| input.token(p)).collect();
        cache.len = end;
        if end < input.len() {
            return Ok(None);
        }
        *self.observed.prefills.lock().unwrap() += 1;
        if prompt_marker(&prompt.token_ids, "PANIC").is_some() {
            panic!("scripted panic");
        }
        if prompt_marker(&prompt.token_ids, "FAIL").is_some() {
            return Err(BackendError::new("scripted failure"));
        }
        let images = prompt.token_ids.iter().filter(|&&t| t == IMAGE).count();
        assert_eq!(images, prompt.image_tokens(), "image positions expanded");
        cache.prompt_len = prompt.token_ids.len();
        cache.eos_after = prompt_marker(&prompt.token_ids, "EOS@").and_then(|n| n.parse().ok());
        if prompt_marker(&prompt.token_ids, "POISON").is_some() {
            // A row the fake sampler panics on: a fault after prefill, in the per-token step.
            return Ok(Some(vec![f32::NAN; VOCAB]));
        }
        Ok(Some(logits_for(cache)))
    }

    fn decode_batch(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut FakeCache],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        assert_eq!(tokens.len(), caches.len());
        self.observed.batch_sizes.lock().unwrap().push(tokens.len());
        if let Some(gate) = &self.options.gate {
            gate.wait();
        }
        if !self.options.step_delay.is_zero() {
            std::thread::sleep(self.options.step_delay);
        }
        Ok(tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(&token, cache)| {
                assert!(
                    cache.table.capacity() > cache.len,
                    "decode without a reserved position"
                );
                cache.prepare_write(cache.len..cache.len + 1);
                cache.tokens.push(token);
                cache.len += 1;
                logits_for(cache)
            })
            .collect())
    }

    /// The rows with a spec are drawn by the device sampler's op (on the CPU, the kernel's Rust
    /// model), so the engine's device path runs in every test; the others go back as logits.
    fn decode_batch_sampled(
        &mut self,
        tokens: &[u32],
        caches: &mut [&mut FakeCache],
        draws: &[Option<DrawSpec>],
    ) -> Result<Vec<StepRow>, BackendError> {
        let rows = self.decode_batch(tokens, caches)?;
        rows.into_iter()
            .zip(draws)
            .map(|(row, draw)| match draw {
                None => Ok(StepRow::Logits(row)),
                Some(spec) => {
                    let logits = candle_core::Tensor::from_slice(
                        &row,
                        (1, row.len()),
                        &candle_core::Device::Cpu,
                    )
                    .map_err(BackendError::new)?;
                    match model::device_sampling::sample_rows(&logits, &[*spec], VOCAB)
                        .map_err(BackendError::new)?
                        .remove(0)
                    {
                        Ok(token) => Ok(StepRow::Sampled(token)),
                        Err(_) => Ok(StepRow::Logits(row)),
                    }
                }
            })
            .collect()
    }

    fn sampler(&self, params: &SamplingParams, prompt: &[u32]) -> FakeSampler {
        FakeSampler(Sampler::for_sequence(params.clone(), prompt, &[EOS]))
    }

    fn stop_token_ids(&self) -> &[u32] {
        &[EOS]
    }

    /// Bytes from 0x80 on are parts of characters, as a byte-fallback tokenizer's `<0x..>`
    /// pieces are.
    fn is_byte_token(&self, id: u32) -> bool {
        (0x80..256).contains(&id)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        if id < 256 {
            vec![id as u8]
        } else {
            Vec::new()
        }
    }

    fn decode_text(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn decode_text_with_special(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &t in ids {
            match t {
                0..=255 => bytes.push(t as u8),
                BOS => bytes.extend(b"<s>"),
                EOS => bytes.extend(b"</s>"),
                IMAGE => bytes.extend(b"<image>"),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The real sampler (so the engine tests see logit bias, penalties and `min_tokens`), with a
/// scripted panic on a poisoned row.
pub struct FakeSampler(Sampler);

impl TokenSampler for FakeSampler {
    fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, BackendError> {
        assert!(
            !logits[0].is_nan(),
            "scripted sampler panic on a poisoned row"
        );
        self.0
            .sample_logits(logits)
            .map_err(|e| BackendError::new(e.to_string()))
    }

    fn params(&self) -> &SamplingParams {
        self.0.params()
    }

    fn device_draw(&mut self) -> Option<DrawSpec> {
        self.0.device_draw()
    }

    fn accept(&mut self, token: &SampledToken) {
        self.0.accept(token)
    }

    fn sample_with(
        &mut self,
        logits: &[f32],
        spec: &DrawSpec,
    ) -> Result<SampledToken, BackendError> {
        assert!(
            !logits[0].is_nan(),
            "scripted sampler panic on a poisoned row"
        );
        self.0
            .sample_logits_with(logits, spec)
            .map_err(|e| BackendError::new(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Server

pub struct TestOptions {
    pub http: HttpConfig,
    pub serving: ServingConfig,
    pub fake: FakeOptions,
    /// Start without a model (to see /ready say 503).
    pub load_model: bool,
    pub max_model_len: usize,
    pub grace: Duration,
}

impl Default for TestOptions {
    fn default() -> Self {
        let mut serving = ServingConfig::default();
        serving.engine.max_num_seqs = 8;
        serving.engine.max_waiting = 16;
        Self {
            http: HttpConfig::default(),
            serving,
            fake: FakeOptions::default(),
            load_model: true,
            max_model_len: 512,
            grace: Duration::from_secs(10),
        }
    }
}

pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    pub metrics: Arc<Metrics>,
    pub observed: Arc<Observed>,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub fn card(max_model_len: usize) -> ModelCard {
    ModelCard {
        id: MODEL_ID.into(),
        created: 1_700_000_000,
        owned_by: "tga".into(),
        max_model_len,
        supports_images: true,
        builtin: false,
        arch: "llava_next".into(),
        dtype: "f32".into(),
        device: "cpu".into(),
    }
}

impl TestServer {
    pub async fn start(options: TestOptions) -> Self {
        let metrics = Arc::new(Metrics::new());
        let state = AppState::new(
            options.http.clone(),
            metrics.clone(),
            Arc::new(Firehose::default()),
        );
        let observed = Arc::new(Observed::default());
        let server = Self::bind(state, metrics, observed.clone(), options.grace).await;
        if options.load_model {
            server.load(&options);
        }
        server
    }

    async fn bind(
        state: Arc<AppState>,
        metrics: Arc<Metrics>,
        observed: Arc<Observed>,
        grace: Duration,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::http::serve(
            listener,
            state.clone(),
            async move {
                let _ = signal.await;
            },
            grace,
        ));
        Self {
            base,
            state,
            metrics,
            observed,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Loads the fake model (as the real loader does once a checkpoint is read).
    pub fn load(&self, options: &TestOptions) {
        let model = FakeModel::new(options.fake.clone(), self.observed.clone());
        let serving = ServingModel::start(
            model,
            Arc::new(FakeProcessor),
            card(options.max_model_len),
            &options.serving,
            self.metrics.clone(),
            self.state.firehose.clone(),
        )
        .unwrap();
        self.state.set_model(serving);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_chat(&self, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Status and JSON body of a non-streaming request.
    pub async fn chat(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self.post_chat(body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The `data:` payloads of a streamed request.
    pub async fn stream(&self, body: &serde_json::Value) -> (u16, Vec<String>) {
        let response = self.post_chat(body).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, sse_data(&text))
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends the shutdown signal and waits for `serve` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap()
    }

    pub fn begin_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    pub async fn finished(mut self) -> std::io::Result<()> {
        self.task.take().unwrap().await.unwrap()
    }
}

/// Splits an SSE body into its `data:` payloads (comments and blank lines skipped).
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|frame| {
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|line| line.strip_prefix("data: ").or(line.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// A user message with text only.
pub fn text_request(text: &str) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 16
    })
}

/// A small PNG (solid colour), encoded with the image crate.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(width, height, image::Rgb([200, 30, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn data_uri(bytes: &[u8], mime: &str) -> String {
    use base64::Engine as _;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A PNG whose header claims `width` x `height` (and no pixel data worth decoding).
pub fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32(&ihdr).to_be_bytes());
    out.extend(0u32.to_be_bytes());
    out.extend(b"IEND");
    out.extend(crc32(b"IEND").to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Reads one sample (`name{labels} value`) from a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `condition` for up to five seconds.
pub async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

/// Options with the fake's KV pool set to `num_blocks` blocks of `block_size` positions.
pub fn pool(block_size: usize, num_blocks: usize) -> TestOptions {
    let mut options = TestOptions::default();
    options.fake.kv_pool = KvPoolConfig {
        block_size,
        num_blocks,
    };
    options
}

/// Every block is back in the pool (free or holding a reusable cached prefix).
pub async fn assert_no_blocks_held(server: &TestServer) {
    let kv = server.observed.kv.lock().unwrap().clone().unwrap();
    assert!(
        eventually(|| kv.lock().used() == 0).await,
        "{} blocks still held",
        kv.lock().used()
    );
}

/// Status and JSON body of a POST of `body` to `path`.
pub async fn post(
    server: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = server
        .client
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}
