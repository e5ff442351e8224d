//! `/v1/models`, `/health`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::app::AppState;
use crate::error::ApiError;
use crate::error::ErrorCode;
use crate::openai::{ErrorResponse, HealthStatus, ModelList, ModelObject, VersionInfo};

/// The served model.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 503, description = "The model is not loaded yet, or the server is shutting down", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub(super) async fn list_models(
    State(state): State<Arc<AppState>>,
) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList {
        object: "list".into(),
        data: vec![model_object(&state)?],
    }))
}

fn model_object(state: &AppState) -> Result<ModelObject, ApiError> {
    let model = state.model()?;
    let card = &model.card;
    Ok(ModelObject {
        id: card.id.clone(),
        object: "model".into(),
        created: card.created,
        owned_by: card.owned_by.clone(),
        max_model_len: card.max_model_len,
        kv_cache_tokens: model.kv_cache_tokens,
        supports_images: card.supports_images,
        builtin: card.builtin,
    })
}

/// One model by id (OpenAI's `client.models.retrieve`).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "models",
    params(("model" = String, Path, description = "The served model's id")),
    responses(
        (status = 200, description = "The served model", body = ModelObject),
        (status = 401, description = "Missing or bad API key", body = ErrorResponse),
        (status = 404, description = "Not the served model", body = ErrorResponse),
        (status = 503, description = "The model is not loaded yet, or the server is shutting down", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub(super) async fn retrieve_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let object = model_object(&state)?;
    if object.id != model {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!(
                "The model `{model}` does not exist; this server serves `{}`.",
                object.id
            ),
        )
        .with_param("model"));
    }
    Ok(Json(object))
}

/// The server's version.
#[utoipa::path(
    get,
    path = "/version",
    tag = "operations",
    responses((status = 200, description = "The tga-serve release", body = VersionInfo))
)]
pub(super) async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Liveness: 200 while the process serves; 503 once its engine thread has ended.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The process is serving", body = HealthStatus),
        (status = 503, description = "The engine thread has stopped", body = ErrorResponse),
    )
)]
pub(super) async fn health(
    State(state): State<Arc<AppState>>,
) -> Result<Json<HealthStatus>, ApiError> {
    state.check_engine()?;
    Ok(Json(HealthStatus {
        status: "ok".into(),
    }))
}

/// Readiness: 503 until the model is loaded and warmed, and again while shutting down.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = HealthStatus),
        (status = 503, description = "Loading, shutting down, or the engine thread has stopped", body = ErrorResponse),
    )
)]
pub(super) async fn ready(
    State(state): State<Arc<AppState>>,
) -> Result<Json<HealthStatus>, ApiError> {
    state.model()?;
    Ok(Json(HealthStatus {
        status: "ready".into(),
    }))
}

/// Prometheus text exposition of the serving metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        state.metrics.render(),
    )
}
