//! The HTTP surface of SERVING.md: routes, middleware (request ids, tracing, CORS, body limit,
//! API keys, request metrics), the OpenAPI document generated from the handlers' own types, and
//! serving with graceful shutdown.

mod chat;
mod completions;
mod deadline;
mod extract;
mod safety;
pub mod sse;
mod system;
mod tokenize;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use extract::ApiJson;

use crate::app::AppState;
use crate::engine::Generation;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::UNMATCHED_ROUTE;
use crate::openai::ChatCompletionRequest;
use crate::validation::{Purpose, ResponseOptions};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id the outer layer set (or the client sent); empty if it is not valid text.
pub(crate) fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// What the chat and diagnose handlers share: validate a request for `purpose` (the clock starts
/// when the handler runs) and hand it to the engine; the events and the response options.
async fn validate_and_submit(
    state: &AppState,
    headers: &HeaderMap,
    request: ChatCompletionRequest,
    purpose: Purpose,
) -> Result<(Generation, ResponseOptions), ApiError> {
    let arrived = Instant::now();
    let model = state.model()?;
    let request_id = request_id(headers).to_string();
    let (valid, options) = model
        .validator
        .validate_for(request, request_id, arrived, purpose)
        .await?;
    Ok((model.engine.submit(valid)?, options))
}

pub const CHAT_COMPLETIONS_ROUTE: &str = "/v1/chat/completions";
/// TGA retrieval's caption of the last user turn's image (percent-encoded UTF-8) and its score.
pub const RETRIEVED_TEXT: HeaderName = HeaderName::from_static("x-tga-retrieved-text");
pub const RETRIEVAL_SCORE: HeaderName = HeaderName::from_static("x-tga-retrieval-score");

/// The retrieval headers of a response (none without retrieval).
fn retrieval_headers(retrieved: &[crate::backend::retrieval::Retrieved]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(last) = retrieved.last() {
        let encoded = percent_encode(&last.text);
        if let Ok(value) = HeaderValue::from_str(&encoded) {
            headers.insert(RETRIEVED_TEXT, value);
        }
        if let Ok(value) = HeaderValue::from_str(&format!("{:.6}", last.score)) {
            headers.insert(RETRIEVAL_SCORE, value);
        }
    }
    headers
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tga-serve",
        description = "OpenAI-compatible multimodal chat completions for LLaVA-Mistral."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "chat", description = "Chat completions"),
        (name = "completions", description = "Legacy completions of a raw prompt (no chat template)"),
        (name = "tokenizer", description = "The served tokenizer and chat template (vLLM's routes)"),
        (name = "models", description = "The served model"),
        (name = "safety", description = "Safety diagnostics (DIAGNOSTICS.md): per-layer refusal activation, attention shares, image-text alignment"),
        (name = "operations", description = "Health, readiness and metrics")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key given to the server with --api-key"))
                    .build(),
            ),
        );
    }
}

/// The routes with their documentation; `protect_public` puts the operational routes behind the
/// API key too.
fn api_routes(state: &Arc<AppState>) -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    // Generation routes take an admission permit before their body is read (inside the key
    // check, so an unauthenticated client cannot take them).
    let generation = OpenApiRouter::new()
        .routes(routes!(chat::chat_completions))
        .routes(routes!(completions::completions))
        .routes(routes!(safety::diagnose))
        .routes(routes!(tokenize::tokenize))
        .routes(routes!(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    let protected = generation
        .routes(routes!(system::list_models))
        .routes(routes!(system::retrieve_model))
        .routes(routes!(safety::events))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut public = OpenApiRouter::new()
        .routes(routes!(system::health))
        .routes(routes!(system::version))
        .routes(routes!(system::ready))
        .routes(routes!(system::metrics));
    if state.http.protect_public_routes {
        public = public.route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    }
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(protected)
        .merge(public)
        .split_for_parts();
    utoipa::Modify::modify(&CommonResponses, &mut doc);
    (router, doc)
}

/// The responses the middleware gives on any route, whatever its handler: 421 from the Host
/// check of a loopback-bound server, and on the routes public by default the 401 of a server
/// that guards them too.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorResponse")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.post].into_iter().flatten();
            for operation in operations {
                let responses = &mut operation.responses.responses;
                responses.entry("421".into()).or_insert_with(|| {
                    error(
                        "Host not served: a server bound to loopback answers only to localhost, \
                         127.0.0.1, [::1] and the names given with --allowed-host",
                    )
                    .into()
                });
                if operation.security.is_none() {
                    responses.entry("401".into()).or_insert_with(|| {
                        error(
                            "Missing or bad API key (only when the server also guards its \
                             operational routes)",
                        )
                        .into()
                    });
                }
            }
        }
    }
}

/// The OpenAPI document, exactly as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let state = AppState::new(Default::default(), Default::default(), Default::default());
    api_routes(&state).1
}

/// The whole application router.
pub fn router(state: Arc<AppState>) -> Router {
    let (routes, doc) = api_routes(&state);
    let doc = Arc::new(
        doc.to_pretty_json()
            .expect("the OpenAPI document serialises"),
    );
    let mut openapi_route = Router::new().route(
        "/openapi.json",
        get(move || async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                doc.as_str().to_owned(),
            )
        }),
    );
    if state.http.protect_public_routes {
        openapi_route = openapi_route.route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    }
    let routes = routes.merge(openapi_route);

    let outer = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request_id(request.headers());
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(tracing::Level::INFO)))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(cors(&state.http.cors_origins))
        .layer(middleware::from_fn_with_state(state.clone(), track_requests))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes));

    routes
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(outer)
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, REQUEST_ID])
        .expose_headers([
            REQUEST_ID,
            header::RETRY_AFTER,
            RETRIEVED_TEXT,
            RETRIEVAL_SCORE,
        ])
}

/// `tga_requests_total{route,status}` for every response, and
/// `tga_requests_rejected_total{reason}` for generation requests refused with an error code.
async fn track_requests(
    State(state): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched
        .as_ref()
        .map_or(UNMATCHED_ROUTE, |path| path.as_str())
        .to_owned();
    let generation = [
        CHAT_COMPLETIONS_ROUTE,
        completions::COMPLETIONS_ROUTE,
        safety::DIAGNOSE_ROUTE,
    ]
    .contains(&route.as_str())
        && request.method() == Method::POST;
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    if generation {
        if let Some(code) = response.extensions().get::<ErrorCode>() {
            if *code != ErrorCode::InternalError {
                state
                    .metrics
                    .rejected
                    .with_label_values(&[code.as_str()])
                    .inc();
            }
        }
    }
    response
}

/// TGI's concurrency permit: at most `max_concurrent_requests` generation requests are being
/// read, validated (images fetched and decoded, prompt tokenized) and submitted at once; beyond
/// it a 429 before the body is read. The permit is released once the request is in the engine's
/// queue (which has its own bound) or refused.
async fn admit(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Ok(_permit) = state.admission.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            ErrorCode::Overloaded,
            format!(
                "Model is overloaded: {} requests are already being read and validated; retry later.",
                state.http.max_concurrent_requests
            ),
        ));
    };
    Ok(next.run(request).await)
}

/// The name part of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower-cased,
/// without a trailing dot.
fn host_name(host: &str) -> String {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a server bound to loopback serves `host` (Ollama's defence against DNS rebinding: a
/// page on a hostile name that resolves to 127.0.0.1 sends its own name as Host).
pub(crate) fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host);
    matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]")
        || allowed.iter().any(|a| host_name(a) == name)
}

/// Refuses requests whose Host is not served (only when bound to loopback; a request without a
/// Host, which no browser sends, passes).
async fn check_host(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if state.http.loopback_only {
        let host = request
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{FFFD}").to_string())
            .or_else(|| request.uri().authority().map(|a| a.to_string()));
        if let Some(host) = host {
            if !host_allowed(&host, &state.http.allowed_hosts) {
                return Err(ApiError::new(
                    ErrorCode::InvalidHost,
                    format!(
                        "This server answers to localhost, 127.0.0.1 and [::1] only (start it with --allowed-host {} to serve that name).",
                        host_name(&host)
                    ),
                ));
            }
        }
    }
    Ok(next.run(request).await)
}

/// `Authorization: Bearer <key>` against the configured keys, in constant time.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let keys = &state.http.api_keys;
    if keys.is_empty() {
        return Ok(next.run(request).await);
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        // The auth scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` too.
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key)
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "Missing API key: send it as `Authorization: Bearer <key>`.",
        ));
    };
    // Every key is compared, so the time does not tell which one (if any) was close.
    let accepted = keys.iter().fold(false, |found, key| {
        found | constant_time_eq(presented.as_bytes(), key.as_bytes())
    });
    if !accepted {
        return Err(ApiError::new(
            ErrorCode::InvalidApiKey,
            "Incorrect API key provided.",
        ));
    }
    Ok(next.run(request).await)
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownUrl,
        format!("Unknown route: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> impl IntoResponse {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}

/// How long past the grace period open connections may take to drain.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// Serves `state` on `listener` until `shutdown` resolves, then shuts down gracefully: new
/// requests get 503, running generations get `grace` to finish (then are cut), open connections
/// are drained, and the engine thread is joined.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let limits = state.http.connections.clone();
    let body_timeout = limits.body_read_timeout;
    let router = router(state.clone()).layer(middleware::map_request(move |request| async move {
        deadline::limit_body(request, body_timeout)
    }));
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            // Reap finished connection tasks as they go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Over the cap: closed at once, before a byte is read.
            tracing::warn!(%peer, max = limits.max_connections, "too many open connections; refusing one");
            drop(tcp);
            continue;
        };
        // Token streams are many small writes: without TCP_NODELAY the first chunk waits for the
        // peer's delayed ACK (~40 ms) and later ones get merged, which distorts TTFT and ITL.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY");
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            // Also bounds how long an idle keep-alive connection waits for its next request.
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(limits.keep_alive);
        let mut closing = closing.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection ended");
                    }
                }
                () = async {
                    // (The borrow ends before each await: the future stays `Send`.)
                    while !*closing.borrow_and_update() {
                        if closing.changed().await.is_err() {
                            break;
                        }
                    }
                } => {
                    // The request in flight finishes; an idle keep-alive connection closes.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    tracing::info!(grace_s = grace.as_secs_f64(), "shutting down");
    state.begin_shutdown(grace);
    let _ = closing_tx.send(true);
    // Connections that outlive the engine (a client that never reads) must not hold the exit.
    let drained = tokio::time::timeout(grace + DRAIN_MARGIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after the grace period; closing");
        connections.abort_all();
    }
    state.engine_stopped().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_answer_to_loopback_names_and_allowed_hosts_only() {
        for host in [
            "localhost",
            "localhost:8000",
            "LOCALHOST.",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8000",
        ] {
            assert!(host_allowed(host, &[]), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "127.0.0.2",
            "[::2]:80",
            "0.0.0.0",
            "",
        ] {
            assert!(!host_allowed(host, &[]), "{host}");
        }
        let allowed = vec!["Box.lan".to_string()];
        assert!(host_allowed("box.lan:8000", &allowed));
        assert!(!host_allowed("other.lan", &allowed));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn openapi_documents_every_route_and_the_wire_types() {
        let doc = serde_json::to_value(openapi()).unwrap();
        for path in [
            "/v1/chat/completions",
            "/v1/models",
            "/health",
            "/ready",
            "/metrics",
            "/v1/safety/diagnose",
            "/v1/safety/events",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} undocumented");
        }
        for schema in [
            "ChatCompletionRequest",
            "ChatCompletionResponse",
            "ChatCompletionChunk",
            "ErrorResponse",
            "ModelList",
        ] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "{schema} missing"
            );
        }
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    }
}
