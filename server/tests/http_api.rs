//! The HTTP surface, in process, against the scripted fake model: responses, SSE framing, the
//! error matrix, backpressure, cancellation, continuous batching, shutdown and metrics.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use server::metrics::names;

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap()
}

/// Content deltas, finish reason and usage of a parsed SSE stream (asserting its framing).
struct Streamed {
    text: String,
    deltas: Vec<String>,
    finish_reason: String,
    usage: Option<Value>,
}

fn parse_stream(frames: &[String]) -> Streamed {
    assert_eq!(
        frames.last().map(String::as_str),
        Some("[DONE]"),
        "ends with [DONE]"
    );
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert!(!chunks.is_empty());
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"], "one id per completion");
        assert_eq!(chunk["model"], MODEL_ID);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "role first"
    );
    let mut finish_reason = None;
    let mut usage = None;
    let mut deltas = Vec::new();
    for (i, chunk) in chunks.iter().enumerate().skip(1) {
        let choices = chunk["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert_eq!(i, chunks.len() - 1, "usage chunk is last");
            usage = Some(chunk["usage"].clone());
            continue;
        }
        assert!(
            finish_reason.is_none(),
            "nothing but usage after finish_reason"
        );
        assert!(choices[0]["delta"].get("role").is_none(), "role only once");
        if let Some(text) = choices[0]["delta"]["content"].as_str() {
            assert!(!text.contains('\u{FFFD}'), "split character in {text:?}");
            deltas.push(text.to_string());
        }
        if let Some(reason) = choices[0]["finish_reason"].as_str() {
            finish_reason = Some(reason.to_string());
        }
    }
    Streamed {
        text: deltas.concat(),
        deltas,
        finish_reason: finish_reason.expect("a finish_reason"),
        usage,
    }
}

#[tokio::test]
async fn chat_completion_returns_text_and_usage() {
    let server = TestServer::start(TestOptions::default()).await;
    let (status, body) = server.chat(&text_request("Say hello")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL_ID);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let text = content(&body);
    assert!(
        !text.is_empty() && SCRIPT.repeat(2).contains(text),
        "{text:?}"
    );
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 16);
    // BOS + "user: Say hello\n" + "assistant: "
    assert_eq!(
        usage["prompt_tokens"],
        1 + "user: Say hello\nassistant: ".len()
    );
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 16)
    );
}

#[tokio::test]
async fn streaming_frames_role_deltas_finish_usage_done() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut request = text_request("Stream this please");
    request["max_tokens"] = json!(40);
    let (_, plain) = server.chat(&request).await;

    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = server.post_chat(&request).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let frames = sse_data(&response.text().await.unwrap());
    let streamed = parse_stream(&frames);
    assert_eq!(streamed.text, content(&plain), "stream and JSON agree");
    assert_eq!(streamed.finish_reason, "length");
    assert!(streamed.deltas.len() > 5);
    assert_eq!(streamed.usage.unwrap(), plain["usage"]);
}

#[tokio::test]
async fn multibyte_characters_arrive_whole_in_stream_deltas() {
    let server = TestServer::start(TestOptions::default()).await;
    // Long enough to walk the whole script, which holds 'ö' (2 bytes) and '😀' (4 bytes).
    let mut request = text_request("unicode");
    request["max_tokens"] = json!(SCRIPT.len() + 4);
    request["stream"] = json!(true);
    let (_, frames) = server.stream(&request).await;
    let streamed = parse_stream(&frames);
    assert!(streamed.text.contains('😀') && streamed.text.contains('ö'));
    // The fake's bytes from 0x80 on are byte-fallback pieces: a run of them is held until the
    // next token shows it complete, so the emoji arrives whole, with that token's text.
    assert!(streamed.deltas.iter().any(|d| d.starts_with('😀')));
    assert!(streamed.usage.is_none(), "no usage chunk unless asked");
}

#[tokio::test]
async fn stop_strings_cut_the_output_in_json_and_stream() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut request = text_request("stop test");
    request["max_tokens"] = json!(SCRIPT.len() * 2);
    request["stop"] = json!(["fake", "never-there"]);
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 200);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let text = content(&body);
    assert!(!text.contains("fake") && !text.contains("fak"), "{text:?}");
    assert!(text.ends_with("a "), "{text:?}");

    request["stream"] = json!(true);
    let (_, frames) = server.stream(&request).await;
    let streamed = parse_stream(&frames);
    assert_eq!(streamed.text, text);
    assert_eq!(streamed.finish_reason, "stop");
}

#[tokio::test]
async fn eos_finishes_with_stop_and_counts_the_token() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut request = text_request("EOS@5 now");
    request["max_tokens"] = json!(50);
    let (_, body) = server.chat(&request).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 6, "5 tokens + EOS");
    assert_eq!(content(&body).len(), 5);
}

#[tokio::test]
async fn same_seed_same_output_and_logprobs_are_reported() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut request = text_request("sample me");
    request["temperature"] = json!(1.0);
    request["max_tokens"] = json!(48);
    request["seed"] = json!(42);
    let (_, a) = server.chat(&request).await;
    let (_, b) = server.chat(&request).await;
    assert_eq!(content(&a), content(&b));
    request["seed"] = json!(7);
    let (_, c) = server.chat(&request).await;
    assert_ne!(content(&a), content(&c), "the seed matters");

    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(2);
    let (_, body) = server.chat(&request).await;
    let entries = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(entries.len(), 48);
    for entry in entries {
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
    }
    assert!(a["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn images_as_data_uris_and_local_urls_take_prompt_positions() {
    let image_server =
        axum::Router::new().route("/cat.png", axum::routing::get(|| async { png(40, 30) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let image_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, image_server).await.unwrap() });

    let mut options = TestOptions::default();
    options.serving.media.allow_private = true;
    let server = TestServer::start(options).await;
    let request = json!({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": data_uri(&png(16, 16), "image/png")}},
            {"type": "image_url", "image_url": {"url": format!("http://{image_addr}/cat.png")}}
        ]}],
        "max_tokens": 4
    });
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 200, "{body}");
    let text_only = 1 + "user: Compare\nassistant: ".len();
    assert_eq!(body["usage"]["prompt_tokens"], text_only + 2 * IMAGE_TOKENS);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["image_tokens"],
        2 * IMAGE_TOKENS
    );
    let metrics = server.metrics_text().await;
    assert_eq!(sample(&metrics, names::IMAGES_TOTAL), Some(2.0));
    assert_eq!(
        sample(&metrics, names::IMAGE_TOKENS_TOTAL),
        Some((2 * IMAGE_TOKENS) as f64)
    );
}

/// Sends `request` and checks status, error code and (if given) param.
async fn expect_error(
    server: &TestServer,
    request: reqwest::RequestBuilder,
    status: u16,
    code: &str,
    param: Option<&str>,
) {
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), status, "expected {code}");
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["type"].is_string());
    if let Some(param) = param {
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let _ = server;
}

fn with_image(url: &str) -> Value {
    json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": url}}
    ]}]})
}

#[tokio::test]
async fn error_matrix_gets_serving_md_statuses_and_the_server_goes_on() {
    let mut options = TestOptions::default();
    options.http.max_body_bytes = 64 * 1024;
    options.max_model_len = 256;
    let server = TestServer::start(options).await;
    let chat = || server.client.post(server.url("/v1/chat/completions"));
    let image_param = Some("messages[0].content[1].image_url");

    expect_error(
        &server,
        chat()
            .header("content-type", "application/json")
            .body("{\"messages\": ["),
        400,
        "invalid_json",
        None,
    )
    .await;
    expect_error(
        &server,
        chat().header("content-type", "text/plain").body("{}"),
        415,
        "unsupported_media_type",
        None,
    )
    .await;
    expect_error(
        &server,
        chat().body("{}"),
        415,
        "unsupported_media_type",
        None,
    )
    .await;
    expect_error(
        &server,
        chat().json(&json!({"messages": [{"role": "user", "content": 5}]})),
        400,
        "invalid_value",
        Some("messages[0].content"),
    )
    .await;
    expect_error(
        &server,
        chat().json(&json!({"messages": [{"role": "tool", "content": "x"}]})),
        400,
        "invalid_value",
        Some("messages[0].role"),
    )
    .await;
    expect_error(
        &server,
        chat().json(&json!({"messages": []})),
        400,
        "invalid_value",
        Some("messages"),
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image("data:image/png;base64,@@not base64@@")),
        400,
        "invalid_image",
        image_param,
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image(&data_uri(b"hello, not an image", "image/png"))),
        400,
        "invalid_image",
        image_param,
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image(&data_uri(
            &png_header_claiming(100_000, 100_000),
            "image/png",
        ))),
        400,
        "invalid_image",
        image_param,
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image("http://127.0.0.1:9/x.png")),
        400,
        "invalid_image_url",
        image_param,
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image("http://localhost:9/x.png")),
        400,
        "invalid_image_url",
        image_param,
    )
    .await;
    expect_error(
        &server,
        chat().json(&with_image("ftp://example.com/x.png")),
        400,
        "invalid_image_url",
        image_param,
    )
    .await;
    let big = "x".repeat(100 * 1024);
    expect_error(
        &server,
        chat().json(&text_request(&big)),
        413,
        "request_too_large",
        None,
    )
    .await;
    let long = "y".repeat(300);
    expect_error(
        &server,
        chat().json(&text_request(&long)),
        400,
        "context_length_exceeded",
        Some("messages"),
    )
    .await;
    let mut over = text_request("short");
    over["max_tokens"] = json!(250);
    let response = chat().json(&over).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "context_length_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("256") && message.contains("250"),
        "counts in {message}"
    );
    let mut unknown = text_request("x");
    unknown["model"] = json!("gpt-4o");
    expect_error(
        &server,
        chat().json(&unknown),
        404,
        "model_not_found",
        Some("model"),
    )
    .await;
    let mut n0 = text_request("x");
    n0["n"] = json!(0);
    expect_error(&server, chat().json(&n0), 400, "invalid_value", Some("n")).await;
    for (field, value) in [
        ("temperature", json!(3)),
        ("top_p", json!(1.5)),
        ("max_tokens", json!(0)),
        ("top_logprobs", json!(5)),
    ] {
        let mut bad = text_request("x");
        bad[field] = value;
        expect_error(
            &server,
            chat().json(&bad),
            400,
            "invalid_value",
            Some(field),
        )
        .await;
    }
    let mut options_without_stream = text_request("x");
    options_without_stream["stream_options"] = json!({"include_usage": true});
    expect_error(
        &server,
        chat().json(&options_without_stream),
        400,
        "invalid_value",
        Some("stream_options"),
    )
    .await;
    let many: Vec<Value> = (0..9)
        .map(|_| json!({"type": "image_url", "image_url": {"url": data_uri(&png(4, 4), "image/png")}}))
        .collect();
    expect_error(
        &server,
        chat().json(&json!({"messages": [{"role": "user", "content": many}]})),
        400,
        "too_many_images",
        None,
    )
    .await;
    expect_error(
        &server,
        server.client.get(server.url("/v1/nothing")),
        404,
        "unknown_url",
        None,
    )
    .await;
    expect_error(
        &server,
        server.client.get(server.url("/v1/chat/completions")),
        405,
        "method_not_allowed",
        None,
    )
    .await;

    // Unknown fields are ignored, and the server still answers normally.
    let mut fine = text_request("still there?");
    fine["presence_penalty"] = json!(0.3);
    fine["some_vendor_field"] = json!({"a": 1});
    let (status, _) = server.chat(&fine).await;
    assert_eq!(status, 200);
    assert_eq!(
        *server.observed.prefills.lock().unwrap(),
        1,
        "bad requests never reached the model"
    );
}

#[tokio::test]
async fn a_model_fault_fails_only_its_own_request() {
    let mut options = TestOptions::default();
    options.fake.step_delay = Duration::from_millis(2);
    let server = TestServer::start(options).await;
    let mut long = text_request("bystander");
    long["max_tokens"] = json!(100);
    let bystander = server.chat(&long);
    let faults = async {
        let (status, body) = server.chat(&text_request("PANIC please")).await;
        assert_eq!(status, 500);
        assert_eq!(error_code(&body), "internal_error");
        let (status, _) = server.chat(&text_request("FAIL please")).await;
        assert_eq!(status, 500);
        // A panic in the per-token step (sampling) is caught like one in the model.
        let (status, body) = server.chat(&text_request("POISON please")).await;
        assert_eq!(status, 500, "{body}");
    };
    let ((status, body), ()) = tokio::join!(bystander, faults);
    assert_eq!(status, 200);
    assert_eq!(body["usage"]["completion_tokens"], 100);
    let (status, _) = server.chat(&text_request("after")).await;
    assert_eq!(status, 200);
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let server = TestServer::start(TestOptions::default()).await;
    let response = server
        .client
        .get(server.url("/health"))
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-42");
    let response = server.post_chat(&text_request("hi")).await;
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health_and_metrics() {
    let mut options = TestOptions::default();
    options.http.api_keys = vec!["sk-one".into(), "sk-two".into()];
    let server = TestServer::start(options).await;
    let chat = || {
        server
            .client
            .post(server.url("/v1/chat/completions"))
            .json(&text_request("hi"))
    };
    expect_error(&server, chat(), 401, "invalid_api_key", None).await;
    expect_error(
        &server,
        chat().bearer_auth("sk-wrong"),
        401,
        "invalid_api_key",
        None,
    )
    .await;
    expect_error(
        &server,
        server.client.get(server.url("/v1/models")),
        401,
        "invalid_api_key",
        None,
    )
    .await;
    assert_eq!(
        chat().bearer_auth("sk-two").send().await.unwrap().status(),
        200
    );
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        let status = server
            .client
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    let metrics = server.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            &format!(
                r#"{}{{reason="invalid_api_key"}}"#,
                names::REQUESTS_REJECTED_TOTAL
            )
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn protected_operational_routes_need_the_key_too() {
    let mut options = TestOptions::default();
    options.http.api_keys = vec!["sk-one".into()];
    options.http.protect_public_routes = true;
    let server = TestServer::start(options).await;
    for path in ["/health", "/metrics", "/openapi.json"] {
        let status = server
            .client
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "{path}");
        let status = server
            .client
            .get(server.url(path))
            .bearer_auth("sk-one")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test]
async fn cors_preflight_answers_for_configured_origins() {
    let mut options = TestOptions::default();
    options.http.cors_origins = vec!["http://app.example".into()];
    options.http.api_keys = vec!["sk".into()];
    let server = TestServer::start(options).await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let response = preflight("http://app.example").await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let response = preflight("http://evil.example").await.unwrap();
    assert!(!response
        .headers()
        .contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn ready_is_503_until_the_model_is_loaded() {
    let options = TestOptions {
        load_model: false,
        ..TestOptions::default()
    };
    let server = TestServer::start(options).await;
    let get = |path: &'static str| server.client.get(server.url(path)).send();
    assert_eq!(get("/health").await.unwrap().status(), 200);
    expect_error(
        &server,
        server.client.get(server.url("/ready")),
        503,
        "not_ready",
        None,
    )
    .await;
    expect_error(
        &server,
        server
            .client
            .post(server.url("/v1/chat/completions"))
            .json(&text_request("x")),
        503,
        "not_ready",
        None,
    )
    .await;

    server.load(&TestOptions::default());
    assert_eq!(get("/ready").await.unwrap().status(), 200);
    let models: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    let model = &models["data"][0];
    assert_eq!(model["id"], MODEL_ID);
    assert_eq!(model["object"], "model");
    assert_eq!(model["max_model_len"], 512);
    assert_eq!(model["supports_images"], true);
    assert_eq!(model["builtin"], false);
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(
        r#"tga_model_info{arch="llava_next",device="cpu",dtype="f32",model="fake-llava"} 1"#
    ));
}

#[tokio::test]
async fn max_model_len_flag_lowers_the_context() {
    let mut options = TestOptions::default();
    options.serving.max_model_len = Some(64);
    let server = TestServer::start(options).await;
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 64);
    let mut request = text_request("hello");
    request["max_tokens"] = json!(60);
    let (status, body) = server.chat(&request).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "context_length_exceeded")
    );
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    let gate = Gate::closed();
    let mut options = TestOptions::default();
    options.serving.engine.max_num_seqs = 1;
    options.serving.engine.max_waiting = 1;
    options.fake.gate = Some(gate.clone());
    let server = TestServer::start(options).await;

    let running = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/v1/chat/completions"));
        async move {
            client
                .post(url)
                .json(&text_request("first"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    assert!(
        eventually(|| server.metrics.running.get() == 1).await,
        "first is running"
    );
    let waiting = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/v1/chat/completions"));
        async move {
            client
                .post(url)
                .json(&text_request("second"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    assert!(
        eventually(|| server.metrics.waiting.get() == 1).await,
        "second is waiting"
    );

    let response = server.post_chat(&text_request("third")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "queue_full");

    gate.open();
    assert_eq!(running.await.unwrap(), 200);
    assert_eq!(waiting.await.unwrap(), 200);
    let metrics = server.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            r#"tga_requests_rejected_total{reason="queue_full"}"#
        ),
        Some(1.0)
    );
    assert_eq!(server.metrics.waiting.get(), 0);
    // The slot is free again.
    assert_eq!(
        server.post_chat(&text_request("fourth")).await.status(),
        200
    );
}

#[tokio::test]
async fn disconnected_streams_free_their_slots_and_are_counted() {
    let mut options = TestOptions::default();
    options.fake.step_delay = Duration::from_millis(2);
    options.serving.engine.max_num_seqs = 4;
    options.max_model_len = 100_000;
    let server = TestServer::start(options).await;
    let mut request = text_request("never ending");
    request["max_tokens"] = json!(50_000);
    request["stream"] = json!(true);

    let mut clients = Vec::new();
    for _ in 0..10 {
        // A fresh connection each, as separate clients would have.
        let client = reqwest::Client::new();
        let mut response = client
            .post(server.url("/v1/chat/completions"))
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let first = response.chunk().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&first).unwrap().contains("assistant"));
        clients.push((client, response));
    }
    // Six are waiting; none may block the others' disconnection.
    drop(clients);
    assert!(
        eventually(|| server.metrics.running.get() == 0 && server.metrics.waiting.get() == 0).await,
        "running {} waiting {}",
        server.metrics.running.get(),
        server.metrics.waiting.get()
    );
    assert_eq!(server.metrics.client_disconnects.get(), 10);
    let (status, _) = server.chat(&text_request("next")).await;
    assert_eq!(status, 200, "slots are free");
}

#[tokio::test]
async fn continuous_batching_runs_concurrent_requests_together_with_solo_outputs() {
    let mut options = TestOptions::default();
    options.fake.step_delay = Duration::from_millis(3);
    options.serving.engine.max_num_seqs = 6;
    let server = TestServer::start(options).await;
    let requests: Vec<Value> = (0..12)
        .map(|i| {
            let mut request = text_request(&format!("request number {i}"));
            request["max_tokens"] = json!(10 + 7 * i);
            request["stream"] = json!(i % 2 == 0);
            request
        })
        .collect();
    let run = |request: Value| {
        let server = &server;
        async move {
            if request["stream"] == json!(true) {
                let (status, frames) = server.stream(&request).await;
                assert_eq!(status, 200);
                parse_stream(&frames).text
            } else {
                let (status, body) = server.chat(&request).await;
                assert_eq!(status, 200);
                content(&body).to_string()
            }
        }
    };
    let together = futures_util::future::join_all(requests.iter().cloned().map(run)).await;

    let sizes = server.observed.batch_sizes.lock().unwrap().clone();
    let widest = sizes.iter().copied().max().unwrap();
    assert!(widest > 1, "batches above 1: {sizes:?}");
    assert!(widest <= 6, "max_num_seqs respected: {sizes:?}");

    let mut alone = Vec::new();
    for request in requests.iter().cloned() {
        alone.push(run(request).await);
    }
    assert_eq!(together, alone, "same text batched as alone");

    let metrics = server.metrics_text().await;
    let count = sample(&metrics, "tga_batch_size_count").unwrap();
    let ones = sample(&metrics, r#"tga_batch_size_bucket{le="1"}"#).unwrap();
    assert!(count > ones, "the histogram shows batches above 1");
    assert_eq!(
        sample(
            &metrics,
            r#"tga_requests_total{route="/v1/chat/completions",status="200"}"#
        ),
        Some(24.0)
    );
}

#[tokio::test]
async fn metrics_agree_with_the_responses() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    for i in 0..3 {
        let mut request = text_request(&format!("count {i}"));
        request["max_tokens"] = json!(5 + i);
        let (_, body) = server.chat(&request).await;
        prompt_tokens += body["usage"]["prompt_tokens"].as_u64().unwrap();
        completion_tokens += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let _ = server.client.get(server.url("/nope")).send().await.unwrap();
    let text = server.metrics_text().await;
    assert_eq!(
        sample(&text, names::PROMPT_TOKENS_TOTAL),
        Some(prompt_tokens as f64)
    );
    assert_eq!(
        sample(&text, names::GENERATION_TOKENS_TOTAL),
        Some(completion_tokens as f64)
    );
    assert_eq!(
        sample(&text, "tga_time_to_first_token_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "tga_request_duration_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "tga_request_queue_time_seconds_count"),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "tga_inter_token_latency_seconds_count"),
        Some((completion_tokens - 3) as f64)
    );
    assert_eq!(sample(&text, names::REQUESTS_RUNNING), Some(0.0));
    assert_eq!(sample(&text, names::REQUESTS_WAITING), Some(0.0));
    assert_eq!(
        sample(
            &text,
            r#"tga_requests_total{route="/v1/chat/completions",status="200"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"tga_requests_total{route="unmatched",status="404"}"#
        ),
        Some(1.0)
    );
    assert!(text.contains(r#"tga_time_to_first_token_seconds_bucket{le="2560"}"#));
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_requests_then_refuses() {
    let mut options = TestOptions::default();
    options.fake.step_delay = Duration::from_millis(5);
    let mut server = TestServer::start(options).await;
    let mut request = text_request("finish me");
    request["max_tokens"] = json!(60);
    request["stream"] = json!(true);
    let mut response = server.post_chat(&request).await;
    let _role = response.chunk().await.unwrap();
    assert!(eventually(|| server.metrics.running.get() == 1).await);

    server.begin_stop();
    assert!(eventually(|| server.state.model().is_err()).await);
    let err = server.state.model().err().unwrap();
    assert_eq!(err.code.as_str(), "shutting_down");
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let frames = sse_data(&rest);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    assert!(
        rest.contains(r#""finish_reason":"length""#),
        "finished within the grace period"
    );
    server.finished().await.unwrap();
}

#[tokio::test]
async fn shutdown_cuts_requests_that_outlive_the_grace_period() {
    let mut options = TestOptions::default();
    options.fake.step_delay = Duration::from_millis(5);
    options.grace = Duration::from_millis(100);
    options.max_model_len = 100_000;
    let mut server = TestServer::start(options).await;
    let mut request = text_request("too long");
    request["max_tokens"] = json!(50_000);
    request["stream"] = json!(true);
    let response = server.post_chat(&request).await;
    server.begin_stop();
    let frames = sse_data(&response.text().await.unwrap());
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down");
    tokio::time::timeout(Duration::from_secs(10), server.finished())
        .await
        .expect("serve returns after the grace period")
        .unwrap();
}

#[tokio::test]
async fn served_openapi_matches_the_committed_document() {
    let server = TestServer::start(TestOptions::default()).await;
    let served: Value = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi")).unwrap();
        // Keys sorted, whatever order serde_json keeps (llguidance turns on its
        // `preserve_order`), so the committed file only changes where the API does.
        let mut sorted = served.clone();
        sorted.sort_all_objects();
        std::fs::write(path, serde_json::to_string_pretty(&sorted).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(path)
            .expect("openapi/openapi.json (regenerate: UPDATE_OPENAPI=1 cargo test -p tga-serve --test http_api served_openapi)"),
    )
    .unwrap();
    assert_eq!(
        served, committed,
        "openapi/openapi.json is stale: regenerate with UPDATE_OPENAPI=1 cargo test -p tga-serve --test http_api served_openapi"
    );
    assert_eq!(
        served,
        serde_json::to_value(server::http::openapi()).unwrap()
    );
}

/// A request whose body never finishes arriving (a slow drip): it holds an admission permit
/// while its body is read.
async fn dripping_request(server: &TestServer) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = server.url("").trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"messages\"",
    )
    .await
    .unwrap();
    tcp
}

#[tokio::test]
async fn concurrency_permits_are_taken_before_the_body_is_read() {
    let mut options = TestOptions::default();
    options.http.max_concurrent_requests = 2;
    let server = TestServer::start(options).await;
    let first = dripping_request(&server).await;
    let second = dripping_request(&server).await;
    // Both permits are held by bodies that never end: the next request is refused at once.
    let mut refused = None;
    for _ in 0..100 {
        let response = server
            .client
            .post(server.url("/v1/chat/completions"))
            .json(&text_request("hi"))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        // The drips may not have reached the handler yet.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("a third request is refused while two bodies drip");
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(error_code(&body), "model_overloaded");
    // Health and metrics are not generation requests.
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // A closed connection gives its permit back.
    drop((first, second));
    let mut served = false;
    for _ in 0..100 {
        if server.chat(&text_request("hi")).await.0 == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served,
        "permits come back when the dripping clients go away"
    );
}

#[tokio::test]
async fn a_loopback_server_answers_only_to_loopback_host_names() {
    let mut options = TestOptions::default();
    options.http.loopback_only = true;
    options.http.allowed_hosts = vec!["box.lan".into()];
    let server = TestServer::start(options).await;
    for (host, status) in [
        ("127.0.0.1:8000", 200),
        ("localhost", 200),
        ("[::1]:1", 200),
        ("box.lan:8000", 200),
        ("attacker.example", 421),
        ("attacker.example:8000", 421),
    ] {
        let response = server
            .client
            .get(server.url("/v1/models"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{host}");
        if status == 421 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(error_code(&body), "invalid_host");
        }
    }
}

#[tokio::test]
async fn stop_strings_and_text_are_bounded_before_tokenizing() {
    let server = TestServer::start(TestOptions::default()).await;
    let mut long_stop = text_request("hi");
    long_stop["stop"] = json!(["x".repeat(257)]);
    let (status, body) = server.chat(&long_stop).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_value"),
        "{body}"
    );
    assert_eq!(body["error"]["param"], "stop");
    let mut ok_stop = text_request("hi");
    ok_stop["stop"] = json!(["x".repeat(256)]);
    assert_eq!(server.chat(&ok_stop).await.0, 200);
    // The fake tokenizer is byte-level: text over max_model_len bytes cannot fit.
    let (status, body) = server.chat(&text_request(&"a".repeat(513))).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "context_length_exceeded"),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bytes of text"));
}

#[tokio::test]
async fn the_request_pixel_budget_is_checked_from_the_headers() {
    let mut options = TestOptions::default();
    // photo_120x160.png is 19,200 pixels: one fits, two do not.
    options.serving.max_request_pixels = 30_000;
    let server = TestServer::start(options).await;
    let photo = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../fixtures/images/photo_120x160.png"
            ))
            .unwrap()
        )
    );
    let one = with_image(&photo);
    assert_eq!(server.chat(&one).await.0, 200);
    let mut two = one.clone();
    two["messages"][0]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "image_url", "image_url": {"url": photo}}));
    let (status, body) = server.chat(&two).await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_image"),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pixels"));
}

#[tokio::test]
async fn slow_heads_are_cut_and_open_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut options = TestOptions::default();
    options.http.connections.header_read_timeout = Duration::from_millis(300);
    options.http.connections.max_connections = 3;
    let server = TestServer::start(options).await;
    let address = server.url("").trim_start_matches("http://").to_string();
    // A head that never ends is closed after the header timeout (EOF, nothing served).
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the slow head was not cut");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Three idle connections fill the cap: a fourth is closed at once; health still answers
    // once they go.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut extra = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "a connection over the cap was served");
    drop(idle);
    let mut healthy = false;
    for _ in 0..50 {
        if let Ok(r) = server.client.get(server.url("/health")).send().await {
            if r.status() == 200 {
                healthy = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(healthy, "serving resumes when connections close");
}

#[tokio::test]
async fn models_by_id_version_and_the_bearer_scheme_in_any_case() {
    let mut options = TestOptions::default();
    options.http.api_keys = vec!["sk-one".into()];
    let server = TestServer::start(options).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = server
            .client
            .get(server.url(&format!("/v1/models/{MODEL_ID}")))
            .header("authorization", format!("{scheme} sk-one"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
        let model: Value = response.json().await.unwrap();
        assert_eq!(model["id"], MODEL_ID);
        assert_eq!(model["object"], "model");
    }
    expect_error(
        &server,
        server
            .client
            .get(server.url("/v1/models/gpt-4o"))
            .bearer_auth("sk-one"),
        404,
        "model_not_found",
        Some("model"),
    )
    .await;
    expect_error(
        &server,
        server
            .client
            .get(server.url("/v1/models/x"))
            .header("authorization", "Basic sk-one"),
        401,
        "invalid_api_key",
        None,
    )
    .await;
    let version: Value = server
        .client
        .get(server.url("/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}

// ---------------------------------------------------------------------------------------------
// Refused fields, /v1/completions, /tokenize, /detokenize

fn completion_text(body: &Value) -> &str {
    body["choices"][0]["text"].as_str().unwrap()
}

#[tokio::test]
async fn completions_tokenize_the_prompt_as_it_is_and_echo_it() {
    let server = TestServer::start(TestOptions::default()).await;
    let (status, body) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], MODEL_ID);
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["logprobs"].is_null());
    // BOS + the five bytes of the prompt: no chat template around it.
    assert_eq!(body["usage"]["prompt_tokens"], 6);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], 11);
    let text = completion_text(&body).to_string();
    assert!(!text.is_empty());

    // The same ids as token ids, as a batch of one, and with echo: the same completion.
    let ids = json!([BOS, 72, 101, 108, 108, 111]);
    for prompt in [ids.clone(), json!([ids]), json!(["Hello"])] {
        let (status, body) = post(
            &server,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 5, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(completion_text(&body), text, "{prompt}");
    }
    let (_, echoed) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(completion_text(&echoed), format!("Hello{text}"));
    // A token-id prompt is echoed decoded, special tokens kept.
    let (_, echoed) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 5, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(completion_text(&echoed), format!("<s>Hello{text}"));
    // Echo with nothing generated is the prompt alone.
    let (status, body) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 0, "echo": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(completion_text(&body), "Hello");
    assert_eq!(body["usage"]["completion_tokens"], 0);

    // OpenAI's default max_tokens is 16; the same seed gives the same text.
    let sampled = json!({"prompt": "Once", "temperature": 1.0, "seed": 7});
    let (_, first) = post(&server, "/v1/completions", &sampled).await;
    assert_eq!(first["usage"]["completion_tokens"], 16);
    let (_, second) = post(&server, "/v1/completions", &sampled).await;
    assert_eq!(completion_text(&first), completion_text(&second));

    let metrics = server.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "{}{{route=\"/v1/completions\",status=\"200\"}}",
                names::REQUESTS_TOTAL
            )
        ),
        Some(9.0)
    );
}

#[tokio::test]
async fn completions_stream_text_completion_frames() {
    let server = TestServer::start(TestOptions::default()).await;
    let request = json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0});
    let (_, whole) = post(&server, "/v1/completions", &request).await;
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["echo"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let frames = sse_data(&response.text().await.unwrap());
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["text"], "Hello", "the echo first");
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    let (last, texts) = rest.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let text: String = texts
        .iter()
        .skip(1)
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null());
            c["choices"][0]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, completion_text(&whole));
}

#[tokio::test]
async fn completion_logprobs_have_the_legacy_shape() {
    let server = TestServer::start(TestOptions::default()).await;
    for stream in [false, true] {
        let request = json!({"prompt": "Hi", "max_tokens": 6, "temperature": 0,
                             "logprobs": 2, "stream": stream});
        let logprobs: Vec<Value> = if stream {
            let response = server
                .client
                .post(server.url("/v1/completions"))
                .json(&request)
                .send()
                .await
                .unwrap();
            let frames = sse_data(&response.text().await.unwrap());
            frames[..frames.len() - 1]
                .iter()
                .map(|f| serde_json::from_str::<Value>(f).unwrap())
                .map(|c| c["choices"][0]["logprobs"].clone())
                .filter(|l| !l.is_null())
                .collect()
        } else {
            let (status, body) = post(&server, "/v1/completions", &request).await;
            assert_eq!(status, 200, "{body}");
            vec![body["choices"][0]["logprobs"].clone()]
        };
        let field = |name: &str| -> Vec<Value> {
            logprobs
                .iter()
                .flat_map(|l| l[name].as_array().unwrap().clone())
                .collect()
        };
        let (tokens, token_logprobs, top, offsets) = (
            field("tokens"),
            field("token_logprobs"),
            field("top_logprobs"),
            field("text_offset"),
        );
        assert_eq!(tokens.len(), 6, "stream: {stream}");
        assert_eq!(token_logprobs.len(), 6);
        assert_eq!(top.len(), 6);
        let mut offset = 0;
        for i in 0..6 {
            let token = tokens[i].as_str().unwrap();
            let alternatives = top[i].as_object().unwrap();
            // The two most likely, and the sampled token (one of them here: greedy). Keys are
            // texts, so alternatives with the same text (bytes of a split character) share one.
            assert!((1..=2).contains(&alternatives.len()), "{alternatives:?}");
            assert_eq!(alternatives[token], token_logprobs[i]);
            assert!(token_logprobs[i].as_f64().unwrap() <= 0.0);
            assert_eq!(offsets[i], offset);
            offset += token.chars().count();
        }
    }
}

#[tokio::test]
async fn completions_refuse_what_they_cannot_do() {
    let server = TestServer::start(TestOptions {
        max_model_len: 64,
        ..Default::default()
    })
    .await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"prompt": "a", "suffix": "b"}),
            400,
            "invalid_value",
            "suffix",
        ),
        (json!({"prompt": "a", "n": 0}), 400, "invalid_value", "n"),
        (
            json!({"prompt": "a", "best_of": 3}),
            400,
            "invalid_value",
            "best_of",
        ),
        (
            json!({"prompt": "a", "echo": true, "logprobs": 1}),
            400,
            "invalid_value",
            "echo",
        ),
        (
            json!({"prompt": "a", "logprobs": 21}),
            400,
            "invalid_value",
            "logprobs",
        ),
        (
            json!({"prompt": "a", "max_tokens": 0}),
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            json!({"prompt": "a", "presence_penalty": 0.5}),
            400,
            "invalid_value",
            "presence_penalty",
        ),
        (
            json!({"prompt": "a", "logit_bias": {"72": 5}}),
            400,
            "invalid_value",
            "logit_bias",
        ),
        (
            json!({"prompt": "a", "temperature": 3}),
            400,
            "invalid_value",
            "temperature",
        ),
        (
            json!({"prompt": "a", "stop": vec!["x"; 17]}),
            400,
            "invalid_value",
            "stop",
        ),
        (
            json!({"prompt": "a", "stream_options": {"include_usage": true}}),
            400,
            "invalid_value",
            "stream_options",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_value",
            "messages",
        ),
        (json!({}), 400, "invalid_value", "prompt"),
        (
            json!({"prompt": ["a", "b"]}),
            400,
            "invalid_value",
            "prompt",
        ),
        (
            json!({"prompt": [[1], [2]]}),
            400,
            "invalid_value",
            "prompt",
        ),
        (json!({"prompt": []}), 400, "invalid_value", "prompt"),
        (
            json!({"prompt": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}),
            400,
            "invalid_value",
            "prompt",
        ),
        (
            json!({"prompt": "look: <image>"}),
            400,
            "invalid_value",
            "prompt",
        ),
        (
            json!({"prompt": [BOS, IMAGE]}),
            400,
            "invalid_value",
            "prompt",
        ),
        (
            json!({"prompt": [BOS, VOCAB]}),
            400,
            "invalid_value",
            "prompt[1]",
        ),
        (
            json!({"prompt": "a".repeat(60), "max_tokens": 8}),
            400,
            "context_length_exceeded",
            "prompt",
        ),
        (
            json!({"prompt": "a".repeat(65)}),
            400,
            "context_length_exceeded",
            "prompt",
        ),
        (
            json!({"prompt": "a", "model": "gpt-3.5-turbo-instruct"}),
            404,
            "model_not_found",
            "model",
        ),
    ];
    for (body, status, code, param) in cases {
        let (got, answer) = post(&server, "/v1/completions", &body).await;
        assert_eq!(
            (got, error_code(&answer)),
            (status, code),
            "{body}: {answer}"
        );
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let (_, answer) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "look: <image>"}),
    )
    .await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/chat/completions"),
        "{answer}"
    );
    // Neutral values of the refused fields pass.
    let (status, body) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2, "suffix": null, "n": 1, "best_of": 1,
                "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let metrics = server.metrics_text().await;
    assert!(
        sample(
            &metrics,
            &format!(
                "{}{{reason=\"context_length_exceeded\"}}",
                names::REQUESTS_REJECTED_TOTAL
            )
        )
        .is_some_and(|n| n >= 2.0),
        "completions refusals are counted"
    );
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip_and_count_images() {
    let server = TestServer::start(TestOptions::default()).await;
    let (status, body) = post(&server, "/tokenize", &json!({"prompt": "Hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"count": 3, "max_model_len": 512, "tokens": [BOS, 72, 105]})
    );
    let (_, body) = post(
        &server,
        "/tokenize",
        &json!({"model": MODEL_ID, "prompt": "Hi", "add_special_tokens": false, "return_token_strs": true}),
    )
    .await;
    assert_eq!(body["tokens"], json!([72, 105]));
    assert_eq!(body["token_strs"], json!(["H", "i"]));
    let text = "Grüße, 世界 😀";
    let (_, tokens) = post(
        &server,
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    let (status, body) = post(&server, "/detokenize", &json!({"tokens": tokens["tokens"]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"prompt": text}));
    let (_, body) = post(&server, "/detokenize", &json!({"tokens": [BOS, 72, 105]})).await;
    assert_eq!(body["prompt"], "<s>Hi", "special tokens kept");

    // A chat is counted as the chat route feeds it: template and image positions.
    let photo = data_uri(&png(32, 24), "image/png");
    let mut chat = with_image(&photo);
    let (status, tokenized) = post(&server, "/tokenize", &chat).await;
    assert_eq!(status, 200, "{tokenized}");
    let tokens = tokenized["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.iter().filter(|&t| t == &json!(IMAGE)).count(),
        IMAGE_TOKENS
    );
    chat["max_tokens"] = json!(1);
    let (status, answer) = server.chat(&chat).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["usage"]["prompt_tokens"], tokenized["count"]);

    let messages = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("/tokenize", json!({}), "invalid_value", "prompt"),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": messages}),
            "invalid_value",
            "messages",
        ),
        (
            "/tokenize",
            json!({"messages": messages, "add_special_tokens": true}),
            "invalid_value",
            "add_special_tokens",
        ),
        (
            "/tokenize",
            json!({"messages": messages, "add_generation_prompt": false}),
            "invalid_value",
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            json!({"messages": messages, "continue_final_message": true}),
            "invalid_value",
            "continue_final_message",
        ),
        (
            "/tokenize",
            json!({"prompt": "a".repeat(513)}),
            "context_length_exceeded",
            "prompt",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}),
            "invalid_image",
            "messages[0].content[0].image_url",
        ),
        (
            "/detokenize",
            json!({"tokens": [1, VOCAB]}),
            "invalid_value",
            "tokens[1]",
        ),
        (
            "/detokenize",
            json!({"tokens": [-1]}),
            "invalid_value",
            "tokens[0]",
        ),
        (
            "/detokenize",
            json!({"tokens": [1], "model": "other"}),
            "model_not_found",
            "model",
        ),
    ];
    for (path, body, code, param) in cases {
        let (status, answer) = post(&server, path, &body).await;
        assert_eq!(error_code(&answer), code, "{path} {body}: {answer}");
        assert_eq!(status, if code == "model_not_found" { 404 } else { 400 });
        assert_eq!(answer["error"]["param"], param, "{path} {body}: {answer}");
    }
}

#[tokio::test]
async fn documented_fields_without_effect_are_refused_and_unknown_ones_accepted() {
    let server = TestServer::start(TestOptions::default()).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
                        "parameters": {"type": "object", "properties": {}}}}]);
    let with = |fields: Value| {
        let mut request = text_request("hi");
        request
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        request
    };
    for (fields, param) in [
        (json!({"tools": tools}), "tools"),
        (
            json!({"tools": tools, "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"tools": tools, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"functions": [{"name": "f", "parameters": {}}]}),
            "functions",
        ),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            "audio",
        ),
    ] {
        let (status, body) = server.chat(&with(fields.clone())).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_value"),
            "{fields}"
        );
        assert_eq!(body["error"]["param"], param, "{fields}");
    }
    // The diagnose route validates the same request.
    let (status, _) = post(
        &server,
        "/v1/safety/diagnose",
        &with(json!({"tools": tools})),
    )
    .await;
    assert_eq!(status, 400);
    for fields in [
        json!({"tools": tools, "tool_choice": "none"}),
        json!({"modalities": ["text"]}),
        json!({"a_field_no_one_documented": {"x": 1}, "parallel_tool_calls": false}),
    ] {
        let (status, body) = server.chat(&with(fields.clone())).await;
        assert_eq!(status, 200, "{fields}: {body}");
    }
}

/// Every limit the schema states is the one the handlers enforce: the constants agree, and a
/// value at each stated bound is served while one just past it is a 400 naming the field.
#[tokio::test]
async fn the_openapi_document_states_the_enforced_limits() {
    use model::sampling::{MAX_TEMPERATURE, MAX_TOP_LOGPROBS};
    use server::openai::diagnostics::{MAX_CAPTION_BYTES, MAX_FOCUS_ITEMS, MAX_MASK_SPANS};
    use server::validation::diagnostics::MAX_CAPTION_MAX_TOKENS;
    use server::validation::{MAX_STOP_BYTES, MAX_STOP_SEQUENCES};

    let doc = serde_json::to_value(server::http::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let chat = &schemas["ChatCompletionRequest"]["properties"];
    let completion = &schemas["CompletionRequest"]["properties"];
    for properties in [chat, completion] {
        let maximum = properties["temperature"]["maximum"].as_f64();
        assert_eq!(maximum, Some(f64::from(MAX_TEMPERATURE)));
    }
    assert_eq!(chat["top_logprobs"]["maximum"], json!(MAX_TOP_LOGPROBS));
    assert_eq!(completion["logprobs"]["maximum"], json!(MAX_TOP_LOGPROBS));
    assert_eq!(chat["messages"]["minItems"], 1);
    let stop = &schemas["StopSequences"]["oneOf"];
    assert_eq!(stop[0]["maxLength"], json!(MAX_STOP_BYTES));
    assert_eq!(stop[1]["maxItems"], json!(MAX_STOP_SEQUENCES));
    assert_eq!(
        schemas["MessageRole"]["enum"],
        json!(["system", "developer", "user", "assistant"])
    );
    let diagnostics = &schemas["DiagnosticsOptions"]["properties"];
    assert_eq!(diagnostics["focus"]["maxItems"], json!(MAX_FOCUS_ITEMS));
    assert_eq!(
        diagnostics["caption"]["maxLength"],
        json!(MAX_CAPTION_BYTES)
    );
    assert_eq!(
        diagnostics["caption_max_tokens"]["maximum"],
        json!(MAX_CAPTION_MAX_TOKENS)
    );
    assert_eq!(
        schemas["MaskAttentionOptions"]["properties"]["spans"]["maxItems"],
        json!(MAX_MASK_SPANS)
    );
    // The SSE frames of each streaming route, [DONE] among them.
    assert_eq!(schemas["StreamDone"]["enum"], json!(["[DONE]"]));
    for (path, frame) in [
        ("/v1/chat/completions", "ChatCompletionStreamFrame"),
        ("/v1/completions", "CompletionStreamFrame"),
        ("/v1/safety/diagnose", "DiagnoseStreamFrame"),
    ] {
        let content = &doc["paths"][path]["post"]["responses"]["200"]["content"];
        assert_eq!(
            content["text/event-stream"]["schema"]["$ref"],
            format!("#/components/schemas/{frame}")
        );
        let frames = schemas[frame]["oneOf"].as_array().unwrap();
        assert!(frames
            .iter()
            .any(|f| f["$ref"] == "#/components/schemas/StreamDone"));
        assert!(frames
            .iter()
            .any(|f| f["$ref"] == "#/components/schemas/ErrorResponse"));
    }
    // The error responses of every route: the middleware's, and a body route's own.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            for status in ["421", "401"] {
                assert!(responses.contains_key(status), "{method} {path}: {status}");
            }
            if method == "post" {
                for status in ["400", "404", "413", "415", "429", "503"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
        }
    }

    // The stated numeric bounds, against the running handlers (with room for 16 choices).
    let mut options = TestOptions::default();
    options.serving.engine.max_num_seqs = 16;
    let server = TestServer::start(options).await;
    let bounds = |properties: &Value, field: &str| {
        let number = |key: &str| properties[field][key].as_f64();
        (number("minimum"), number("maximum"))
    };
    let cases = [
        ("/v1/chat/completions", chat, "temperature", 0.01, json!({})),
        ("/v1/chat/completions", chat, "top_p", 0.01, json!({})),
        ("/v1/chat/completions", chat, "top_k", 1.0, json!({})),
        ("/v1/chat/completions", chat, "n", 1.0, json!({})),
        (
            "/v1/chat/completions",
            chat,
            "top_logprobs",
            1.0,
            json!({"logprobs": true}),
        ),
        ("/v1/chat/completions", chat, "max_tokens", 1.0, json!({})),
        (
            "/v1/completions",
            completion,
            "temperature",
            0.01,
            json!({}),
        ),
        ("/v1/completions", completion, "top_p", 0.01, json!({})),
        ("/v1/completions", completion, "logprobs", 1.0, json!({})),
        ("/v1/completions", completion, "n", 1.0, json!({})),
        // best_of's rule is equality with n (tests/choices.rs), not a range of its own.
        (
            "/v1/completions",
            completion,
            "presence_penalty",
            0.01,
            json!({}),
        ),
    ];
    for (path, properties, field, step, extra) in cases {
        let (min, max) = bounds(properties, field);
        assert!(
            min.is_some() || max.is_some(),
            "{path} {field} states no bound"
        );
        let mut base = if path == "/v1/completions" {
            json!({"prompt": "hi", "max_tokens": 2})
        } else {
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        };
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        // max_tokens 0 is the diagnose route's; chat completions need 1.
        let min = if field == "max_tokens" {
            Some(1.0)
        } else {
            min
        };
        let integer = step == 1.0;
        let value = |v: f64| if integer { json!(v as i64) } else { json!(v) };
        for (bound, past) in [(min, min.map(|m| m - step)), (max, max.map(|m| m + step))] {
            let (Some(bound), Some(past)) = (bound, past) else {
                continue;
            };
            let mut at = base.clone();
            at[field] = value(bound);
            let (status, body) = post(&server, path, &at).await;
            assert_eq!(status, 200, "{path} {field} = {bound}: {body}");
            let mut beyond = base.clone();
            beyond[field] = value(past);
            let (status, body) = post(&server, path, &beyond).await;
            assert_eq!(status, 400, "{path} {field} = {past}: {body}");
            assert_eq!(
                body["error"]["param"], field,
                "{path} {field} = {past}: {body}"
            );
        }
    }
}
