//! vLLM's `POST /tokenize` and `POST /detokenize`: the served tokenizer (and chat template) over
//! HTTP, so a client can count a prompt's tokens, images included, before it sends it.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::ApiJson;
use crate::app::AppState;
use crate::error::ApiError;
use crate::openai::tokenize::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
};
use crate::openai::ErrorResponse;

/// Tokenizes a raw prompt, or a chat as `/v1/chat/completions` would feed it to the model.
///
/// With `messages`, image parts are fetched and each takes its prompt positions (counted from
/// the image's header; no pixel is decoded), so `count` is the chat request's
/// `usage.prompt_tokens`. The count is not held to the context: `max_model_len` says how far it
/// may go (prompt + completion).
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The prompt's token ids", body = TokenizeResponse),
        (status = 400, description = "Malformed JSON, schema violation, both or neither of prompt \
            and messages, a refused option (add_special_tokens with messages, \
            add_generation_prompt: false, continue_final_message), a bad or unreachable image, \
            too many images, or text too long to fit the context whatever its tokens \
            (`context_length_exceeded`)", body = ErrorResponse),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 429, description = "Too many requests being validated", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "Not ready, or shutting down", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub(super) async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let model = state.model()?;
    let tokenized = model.validator.tokenize(request).await?;
    Ok(Json(TokenizeResponse {
        count: tokenized.tokens.len(),
        max_model_len: model.card.max_model_len,
        tokens: tokenized.tokens,
        token_strs: tokenized.token_strs,
    }))
}

/// The text of token ids (special tokens kept, as transformers' `decode`).
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "Malformed JSON, schema violation, or a token id out of the \
            vocabulary", body = ErrorResponse),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 415, description = "Content-Type is not application/json", body = ErrorResponse),
        (status = 429, description = "Too many requests being validated", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "Not ready, or shutting down", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub(super) async fn detokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let model = state.model()?;
    let prompt = model.validator.detokenize(request).await?;
    Ok(Json(DetokenizeResponse { prompt }))
}
