//! OpenAI Images: `POST /v1/images/generations` (with `stream` and `partial_images`),
//! `POST /v1/images/edits` (multipart; OpenAI's mask convention: alpha 0 = the area to edit),
//! `GET /v1/models` (the tiers). `model` is a tier; fields kiln cannot honour get a 400.

use crate::auth::Quota;
use crate::common::{b64, decode_upload, parse_size, result_images, run_to_end, store_upload, wait_for};
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, Owner};
use axum::body::Bytes;
use axum::extract::{Multipart, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_core::jobs::spec::{GenerateSpec, ImageRef, InpaintSpec};
use kiln_core::jobs::{JobEvent, JobSpec};
use serde::Deserialize;
use std::sync::Arc;

/// Most images one request may ask for.
const MAX_N: usize = 10;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    output_format: Option<String>,
    #[serde(default)]
    output_compression: Option<u8>,
    #[serde(default)]
    quality: Option<String>,
    #[serde(default)]
    background: Option<String>,
    #[serde(default)]
    moderation: Option<String>,
    #[serde(default)]
    style: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    partial_images: Option<usize>,
    /// kiln's extension: the first seed (image i uses seed + i), for reproducible results.
    #[serde(default)]
    seed: Option<u64>,
    /// kiln's extension.
    #[serde(default)]
    negative_prompt: Option<String>,
    /// kiln's extension.
    #[serde(default)]
    steps: Option<usize>,
    /// kiln's extension: LoRAs of the server's library, `NAME[:WEIGHT]` each.
    #[serde(default)]
    loras: Vec<String>,
}

/// The options every image route shares, checked the same way.
struct Common {
    tier: String,
    n: usize,
    size: Option<(usize, usize)>,
    format: String,
}

fn check_common(
    state: &AppState,
    model: Option<&str>,
    n: Option<usize>,
    size: Option<&str>,
    response_format: Option<&str>,
    output_format: Option<&str>,
) -> ApiResult<Common> {
    let tier = model.unwrap_or("draft").to_string();
    let tiers = state.engine.project.tiers()?;
    let t = tiers.get(&tier).map_err(|_| {
        let known: Vec<String> = tiers.tiers.keys().cloned().collect();
        ApiError::bad(format!(
            "model `{tier}` is not a tier of this server; use one of: {}",
            known.join(", ")
        ))
    })?;
    if t.kind != kiln_core::tiers::TierKind::Diffusion {
        return Err(ApiError::bad(format!("model `{tier}` is an upscale tier, not an image model")));
    }
    let n = n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad(format!("n = {n}: expected 1..={MAX_N}")));
    }
    if let Some(rf) = response_format.filter(|f| *f != "b64_json") {
        return Err(ApiError::bad(format!(
            "response_format `{rf}`: kiln returns images inline only; use b64_json (or leave it out)"
        )));
    }
    let size = match size {
        None | Some("auto") => None,
        Some(s) => Some(parse_size(state, "size", s)?),
    };
    let format = output_format.unwrap_or("png").to_string();
    if !matches!(format.as_str(), "png" | "jpeg" | "webp") {
        return Err(ApiError::bad(format!("output_format `{format}`: expected png, jpeg or webp")));
    }
    Ok(Common { tier, n, size, format })
}

fn response(state: &AppState, result: &serde_json::Value, format: &str) -> ApiResult<Response> {
    let images = result_images(state, result)?;
    let mut data = Vec::new();
    let mut size = String::new();
    for img in &images {
        size = format!("{}x{}", img.width, img.height);
        data.push(serde_json::json!({ "b64_json": b64(&img.encoded(format)?), "revised_prompt": null, "seed": img.seed }));
    }
    Ok(Json(serde_json::json!({
        "created": crate::state::now() as i64,
        "data": data,
        "output_format": format,
        "size": size,
        "background": "opaque",
        "quality": "auto",
        "usage": { "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                   "input_tokens_details": { "text_tokens": 0, "image_tokens": 0 } },
    }))
    .into_response())
}

pub async fn generations(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: GenerationRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    let common = check_common(
        &state,
        req.model.as_deref(),
        req.n,
        req.size.as_deref(),
        req.response_format.as_deref(),
        req.output_format.as_deref(),
    )?;
    if let Some(s) = &req.style {
        return Err(ApiError::bad(format!(
            "style `{s}` is a DALL-E 3 option kiln does not have; leave it out"
        )));
    }
    if let Some(b) = req.background.as_deref().filter(|b| !matches!(*b, "auto" | "opaque")) {
        return Err(ApiError::bad(format!("background `{b}`: kiln makes opaque images (auto or opaque)")));
    }
    if let Some(q) = req
        .quality
        .as_deref()
        .filter(|q| !matches!(*q, "auto" | "standard" | "low" | "medium" | "high" | "hd"))
    {
        return Err(ApiError::bad(format!("quality `{q}`: expected auto (the tier decides quality)")));
    }
    if let Some(m) = req.moderation.as_deref().filter(|m| !matches!(*m, "auto" | "low")) {
        return Err(ApiError::bad(format!("moderation `{m}`: expected auto or low")));
    }
    if req.output_compression.is_some_and(|c| c > 100) {
        return Err(ApiError::bad("output_compression: expected 0..=100"));
    }
    let partials = req.partial_images.unwrap_or(0);
    if partials > 3 {
        return Err(ApiError::bad(format!("partial_images = {partials}: expected 0..=3")));
    }
    if req.prompt.trim().is_empty() {
        return Err(ApiError::bad("prompt is empty"));
    }
    let _ = &req.user;
    let spec = JobSpec::Generate(GenerateSpec {
        tier: Some(common.tier.clone()),
        prompt: req.prompt.clone(),
        negative: req.negative_prompt.clone(),
        width: common.size.map(|s| s.0),
        height: common.size.map(|s| s.1),
        steps: req.steps,
        seed: req.seed,
        count: Some(common.n),
        loras: req.loras.clone(),
        ..Default::default()
    });
    let id = state.submit(&spec, &owner, quota.0)?;
    if req.stream.unwrap_or(false) {
        return Ok(stream(state, id, partials, common.format).await.into_response());
    }
    let result = wait_for(&state, id).await?;
    response(&state, &result, &common.format)
}

/// `stream: true`: `image_generation.partial_image` events from the step previews, then one
/// `image_generation.completed` per image.
async fn stream(state: Arc<AppState>, id: i64, partials: usize, format: String) -> impl IntoResponse {
    let (history, rx) = state.hub.subscribe(id);
    let events = futures_util::stream::unfold(
        (state, rx, history.into_iter(), 0usize, false),
        move |(state, mut rx, mut history, mut sent, done)| {
            let format = format.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let next = match history.next() {
                        Some(e) => e,
                        None => match rx.recv().await {
                            Ok(e) => e,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => return None,
                        },
                    };
                    match next {
                        JobEvent::Preview { png_base64, width, height, .. } if sent < partials => {
                            let data = serde_json::json!({
                                "type": "image_generation.partial_image", "b64_json": png_base64,
                                "partial_image_index": sent, "created_at": crate::state::now() as i64,
                                "size": format!("{width}x{height}"), "quality": "auto", "background": "opaque",
                                "output_format": "png",
                            });
                            sent += 1;
                            let ev = Event::default()
                                .event("image_generation.partial_image")
                                .data(data.to_string());
                            return Some((
                                Ok::<_, std::convert::Infallible>(ev),
                                (state, rx, history, sent, false),
                            ));
                        }
                        JobEvent::Done { result } => {
                            // One completed event per stream (OpenAI streams one image).
                            let first =
                                result_images(&state, &result).ok().and_then(|v| v.into_iter().next());
                            let body = match first {
                                Some(img) => serde_json::json!({
                                    "type": "image_generation.completed",
                                    "b64_json": b64(&img.encoded(&format).unwrap_or_default()),
                                    "created_at": crate::state::now() as i64,
                                    "size": format!("{}x{}", img.width, img.height), "quality": "auto",
                                    "background": "opaque", "output_format": format,
                                    "usage": { "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                               "input_tokens_details": { "text_tokens": 0, "image_tokens": 0 } },
                                })
                                .to_string(),
                                None => "{}".to_string(),
                            };
                            let ev = Event::default().event("image_generation.completed").data(body);
                            return Some((Ok(ev), (state, rx, history, sent, true)));
                        }
                        JobEvent::Failed { error } => {
                            let data = serde_json::json!({ "type": "error", "error": { "message": error } });
                            let ev = Event::default().event("error").data(data.to_string());
                            return Some((Ok(ev), (state, rx, history, sent, true)));
                        }
                        JobEvent::Cancelled => {
                            let data =
                                serde_json::json!({ "type": "error", "error": { "message": "cancelled" } });
                            let ev = Event::default().event("error").data(data.to_string());
                            return Some((Ok(ev), (state, rx, history, sent, true)));
                        }
                        _ => {}
                    }
                }
            }
        },
    );
    Sse::new(events)
}

pub async fn edits(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    mut multipart: Multipart,
) -> ApiResult<Response> {
    let mut fields: std::collections::HashMap<String, String> = Default::default();
    let mut image = None;
    let mut mask = None;
    while let Some(field) =
        multipart.next_field().await.map_err(|e| ApiError::bad(format!("invalid multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| ApiError::bad(format!("field `{name}`: {e}")))?;
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(ApiError::bad("kiln edits one image per request; send a single `image`"));
                }
                image = Some(decode_upload(&state, "image", &bytes)?);
            }
            "mask" => mask = Some(decode_upload(&state, "mask", &bytes)?),
            "prompt" | "model" | "n" | "size" | "response_format" | "output_format" | "quality" | "user"
            | "background" | "seed" | "input_fidelity" | "output_compression" | "stream"
            | "partial_images" => {
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::bad(format!("field `{name}` is not text")))?;
                fields.insert(name, text);
            }
            other => return Err(ApiError::bad(format!("unknown field `{other}`"))),
        }
    }
    let image = image.ok_or_else(|| ApiError::bad("the `image` file is missing"))?;
    let prompt = fields.get("prompt").cloned().ok_or_else(|| ApiError::bad("`prompt` is missing"))?;
    let n = fields
        .get("n")
        .map(|v| v.parse::<usize>().map_err(|_| ApiError::bad(format!("n `{v}` is not a number"))))
        .transpose()?;
    let seed = fields
        .get("seed")
        .map(|v| v.parse::<u64>().map_err(|_| ApiError::bad(format!("seed `{v}` is not a number"))))
        .transpose()?;
    if fields.get("stream").is_some_and(|s| s == "true") {
        return Err(ApiError::bad("stream: kiln streams generations, not edits; leave it out"));
    }
    let common = check_common(
        &state,
        fields.get("model").map(String::as_str),
        n,
        fields.get("size").map(String::as_str),
        fields.get("response_format").map(String::as_str),
        fields.get("output_format").map(String::as_str),
    )?;
    let rgb = image.image.to_rgb8();
    let image_id = store_upload(&state, &rgb)?;
    let spec = match mask {
        Some(m) => {
            if (m.image.width(), m.image.height()) != (rgb.width(), rgb.height()) {
                return Err(ApiError::bad(format!(
                    "mask is {}x{} but the image is {}x{}; send a mask of the image's size",
                    m.image.width(),
                    m.image.height(),
                    rgb.width(),
                    rgb.height()
                )));
            }
            if !m.image.color().has_alpha() {
                return Err(ApiError::bad(
                    "mask has no alpha channel; OpenAI's convention is a PNG whose transparent pixels (alpha 0) are edited",
                ));
            }
            // OpenAI: alpha 0 = edit. kiln: white = repaint.
            let rgba = m.image.to_rgba8();
            let kiln_mask = image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let v = if rgba.get_pixel(x, y)[3] == 0 { 255 } else { 0 };
                image::Rgb([v, v, v])
            });
            let mask_id = store_upload(&state, &kiln_mask)?;
            JobSpec::Inpaint(InpaintSpec {
                tier: Some(common.tier.clone()),
                image: ImageRef::Upload(image_id),
                mask: Some(ImageRef::Upload(mask_id)),
                prompt,
                seed,
                count: Some(common.n),
                ..Default::default()
            })
        }
        // Without a mask the whole image is reworked: img2img.
        None => JobSpec::Generate(GenerateSpec {
            tier: Some(common.tier.clone()),
            prompt,
            seed,
            count: Some(common.n),
            init_image: Some(ImageRef::Upload(image_id)),
            strength: Some(0.75),
            width: Some(common.size.map(|s| s.0).unwrap_or((rgb.width() as usize / 8) * 8)),
            height: Some(common.size.map(|s| s.1).unwrap_or((rgb.height() as usize / 8) * 8)),
            ..Default::default()
        }),
    };
    let result = run_to_end(&state, &spec, &owner, quota.0).await?;
    response(&state, &result, &common.format)
}

pub async fn models(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let tiers = state.engine.project.tiers()?;
    let data: Vec<serde_json::Value> = tiers
        .tiers
        .values()
        .filter(|t| t.kind == kiln_core::tiers::TierKind::Diffusion)
        .map(|t| serde_json::json!({ "id": t.name, "object": "model", "created": 0, "owned_by": "kiln" }))
        .collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })).into_response())
}
