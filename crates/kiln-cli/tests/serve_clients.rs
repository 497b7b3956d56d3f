//! Real clients against `kiln serve`: the official `openai` Python client (generate, edit with
//! a mask, stream partial images) and the AUTOMATIC1111 flow SillyTavern and Open WebUI use,
//! with `requests` (options → sd-models → txt2img → progress → interrupt). The clients live in
//! tests/clients/ and run from .venv-clients (made by scripts/client-venv.sh, run here if absent).
#![allow(clippy::unwrap_used)]

mod support;

use support::{file_pixels, generate_pixels, kiln, project, run_client, Server};

#[test]
fn openai_python_client() {
    let dir = project(8, "");
    let root = dir.path();
    let server = Server::start(root, &[]);
    let image = root.join("image.png");
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]))
        .save(&image)
        .unwrap();
    let mask = root.join("mask.png");
    image::RgbaImage::from_fn(64, 64, |x, _| image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }]))
        .save(&mask)
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let r = run_client(
        "openai_client.py",
        &[&server.base, out.path().to_str().unwrap(), image.to_str().unwrap(), mask.to_str().unwrap()],
    );
    assert_eq!(
        r["models"],
        serde_json::json!(["draft", "final", "flux-dev", "flux-schnell", "z-image-turbo"]),
        "{r}"
    );
    assert_eq!(r["generated"], 2, "{r}");
    assert_eq!(r["edited_png"], true, "{r}");
    assert_eq!(r["completed_png"], true, "{r}");
    let events: Vec<&str> =
        r["stream_events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"],
        "{r}"
    );
    assert!(r["bad_model"].as_str().unwrap().contains("BadRequestError"), "{r}");
    assert!(r["bad_model"].as_str().unwrap().contains("not a tier"), "{r}");

    // The client's image is the one `kiln generate` makes with the same tier, prompt and seed.
    let cli = generate_pixels(root, "a red kiln", 7, &["--width", "64", "--height", "64"]);
    assert_eq!(file_pixels(&out.path().join("openai-0.png")), cli);

    // The edit kept the unmasked (opaque) right half: only alpha-0 pixels were repainted.
    let edited = image::open(out.path().join("openai-edit.png")).unwrap().to_rgb8();
    let source = image::open(&image).unwrap().to_rgb8();
    let right_same = (48..64).all(|x| (0..64).all(|y| edited.get_pixel(x, y) == source.get_pixel(x, y)));
    assert!(right_same, "the edit changed pixels outside the mask");
}

#[test]
fn a1111_flow_with_requests() {
    let dir = project(60, "");
    let root = dir.path();
    let key = {
        let o = kiln(root).args(["keys", "add", "tavern"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string()
    };
    let server = Server::start(root, &[]);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("a1111.png");
    let r = run_client("a1111_client.py", &[&server.base, &key, png.to_str().unwrap()]);
    assert_eq!(r["checkpoint"], "draft", "{r}");
    assert_eq!(
        r["models"],
        serde_json::json!(["draft", "final", "flux-dev", "flux-schnell", "z-image-turbo"]),
        "{r}"
    );
    assert!(r["samplers"].as_array().unwrap().iter().any(|s| s == "Euler a"), "{r}");
    assert_eq!(r["info_seed"], 7, "{r}");
    assert_eq!(r["image_png"], true, "{r}");
    assert!(r["progress_seen"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["interrupted_status"], 409, "{r}");
    let jobs = server.get("/v1/jobs", Some(&key)).json();
    assert!(jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["state"] == "cancelled" && j["owner"] == "tavern"));
}
