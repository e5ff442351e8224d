//! `n` choices per request, with the fake model on a small block pool: the choices share one
//! prefill and its blocks (copy-on-write, every write into a shared block given a free block by
//! the engine: the fake model's cache fails the step otherwise), choice `i` is the request with
//! `seed + i` on its own, streams carry each choice's index, and every block is free afterwards.

mod common;

use common::*;
use serde_json::{json, Value};

fn sampled(text: &str, seed: u64, n: usize, max_tokens: usize) -> Value {
    let mut r = text_request(text);
    r["temperature"] = json!(1.0);
    r["seed"] = json!(seed);
    r["n"] = json!(n);
    r["max_tokens"] = json!(max_tokens);
    r
}

fn contents(body: &Value) -> Vec<String> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "choices in index order: {body}");
            c["message"]["content"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The answers of `n` one-choice requests with seeds `seed..seed + n`.
async fn one_by_one(
    server: &TestServer,
    text: &str,
    seed: u64,
    n: usize,
    max: usize,
) -> Vec<String> {
    let mut want = Vec::new();
    for i in 0..n {
        let (status, body) = server.chat(&sampled(text, seed + i as u64, 1, max)).await;
        assert_eq!(status, 200, "{body}");
        want.extend(contents(&body));
    }
    want
}

#[tokio::test]
async fn choices_share_one_prefill_and_each_is_its_seeded_request() {
    let server = TestServer::start(pool(4, 64)).await;
    let want = one_by_one(&server, "tell me a story", 7, 3, 12).await;
    assert!(
        want.windows(2).any(|w| w[0] != w[1]),
        "the seeds give different texts: {want:?}"
    );
    let prefills = *server.observed.prefills.lock().unwrap();
    let (status, body) = server.chat(&sampled("tell me a story", 7, 3, 12)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(contents(&body), want);
    assert_eq!(
        *server.observed.prefills.lock().unwrap() - prefills,
        1,
        "one prefill for the three choices"
    );
    // The prompt counted once, the completions of all three.
    let one = server.chat(&sampled("tell me a story", 7, 1, 12)).await.1;
    let prompt = one["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], prompt);
    assert_eq!(body["usage"]["completion_tokens"], 36);
    assert_eq!(body["usage"]["total_tokens"], prompt + 36);
    // Reproducible.
    let (_, again) = server.chat(&sampled("tell me a story", 7, 3, 12)).await;
    assert_eq!(contents(&again), want);
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn streamed_choices_carry_their_index() {
    let server = TestServer::start(pool(4, 64)).await;
    let want = one_by_one(&server, "stream three", 11, 3, 10).await;
    let mut request = sampled("stream three", 11, 3, 10);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, events) = server.stream(&request).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut texts = vec![String::new(); 3];
    let mut roles = [0; 3];
    let mut finishes = vec![None; 3];
    for chunk in &chunks[..chunks.len() - 1] {
        let choices = chunk["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "one choice per chunk: {chunk}");
        let i = choices[0]["index"].as_u64().unwrap() as usize;
        let delta = &choices[0]["delta"];
        if delta["role"] == "assistant" {
            roles[i] += 1;
        }
        texts[i].push_str(delta["content"].as_str().unwrap_or(""));
        if let Some(reason) = choices[0]["finish_reason"].as_str() {
            assert!(finishes[i].is_none(), "choice {i} finished twice");
            finishes[i] = Some(reason.to_string());
        }
    }
    assert_eq!(roles, [1, 1, 1], "each choice's role frame once");
    assert_eq!(texts, want);
    assert_eq!(finishes, vec![Some("length".to_string()); 3]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 30);
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn choices_preempted_in_a_tight_pool_still_give_their_seeded_text() {
    // 4-token blocks, 16 of them (64 positions) for 4 choices of ~16 prompt + 24 generated:
    // the choices cannot all stay, and each one that grows into a shared block copies it.
    let server = TestServer::start(pool(4, 16)).await;
    let want = one_by_one(&server, "tight pool", 3, 4, 24).await;
    let (status, body) = server.chat(&sampled("tight pool", 3, 4, 24)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(contents(&body), want);
    let metrics = server.metrics_text().await;
    assert!(
        sample(&metrics, "tga_preemptions_total").unwrap() > 0.0,
        "the pool is too small for four: {metrics}"
    );
    assert_eq!(sample(&metrics, "tga_requests_running"), Some(0.0));
    assert_no_blocks_held(&server).await;
}

#[tokio::test]
async fn greedy_choices_are_equal_and_stop_on_their_own() {
    let server = TestServer::start(pool(4, 64)).await;
    let mut request = text_request("greedy EOS@5");
    let (_, one) = server.chat(&request).await;
    request["n"] = json!(2);
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 200, "{body}");
    let texts = contents(&body);
    assert_eq!(texts, vec![contents(&one)[0].clone(); 2]);
    for choice in body["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "stop");
    }
    let each = one["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 2 * each);
}

#[tokio::test]
async fn n_is_bounded_and_refused_with_diagnostics() {
    let server = TestServer::start(pool(4, 64)).await;
    for n in [0, 17, -1] {
        let mut request = text_request("hi");
        request["n"] = json!(n);
        let (status, body) = server.chat(&request).await;
        assert_eq!(status, 400, "n = {n}: {body}");
        assert_eq!(body["error"]["param"], "n", "{body}");
    }
    let mut request = text_request("hi");
    request["n"] = json!(2);
    request["diagnostics"] = json!({});
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
    // Never more than the engine's max_num_seqs (8 in tests): 16 is refused there.
    request = text_request("hi");
    request["n"] = json!(9);
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("between 1 and 8"),
        "{body}"
    );
    request["n"] = json!(8);
    let (status, body) = server.chat(&request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 8);
}

#[tokio::test]
async fn completions_give_n_choices_each_echoed() {
    let server = TestServer::start(pool(4, 64)).await;
    let request = |n: usize, seed: u64| {
        json!({"model": MODEL_ID, "prompt": "Once", "max_tokens": 6, "temperature": 1.0,
               "seed": seed, "n": n, "echo": true})
    };
    let mut want = Vec::new();
    for i in 0..3 {
        let (_, body) = post(&server, "/v1/completions", &request(1, 5 + i)).await;
        want.push(body["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let (status, body) = post(&server, "/v1/completions", &request(3, 5)).await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<String> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|t| t.starts_with("Once")), "{got:?}");
    assert_eq!(body["usage"]["completion_tokens"], 18);
    // best_of other than n is refused.
    let mut bad = request(2, 5);
    bad["best_of"] = json!(3);
    let (status, body) = post(&server, "/v1/completions", &bad).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "best_of");
}

#[tokio::test]
async fn a_cancelled_request_frees_every_choice() {
    let mut options = pool(4, 64);
    options.fake.step_delay = std::time::Duration::from_millis(20);
    let server = TestServer::start(options).await;
    let mut request = sampled("cancel me", 1, 4, 200);
    request["stream"] = json!(true);
    let mut response = server.post_chat(&request).await;
    assert_eq!(response.status(), 200);
    // Read a few frames, then go away.
    for _ in 0..3 {
        response.chunk().await.unwrap();
    }
    drop(response);
    let metrics = server.metrics.clone();
    assert!(eventually(|| metrics.running.get() == 0).await);
    assert_no_blocks_held(&server).await;
}

/// `request(pad)` with the padding (0 to 3 characters) that makes its prompt (template included)
/// `len % 4 == 1` positions long, so that with 4-token blocks the first tokens of its choices
/// land in the prompt's shared last block; and that length.
async fn padded_to_1_mod_4(request: impl Fn(&str) -> Value) -> (Value, usize) {
    let probe = TestServer::start(pool(4, 256)).await;
    for pad in 0..4 {
        let mut body = request(&"x".repeat(pad));
        body["max_tokens"] = json!(1);
        let (status, answer) = probe.chat(&body).await;
        assert_eq!(status, 200, "{answer}");
        let len = answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        if len % 4 == 1 {
            return (request(&"x".repeat(pad)), len);
        }
    }
    unreachable!("one of four paddings gives each residue")
}

/// The copies of the block a request's choices share are planned before anyone else can take
/// the free blocks: here a second request admitted in the same step leaves one free block for
/// three choices writing into their shared block. The engine preempts two of them (they resume
/// later with their seeded text) rather than letting the step fail for want of a block.
#[tokio::test]
async fn a_later_admission_cannot_take_the_blocks_the_choices_copy_into() {
    // Three prompts that share no block (the fake template starts with the first role).
    let with_roles = |roles: &[(&str, String)]| {
        let messages: Vec<Value> = roles
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        json!({"model": MODEL_ID, "messages": messages, "temperature": 1.0, "seed": 21})
    };
    let (mut x, x_len) = padded_to_1_mod_4(|pad| {
        with_roles(&[("system", "s".into()), ("user", format!("choices {pad}"))])
    })
    .await;
    x["n"] = json!(3);
    x["max_tokens"] = json!(8);
    let (mut y, y_len) =
        padded_to_1_mod_4(|pad| with_roles(&[("user", format!("beside them {pad}"))])).await;
    y["max_tokens"] = json!(8);
    let mut z = with_roles(&[("assistant", "a".into()), ("user", "z".into())]);
    z["max_tokens"] = json!(2);
    let blocks = |len: usize| (len + 1).div_ceil(4);
    // X (n = 3) is admitted alone: its blocks and two copies fit. Y then takes all but one
    // free block (the 1 % watermark).
    let num_blocks = blocks(x_len) + blocks(y_len) + 1;
    let gate = Gate::closed();
    let mut options = pool(4, num_blocks);
    options.fake.gate = Some(gate.clone());
    let server = TestServer::start(options).await;
    let post = |body: Value| {
        let (client, url) = (server.client.clone(), server.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    };
    // Z holds the engine in a decode step while X and Y queue up, in that order.
    let z = post(z);
    assert!(eventually(|| server.metrics.running.get() == 1).await);
    let x_answer = post(x.clone());
    assert!(eventually(|| server.metrics.waiting.get() == 1).await);
    let y_answer = post(y);
    assert!(eventually(|| server.metrics.waiting.get() == 2).await);
    gate.open();
    for (name, answer) in [("z", z), ("x", x_answer), ("y", y_answer)] {
        let (status, body) = answer.await.unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        if name == "x" {
            x = body;
        }
    }
    let metrics = server.metrics_text().await;
    assert!(
        sample(&metrics, "tga_preemptions_total").unwrap() > 0.0,
        "one free block for two copies: {metrics}"
    );
    // The same texts as alone, on a pool with room.
    let roomy = TestServer::start(pool(4, 256)).await;
    let mut want = Vec::new();
    for i in 0..3 {
        let (mut alone, _) = padded_to_1_mod_4(|pad| {
            with_roles(&[("system", "s".into()), ("user", format!("choices {pad}"))])
        })
        .await;
        alone["seed"] = json!(21 + i);
        alone["max_tokens"] = json!(8);
        want.extend(contents(&roomy.chat(&alone).await.1));
    }
    assert_eq!(contents(&x), want);
    assert_no_blocks_held(&server).await;
}
