//! Sending one request and timing its stream with vLLM `bench serve`'s definitions:
//! TTFT = arrival of the first chunk with non-empty content − send time; ITL = gaps between
//! consecutive content chunks; e2e = arrival of the last data frame − send time;
//! output tokens = the usage chunk's `completion_tokens` when the server sends one
//! (`stream_options.include_usage`), else the number of content chunks.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sse::SseDecoder;
use crate::workload::{RequestKind, RequestSpec};

/// Error responses are read up to this size, for their message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Where and how requests are sent.
#[derive(Debug, Clone)]
pub struct Target {
    pub client: reqwest::Client,
    /// Without a trailing slash, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub api_key: Option<String>,
    /// `None`: the field is left out (servers with one model accept that).
    pub model: Option<String>,
    pub temperature: f64,
    /// vLLM's `ignore_eos` extension: generate exactly max_tokens.
    pub ignore_eos: bool,
    /// OpenAI's `response_format`, on chat requests.
    pub response_format: Option<Value>,
    pub timeout: Duration,
}

impl Target {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.api_key {
            if let Ok(value) = HeaderValue::from_str(&format!("Bearer {key}")) {
                headers.insert(AUTHORIZATION, value);
            }
        }
        headers
    }

    fn body(&self, spec: &RequestSpec) -> Value {
        let mut body = json!({
            "messages": spec.messages,
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "seed": spec.seed,
        });
        if let Some(model) = &self.model {
            body["model"] = json!(model);
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        match spec.kind {
            RequestKind::Chat => {
                if let Some(format) = &self.response_format {
                    body["response_format"] = format.clone();
                }
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            RequestKind::Diagnose => {
                body["stream"] = json!(false);
                body["diagnostics"] = json!({});
            }
        }
        body
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A non-2xx status.
    Http,
    /// No connection could be made.
    Connect,
    /// The request ran past `--timeout`.
    Timeout,
    /// The connection broke while the body was read.
    Body,
    /// An error object inside a 200 stream (the server failed mid-generation).
    StreamError,
    /// A frame that is not JSON, or a stream that ended before `[DONE]`.
    Protocol,
    /// Any other client-side failure.
    Transport,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Body => "body",
            Self::StreamError => "stream_error",
            Self::Protocol => "protocol",
            Self::Transport => "transport",
        }
    }

    /// Whether the server may have received the request without the client seeing a status.
    pub fn status_unseen(self) -> bool {
        matches!(self, Self::Timeout | Self::Transport)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    pub kind: ErrorKind,
    /// OpenAI's `error.code` (or `type`) when the server sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
}

/// Where the output token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    Usage,
    Chunks,
}

/// What one request did, times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    pub kind: RequestKind,
    pub images: usize,
    pub max_tokens: u32,
    /// The planned send offset from the run's start (open loop only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_s: Option<f64>,
    /// The actual send offset from the run's start.
    pub start_s: f64,
    /// When the request was over (answered, failed or timed out), from the run's start.
    #[serde(default)]
    pub end_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RequestError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2e_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens_source: Option<TokenSource>,
    /// The usage's `prompt_tokens` (diagnose: `meta.prompt_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// The usage's `completion_tokens`, when the server sent usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_completion_tokens: Option<u64>,
    pub content_chunks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Gaps between content chunks (kept out of the JSON: the summary has them).
    #[serde(skip)]
    pub itl_s: Vec<f64>,
    /// Arrival offsets of the content chunks from the run's start, for throughput over time.
    #[serde(skip)]
    pub chunk_offsets_s: Vec<f64>,
}

impl RequestRecord {
    pub fn new(spec: &RequestSpec, scheduled_s: Option<f64>, start_s: f64) -> Self {
        Self {
            index: spec.index,
            kind: spec.kind,
            images: spec.images.len(),
            max_tokens: spec.max_tokens,
            scheduled_s,
            start_s,
            end_s: start_s,
            status: None,
            error: None,
            ttft_s: None,
            e2e_s: None,
            output_tokens: None,
            output_tokens_source: None,
            prompt_tokens: None,
            usage_completion_tokens: None,
            content_chunks: 0,
            finish_reason: None,
            itl_s: Vec::new(),
            chunk_offsets_s: Vec::new(),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// vLLM's TPOT: (e2e − TTFT) / (output tokens − 1), for requests with more than one token.
    pub fn tpot_s(&self) -> Option<f64> {
        match (self.e2e_s, self.ttft_s, self.output_tokens) {
            (Some(e2e), Some(ttft), Some(n)) if n > 1 && self.succeeded() => {
                Some((e2e - ttft) / (n - 1) as f64)
            }
            _ => None,
        }
    }

    fn fail(&mut self, kind: ErrorKind, code: Option<String>, message: impl Into<String>) {
        self.error = Some(RequestError {
            kind,
            code,
            message: message.into(),
        });
    }
}

/// Sends `spec` and measures it. `run_start` is the run's time origin for the offsets.
pub async fn send(
    target: &Target,
    spec: &RequestSpec,
    run_start: Instant,
    scheduled_s: Option<f64>,
) -> RequestRecord {
    // The body is serialised before the clock starts, as vLLM does.
    let body = serde_json::to_vec(&target.body(spec)).expect("JSON values serialise");
    let request = target
        .client
        .post(target.url(spec.kind.route()))
        .headers(target.headers())
        .header(CONTENT_TYPE, "application/json")
        .body(body);
    let sent = Instant::now();
    let mut record = RequestRecord::new(
        spec,
        scheduled_s,
        sent.duration_since(run_start).as_secs_f64(),
    );
    let exchange = async {
        match spec.kind {
            RequestKind::Chat => stream_chat(request, sent, run_start, &mut record).await,
            RequestKind::Diagnose => diagnose(request, sent, &mut record).await,
        }
    };
    if tokio::time::timeout(target.timeout, exchange)
        .await
        .is_err()
    {
        record.fail(
            ErrorKind::Timeout,
            None,
            format!("no complete answer within {:?}", target.timeout),
        );
    }
    record.end_s = run_start.elapsed().as_secs_f64();
    record
}

fn transport_error(err: &reqwest::Error) -> ErrorKind {
    if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_connect() {
        ErrorKind::Connect
    } else if err.is_body() || err.is_decode() {
        ErrorKind::Body
    } else {
        ErrorKind::Transport
    }
}

/// Full error chain: reqwest's top-level message rarely names the cause.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// OpenAI's error object `{"error": {"message", "type", "code"}}` (or vLLM's flat variant).
fn error_details(body: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(body);
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (None, text.chars().take(300).collect());
    };
    let error = value.get("error").unwrap_or(&value);
    let code = error
        .get("code")
        .and_then(|c| match c {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .or_else(|| error.get("type").and_then(Value::as_str).map(String::from));
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| text.chars().take(300).collect());
    (code, message)
}

/// Sends, and on a non-2xx status records the error; returns the response when it is 2xx.
async fn open(
    request: reqwest::RequestBuilder,
    record: &mut RequestRecord,
) -> Option<reqwest::Response> {
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => {
            record.fail(transport_error(&err), None, describe(&err));
            return None;
        }
    };
    let status = response.status();
    record.status = Some(status.as_u16());
    if status.is_success() {
        return Some(response);
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_LIMIT {
            break;
        }
    }
    let (code, message) = error_details(&body);
    record.fail(ErrorKind::Http, code, message);
    None
}

async fn stream_chat(
    request: reqwest::RequestBuilder,
    sent: Instant,
    run_start: Instant,
    record: &mut RequestRecord,
) {
    let Some(response) = open(request, record).await else {
        return;
    };
    let mut stream = response.bytes_stream();
    let mut decoder = SseDecoder::new();
    let mut last_content: Option<Instant> = None;
    let mut last_frame: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                record.fail(transport_error(&err), None, describe(&err));
                return;
            }
        };
        let now = Instant::now();
        for data in decoder.push(&chunk) {
            if done {
                continue;
            }
            if data.trim() == "[DONE]" {
                done = true;
                continue;
            }
            let frame: Value = match serde_json::from_str(&data) {
                Ok(frame) => frame,
                Err(err) => {
                    record.fail(
                        ErrorKind::Protocol,
                        None,
                        format!("a stream frame is not JSON ({err}): {data:.200}"),
                    );
                    return;
                }
            };
            if frame.get("error").is_some() {
                let (code, message) = error_details(data.as_bytes());
                record.fail(ErrorKind::StreamError, code, message);
                return;
            }
            last_frame = Some(now);
            if let Some(choice) = frame["choices"].as_array().and_then(|c| c.first()) {
                let content = choice["delta"]["content"].as_str().unwrap_or_default();
                if !content.is_empty() {
                    match last_content {
                        None => record.ttft_s = Some((now - sent).as_secs_f64()),
                        Some(previous) => record.itl_s.push((now - previous).as_secs_f64()),
                    }
                    last_content = Some(now);
                    record.content_chunks += 1;
                    record
                        .chunk_offsets_s
                        .push(now.duration_since(run_start).as_secs_f64());
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    record.finish_reason = Some(reason.to_string());
                }
            }
            if let Some(usage) = frame.get("usage").filter(|u| u.is_object()) {
                record.prompt_tokens = usage["prompt_tokens"].as_u64();
                record.usage_completion_tokens = usage["completion_tokens"].as_u64();
            }
        }
    }
    if !done {
        record.fail(
            ErrorKind::Protocol,
            None,
            "the stream ended before `data: [DONE]`",
        );
        return;
    }
    record.e2e_s = last_frame.map(|t| (t - sent).as_secs_f64());
    (record.output_tokens, record.output_tokens_source) = match record.usage_completion_tokens {
        Some(n) => (Some(n), Some(TokenSource::Usage)),
        None => (Some(record.content_chunks), Some(TokenSource::Chunks)),
    };
}

/// The diagnose endpoint answers one JSON object (`meta`, `layers`, `summary`, `answer`); only
/// its end-to-end time is measured.
async fn diagnose(request: reqwest::RequestBuilder, sent: Instant, record: &mut RequestRecord) {
    let Some(response) = open(request, record).await else {
        return;
    };
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(err) => {
            record.fail(transport_error(&err), None, describe(&err));
            return;
        }
    };
    record.e2e_s = Some(sent.elapsed().as_secs_f64());
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(err) => {
            record.fail(
                ErrorKind::Protocol,
                None,
                format!("the diagnose answer is not JSON: {err}"),
            );
            return;
        }
    };
    record.prompt_tokens = value["meta"]["prompt_tokens"]
        .as_u64()
        .or_else(|| value["usage"]["prompt_tokens"].as_u64());
    record.usage_completion_tokens = value["usage"]["completion_tokens"].as_u64();
    if let Some(n) = record.usage_completion_tokens {
        record.output_tokens = Some(n);
        record.output_tokens_source = Some(TokenSource::Usage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_carry_the_response_format_and_diagnose_bodies_do_not() {
        let mut target = Target {
            client: reqwest::Client::new(),
            base_url: "http://127.0.0.1:1".into(),
            api_key: None,
            model: None,
            temperature: 0.0,
            ignore_eos: true,
            response_format: Some(json!({"type": "json_object"})),
            timeout: Duration::from_secs(1),
        };
        let mut spec = RequestSpec {
            index: 0,
            kind: RequestKind::Chat,
            messages: json!([]),
            images: vec![],
            max_tokens: 8,
            seed: 0,
        };
        let body = target.body(&spec);
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
        assert_eq!(body["ignore_eos"], json!(true));
        spec.kind = RequestKind::Diagnose;
        assert!(target.body(&spec).get("response_format").is_none());
        target.response_format = None;
        spec.kind = RequestKind::Chat;
        assert!(target.body(&spec).get("response_format").is_none());
    }

    #[test]
    fn openai_and_flat_error_bodies_give_code_and_message() {
        let (code, message) = error_details(
            br#"{"error":{"message":"queue full","type":"server_error","code":"queue_full"}}"#,
        );
        assert_eq!(code.as_deref(), Some("queue_full"));
        assert_eq!(message, "queue full");
        let (code, message) = error_details(
            br#"{"object":"error","message":"m","type":"BadRequestError","code":400}"#,
        );
        assert_eq!(code.as_deref(), Some("400"));
        assert_eq!(message, "m");
        let (code, message) = error_details(b"plain text");
        assert_eq!((code, message.as_str()), (None, "plain text"));
    }

    #[test]
    fn tpot_follows_vllm() {
        let spec = RequestSpec {
            index: 0,
            kind: RequestKind::Chat,
            messages: json!([]),
            images: vec![],
            max_tokens: 8,
            seed: 0,
        };
        let mut record = RequestRecord::new(&spec, None, 0.0);
        record.ttft_s = Some(0.2);
        record.e2e_s = Some(0.38);
        record.output_tokens = Some(10);
        assert!((record.tpot_s().unwrap() - 0.02).abs() < 1e-12);
        record.output_tokens = Some(1);
        assert_eq!(record.tpot_s(), None);
    }
}
