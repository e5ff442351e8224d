//! The engine planned in KV blocks, with the fake model on a pool of a few blocks: preempted
//! streams come out complete and in order, chunked prefill stays under the step budget, shared
//! prompt prefixes are reused, a prompt larger than the pool is a 400, and every block is free
//! after each test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn request(text: &str, max_tokens: usize) -> serde_json::Value {
    let mut r = text_request(text);
    r["max_tokens"] = json!(max_tokens);
    r
}

/// Content and finish reason of a chat completion.
fn answer(body: &serde_json::Value) -> (String, String) {
    (
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        body["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[tokio::test]
async fn preempted_streams_are_complete_and_in_order() {
    // 4-token blocks, 16 of them: 64 positions for 6 sequences of ~20 prompt + 30 generated.
    let mut options = pool(4, 16);
    options.fake.step_delay = Duration::from_millis(1);
    let server = TestServer::start(options).await;
    let prompts: Vec<String> = (0..6).map(|i| format!("question {i} ?")).collect();
    // Alone: what each request must answer.
    let mut want = Vec::new();
    for p in &prompts {
        let (status, body) = server.chat(&request(p, 30)).await;
        assert_eq!(status, 200, "{body}");
        want.push(answer(&body));
    }
    assert_eq!(
        sample(&server.metrics_text().await, "tga_preemptions_total"),
        Some(0.0),
        "one sequence alone fits"
    );
    // Together, streamed (a stream shows a repeated or lost token as a changed text), and a
    // seeded sampled one beside them.
    let bodies: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| {
            let mut r = request(p, 30);
            r["stream"] = json!(true);
            r
        })
        .collect();
    let got = futures_util::future::join_all(bodies.iter().map(|r| server.stream(r))).await;
    for (i, (status, events)) in got.iter().enumerate() {
        assert_eq!(*status, 200);
        let chunks: Vec<serde_json::Value> = events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
            .unwrap_or_else(|| panic!("request {i} has no finish: {events:?}"));
        assert_eq!((text, finish.to_string()), want[i], "request {i}");
    }
    let metrics = server.metrics_text().await;
    let preemptions = sample(&metrics, "tga_preemptions_total").unwrap();
    assert!(
        preemptions > 0.0,
        "the pool is too small for all six: {metrics}"
    );
    assert_eq!(sample(&metrics, "tga_requests_running"), Some(0.0));
    assert_eq!(sample(&metrics, "tga_requests_waiting"), Some(0.0));
    assert_no_blocks_held(&server).await;
    // The gauges follow at the end of the engine's step (after the clients saw their ends).
    let mut idle = false;
    for _ in 0..100 {
        let metrics = server.metrics_text().await;
        if sample(&metrics, "tga_kv_cache_blocks_used") == Some(0.0) {
            assert_eq!(sample(&metrics, "tga_kv_cache_usage_ratio"), Some(0.0));
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(idle, "tga_kv_cache_blocks_used never returned to 0");
}

#[tokio::test]
async fn seeded_sampling_gives_the_same_text_through_preemptions() {
    let server = TestServer::start(pool(4, 16)).await;
    let sampled = |i: usize| {
        let mut r = request(&format!("sampled {i}"), 30);
        r["temperature"] = json!(1.0);
        r["seed"] = json!(7 + i);
        r
    };
    let mut want = Vec::new();
    for i in 0..5 {
        want.push(answer(&server.chat(&sampled(i)).await.1));
    }
    let bodies: Vec<serde_json::Value> = (0..5).map(sampled).collect();
    let got = futures_util::future::join_all(bodies.iter().map(|r| server.chat(r))).await;
    for (i, (status, body)) in got.iter().enumerate() {
        assert_eq!(*status, 200);
        assert_eq!(answer(body), want[i], "request {i}");
    }
    let preemptions = sample(&server.metrics_text().await, "tga_preemptions_total").unwrap();
    assert!(preemptions > 0.0);
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn long_prompts_are_prefilled_in_chunks_under_the_step_budget() {
    let mut options = pool(16, 256);
    options.serving.engine.max_batch_tokens = 8;
    options.serving.engine.idle_batch_tokens = 0;
    let server = TestServer::start(options).await;
    let long = "a long prompt that takes many chunks ".repeat(4);
    let (status, body) = server.chat(&request(&long, 5)).await;
    assert_eq!(status, 200, "{body}");
    let chunks = server.observed.prefill_chunks.lock().unwrap().clone();
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(chunks.len() > 1, "{chunks:?}");
    assert!(chunks.iter().all(|&c| c <= 8), "{chunks:?}");
    assert_eq!(chunks.iter().sum::<usize>(), prompt_tokens);
    // The same answer as one whole prefill.
    let whole = TestServer::start(pool(16, 256)).await;
    let (_, want) = whole.chat(&request(&long, 5)).await;
    assert_eq!(answer(&body), answer(&want));
    assert_no_blocks_held(&server).await;
    // With nothing decoding, there is no stream to interleave with: one chunk.
    let mut options = pool(16, 256);
    options.serving.engine.max_batch_tokens = 8;
    let idle = TestServer::start(options).await;
    let (status, _) = idle.chat(&request(&long, 5)).await;
    assert_eq!(status, 200);
    assert_eq!(idle.observed.prefill_chunks.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_shared_prompt_prefix_is_computed_once() {
    let server = TestServer::start(pool(4, 64)).await;
    let system = "You are a helpful assistant with a long system prompt.";
    let chat = |question: &str| {
        json!({
            "model": MODEL_ID,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "temperature": 0, "max_tokens": 4
        })
    };
    let (status, first) = server.chat(&chat("first?")).await;
    assert_eq!(status, 200);
    let before: usize = server.observed.prefill_chunks.lock().unwrap().iter().sum();
    let (status, second) = server.chat(&chat("second?")).await;
    assert_eq!(status, 200);
    let after: usize = server.observed.prefill_chunks.lock().unwrap().iter().sum();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let metrics = server.metrics_text().await;
    let hits = sample(&metrics, "tga_prefix_cache_hits_total").unwrap() as usize;
    assert!(hits >= 48, "the system prompt's blocks are reused: {hits}");
    assert_eq!(after - before, prompt - hits, "only the rest was computed");
    assert!(sample(&metrics, "tga_prefix_cache_queries_total").unwrap() as usize >= hits);
    // Reuse does not change the answer.
    let fresh = TestServer::start(pool(4, 64)).await;
    let (_, want) = fresh.chat(&chat("second?")).await;
    assert_eq!(answer(&second), answer(&want));
    assert_ne!(answer(&first), answer(&second));
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn a_prompt_larger_than_the_pool_is_refused_at_validation() {
    // 4 × 8 = 32 positions.
    let server = TestServer::start(pool(4, 8)).await;
    let (status, body) = server.chat(&request(&"x".repeat(40), 4)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("KV cache holds at most 32 tokens"),
        "{message}"
    );
    let models = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["kv_cache_tokens"], 32);
    // One that fits still runs.
    let (status, _) = server.chat(&request("hi", 4)).await;
    assert_eq!(status, 200);
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn cancelled_and_failed_requests_free_their_blocks() {
    let mut options = pool(4, 64);
    options.fake.step_delay = Duration::from_millis(2);
    let server = TestServer::start(options).await;
    // A streamed request dropped after its first chunk.
    let mut r = request("cancel me", 200);
    r["stream"] = json!(true);
    let mut response = server.post_chat(&r).await;
    assert_eq!(response.status(), 200);
    let _ = response.chunk().await.unwrap();
    drop(response);
    let (status, _) = server.chat(&request("FAIL please", 4)).await;
    assert_eq!(status, 500);
    let (status, _) = server.chat(&request("PANIC please", 4)).await;
    assert_eq!(status, 500);
    assert_no_blocks_held(&server).await;
}
