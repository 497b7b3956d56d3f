//! AUTOMATIC1111's `/sdapi/v1`: txt2img, img2img (with mask: white = repaint, mask_blur,
//! inpaint_full_res, inpaint_full_res_padding, denoising_strength), progress, interrupt,
//! options (`sd_model_checkpoint` = a tier), sd-models, samplers, schedulers, upscalers,
//! extra-single-image (an upscale tier).
//! A1111 clients send many defaulted fields; kiln reads the ones it honours and refuses
//! those set to values it cannot honour (hires fix, restore faces, tiling).

use crate::auth::Quota;
use crate::common::{b64, decode_upload, result_images, run_to_end, store_upload, unb64};
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, Owner};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kiln_core::jobs::spec::{GenerateSpec, ImageRef, InpaintSpec};
use kiln_core::jobs::JobSpec;
use serde_json::Value;
use std::sync::Arc;

/// A1111 sampler names and the kiln scheduler each means (with the "Karras" schedule variant).
const SAMPLERS: &[(&str, &str)] = &[
    ("Euler a", "euler-a"),
    ("Euler", "euler"),
    ("DDIM", "ddim"),
    ("DPM++ 2M", "dpmpp-2m"),
    ("DPM++ 2M Karras", "dpmpp-2m-karras"),
    ("LCM", "lcm"),
    ("PLMS", "pndm"),
];

fn sampler(name: &str, schedule: Option<&str>) -> ApiResult<String> {
    let karras = schedule.is_some_and(|s| s.eq_ignore_ascii_case("karras"));
    let base = SAMPLERS
        .iter()
        .find(|(a, k)| a.eq_ignore_ascii_case(name) || k.eq_ignore_ascii_case(name))
        .map(|(_, k)| k.to_string())
        .ok_or_else(|| {
            let known: Vec<&str> = SAMPLERS.iter().map(|(a, _)| *a).collect();
            ApiError::bad(format!("sampler_name `{name}` is not one kiln has: {}", known.join(", ")))
        })?;
    Ok(if karras && base == "dpmpp-2m" { "dpmpp-2m-karras".into() } else { base })
}

fn body(bytes: &[u8]) -> ApiResult<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad(format!("invalid JSON: {e}"))),
    }
}

fn get_u64(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<u64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{k}: expected a non-negative integer, got {v}"))),
    }
}

fn get_f64(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<f64>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| ApiError::bad(format!("{k}: expected a number, got {v}")))
        }
    }
}

fn get_str<'a>(m: &'a serde_json::Map<String, Value>, k: &str) -> ApiResult<Option<&'a str>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::bad(format!("{k}: expected a string, got {v}"))),
    }
}

fn get_bool(m: &serde_json::Map<String, Value>, k: &str) -> ApiResult<bool> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad(format!("{k}: expected true or false, got {v}"))),
    }
}

/// What txt2img and img2img share.
struct Sampling {
    tier: String,
    prompt: String,
    negative: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    count: usize,
    /// A1111's `styles`: kiln's presets (one per job).
    preset: Option<String>,
}

impl Sampling {
    /// The txt2img spec these settings make.
    fn generate_spec(&self) -> GenerateSpec {
        GenerateSpec {
            tier: Some(self.tier.clone()),
            prompt: self.prompt.clone(),
            negative: self.negative.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.clone(),
            seed: self.seed,
            count: Some(self.count),
            preset: self.preset.clone(),
            ..Default::default()
        }
    }
}

fn sampling(state: &AppState, m: &serde_json::Map<String, Value>) -> ApiResult<Sampling> {
    for flag in ["enable_hr", "restore_faces", "tiling"] {
        if get_bool(m, flag)? {
            return Err(ApiError::bad(format!(
                "{flag}: kiln does not do this; set it false (upscale with kiln's upscale tier)"
            )));
        }
    }
    let seed = match m.get("seed") {
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => None,
        _ => get_u64(m, "seed")?,
    };
    let count = get_u64(m, "batch_size")?.unwrap_or(1) * get_u64(m, "n_iter")?.unwrap_or(1);
    if count == 0 || count > 16 {
        return Err(ApiError::bad(format!("batch_size × n_iter = {count}: expected 1..=16")));
    }
    let dims = |k: &str| -> ApiResult<Option<usize>> {
        let v = get_u64(m, k)?;
        match v {
            Some(v) if v == 0 || v as usize > state.limits.generate_side || v % 8 != 0 => Err(ApiError::bad(
                format!("{k} = {v}: expected a multiple of 8 in 8..={}", state.limits.generate_side),
            )),
            v => Ok(v.map(|v| v as usize)),
        }
    };
    let scheduler = match get_str(m, "sampler_name")?.or(get_str(m, "sampler_index")?) {
        Some(name) => Some(sampler(name, get_str(m, "scheduler")?)?),
        None => None,
    };
    let tier = {
        let overridden = m
            .get("override_settings")
            .and_then(|o| o.get("sd_model_checkpoint"))
            .and_then(Value::as_str)
            .map(str::to_string);
        overridden.unwrap_or_else(|| state.a1111_tier.lock().unwrap_or_else(|p| p.into_inner()).clone())
    };
    let preset = match m.get("styles") {
        None | Some(Value::Null) => None,
        Some(Value::Array(names)) => match names.as_slice() {
            [] => None,
            [Value::String(name)] => Some(name.clone()),
            _ => {
                return Err(ApiError::bad(
                    "styles: kiln applies one style (preset) per job; send at most one name (GET /sdapi/v1/prompt-styles lists them)",
                ))
            }
        },
        Some(other) => return Err(ApiError::bad(format!("styles: expected a list of names, got {other}"))),
    };
    Ok(Sampling {
        preset,
        tier,
        prompt: get_str(m, "prompt")?.unwrap_or_default().to_string(),
        negative: get_str(m, "negative_prompt")?.filter(|s| !s.is_empty()).map(str::to_string),
        seed,
        steps: get_u64(m, "steps")?.map(|v| v as usize),
        guidance: get_f64(m, "cfg_scale")?,
        scheduler,
        width: dims("width")?,
        height: dims("height")?,
        count: count as usize,
    })
}

/// The A1111 response: images, the parameters echoed, and `info` as the JSON string clients parse.
fn reply(state: &AppState, s: &Sampling, params: Value, result: &Value) -> ApiResult<Response> {
    let images = result_images(state, result)?;
    let seeds: Vec<u64> = images.iter().filter_map(|i| i.seed).collect();
    let (w, h) = images.first().map(|i| (i.width, i.height)).unwrap_or((0, 0));
    let sampler_name = result["detail"]["scheduler"].as_str().unwrap_or_default().to_string();
    let hash = result["detail"]["library"]["asset_ids"].clone();
    let info = serde_json::json!({
        "prompt": s.prompt, "all_prompts": vec![s.prompt.clone(); images.len()],
        "negative_prompt": s.negative.clone().unwrap_or_default(),
        "seed": seeds.first(), "all_seeds": seeds, "subseed": -1, "all_subseeds": vec![-1; images.len()],
        "sampler_name": sampler_name, "cfg_scale": s.guidance, "steps": s.steps,
        "width": w, "height": h, "batch_size": images.len(), "sd_model_name": s.tier,
        "sd_model_hash": result["detail"]["library"]["job_id"], "kiln_asset_ids": hash,
        "infotexts": images.iter().map(|_| s.prompt.clone()).collect::<Vec<_>>(),
    });
    let mut encoded = Vec::new();
    for img in &images {
        encoded.push(b64(&img.png));
    }
    Ok(Json(serde_json::json!({ "images": encoded, "parameters": params, "info": info.to_string() }))
        .into_response())
}

pub async fn txt2img(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let m = body(&bytes)?;
    let s = sampling(&state, &m)?;
    let spec = JobSpec::Generate(s.generate_spec());
    let result = run_to_end(&state, &spec, &owner, quota.0).await?;
    reply(&state, &s, Value::Object(m), &result)
}

pub async fn img2img(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let m = body(&bytes)?;
    let s = sampling(&state, &m)?;
    let init = match m.get("init_images") {
        Some(Value::Array(a)) if a.len() == 1 => {
            a[0].as_str().ok_or_else(|| ApiError::bad("init_images: expected base64 strings"))?
        }
        Some(Value::Array(a)) if a.len() > 1 => {
            return Err(ApiError::bad("init_images: kiln takes one image"))
        }
        _ => return Err(ApiError::bad("init_images: one base64 image is required")),
    };
    let image = decode_upload(&state, "init_images[0]", &unb64("init_images[0]", init)?)?.image.to_rgb8();
    let image_id = store_upload(&state, &image)?;
    let strength = get_f64(&m, "denoising_strength")?.unwrap_or(0.75);
    let spec = match get_str(&m, "mask")? {
        Some(mask_b64) => {
            let mask = decode_upload(&state, "mask", &unb64("mask", mask_b64)?)?.image;
            if (mask.width(), mask.height()) != (image.width(), image.height()) {
                return Err(ApiError::bad(format!(
                    "mask is {}x{} but the image is {}x{}; send a mask of the image's size",
                    mask.width(),
                    mask.height(),
                    image.width(),
                    image.height()
                )));
            }
            let invert = get_u64(&m, "inpainting_mask_invert")?.unwrap_or(0) == 1;
            let gray = mask.to_luma8();
            let rgb = image::RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
                let v = gray.get_pixel(x, y)[0];
                let v = if invert { 255 - v } else { v };
                image::Rgb([v, v, v])
            });
            let mask_id = store_upload(&state, &rgb)?;
            let full_res = get_bool(&m, "inpaint_full_res")?;
            JobSpec::Inpaint(InpaintSpec {
                tier: Some(s.tier.clone()),
                image: ImageRef::Upload(image_id),
                mask: Some(ImageRef::Upload(mask_id)),
                prompt: s.prompt.clone(),
                negative: s.negative.clone(),
                steps: s.steps,
                guidance: s.guidance,
                scheduler: s.scheduler.clone(),
                seed: s.seed,
                count: Some(s.count),
                strength: Some(strength),
                mask_blur: get_f64(&m, "mask_blur")?,
                region: Some(if full_res { "only-masked".into() } else { "whole".into() }),
                padding: get_u64(&m, "inpaint_full_res_padding")?.map(|p| p.min(4096) as u32),
                ..Default::default()
            })
        }
        None => JobSpec::Generate(GenerateSpec {
            init_image: Some(ImageRef::Upload(image_id)),
            strength: Some(strength),
            ..s.generate_spec()
        }),
    };
    let result = run_to_end(&state, &spec, &owner, quota.0).await?;
    let mut params = m;
    params.remove("init_images");
    params.remove("mask");
    reply(&state, &s, Value::Object(params), &result)
}

pub async fn progress(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let cur = state.hub.current();
    let queued = state
        .queue()?
        .list(1000)?
        .iter()
        .filter(|j| j.state == kiln_core::jobs::queue::JobState::Queued)
        .count();
    let progress = if cur.steps > 0 { cur.step as f64 / cur.steps as f64 } else { 0.0 };
    Ok(Json(serde_json::json!({
        "progress": progress,
        "eta_relative": 0.0,
        "state": { "skipped": false, "interrupted": false, "job": cur.job.map(|j| j.to_string()).unwrap_or_default(),
                   "job_count": queued + usize::from(cur.job.is_some()), "sampling_step": cur.step, "sampling_steps": cur.steps },
        "current_image": cur.preview,
        "textinfo": null,
    }))
    .into_response())
}

pub async fn interrupt(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
) -> ApiResult<Response> {
    if let Some(job) = state.hub.current().job {
        let mut queue = state.queue()?;
        // Only the running job's owner may stop it.
        if queue.get(job)?.owner != owner.0 {
            return Err(ApiError::Forbidden(format!(
                "job {job} belongs to another key; only its owner can interrupt it"
            )));
        }
        queue.cancel(job)?;
    }
    Ok(Json(serde_json::json!({})).into_response())
}

pub async fn get_options(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let tier = state.a1111_tier.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Json(serde_json::json!({ "sd_model_checkpoint": tier, "samples_format": "png" })).into_response())
}

pub async fn set_options(State(state): State<Arc<AppState>>, bytes: Bytes) -> ApiResult<Response> {
    let m = body(&bytes)?;
    for (k, v) in &m {
        match k.as_str() {
            "sd_model_checkpoint" => {
                let name =
                    v.as_str().ok_or_else(|| ApiError::bad("sd_model_checkpoint: expected a tier name"))?;
                // Clients send "title [hash]"; the title is the tier.
                let name = name.split(" [").next().unwrap_or(name).trim();
                let tiers = state.engine.project.tiers()?;
                let tier = tiers.get(name).map_err(|e| ApiError::bad(e.to_string()))?;
                if tier.kind != kiln_core::tiers::TierKind::Diffusion {
                    return Err(ApiError::bad(format!("`{name}` is an upscale tier, not a checkpoint")));
                }
                *state.a1111_tier.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
            }
            other => {
                return Err(ApiError::bad(format!(
                    "option `{other}` is not one kiln has (sd_model_checkpoint)"
                )))
            }
        }
    }
    Ok(Json(Value::Null).into_response())
}

pub async fn sd_models(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let tiers = state.engine.project.tiers()?;
    let list: Vec<Value> = tiers
        .tiers
        .values()
        .filter(|t| t.kind == kiln_core::tiers::TierKind::Diffusion)
        .map(|t| serde_json::json!({ "title": t.name, "model_name": t.name, "hash": null, "sha256": null, "filename": t.model, "config": null }))
        .collect();
    Ok(Json(list).into_response())
}

pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SAMPLERS
            .iter()
            .map(|(a, _)| serde_json::json!({ "name": a, "aliases": [], "options": {} }))
            .collect(),
    ))
}

pub async fn schedulers() -> Json<Value> {
    Json(serde_json::json!([
        { "name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false },
        { "name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false },
    ]))
}

pub async fn upscalers(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let tiers = state.engine.project.tiers()?;
    let list: Vec<Value> = tiers
        .tiers
        .values()
        .filter(|t| t.kind == kiln_core::tiers::TierKind::Upscale)
        .map(|t| serde_json::json!({ "name": t.name, "model_name": t.model, "model_path": null, "model_url": null, "scale": t.scale }))
        .collect();
    Ok(Json(list).into_response())
}

/// `extra-single-image`: the image through an upscale tier (`upscaler_1` names it; default
/// `upscale`), to `upscaling_resize` × its size (default: the model's scale).
pub async fn extra_single_image(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<Owner>,
    Extension(quota): Extension<Quota>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let m = body(&bytes)?;
    let image_b64 =
        get_str(&m, "image")?.ok_or_else(|| ApiError::bad("image: one base64 image is required"))?;
    let image = decode_upload(&state, "image", &unb64("image", image_b64)?)?.image.to_rgb8();
    let id = store_upload(&state, &image)?;
    let tier = match get_str(&m, "upscaler_1")? {
        None | Some("None") | Some("") => "upscale".to_string(),
        Some(name) => name.to_string(),
    };
    let to = match get_f64(&m, "upscaling_resize")? {
        Some(s) if !(s.is_finite() && s > 0.0 && s <= 16.0) => {
            return Err(ApiError::bad(format!("upscaling_resize = {s}: expected a scale in (0, 16]")))
        }
        Some(s) => Some(s.to_string()),
        None => None,
    };
    let spec = JobSpec::Upscale(kiln_core::jobs::spec::UpscaleSpec {
        image: ImageRef::Upload(id),
        tier: Some(tier),
        to,
        tile: None,
        redetail: None,
    });
    let result = run_to_end(&state, &spec, &owner, quota.0).await?;
    let images = result_images(&state, &result)?;
    let first = images.first().ok_or_else(|| ApiError::Internal("the upscale made no image".into()))?;
    Ok(Json(serde_json::json!({ "html_info": "", "image": b64(&first.png) })).into_response())
}

/// A1111's LoRA list: the LoRA library, as `<lora:NAME:W>` tags name them (A1111's `path` is a
/// file on the server, which kiln does not expose).
pub async fn loras(State(_state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let entries = kiln_core::loaders::lora::LoraLibrary::open_default()?.list()?;
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "alias": e.name,
                "metadata": {
                    "ss_base_model_version": e.info.base_model,
                    "ss_resolution": e.info.resolution,
                    "trigger_words": e.info.trigger_words,
                    "sha256": e.sha256,
                },
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

/// A1111's prompt styles: the project's presets (name, prompt template, negative prompt).
pub async fn prompt_styles(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let presets = state.engine.project.presets()?;
    let styles: Vec<Value> = presets
        .presets
        .values()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt.clone().unwrap_or_default(),
            })
        })
        .collect();
    Ok(Json(Value::Array(styles)))
}
