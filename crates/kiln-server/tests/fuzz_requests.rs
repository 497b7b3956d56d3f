//! Mutation fuzzing of the server's request bodies, sent through the real router (auth, body
//! limits, extractors, handlers, the job queue and its worker): multipart forms
//! (`/v1/images/edits`), raw uploads (`/v1/uploads`) and JSON bodies (native jobs, OpenAI
//! generations, AUTOMATIC1111 txt2img/img2img/extras). Every answer must come within a
//! per-request timeout and, when it is an error, be kiln's typed error body; a panic anywhere in
//! a handler fails the test with the shrunk mutation list.
//!
//! The project's tier names a model folder that holds no model, so a request that survives
//! every check is queued and fails at load in the worker, quickly, instead of rendering.
//! CI runs each target for a few seconds; a long run is
//! `KILN_FUZZ_SECONDS=600 cargo test -p kiln-server --test fuzz_requests -- --nocapture --test-threads 1`.
#![allow(clippy::unwrap_used)]

#[path = "../../kiln-core/tests/mutation/mod.rs"]
mod mutation;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine as _;
use kiln_core::jobs::pool::ModelPool;
use kiln_core::jobs::Engine;
use kiln_core::library::Project;
use kiln_core::workflow::JobOptions;
use kiln_server::state::{AppState, Cors, Limits};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

/// Longest a single request may take before it counts as a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A project on a temporary folder with one diffusion tier whose model is missing, the router
/// over it and its queue worker; the worker stops when this is dropped.
struct Server {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
    router: axum::Router,
    runtime: tokio::runtime::Runtime,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        // A folder without a model in it: loading fails at once (a path that does not exist
        // would be taken for a hub id).
        let missing = dir.path().join("empty-model");
        std::fs::create_dir(&missing).unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            format!(
                "[tiers.draft]\nmodel = \"{}\"\nwidth = 64\nheight = 64\nsteps = 2\nguidance = 0.0\n",
                missing.display()
            ),
        )
        .unwrap();
        let project = Project::find(Some(dir.path())).unwrap();
        let options = JobOptions::new(candle_core::Device::Cpu);
        let engine = Arc::new(Engine::new(project, options, Arc::new(ModelPool::new(None))));
        // Small limits, so that the limit checks themselves are reached by mutated sizes.
        let limits = Limits { body_bytes: 1 << 20, image_side: 512, generate_side: 512 };
        let state = Arc::new(AppState::new(engine.clone(), limits, vec![(engine, Default::default())]));
        let router = kiln_server::router(state.clone(), &Cors::default()).unwrap();
        let worker = state.workers[0].clone();
        let worker = std::thread::spawn(move || worker.run().unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Server { _dir: dir, state, router, runtime, worker: Some(worker) }
    }

    /// Sends one request; returns its status. Panics (a test failure) on a hang or on an error
    /// answer that is not kiln's typed error body.
    fn send(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> StatusCode {
        self.send_full(method, path, content_type, body).0
    }

    /// [`Server::send`], also returning the body.
    fn send_full(&self, method: &str, path: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap();
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let response = tokio::time::timeout(REQUEST_TIMEOUT, router.oneshot(request))
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer within {REQUEST_TIMEOUT:?}"))
                .unwrap();
            let status = response.status();
            let bytes =
                tokio::time::timeout(REQUEST_TIMEOUT, axum::body::to_bytes(response.into_body(), 64 << 20))
                    .await
                    .unwrap_or_else(|_| panic!("{path}: body not finished within {REQUEST_TIMEOUT:?}"))
                    .unwrap();
            if status.is_client_error() || status.is_server_error() {
                let json: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| panic!("{path}: {status} without a JSON error body"));
                let message = json["error"]["message"].as_str().unwrap_or_default();
                assert!(!message.is_empty(), "{path}: {status} without an error message: {json}");
            }
            (status, String::from_utf8_lossy(&bytes).into_owned())
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.state.workers.iter().for_each(|w| w.drain());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn png(width: u32, height: u32, rgba: bool) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    if rgba {
        image::RgbaImage::from_fn(width, height, |x, y| {
            image::Rgba([x as u8 * 9, y as u8 * 7, 90, (x % 2) as u8 * 255])
        })
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    } else {
        image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 90]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
    }
    out.into_inner()
}

const BOUNDARY: &str = "kiln-fuzz-boundary-7MA4YWxkTrZu0gW";

/// A multipart form: (name, filename, bytes) per part.
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, bytes) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n")
                    .as_bytes(),
            ),
            None => out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

#[test]
fn multipart_edits() {
    let server = Server::start();
    let image = png(16, 16, false);
    let mask = png(16, 16, true);
    let seeds = vec![
        form(&[
            ("image", Some("in.png"), &image),
            ("mask", Some("mask.png"), &mask),
            ("prompt", None, b"a red door"),
            ("n", None, b"2"),
            ("size", None, b"64x64"),
            ("model", None, b"draft"),
        ]),
        form(&[("image", Some("in.png"), &image), ("prompt", None, b"a fox"), ("seed", None, b"7")]),
        form(&[
            ("prompt", None, b"sea"),
            ("image[]", Some("a.png"), &image),
            ("response_format", None, b"b64_json"),
            ("output_format", None, b"webp"),
        ]),
    ];
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    // The unmutated forms pass every check and fail only at load (the folder holds no model).
    for s in &seeds {
        let (status, body) = server.send_full("POST", "/v1/images/edits", &content_type, s.clone());
        assert!(body.contains("model_index.json not found"), "a valid form was refused: {status} {body}");
    }
    mutation::fuzz("multipart-edits", seeds, |body| {
        server.send("POST", "/v1/images/edits", &content_type, body.to_vec());
    });
}

#[test]
fn raw_uploads() {
    let server = Server::start();
    let seeds = vec![png(24, 16, false), png(8, 8, true)];
    for s in &seeds {
        assert_eq!(server.send("POST", "/v1/uploads", "image/png", s.clone()), StatusCode::CREATED);
    }
    mutation::fuzz("raw-uploads", seeds, |body| {
        server.send("POST", "/v1/uploads", "application/octet-stream", body.to_vec());
    });
}

#[test]
fn json_bodies() {
    let server = Server::start();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png(16, 16, false));
    let routes_and_seeds: Vec<(&str, String)> = vec![
        ("/v1/jobs", r#"{"kind":"generate","tier":"draft","prompt":"a lighthouse","width":64,"height":64,"count":2,"seed":7}"#.into()),
        ("/v1/jobs", r#"{"kind":"promote","draft":{"asset":1},"tier":"draft","strength":0.5}"#.into()),
        ("/v1/jobs", r#"{"kind":"upscale","image":{"upload":"00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff"},"tier":"draft"}"#.into()),
        ("/v1/images/generations", r#"{"prompt":"a fox","model":"draft","n":1,"size":"64x64","response_format":"b64_json"}"#.into()),
        ("/sdapi/v1/txt2img", r#"{"prompt":"a fox","negative_prompt":"blur","steps":2,"width":64,"height":64,"seed":3,"batch_size":1,"cfg_scale":1.5,"sampler_name":"Euler"}"#.into()),
        ("/sdapi/v1/img2img", format!(r#"{{"prompt":"a fox","init_images":["{b64}"],"denoising_strength":0.4,"steps":2,"seed":3}}"#)),
        ("/sdapi/v1/extra-single-image", format!(r#"{{"image":"data:image/png;base64,{b64}","upscaling_resize":2}}"#)),
    ];
    for (route, body) in &routes_and_seeds {
        let (status, answer) = server.send_full("POST", route, "application/json", body.clone().into_bytes());
        // Each seed is a well-formed request: answered by a check further on (a missing
        // asset or model), never refused as unparseable.
        let unparsed = ["not a job spec", "invalid request body", "invalid JSON", "must be a JSON object"]
            .iter()
            .any(|m| answer.contains(m));
        assert!(status.is_success() || !unparsed, "{route}: {status} {answer}");
    }
    // One target over every route: the seed index picks the route.
    let seeds: Vec<Vec<u8>> = routes_and_seeds.iter().map(|(_, b)| b.clone().into_bytes()).collect();
    let routes: Vec<&str> = routes_and_seeds.iter().map(|(r, _)| *r).collect();
    mutation::fuzz_indexed("json-bodies", seeds, |which, body| {
        server.send("POST", routes[which], "application/json", body.to_vec());
    });
}
