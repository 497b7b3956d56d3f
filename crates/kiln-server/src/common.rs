//! What the compatibility APIs share: uploads (checked before decoding), waiting for a queued
//! job, and reading its images back in the format a client asked for.

use crate::error::{ApiError, ApiResult};
use crate::hub::is_terminal;
use crate::state::AppState;
use kiln_core::jobs::JobEvent;
use std::io::Cursor;

/// An uploaded image after its size check: decoded, with its alpha when it had one.
pub struct Upload {
    pub image: image::DynamicImage,
}

/// Decodes `bytes` as an image, refusing sizes over the limit from the header alone.
pub fn decode_upload(state: &AppState, field: &str, bytes: &[u8]) -> ApiResult<Upload> {
    if bytes.is_empty() {
        return Err(ApiError::bad(format!("{field}: the image is empty")));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(format!("{field}: not a readable image ({e})")))?;
    if reader.format().is_none() {
        return Err(ApiError::bad(format!("{field}: not an image kiln reads (send PNG, JPEG or WebP)")));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("{field}: cannot read the image's size ({e})")))?;
    let max = state.limits.image_side;
    if w == 0 || h == 0 || w > max || h > max {
        return Err(ApiError::bad(format!(
            "{field}: {w}x{h} is outside 1..={max} px a side; send a smaller image"
        )));
    }
    // kiln's one decoder: EXIF orientation applied, as for files on disk.
    let image =
        kiln_core::image::decode_bytes(bytes, max, std::path::Path::new(&format!("upload `{field}`")))
            .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(Upload { image })
}

/// Stores an RGB image in the project's uploads (named by the sha256 of its PNG) and returns
/// that id.
pub fn store_upload(state: &AppState, rgb: &image::RgbImage) -> ApiResult<String> {
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        rgb.as_raw(),
        rgb.width(),
        rgb.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&png));
    let path = kiln_core::jobs::engine::upload_path(&state.engine.project, &sha);
    if !path.is_file() {
        kiln_core::image::png_meta::write_png_atomic(&path, rgb, &[])?;
    }
    // Workers on other boxes read it from a shared library (under its id: these bytes' sha256).
    let library = state.engine.project.library()?;
    if library.shares_files() {
        library.put_blob(&sha, &png)?;
    }
    Ok(sha)
}

/// Queues `spec` for `owner` and waits for its result (the synchronous OpenAI and A1111 routes).
pub async fn run_to_end(
    state: &AppState,
    spec: &kiln_core::jobs::JobSpec,
    owner: &crate::state::Owner,
    quota: Option<f64>,
) -> ApiResult<serde_json::Value> {
    let id = state.submit(spec, owner, quota)?;
    wait_for(state, id).await
}

/// Waits for job `id` to end; its result on success.
pub async fn wait_for(state: &AppState, id: i64) -> ApiResult<serde_json::Value> {
    let (history, mut rx) = state.hub.subscribe(id);
    let mut last = history.into_iter().find(is_terminal);
    while last.is_none() {
        match rx.recv().await {
            Ok(e) if is_terminal(&e) => last = Some(e),
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    match last {
        Some(JobEvent::Done { result }) => Ok(result),
        Some(JobEvent::Failed { error }) => Err(ApiError::bad(error)),
        Some(JobEvent::Cancelled) => Err(ApiError::Conflict(format!("job {id} was cancelled"))),
        _ => Err(ApiError::Internal(format!("job {id} ended without a result"))),
    }
}

/// One image of a finished job: its PNG file's bytes (with kiln's metadata), size and seed.
pub struct ResultImage {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub seed: Option<u64>,
}

impl ResultImage {
    /// The image as png (the file itself, no re-encoding), jpeg or webp.
    pub fn encoded(&self, format: &str) -> ApiResult<Vec<u8>> {
        let fmt = match format {
            "png" => return Ok(self.png.clone()),
            "jpeg" | "jpg" => image::ImageFormat::Jpeg,
            "webp" => image::ImageFormat::WebP,
            other => {
                return Err(ApiError::bad(format!("output_format `{other}`: expected png, jpeg or webp")))
            }
        };
        let img = image::load_from_memory(&self.png).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut buf = Cursor::new(Vec::new());
        img.to_rgb8().write_to(&mut buf, fmt).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(buf.into_inner())
    }
}

/// The images of a finished job (sheets left out), with their seeds.
pub fn result_images(state: &AppState, result: &serde_json::Value) -> ApiResult<Vec<ResultImage>> {
    let root = &state.engine.project.root;
    let mut out = Vec::new();
    for img in result["images"].as_array().into_iter().flatten() {
        if img["role"] == "sheet" {
            continue;
        }
        let rel = img["path"].as_str().unwrap_or_default();
        let mut path = root.join(rel);
        if let Some(id) = img["asset_id"].as_i64().filter(|_| !path.is_file()) {
            // Made on another box: fetched from a shared library.
            let library = state.engine.project.library()?;
            path = library.local_file(&library.asset(id)?)?;
        }
        let png = fs_err::read(&path).map_err(|e| ApiError::Internal(format!("reading {rel}: {e}")))?;
        let (width, height) = image::ImageReader::new(Cursor::new(&png))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
            .unwrap_or((0, 0));
        out.push(ResultImage { png, width, height, seed: img["seed"].as_u64() });
    }
    Ok(out)
}

pub fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// Decodes base64 (with or without a `data:...;base64,` prefix).
pub fn unb64(field: &str, s: &str) -> ApiResult<Vec<u8>> {
    let data = s.split_once("base64,").map(|(_, d)| d).unwrap_or(s);
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data.trim())
        .map_err(|e| ApiError::bad(format!("{field}: not base64 ({e})")))
}

/// Parses `WxH` within the server's generation limit.
pub fn parse_size(state: &AppState, field: &str, s: &str) -> ApiResult<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<usize>().ok()?, h.trim().parse::<usize>().ok()?)))
        .ok_or_else(|| {
            ApiError::bad(format!("{field} `{s}`: expected WIDTHxHEIGHT such as 512x512, or auto"))
        })?;
    let max = state.limits.generate_side;
    if w == 0 || h == 0 || w > max || h > max || w % 8 != 0 || h % 8 != 0 {
        return Err(ApiError::bad(format!("{field} `{s}`: each side must be a multiple of 8 in 8..={max}")));
    }
    Ok((w, h))
}
