//! The SSE writer (`server::http::sse`, the one way every streaming route writes frames) with
//! arbitrary wire values: chat chunks whose text is any UTF-8 (line breaks, `\r`, U+2028, NUL,
//! `data:` look-alikes) and whose logprobs are any f32 (NaN and infinities included), the
//! diagnose stream's `layer`, `summary` and `token` events with any f64, OpenAI error frames with
//! any message, and `[DONE]`. The bytes axum's `Sse` response writes are read back with the
//! WHATWG event-stream parsing rules: the same events in the same order, each name kept, each
//! payload one JSON document that parses back to the value sent (non-finite numbers as null);
//! chunks with finite numbers parse back into the same typed chunk.
#![no_main]

use std::convert::Infallible;
use std::sync::LazyLock;

use arbitrary::{Result, Unstructured};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use model::diagnostics::{Band, LayerRecord, Modality, Summary, TokenRef};
use serde::Serialize;
use serde_json::Value;
use server::error::{ApiError, ErrorCode};
use server::http::sse::{done_frame, error_frame, json_frame, named_frame};
use server::openai::{
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, FinishReason, PromptTokensDetails,
    Role, TokenLogprob, TopLogprob, Usage,
};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
});

/// What a client should read back for one frame.
struct Expected {
    name: &'static str,
    data: Expect,
}

enum Expect {
    Json(Value),
    /// A chat chunk whose numbers are all finite: it must also parse back into the same chunk.
    Chunk(Value, Box<ChatCompletionChunk>),
    Error(ErrorCode, String),
    Done,
}

fn finite_f32(x: f32) -> bool {
    x.is_finite()
}

fn text(u: &mut Unstructured) -> Result<String> {
    // Mostly short strings, sometimes one of the characters that matter to SSE framing.
    let mut s: String = u.arbitrary()?;
    if u.ratio(1, 4)? {
        let special = *u.choose(&["\n", "\r", "\r\n", "\n\n", "\u{2028}", "\0", "data: ", ":"])?;
        s.push_str(special);
    }
    Ok(s)
}

fn f32_any(u: &mut Unstructured) -> Result<f32> {
    Ok(f32::from_bits(u.arbitrary()?))
}

fn f64_opt(u: &mut Unstructured) -> Result<Option<f64>> {
    Ok(if u.arbitrary()? {
        Some(f64::from_bits(u.arbitrary()?))
    } else {
        None
    })
}

fn chunk(u: &mut Unstructured) -> Result<ChatCompletionChunk> {
    let mut choices = Vec::new();
    for index in 0..u.int_in_range(0..=2)? {
        let logprobs = if u.arbitrary()? {
            let mut content = Vec::new();
            for _ in 0..u.int_in_range(0..=3)? {
                let token = text(u)?;
                let mut top_logprobs = Vec::new();
                for _ in 0..u.int_in_range(0..=2)? {
                    let token = text(u)?;
                    top_logprobs.push(TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: f32_any(u)?,
                    });
                }
                content.push(TokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: f32_any(u)?,
                    top_logprobs,
                });
            }
            Some(ChoiceLogprobs { content })
        } else {
            None
        };
        choices.push(ChunkChoice {
            index,
            delta: Delta {
                role: if u.arbitrary()? {
                    Some(Role::Assistant)
                } else {
                    None
                },
                content: if u.arbitrary()? { Some(text(u)?) } else { None },
            },
            logprobs,
            finish_reason: *u.choose(&[
                None,
                Some(FinishReason::Stop),
                Some(FinishReason::Length),
            ])?,
        });
    }
    let usage = if u.arbitrary()? {
        let prompt_tokens: u32 = u.arbitrary()?;
        let completion_tokens: u32 = u.arbitrary()?;
        Some(Usage {
            prompt_tokens: prompt_tokens as usize,
            completion_tokens: completion_tokens as usize,
            total_tokens: prompt_tokens as usize + completion_tokens as usize,
            prompt_tokens_details: PromptTokensDetails {
                image_tokens: u.int_in_range(0..=prompt_tokens)? as usize,
            },
        })
    } else {
        None
    };
    Ok(ChatCompletionChunk {
        id: text(u)?,
        object: "chat.completion.chunk".into(),
        created: u.arbitrary()?,
        model: text(u)?,
        choices,
        usage,
        diagnostics: None,
    })
}

fn token_ref(u: &mut Unstructured) -> Result<Option<TokenRef>> {
    Ok(if u.arbitrary()? {
        Some(TokenRef {
            id: u.arbitrary()?,
            text: text(u)?,
        })
    } else {
        None
    })
}

fn layer(u: &mut Unstructured) -> Result<LayerRecord> {
    Ok(LayerRecord {
        layer: u.int_in_range(0..=64)?,
        p_refusal: f64_opt(u)?,
        refusal_log_odds: f64_opt(u)?,
        d_refusal: f64_opt(u)?,
        top_token: token_ref(u)?,
        top_delta_token: token_ref(u)?,
        attn_image: f64_opt(u)?,
        attn_text: f64_opt(u)?,
        attn_focus: if u.arbitrary()? {
            let mut shares = Vec::new();
            for _ in 0..u.int_in_range(0..=3)? {
                shares.push(f64::from_bits(u.arbitrary()?));
            }
            Some(shares)
        } else {
            None
        },
        cos_image_text: f64_opt(u)?,
    })
}

fn summary(u: &mut Unstructured) -> Result<Summary> {
    let layer = |u: &mut Unstructured| -> Result<Option<usize>> {
        Ok(if u.arbitrary()? {
            Some(u.int_in_range(0..=64)?)
        } else {
            None
        })
    };
    let lo = u.int_in_range(0..=64)?;
    Ok(Summary {
        activation_layer: layer(u)?,
        start_layer: layer(u)?,
        end_layer: layer(u)?,
        band: Band(lo, u.int_in_range(lo..=64)?),
        band_mean_p_refusal: f64_opt(u)?,
        band_mean_cos: f64_opt(u)?,
        refused: u.arbitrary()?,
        judge: if u.arbitrary()? { Some(text(u)?) } else { None },
        modality: *u.choose(&[Modality::Text, Modality::Image, Modality::Mixed])?,
    })
}

#[derive(Serialize)]
struct TokenEvent {
    text: String,
}

/// The value as a client reads it: serde_json's text of it, parsed (f32s are written in their
/// shortest form, so this is not `to_value`'s exact widening).
fn json<T: Serialize>(value: &T) -> Value {
    let text = serde_json::to_string(value).expect("wire types serialise");
    serde_json::from_str(&text).expect("serde_json reads its own text")
}

fn frames(u: &mut Unstructured) -> Result<(Vec<Event>, Vec<Expected>)> {
    let mut events = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..u.int_in_range(1..=8)? {
        let (event, name, data) = match u.int_in_range(0..=5)? {
            0 => {
                let chunk = chunk(u)?;
                let all_finite = chunk
                    .choices
                    .iter()
                    .flat_map(|c| c.logprobs.iter().flat_map(|l| &l.content))
                    .all(|t| {
                        finite_f32(t.logprob)
                            && t.top_logprobs.iter().all(|t| finite_f32(t.logprob))
                    });
                let value = json(&chunk);
                let data = if all_finite {
                    Expect::Chunk(value, Box::new(chunk.clone()))
                } else {
                    Expect::Json(value)
                };
                (json_frame(&chunk), "message", data)
            }
            1 => {
                let record = layer(u)?;
                (
                    named_frame("layer", &record),
                    "layer",
                    Expect::Json(json(&record)),
                )
            }
            2 => {
                let summary = summary(u)?;
                (
                    named_frame("summary", &summary),
                    "summary",
                    Expect::Json(json(&summary)),
                )
            }
            3 => {
                let token = TokenEvent { text: text(u)? };
                (
                    named_frame("token", &token),
                    "token",
                    Expect::Json(json(&token)),
                )
            }
            4 => {
                let code = *u.choose(&ErrorCode::ALL)?;
                let message = text(u)?;
                let err = ApiError::new(code, message.clone());
                (error_frame(&err), "message", Expect::Error(code, message))
            }
            _ => (done_frame(), "message", Expect::Done),
        };
        events.push(event);
        expected.push(Expected { name, data });
    }
    Ok((events, expected))
}

/// WHATWG HTML §9.2.6 (interpreting an event stream): (event type, data) per dispatched event.
fn parse_event_stream(stream: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    let mut rest = stream;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        rest = rest
            .strip_prefix("\r\n")
            .or_else(|| rest.strip_prefix('\r'))
            .or_else(|| rest.strip_prefix('\n'))
            .unwrap_or(rest);
        if line.is_empty() {
            if !data.is_empty() {
                data.pop(); // the last line feed
                let kind = if name.is_empty() {
                    "message".into()
                } else {
                    name.clone()
                };
                events.push((kind, std::mem::take(&mut data)));
            }
            name.clear();
            data.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => name = value.to_string(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            _ => {}
        }
    }
    events
}

/// Equal, numbers within a relative `tolerance` (a typed f32 read back through f64 may round
/// differently in its last bit).
fn same(a: &Value, b: &Value, tolerance: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            _ if x == y => true,
            (Some(x), Some(y)) => (x - y).abs() <= tolerance * x.abs().max(y.abs()),
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y, tolerance))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(v, w, tolerance)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((events, expected)) = frames(&mut u) else {
        return;
    };
    let response = Sse::new(futures_util::stream::iter(
        events.into_iter().map(Ok::<_, Infallible>),
    ))
    .into_response();
    let body = RUNTIME
        .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .expect("an in-memory SSE body");
    let stream = std::str::from_utf8(&body).expect("an event stream is UTF-8");
    let got = parse_event_stream(stream);
    assert_eq!(got.len(), expected.len(), "{stream:?}");
    for ((name, data), want) in got.iter().zip(&expected) {
        assert_eq!(name, want.name, "{stream:?}");
        assert!(
            !data.contains(['\n', '\r']),
            "a payload spans lines: {data:?}"
        );
        match &want.data {
            Expect::Done => assert_eq!(data, "[DONE]"),
            Expect::Json(value) => {
                let parsed: Value = serde_json::from_str(data).expect("one JSON document");
                assert_eq!(&parsed, value);
            }
            Expect::Chunk(value, chunk) => {
                let parsed: Value = serde_json::from_str(data).expect("one JSON document");
                assert_eq!(&parsed, value);
                let typed: ChatCompletionChunk =
                    serde_json::from_str(data).expect("the chunk parses back");
                assert!(
                    same(&json(&typed), &json(chunk), 1e-6),
                    "{typed:?} != {chunk:?}"
                );
            }
            Expect::Error(code, message) => {
                let parsed: Value = serde_json::from_str(data).expect("one JSON document");
                assert_eq!(parsed["error"]["code"], code.as_str(), "{parsed}");
                assert_eq!(parsed["error"]["message"], message.as_str(), "{parsed}");
            }
        }
    }
});
