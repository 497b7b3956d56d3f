//! kiln-server: kiln over HTTP (axum). It translates requests into job specs, queues them in
//! the project library and serialises results; every job runs through kiln-core's engine, on
//! kiln-core's queue worker in a thread that shares the warm model pool, beside any `kiln worker`
//! processes on the same database. No model logic lives here.
//!
//! - [`native`]: `/v1/jobs` (+ SSE events), `/v1/assets`, `/v1/uploads`, `/v1/me`, `/v1/report`,
//!   `/v1/tiers`, `/v1/presets`, `/v1/loras`, `/v1/workers`;
//! - [`web`]: the studio page at `/` and its files under `/ui/`, embedded in the binary;
//! - [`openai`]: OpenAI Images (`/v1/images/generations|edits`, `/v1/models`);
//! - [`openapi`]: the OpenAPI document, generated from the request and response types;
//! - [`a1111`]: AUTOMATIC1111's `/sdapi/v1/*`;
//! - [`auth`]: API keys (Bearer or Basic) once the project has any;
//! - [`common`]: uploads, waiting for jobs, encoding results;
//! - [`hub`]: live per-job event channels;
//! - [`relay`]: the in-process worker's events into the hub, other processes' events relayed
//!   from the database, expired leases returned to the queue;
//! - [`state`], [`error`]: shared state and typed API errors.

pub mod a1111;
pub mod auth;
pub mod common;
pub mod error;
pub mod hub;
pub mod native;
pub mod openai;
pub mod openapi;
pub mod relay;
pub mod state;
pub mod web;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use kiln_core::jobs::keys::Keys;
use kiln_core::jobs::queue::Queue;
use kiln_core::jobs::Engine;
use state::{AppState, Limits};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How to serve.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub limits: Limits,
    /// Tiers to load before accepting requests.
    pub preload: Vec<String>,
    /// Browser origins allowed to call the API (CORS); empty = no CORS headers at all.
    pub cors: state::Cors,
    /// The server's own queue worker on its engine (its id, tiers, leases); None: only
    /// `kiln worker` processes run jobs.
    pub worker: Option<kiln_core::jobs::worker::WorkerOptions>,
    /// Workers on further devices (`--devices`), each with its own engine and model pool.
    pub more_workers: Vec<(Engine, kiln_core::jobs::worker::WorkerOptions)>,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(
        "refusing to listen on {0} without API keys: anyone on the network could use this machine; \
         run `kiln keys add NAME` first, or listen on 127.0.0.1"
    )]
    ExposedWithoutKeys(SocketAddr),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid --cors-origin `{0}`: expected an origin such as https://studio.example:8443")]
    BadOrigin(String),
}

/// All routes over `state`, with CORS for `cors`'s origins only.
pub fn router(state: Arc<AppState>, cors: &state::Cors) -> Result<Router, ServeError> {
    let limits = state.limits;
    let router = routes(state, limits);
    if cors.origins.is_empty() {
        return Ok(router);
    }
    let origins = cors.header_values()?;
    let layer = tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST, axum::http::Method::DELETE])
        .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE]);
    Ok(router.layer(layer))
}

fn routes(state: Arc<AppState>, limits: Limits) -> Router {
    Router::new()
        .route("/healthz", get(native::healthz))
        .route("/v1/jobs", post(native::create_job).get(native::list_jobs))
        .route("/v1/jobs/{id}", get(native::get_job).delete(native::cancel_job))
        .route("/v1/jobs/{id}/events", get(native::job_events))
        .route("/v1/assets", get(native::list_assets))
        .route("/v1/assets/{id}", get(native::get_asset))
        .route("/v1/assets/{id}/image", get(native::asset_image))
        .route("/v1/assets/{id}/lineage", get(native::asset_lineage))
        .route("/v1/uploads", post(native::create_upload))
        .route("/v1/me", get(native::me))
        .route("/v1/report", get(native::report))
        .route("/v1/workers", get(native::workers))
        .route("/v1/tiers", get(native::tiers))
        .route("/v1/presets", get(native::presets))
        .route("/v1/loras", get(native::loras))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/v1/models", get(openai::models))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/options", get(a1111::get_options).post(a1111::set_options))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route("/sdapi/v1/prompt-styles", get(a1111::prompt_styles))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/extra-single-image", post(a1111::extra_single_image))
        .route("/", get(web::index))
        .route("/ui/{file}", get(web::asset))
        .fallback(|| async { error::ApiError::NotFound("no such route; see GET /v1/openapi.json".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(limits.body_bytes))
        .with_state(state)
}

/// The OpenAPI document (generated from the request and response types).
async fn openapi() -> axum::Json<serde_json::Value> {
    axum::Json(openapi::document())
}

/// Serves until SIGTERM or Ctrl-C; the running job finishes first (queued ones stay queued).
pub fn serve(engine: Engine, config: ServerConfig) -> Result<(), ServeError> {
    // Flag mistakes first, before recovery, preloading or binding.
    config.cors.header_values()?;
    let keys = Keys::open(&engine.project)?;
    if !config.listen.ip().is_loopback() && !keys.any_active()? {
        return Err(ServeError::ExposedWithoutKeys(config.listen));
    }
    let mut queue = Queue::open(&engine.project)?;
    let engine = Arc::new(engine);
    let mut workers: Vec<_> = config.worker.iter().map(|o| (engine.clone(), o.clone())).collect();
    workers.extend(config.more_workers.into_iter().map(|(e, o)| (Arc::new(e), o)));
    // Unleased rows, and rows this process's workers held in their previous life.
    let own: Vec<&str> = workers.iter().map(|(_, o)| o.ad.id.as_str()).collect();
    let recovery = queue.recover(&own)?;
    drop(queue);
    for tier in &config.preload {
        let ws = engine.workspace()?;
        ws.load_tier(tier)?;
        tracing::info!(tier = %tier, "preloaded");
    }
    let state = Arc::new(AppState::new(engine, config.limits, workers));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr()?;
        if !recovery.requeued.is_empty() || !recovery.completed.is_empty() {
            tracing::warn!(requeued = ?recovery.requeued, completed = ?recovery.completed,
                removed_files = recovery.removed_files, "recovered jobs left running by a previous process");
        }
        let workers: Vec<_> = state
            .workers
            .iter()
            .cloned()
            .map(|worker| {
                std::thread::spawn(move || {
                    if let Err(e) = worker.run() {
                        tracing::error!(worker = %worker.options.ad.id, "the queue worker stopped: {e}");
                    }
                })
            })
            .collect();
        let relay_state = state.clone();
        let relay = std::thread::spawn(move || relay::run(relay_state));
        // A line tools can wait for (the port, when 0 was asked for).
        tracing::info!("listening on http://{addr}");
        eprintln!("kiln serve: listening on http://{addr}");
        let shutdown_state = state.clone();
        axum::serve(listener, router(state, &config.cors)?)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing the running job");
                shutdown_state.shutting_down.store(true, Ordering::SeqCst);
                shutdown_state.workers.iter().for_each(|w| w.drain());
            })
            .await?;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
            relay.join()
        })
        .await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Calls `then` (on its own thread) when SIGTERM or Ctrl-C arrives: how a process without a
/// server (`kiln worker`) drains.
pub fn on_shutdown_signal(then: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(shutdown_signal());
        then();
    });
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
