//! A stub OpenAI-compatible server with scripted timing: the first content token `ttft` after a
//! request arrives, then one token every `itl` (on an absolute schedule, so sleeps do not drift),
//! a fixed number of tokens, an optional usage chunk, and its own `/metrics` that counts what it
//! served — correctly, or with a scripted miscount.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

pub const MODEL: &str = "stub-model";
pub const CHAT: &str = "/v1/chat/completions";
pub const DIAGNOSE: &str = "/v1/safety/diagnose";

#[derive(Debug, Clone)]
pub struct Script {
    pub ttft: Duration,
    pub itl: Duration,
    /// Content chunks (one token each) of every answer, whatever max_tokens says.
    pub tokens: u64,
    pub prompt_tokens: u64,
    /// Honour `stream_options.include_usage`.
    pub usage: bool,
    /// Every k-th chat request is refused with 429 `queue_full`.
    pub reject_every: Option<u64>,
    pub diagnose_delay: Duration,
    /// The n-th chat request (1-based) is counted twice in `tga_requests_total`.
    pub double_count_request: Option<u64>,
    /// Generated tokens the server counts at the first request but never sends.
    pub phantom_generation_tokens: u64,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(20),
            itl: Duration::from_millis(5),
            tokens: 4,
            prompt_tokens: 7,
            usage: true,
            reject_every: None,
            diagnose_delay: Duration::from_millis(30),
            double_count_request: None,
            phantom_generation_tokens: 0,
        }
    }
}

#[derive(Default)]
pub struct Counters {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    chat_seen: AtomicU64,
}

impl Counters {
    fn request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn requests(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .unwrap()
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    pub fn generation_tokens(&self) -> u64 {
        self.generation_tokens.load(Ordering::SeqCst)
    }
}

struct Shared {
    script: Script,
    counters: Arc<Counters>,
}

pub struct Stub {
    pub url: String,
    pub counters: Arc<Counters>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stub {
    /// Serves on a free loopback port from its own thread and runtime, so that its timing does
    /// not depend on the client's runtime.
    pub fn start(script: Script) -> Self {
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            script,
            counters: counters.clone(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                use axum::serve::ListenerExt;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs would merge token
                // frames and the test would measure the kernel, not the client.
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let app = Router::new()
                    .route(CHAT, post(chat))
                    .route(DIAGNOSE, post(diagnose))
                    .route("/v1/models", get(models))
                    .route("/metrics", get(metrics))
                    .with_state(shared);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = shutdown_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            url: format!("http://{addr}"),
            counters,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let frame = json!({
        "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {frame}\n\n")
}

async fn chat(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let arrived = tokio::time::Instant::now();
    let script = &shared.script;
    let counters = shared.counters.clone();
    let n = counters.chat_seen.fetch_add(1, Ordering::SeqCst) + 1;
    if script.reject_every.is_some_and(|k| n % k == 0) {
        counters.request(CHAT, 429);
        let error = json!({"error": {"message": "the waiting queue is full", "type": "server_error", "param": null, "code": "queue_full"}});
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            Json(error),
        )
            .into_response();
    }
    counters.request(CHAT, 200);
    if script.double_count_request == Some(n) {
        counters.request(CHAT, 200);
    }
    if n == 1 {
        counters
            .generation_tokens
            .fetch_add(script.phantom_generation_tokens, Ordering::SeqCst);
    }
    counters
        .prompt_tokens
        .fetch_add(script.prompt_tokens, Ordering::SeqCst);
    let include_usage = script.usage && body["stream_options"]["include_usage"] == json!(true);

    // (when, frame, tokens it carries)
    let mut frames = vec![(
        arrived,
        chunk(json!({"role": "assistant", "content": ""}), None),
        0,
    )];
    for k in 0..script.tokens {
        let at = arrived + script.ttft + script.itl * k as u32;
        frames.push((at, chunk(json!({"content": format!("t{k} ")}), None), 1));
    }
    let end = frames.last().unwrap().0;
    frames.push((end, chunk(json!({}), Some("length")), 0));
    if include_usage {
        let usage = json!({
            "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": script.prompt_tokens, "completion_tokens": script.tokens,
                      "total_tokens": script.prompt_tokens + script.tokens},
        });
        frames.push((end, format!("data: {usage}\n\n"), 0));
    }
    frames.push((end, "data: [DONE]\n\n".to_string(), 0));
    let body = stream::iter(frames).then(move |(at, frame, tokens)| {
        let counters = counters.clone();
        async move {
            tokio::time::sleep_until(at).await;
            counters
                .generation_tokens
                .fetch_add(tokens, Ordering::SeqCst);
            Ok::<_, Infallible>(Bytes::from(frame))
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(body),
    )
        .into_response()
}

async fn diagnose(State(shared): State<Arc<Shared>>, Json(_body): Json<Value>) -> Response {
    let script = &shared.script;
    tokio::time::sleep(script.diagnose_delay).await;
    let counters = &shared.counters;
    counters.request(DIAGNOSE, 200);
    counters
        .prompt_tokens
        .fetch_add(script.prompt_tokens, Ordering::SeqCst);
    counters
        .generation_tokens
        .fetch_add(script.tokens, Ordering::SeqCst);
    Json(json!({
        "meta": {"model": MODEL, "n_layers": 3, "prompt_tokens": script.prompt_tokens},
        "layers": [],
        "summary": {"activation_layer": null, "refused": false},
        "answer": "t0 t1",
        "usage": {"prompt_tokens": script.prompt_tokens, "completion_tokens": script.tokens},
    }))
    .into_response()
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "stub"}]}),
    )
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    let counters = &shared.counters;
    counters.request("/metrics", 200);
    let mut out = String::from("# HELP tga_requests_total HTTP requests by route and status code.\n# TYPE tga_requests_total counter\n");
    for ((route, status), n) in counters.requests.lock().unwrap().iter() {
        out.push_str(&format!(
            "tga_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "# TYPE tga_prompt_tokens_total counter\ntga_prompt_tokens_total {}\n# TYPE tga_generation_tokens_total counter\ntga_generation_tokens_total {}\n",
        counters.prompt_tokens.load(Ordering::SeqCst),
        counters.generation_tokens.load(Ordering::SeqCst)
    ));
    out
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tga-loadtest-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
