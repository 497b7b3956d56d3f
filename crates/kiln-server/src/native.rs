//! kiln's own API: `/v1/jobs` (any job spec; list, get, cancel, SSE events), `/v1/assets`
//! (+ image, lineage), `/v1/uploads` (images for masks and inputs), `/v1/me`, `/v1/report`,
//! `/v1/tiers`, `/v1/openapi.json`.

use crate::auth::Quota;
use crate::error::{ApiError, ApiResult};
use crate::hub::is_terminal;
use crate::state::{AppState, Owner};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::Stream;
use kiln_core::jobs::queue::JobState;
use kiln_core::jobs::{JobEvent, JobSpec};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;

/// Parses a path id, saying what a valid one is.
pub fn parse_id(what: &str, s: &str) -> ApiResult<i64> {
    s.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::NotFound(format!("{what} `{s}` does not exist ({what} ids are positive integers)"))
    })
}

pub async fn create_job(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    body: Bytes,
) -> ApiResult<Response> {
    let spec: JobSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the body is not a job spec: {e}; send JSON such as {{\"kind\": \"draft\", \"prompt\": \"...\"}} \
             (kinds: generate, draft, promote, inpaint, upscale, replay, cutout)"
        ))
    })?;
    let id = state.submit(&spec, &owner, quota.0)?;
    let job = state.queue()?.get(id)?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(job)).into_response())
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
}

pub async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(serde_json::json!({ "jobs": state.queue()?.list(limit)? })).into_response())
}

/// The queue workers on this database (this server's own and every `kiln worker`): device,
/// state (`down` when silent for three heartbeats), current job, jobs done, warm models.
pub async fn workers(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    Ok(Json(serde_json::json!({ "workers": state.queue()?.workers()? })).into_response())
}

pub async fn get_job(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id("job", &id)?;
    Ok(Json(state.queue()?.get(id)?).into_response())
}

pub async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = parse_id("job", &id)?;
    let mut queue = state.queue()?;
    let job = queue.get(id)?;
    // Everyone sees the queue; only a job's owner may cancel it.
    if job.owner != owner.0 {
        return Err(ApiError::Forbidden(format!(
            "job {id} belongs to another key; only its owner can cancel it"
        )));
    }
    let before = job.state;
    if before.is_final() {
        return Err(ApiError::Conflict(format!("job {id} already ended ({})", before.as_str())));
    }
    let after = queue.cancel(id)?;
    if after == JobState::Cancelled {
        state.hub.publish(id, JobEvent::Cancelled);
    }
    Ok(Json(serde_json::json!({ "id": id, "state": after, "cancel_requested": after == JobState::Running }))
        .into_response())
}

/// The job's events as SSE: everything so far, then live until it ends.
pub async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = parse_id("job", &id)?;
    let job = state.queue()?.get(id)?;
    let (mut history, rx) = state.hub.subscribe(id);
    // A job this process never ran (finished before a restart) gets its end from the queue.
    if history.is_empty() {
        match job.state {
            JobState::Queued => history.push(JobEvent::Queued { position: job.position.unwrap_or(0) }),
            JobState::Done => history.push(JobEvent::Done { result: job.result.clone().unwrap_or_default() }),
            JobState::Failed => {
                history.push(JobEvent::Failed { error: job.error.clone().unwrap_or_default() })
            }
            JobState::Cancelled => history.push(JobEvent::Cancelled),
            JobState::Running => {}
        }
    }
    let ended = history.iter().any(is_terminal);
    let initial = futures_util::stream::iter(history.into_iter().map(|e| Ok(to_sse(&e))));
    let live = futures_util::stream::unfold((rx, ended), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Ok(e) => {
                let end = is_terminal(&e);
                Some((Ok(to_sse(&e)), (rx, end)))
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                Some((Ok(Event::default().event("lagged").data("{}")), (rx, false)))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    Ok(Sse::new(futures_util::StreamExt::chain(initial, live)).keep_alive(KeepAlive::default()))
}

fn to_sse(e: &JobEvent) -> Event {
    let name = serde_json::to_value(e).ok().and_then(|v| v["event"].as_str().map(str::to_string));
    let data = serde_json::to_string(e).unwrap_or_default();
    Event::default().event(name.unwrap_or_else(|| "event".into())).data(data)
}

#[derive(Deserialize)]
pub struct AssetQuery {
    kind: Option<String>,
    tier: Option<String>,
    limit: Option<usize>,
}

pub async fn list_assets(
    State(state): State<Arc<AppState>>,
    Query(q): Query<AssetQuery>,
) -> ApiResult<Response> {
    let library = state.engine.project.library()?;
    let filter = kiln_core::library::assets::AssetFilter {
        kind: q.kind,
        tier: q.tier,
        limit: Some(q.limit.unwrap_or(100).clamp(1, 1000)),
    };
    Ok(Json(serde_json::json!({ "assets": library.list_assets(&filter)? })).into_response())
}

fn asset_row(state: &AppState, id: &str) -> ApiResult<kiln_core::library::assets::AssetRow> {
    let id = parse_id("asset", id)?;
    let library = state.engine.project.library()?;
    library.asset(id).map_err(|_| ApiError::NotFound(format!("asset {id} does not exist")))
}

/// The asset's row, with the library job that made it (device seconds, timings, device) under
/// `job`.
pub async fn get_asset(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let row = asset_row(&state, &id)?;
    let job = state.engine.project.library()?.job(row.job_id)?;
    let mut value = serde_json::to_value(&row).map_err(|e| ApiError::Internal(e.to_string()))?;
    value["job"] = serde_json::to_value(job).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(value).into_response())
}

/// Stores an image (PNG, JPEG or WebP; the body is the file) in the project's uploads, for a
/// job spec to name as `{"upload": "<sha256>"}` (an inpainting mask, an init image). Stored as
/// RGB: a mask is white where it repaints, black where it keeps.
pub async fn create_upload(State(state): State<Arc<AppState>>, body: Bytes) -> ApiResult<Response> {
    let upload = crate::common::decode_upload(&state, "upload", &body)?;
    let rgb = upload.image.to_rgb8();
    let sha = crate::common::store_upload(&state, &rgb)?;
    let body = serde_json::json!({ "upload": sha, "width": rgb.width(), "height": rgb.height() });
    Ok((axum::http::StatusCode::CREATED, Json(body)).into_response())
}

/// Who the request's key belongs to (`local` when the project has no keys) and its daily quota,
/// so a client can tell its own jobs from everyone's in `GET /v1/jobs`.
pub async fn me(
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "owner": owner.0, "quota_credits_per_day": quota.0 }))
}

pub async fn asset_image(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let row = asset_row(&state, &id)?;
    let root = &state.engine.project.root;
    // The library stores paths relative to the project; anything resolving outside it is refused.
    // A file another box made is fetched from a shared library first.
    let path = state.engine.project.library()?.local_file(&row)?;
    let canonical = std::fs::canonicalize(&path)
        .map_err(|_| ApiError::NotFound(format!("asset {} has no file (run `kiln assets check`)", row.id)))?;
    let root_canonical = std::fs::canonicalize(root).map_err(|e| ApiError::Internal(e.to_string()))?;
    if !canonical.starts_with(&root_canonical) {
        return Err(ApiError::NotFound(format!("asset {} lies outside the project", row.id)));
    }
    let bytes = fs_err::read(&canonical).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mime = match canonical.extension().and_then(|e| e.to_str()) {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "image/png",
    };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

pub async fn asset_lineage(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = asset_row(&state, &id)?;
    let library = state.engine.project.library()?;
    Ok(Json(serde_json::json!({
        "lineage": library.lineage(row.id)?,
        "children": library.children(row.id)?,
    }))
    .into_response())
}

pub async fn report(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let library = state.engine.project.library()?;
    let report = kiln_core::library::ledger::report(&library, &state.engine.project.config)?;
    Ok(Json(serde_json::json!({ "report": report, "models_loaded": state.engine.pool.entries() }))
        .into_response())
}

pub async fn tiers(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let tiers = state.engine.project.tiers()?;
    let list: Vec<serde_json::Value> = tiers
        .tiers
        .values()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "description": t.description, "kind": t.kind, "lane": if t.is_draft() { "draft" } else { "final" },
                "width": t.width, "height": t.height, "steps": t.steps, "price": t.price,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "tiers": list })).into_response())
}

/// The project's presets (brand kits): name, description, tier, settings and content hash; no
/// file paths (a LUT is named by its file name).
pub async fn presets(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let presets = state.engine.project.presets()?;
    let list: Vec<serde_json::Value> = presets
        .presets
        .values()
        .map(|p| {
            let lut = p.grade.as_ref().and_then(|g| g.lut.file_name()).map(|n| n.to_string_lossy().into_owned());
            serde_json::json!({
                "name": p.name, "description": p.description, "tier": p.tier, "prompt": p.prompt,
                "negative_prompt": p.negative_prompt, "aspect": p.aspect, "width": p.width, "height": p.height,
                "steps": p.steps, "guidance": p.guidance, "scheduler": p.scheduler, "seed": p.seed,
                "grade_lut": lut, "sha256": p.sha256,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "presets": list })).into_response())
}

/// The LoRA library (`kiln loras import`): name, sha256, size and what each file says about
/// itself (format, family, base model, trigger words, resolution); no file paths.
pub async fn loras(State(_state): State<Arc<AppState>>) -> ApiResult<Response> {
    let entries = kiln_core::loaders::lora::LoraLibrary::open_default()?.list()?;
    let list: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::json!({ "name": e.name, "sha256": e.sha256, "bytes": e.bytes, "info": e.info }))
        .collect();
    Ok(Json(serde_json::json!({ "loras": list })).into_response())
}

pub async fn healthz() -> &'static str {
    "ok"
}
