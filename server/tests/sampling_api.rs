//! The sampling parameters and the output's fidelity through the whole server, against the
//! scripted fake model: each request is replayed by hand from the fake's logits with the
//! parameters' definitions written out naively, and the server must give the same text.

mod common;

use common::*;
use serde_json::{json, Value};
use server::backend::PromptProcessor;
use server::engine::request::{ChatTurn, Role, TurnPart};

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

fn finish_reason(body: &Value) -> &str {
    body["choices"][0]["finish_reason"].as_str().unwrap()
}

fn completion_tokens(body: &Value) -> u64 {
    body["usage"]["completion_tokens"].as_u64().unwrap()
}

/// The prompt ids the fake processor gives `text_request(text)`.
fn prompt_ids(text: &str) -> Vec<u32> {
    let turns = [ChatTurn {
        role: Role::User,
        parts: vec![TurnPart::Text(text.into())],
        retrieved: None,
    }];
    FakeProcessor
        .build_prompt(&turns, vec![], &[])
        .unwrap()
        .token_ids
}

/// Greedy decoding of the fake model by hand, with OpenAI's presence/frequency penalties and
/// transformers' repetition penalty applied over the whole vocabulary from their definitions.
fn replay_greedy(
    text: &str,
    max_tokens: usize,
    presence: f32,
    frequency: f32,
    repetition: f32,
) -> String {
    let prompt = prompt_ids(text);
    let mut out: Vec<u32> = Vec::new();
    while out.len() < max_tokens {
        let mut logits = fake_logits(&prompt, out.len());
        for (j, x) in logits.iter_mut().enumerate() {
            let j = j as u32;
            let count = out.iter().filter(|&&t| t == j).count() as f32;
            if prompt.contains(&j) || count > 0.0 {
                *x = if *x > 0.0 {
                    *x / repetition
                } else {
                    *x * repetition
                };
            }
            *x -= count * frequency + if count > 0.0 { presence } else { 0.0 };
        }
        let next = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        if next == EOS {
            break;
        }
        out.push(next);
    }
    let bytes: Vec<u8> = out.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn request(text: &str, max_tokens: u64, extra: Value) -> Value {
    let mut body = text_request(text);
    body["max_tokens"] = json!(max_tokens);
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The concatenated bytes of a response's logprob tokens.
fn logprob_bytes(body: &Value) -> Vec<u8> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["bytes"].as_array().unwrap().clone())
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

/// The first `len` ASCII letters and spaces of `text` in a row, starting at or after byte `from`.
fn ascii_window(text: &str, from: usize, len: usize) -> String {
    let bytes = text.as_bytes();
    (from..bytes.len() - len)
        .map(|i| &bytes[i..i + len])
        .find(|w| w.iter().all(|b| b.is_ascii_alphabetic() || *b == b' '))
        .map(|w| String::from_utf8(w.to_vec()).unwrap())
        .unwrap()
}

#[tokio::test]
async fn penalties_change_the_output_as_defined() {
    let server = TestServer::start(TestOptions::default()).await;
    for text in ["penalise me", "again, differently", "wörld"] {
        let baseline = replay_greedy(text, 40, 0.0, 0.0, 1.0);
        for (presence, frequency, repetition) in [
            (1.5f32, 0.0f32, 1.0f32),
            (0.0, 2.0, 1.0),
            (0.5, 0.7, 1.0),
            (-2.0, -1.0, 1.0),
            (0.0, 0.0, 1.9),
            (0.0, 0.0, 0.5),
            (1.0, 1.0, 1.5),
        ] {
            let expected = replay_greedy(text, 40, presence, frequency, repetition);
            let (status, body) = server
                .chat(&request(
                    text,
                    40,
                    json!({"presence_penalty": presence, "frequency_penalty": frequency,
                           "repetition_penalty": repetition}),
                ))
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                content(&body),
                expected,
                "{text:?} presence {presence} frequency {frequency} repetition {repetition}"
            );
            if presence > 0.0 || frequency > 0.0 || repetition > 1.0 {
                assert_ne!(expected, baseline, "the penalty is visible in {text:?}");
            }
        }
    }
}

#[tokio::test]
async fn logit_bias_forces_or_bans_a_token() {
    let server = TestServer::start(TestOptions::default()).await;
    let (_, body) = server
        .chat(&request("bias me", 8, json!({"logit_bias": {"65": 100}})))
        .await;
    assert_eq!(content(&body), "AAAAAAAA");
    let (_, plain) = server.chat(&request("bias me", 8, json!({}))).await;
    let first = content(&plain).as_bytes()[0];
    let (_, body) = server
        .chat(&request(
            "bias me",
            8,
            json!({"logit_bias": {first.to_string(): -100}}),
        ))
        .await;
    assert!(!content(&body).as_bytes().contains(&first), "{body}");
}

#[tokio::test]
async fn min_tokens_holds_back_eos_and_stop_strings() {
    let server = TestServer::start(TestOptions::default()).await;
    // The fake ends with EOS after two tokens.
    let (_, body) = server.chat(&request("EOS@2", 16, json!({}))).await;
    assert_eq!(completion_tokens(&body), 3);
    let two = content(&body).to_string();
    let (_, body) = server
        .chat(&request("EOS@2", 16, json!({"min_tokens": 5})))
        .await;
    assert_eq!(finish_reason(&body), "stop");
    // Five tokens, then EOS: what the fake ranks second after its EOS (byte 2) fills the gap.
    assert_eq!(completion_tokens(&body), 6);
    assert_eq!(content(&body), format!("{two}\u{2}\u{2}\u{2}"));

    // Stop strings ending within the first min_tokens tokens do not count (one byte a token).
    let long = replay_greedy("stop later", 60, 0.0, 0.0, 1.0);
    let stop = &ascii_window(&long, 0, 1);
    for min_tokens in [0usize, 3, 9] {
        let (_, body) = server
            .chat(&request(
                "stop later",
                60,
                json!({"stop": stop, "min_tokens": min_tokens}),
            ))
            .await;
        let floor = min_tokens;
        let at = (0..long.len())
            .filter(|&i| long.is_char_boundary(i))
            .find(|&i| long[i..].starts_with(stop) && i + stop.len() > floor)
            .unwrap();
        assert_eq!(content(&body), &long[..at], "min_tokens {min_tokens}");
    }
}

#[tokio::test]
async fn stop_token_ids_and_include_stop_str_in_output() {
    let server = TestServer::start(TestOptions::default()).await;
    let long = replay_greedy("stop tokens", 40, 0.0, 0.0, 1.0);
    let stop_byte = long
        .bytes()
        .skip(3)
        .find(|b| b.is_ascii_alphabetic())
        .unwrap();
    let at = long.bytes().position(|b| b == stop_byte).unwrap();
    let (_, body) = server
        .chat(&request(
            "stop tokens",
            40,
            json!({"stop_token_ids": [stop_byte]}),
        ))
        .await;
    assert_eq!(finish_reason(&body), "stop");
    assert_eq!(content(&body), &long[..at]);
    assert_eq!(completion_tokens(&body) as usize, at + 1);
    let (_, body) = server
        .chat(&request(
            "stop tokens",
            40,
            json!({"stop_token_ids": [stop_byte], "include_stop_str_in_output": true}),
        ))
        .await;
    assert_eq!(content(&body), &long[..=at]);

    // Stop strings: cut before, or after with include_stop_str_in_output, streamed or not.
    let stop = ascii_window(&long, 4, 3);
    let at = long.find(&stop).unwrap();
    for include in [false, true] {
        let body = request(
            "stop tokens",
            40,
            json!({"stop": [stop], "include_stop_str_in_output": include}),
        );
        let expected = if include {
            &long[..at + stop.len()]
        } else {
            &long[..at]
        };
        let (_, json_body) = server.chat(&body).await;
        assert_eq!(content(&json_body), expected, "include {include}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (_, frames) = server.stream(&streamed).await;
        let text: String = frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str::<Value>(f).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, expected, "streamed, include {include}");
    }
}

#[tokio::test]
async fn ignore_eos_and_skip_special_tokens() {
    let server = TestServer::start(TestOptions::default()).await;
    let (_, two) = server.chat(&request("EOS@2", 6, json!({}))).await;
    let two = content(&two).to_string();
    let (_, body) = server
        .chat(&request("EOS@2", 6, json!({"ignore_eos": true})))
        .await;
    assert_eq!(finish_reason(&body), "length");
    assert_eq!(completion_tokens(&body), 6);
    // EOS is generated four times and, being special, skipped from the text.
    assert_eq!(content(&body), two);
    let (_, body) = server
        .chat(&request(
            "EOS@2",
            6,
            json!({"ignore_eos": true, "skip_special_tokens": false}),
        ))
        .await;
    assert_eq!(content(&body), format!("{two}</s></s></s></s>"));
    // stop_token_ids still stop with ignore_eos.
    let (_, body) = server
        .chat(&request(
            "EOS@2",
            6,
            json!({"ignore_eos": true, "stop_token_ids": [EOS]}),
        ))
        .await;
    assert_eq!(
        (content(&body), completion_tokens(&body)),
        (two.as_str(), 3)
    );
}

#[tokio::test]
async fn logprob_bytes_concatenate_to_the_content() {
    let server = TestServer::start(TestOptions::default()).await;
    // The fake's script holds "ö" and "😀": characters of several byte tokens.
    for (i, text) in ["a", "bb", "wörld", "emoji please", "more text", "x"]
        .iter()
        .enumerate()
    {
        let mut body = request(text, 48, json!({"logprobs": true, "top_logprobs": 3}));
        if i % 2 == 1 {
            body["temperature"] = json!(1.0);
            body["seed"] = json!(i);
        }
        let (_, json_body) = server.chat(&body).await;
        // Through U+FFFD where a character is cut by max_tokens, byte for byte elsewhere.
        let bytes = logprob_bytes(&json_body);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            content(&json_body),
            "{json_body}"
        );
        if !content(&json_body).contains('\u{FFFD}') {
            assert_eq!(bytes, content(&json_body).as_bytes());
        }
        // Each token's text is its bytes where they are UTF-8 on their own.
        for entry in json_body["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
        {
            let bytes: Vec<u8> = entry["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(entry["token"], String::from_utf8_lossy(&bytes).as_ref());
        }
    }
}

#[tokio::test]
async fn logprobs_of_a_stopped_output_spell_its_content() {
    let server = TestServer::start(TestOptions::default()).await;
    let long = replay_greedy("cut me", 40, 0.0, 0.0, 1.0);
    let stop = ascii_window(&long, 6, 2);
    for include in [false, true] {
        let (_, body) = server
            .chat(&request(
                "cut me",
                40,
                json!({"stop": [stop], "include_stop_str_in_output": include, "logprobs": true}),
            ))
            .await;
        // One byte a token: the tokens of the stop string (and after it) are left out unless
        // the stop string is part of the content.
        assert_eq!(logprob_bytes(&body), content(&body).as_bytes(), "{body}");
        assert!(content(&body).ends_with(&stop) == include);
    }
}

#[tokio::test]
async fn out_of_range_sampling_parameters_are_400s_naming_them() {
    let server = TestServer::start(TestOptions::default()).await;
    let cases = [
        ("presence_penalty", json!({"presence_penalty": 2.5})),
        ("frequency_penalty", json!({"frequency_penalty": -3})),
        ("repetition_penalty", json!({"repetition_penalty": 0})),
        ("repetition_penalty", json!({"repetition_penalty": -1})),
        ("min_p", json!({"min_p": 1.01})),
        ("min_tokens", json!({"min_tokens": -1})),
        ("min_tokens", json!({"min_tokens": 9})),
        ("logit_bias", json!({"logit_bias": {"65": 101}})),
        ("logit_bias", json!({"logit_bias": {"abc": 1}})),
        ("logit_bias", json!({"logit_bias": {"-1": 1}})),
        ("logit_bias", json!({"logit_bias": {"259": 1}})),
        (
            "logit_bias",
            json!({"logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
        ),
        ("stop_token_ids", json!({"stop_token_ids": [1000]})),
        ("stop_token_ids", json!({"stop_token_ids": [-2]})),
    ];
    for (param, extra) in cases {
        let (status, body) = server.chat(&request("x", 8, extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{extra}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // The edges of each range are accepted.
    let (status, body) = server
        .chat(&request(
            "x",
            8,
            json!({"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 2,
                   "min_p": 1, "min_tokens": 8, "logit_bias": {"258": -100, "0": 100},
                   "stop_token_ids": [258]}),
        ))
        .await;
    assert_eq!(status, 200, "{body}");
}
