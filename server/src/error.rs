//! Every error the API returns, mapped in one place to SERVING.md's statuses and OpenAI's error
//! JSON `{"error":{"message","type","param","code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::backend::ProcessError;
use crate::engine::{GenerationError, SubmitError};
use crate::media::MediaError;
use crate::openai::{ErrorBody, ErrorResponse};

/// The `code` of an error response. Status and `type` follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body is not JSON.
    InvalidJson,
    /// A field is missing, has the wrong type or is out of range.
    InvalidValue,
    /// Bad base64, undecodable or unsupported image, image too large.
    InvalidImage,
    /// An image URL that could not or may not be fetched.
    InvalidImageUrl,
    TooManyImages,
    ContextLengthExceeded,
    InvalidApiKey,
    ModelNotFound,
    UnknownUrl,
    MethodNotAllowed,
    RequestTooLarge,
    UnsupportedMediaType,
    QueueFull,
    /// More requests are being read and validated than `--max-concurrent-requests` allows.
    Overloaded,
    /// The Host header names neither a loopback name nor an `--allowed-host` (DNS rebinding).
    InvalidHost,
    NotReady,
    ShuttingDown,
    /// The engine thread ended: nothing can be served until the server is restarted.
    EngineStopped,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        Self::InvalidJson,
        Self::InvalidValue,
        Self::InvalidImage,
        Self::InvalidImageUrl,
        Self::TooManyImages,
        Self::ContextLengthExceeded,
        Self::InvalidApiKey,
        Self::ModelNotFound,
        Self::UnknownUrl,
        Self::MethodNotAllowed,
        Self::RequestTooLarge,
        Self::UnsupportedMediaType,
        Self::QueueFull,
        Self::Overloaded,
        Self::InvalidHost,
        Self::NotReady,
        Self::ShuttingDown,
        Self::EngineStopped,
        Self::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidValue => "invalid_value",
            Self::InvalidImage => "invalid_image",
            Self::InvalidImageUrl => "invalid_image_url",
            Self::TooManyImages => "too_many_images",
            Self::ContextLengthExceeded => "context_length_exceeded",
            Self::InvalidApiKey => "invalid_api_key",
            Self::ModelNotFound => "model_not_found",
            Self::UnknownUrl => "unknown_url",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTooLarge => "request_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::QueueFull => "queue_full",
            Self::Overloaded => "model_overloaded",
            Self::InvalidHost => "invalid_host",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::EngineStopped => "engine_stopped",
            Self::InternalError => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidValue
            | Self::InvalidImage
            | Self::InvalidImageUrl
            | Self::TooManyImages
            | Self::ContextLengthExceeded => StatusCode::BAD_REQUEST,
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound | Self::UnknownUrl => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::QueueFull | Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::InvalidHost => StatusCode::MISDIRECTED_REQUEST,
            Self::NotReady | Self::ShuttingDown | Self::EngineStopped => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`, by status class as the `openai` client's exception classes are.
    pub fn error_type(self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

/// Seconds a client should wait after a 429 (a decode step of a full batch is well under it).
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// An error response. Handlers return `Result<_, ApiError>`; nothing else builds error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Where in the request the problem is, e.g. `messages[0].content[1].image_url`.
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidValue, message).with_param(param)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalError, message)
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                r#type: self.code.error_type().to_string(),
                param: self.param.clone(),
                code: Some(self.code.as_str().to_string()),
            },
        }
    }

    /// An image's own failure, located at `param`.
    pub fn from_media(err: MediaError, param: String) -> Self {
        let code = match err {
            MediaError::InvalidDataUri(_)
            | MediaError::InvalidBase64(_)
            | MediaError::TooLarge { .. } => ErrorCode::InvalidImage,
            MediaError::UnsupportedScheme(_)
            | MediaError::Forbidden(_)
            | MediaError::Fetch(_)
            | MediaError::Status(_)
            | MediaError::Timeout => ErrorCode::InvalidImageUrl,
        };
        Self::new(code, err.to_string()).with_param(param)
    }

    /// A processor refusal; `param` locates the image or the messages.
    pub fn from_process(err: ProcessError, param: String) -> Self {
        match err {
            ProcessError::InvalidImage(msg) => {
                Self::new(ErrorCode::InvalidImage, msg).with_param(param)
            }
            ProcessError::InvalidPrompt(msg) => Self::invalid(param, msg),
            ProcessError::Internal(msg) => Self::internal(msg),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::QueueFull => Self::new(
                ErrorCode::QueueFull,
                "the server is at capacity (waiting queue full); retry later",
            ),
            SubmitError::ShuttingDown => Self::new(ErrorCode::ShuttingDown, err.to_string()),
        }
    }
}

impl From<GenerationError> for ApiError {
    fn from(err: GenerationError) -> Self {
        match err {
            GenerationError::Internal(_) => Self::internal(err.to_string()),
            GenerationError::ShuttingDown => Self::new(ErrorCode::ShuttingDown, err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code == ErrorCode::InternalError {
            // The request span (request id) is current here.
            tracing::error!(message = %self.message, "internal error");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if self.status() == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        // Read back by the metrics middleware for `tga_requests_rejected_total{reason}`.
        response.extensions_mut().insert(self.code);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_openai_shape() {
        let err = ApiError::new(ErrorCode::InvalidImage, "bad base64")
            .with_param("messages[0].content[1].image_url");
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "bad base64",
                "type": "invalid_request_error",
                "param": "messages[0].content[1].image_url",
                "code": "invalid_image"
            }})
        );
        let json = serde_json::to_value(ApiError::internal("boom").body()).unwrap();
        assert_eq!(json["error"]["param"], serde_json::Value::Null);
        assert_eq!(json["error"]["type"], "server_error");
    }

    #[test]
    fn statuses_follow_serving_md() {
        use ErrorCode::*;
        let expect = [
            (InvalidJson, 400),
            (InvalidImage, 400),
            (TooManyImages, 400),
            (ContextLengthExceeded, 400),
            (InvalidApiKey, 401),
            (ModelNotFound, 404),
            (UnknownUrl, 404),
            (RequestTooLarge, 413),
            (UnsupportedMediaType, 415),
            (QueueFull, 429),
            (Overloaded, 429),
            (InvalidHost, 421),
            (NotReady, 503),
            (ShuttingDown, 503),
            (EngineStopped, 503),
            (InternalError, 500),
        ];
        for (code, status) in expect {
            assert_eq!(code.status().as_u16(), status, "{code:?}");
        }
        let codes: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len(), "codes are distinct");
    }

    #[test]
    fn queue_full_carries_retry_after() {
        let response = ApiError::from(SubmitError::QueueFull).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            response.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::QueueFull)
        );
    }
}
