//! A JSON body extractor whose every failure is an [`ApiError`]: 415 for another content type,
//! 413 past the body limit, 400 with the offending field's path for schema violations.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !is_json(content_type) {
            let shown = if content_type.is_empty() {
                "none"
            } else {
                content_type
            };
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("Content-Type must be application/json, got {shown}"),
            ));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        ErrorCode::RequestTooLarge,
                        "the request body is larger than the server's limit",
                    )
                } else {
                    ApiError::new(ErrorCode::InvalidJson, rejection.body_text())
                }
            })?;
        parse_json(&body).map(ApiJson)
    }
}

/// `application/json`, with parameters, or any `+json` type.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Syntax errors are `invalid_json`; well-formed JSON that does not fit the schema is
/// `invalid_value` with the path of the field (`messages[0].content[1].image_url`).
/// Unknown fields are accepted, as OpenAI-compatible servers do, and logged at debug level
/// (vLLM's behaviour): a client's misspelt option then shows in the log instead of vanishing.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let (parsed, ignored) = parse_json_noting_unknown(body);
    if !ignored.is_empty() {
        tracing::debug!(fields = ?ignored, "ignored unknown request fields");
    }
    parsed
}

/// [`parse_json`], and the paths of the unknown fields it skipped (`messages.0.mood`).
fn parse_json_noting_unknown<T: DeserializeOwned>(
    body: &[u8],
) -> (Result<T, ApiError>, Vec<String>) {
    let mut ignored = Vec::new();
    let parsed = parse_json_into(body, |path: serde_ignored::Path<'_>| {
        ignored.push(path.to_string())
    });
    (parsed, ignored)
}

fn parse_json_into<T: DeserializeOwned>(
    body: &[u8],
    mut on_ignored: impl FnMut(serde_ignored::Path<'_>),
) -> Result<T, ApiError> {
    // Every request body is an object. serde's derived structs also accept a JSON array of the
    // fields in declaration order (`[null, [{"role": …}]]` would be a chat request), which no
    // client means to send.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        let error = match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => ApiError::new(
                ErrorCode::InvalidValue,
                "invalid request: the body must be a JSON object",
            ),
            Err(err) => ApiError::new(ErrorCode::InvalidJson, format!("malformed JSON: {err}")),
        };
        return Err(error);
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    let deserializer = serde_ignored::Deserializer::new(deserializer, &mut on_ignored);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let error =
                    ApiError::new(ErrorCode::InvalidValue, format!("invalid request: {inner}"));
                if path == "." {
                    error
                } else {
                    error.with_param(path)
                }
            }
            _ => ApiError::new(ErrorCode::InvalidJson, format!("malformed JSON: {inner}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatCompletionRequest;

    #[test]
    fn content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/vnd.api+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("multipart/form-data; boundary=x"));
    }

    #[test]
    fn syntax_and_schema_errors_are_told_apart() {
        let err = parse_json::<ChatCompletionRequest>(b"{\"messages\": [").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidJson);
        assert_eq!(err.param, None);
        let err = parse_json::<ChatCompletionRequest>(br#"{"messages": [{"role": "user"}]}"#)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidValue);
        assert_eq!(err.param.as_deref(), Some("messages[0]"));
        let err = parse_json::<ChatCompletionRequest>(br#"{"messages": "hi"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = parse_json::<ChatCompletionRequest>(b"{}").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidValue);
    }

    #[test]
    fn unknown_fields_are_accepted_and_named() {
        let body = br#"{"messages": [{"role": "user", "content": "hi", "mood": 1}],
            "stream": true, "stream_options": {"include_usage": true, "extra": [1]}, "foo": null}"#;
        let (parsed, ignored) = parse_json_noting_unknown::<ChatCompletionRequest>(body);
        assert!(parsed.is_ok());
        // serde_ignored's path notation: list indices as segments, `?` for an `Option`.
        assert_eq!(
            ignored,
            ["messages.0.mood", "stream_options.?.extra", "foo"]
        );
        // Paths of schema errors are unchanged by the recording.
        let (parsed, _) = parse_json_noting_unknown::<ChatCompletionRequest>(
            br#"{"foo": 1, "messages": [{"role": "tool", "content": "a"}]}"#,
        );
        assert_eq!(
            parsed.unwrap_err().param.as_deref(),
            Some("messages[0].role")
        );
    }

    #[test]
    fn only_an_object_is_a_request() {
        // Positional fields would otherwise make this a valid request.
        let positional = br#" [null, [{"role": "user", "content": "hi"}]]"#;
        let err = parse_json::<ChatCompletionRequest>(positional).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidValue);
        assert!(err.message.contains("JSON object"), "{}", err.message);
        for body in [&b"\"hi\""[..], b"3", b"null"] {
            let err = parse_json::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidValue);
        }
        for body in [&b"[1,"[..], b"", b"  "] {
            let err = parse_json::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidJson, "{:?}", body);
        }
        let ok = br#" {"messages": [{"role": "user", "content": "hi"}]}"#;
        assert!(parse_json::<ChatCompletionRequest>(ok).is_ok());
    }
}
