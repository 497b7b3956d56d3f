//! `kiln serve` end to end on the tiny SD1 fixture: the same engine behind every door, events
//! in order, cancellation, a final preempted by a draft resuming to the same bytes, lanes and
//! round-robin, API keys and quotas, malformed requests, the budget race, kill -9 recovery and
//! SIGTERM draining.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{json, Value};
use support::{b64_pixels, generate_pixels, kiln, project, Server};

fn asset_pixels(server: &Server, id: i64, auth: Option<&str>) -> Vec<u8> {
    let r = server.get(&format!("/v1/assets/{id}/image"), auth);
    assert_eq!(r.status, 200, "{}", r.text());
    image::load_from_memory(&r.bytes).unwrap().to_rgb8().into_raw()
}

fn submit(server: &Server, auth: Option<&str>, spec: Value) -> i64 {
    let r = server.post_json("/v1/jobs", auth, &spec);
    assert_eq!(r.status, 202, "{spec}: {}", r.text());
    r.json()["id"].as_i64().unwrap()
}

fn first_asset(job: &Value) -> i64 {
    job["result"]["images"][0]["asset_id"].as_i64().unwrap_or_else(|| panic!("no asset in {job}"))
}

#[test]
fn every_door_gives_the_bytes_kiln_generate_gives() {
    let dir = project(4, "");
    let root = dir.path();
    let cli = generate_pixels(root, "a red kiln", 7, &[]);

    let server = Server::start(root, &[]);
    assert_eq!(server.get("/healthz", None).text(), "ok");
    // The OpenAPI document describes the job spec from its type.
    let doc = server.get("/v1/openapi.json", None).json();
    assert!(doc["components"]["schemas"]["JobSpec"].is_object(), "{doc}");
    assert!(doc["paths"]["/v1/jobs"]["post"]["requestBody"].is_object(), "{doc}");
    let openai = server.post_json(
        "/v1/images/generations",
        None,
        &json!({ "model": "draft", "prompt": "a red kiln", "seed": 7, "response_format": "b64_json" }),
    );
    assert_eq!(openai.status, 200, "{}", openai.text());
    assert_eq!(
        b64_pixels(openai.json()["data"][0]["b64_json"].as_str().unwrap()),
        cli,
        "OpenAI door differs"
    );

    let a1111 = server.post_json("/sdapi/v1/txt2img", None, &json!({ "prompt": "a red kiln", "seed": 7 }));
    assert_eq!(a1111.status, 200, "{}", a1111.text());
    let body = a1111.json();
    assert_eq!(b64_pixels(body["images"][0].as_str().unwrap()), cli, "A1111 door differs");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 7);
    assert_eq!(info["all_seeds"], json!([7]));

    let id = submit(
        &server,
        None,
        json!({ "kind": "generate", "tier": "draft", "prompt": "a red kiln", "seed": 7 }),
    );
    let job = server.wait(id, None);
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(asset_pixels(&server, first_asset(&job), None), cli, "native door differs");
    // The server's images are assets of the project, drafts by their tier's lane.
    let assets = server.get("/v1/assets?kind=draft", None).json();
    assert!(assets["assets"].as_array().unwrap().len() >= 3, "{assets}");
    let lineage = server.get(&format!("/v1/assets/{}/lineage", first_asset(&job)), None);
    assert_eq!(lineage.status, 200);
}

#[test]
fn events_cancellation_preemption_and_lanes() {
    let dir = project(40, "");
    let root = dir.path();
    let server = Server::start(root, &[]);
    let final_spec = json!({ "kind": "generate", "tier": "final", "prompt": "a long final", "seed": 11 });

    // Uninterrupted reference.
    let reference = submit(&server, None, final_spec.clone());
    let events = server.events(reference, None);
    let names: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let steps: Vec<u64> =
        events.iter().filter(|e| e["event"] == "step").map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>(), "steps out of order: {names:?}");
    assert_eq!(names[..2], ["queued", "started"], "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    for stage in ["load", "text_encode", "denoise", "vae_decode", "write", "record"] {
        assert!(events.iter().any(|e| e["event"] == "stage" && e["stage"] == stage), "no {stage}: {names:?}");
    }
    assert!(names.contains(&"preview"), "no preview: {names:?}");
    let reference_job = server.wait(reference, None);
    let reference_pixels = asset_pixels(&server, first_asset(&reference_job), None);

    // The same final, interrupted by a draft at a step boundary.
    let preempted = submit(&server, None, final_spec.clone());
    server.wait_running_step(preempted, None);
    let draft = submit(&server, None, json!({ "kind": "draft", "prompt": "quick", "count": 1, "seed": 3 }));
    let draft_job = server.wait(draft, None);
    assert_eq!(draft_job["state"], "done", "{draft_job}");
    assert_eq!(draft_job["lane"], "draft");
    let final_job = server.wait(preempted, None);
    assert_eq!(final_job["state"], "done", "{final_job}");
    let events = server.events(preempted, None);
    assert!(events.iter().any(|e| e["event"] == "yielded" && e["to"] == draft), "no yield: {events:?}");
    assert!(events.iter().any(|e| e["event"] == "resumed"));
    assert!(
        draft_job["finished_at"].as_f64().unwrap() < final_job["finished_at"].as_f64().unwrap(),
        "the draft did not overtake the final"
    );
    assert_eq!(
        asset_pixels(&server, first_asset(&final_job), None),
        reference_pixels,
        "a preempted final must resume to the bytes of an uninterrupted one"
    );

    // Cancel mid-job: nothing recorded but the cancellation.
    let assets_before = server.get("/v1/assets", None).json()["assets"].as_array().unwrap().len();
    let doomed = submit(&server, None, final_spec.clone());
    server.wait_running_step(doomed, None);
    let r = server.call("DELETE", &format!("/v1/jobs/{doomed}"), None, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let job = server.wait(doomed, None);
    assert_eq!(job["state"], "cancelled", "{job}");
    let events = server.events(doomed, None);
    assert_eq!(events.last().unwrap()["event"], "cancelled");
    assert_eq!(server.get("/v1/assets", None).json()["assets"].as_array().unwrap().len(), assets_before);
    assert_eq!(server.call("DELETE", &format!("/v1/jobs/{doomed}"), None, None).status, 409);
    // A queued job is cancelled at once.
    let blocker = submit(&server, None, final_spec.clone());
    let queued = submit(&server, None, final_spec);
    let r = server.call("DELETE", &format!("/v1/jobs/{queued}"), None, None);
    assert_eq!(r.json()["state"], "cancelled");
    server.wait(blocker, None);
    // The listing shows finished jobs with their lane, owner and spec.
    let list = server.get("/v1/jobs", None).json();
    let jobs = list["jobs"].as_array().unwrap();
    assert!(jobs
        .iter()
        .any(|j| j["id"] == queued && j["state"] == "cancelled" && j["spec"]["kind"] == "generate"));
    assert!(jobs.iter().all(|j| j["owner"] == "local" && j["lane"].is_string()));
}

#[test]
fn round_robin_between_keys_and_auth() {
    let dir = project(40, "");
    let root = dir.path();
    let key = |name: &str, quota: Option<&str>| -> String {
        let mut c = kiln(root);
        c.args(["keys", "add", name]);
        if let Some(q) = quota {
            c.args(["--quota", q]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string()
    };
    let alice = key("alice", None);
    let bob = key("bob", None);
    let carol = key("carol", Some("0.02"));
    let mallory = key("mallory", None);
    let o = kiln(root).args(["keys", "revoke", "mallory"]).output().unwrap();
    assert!(o.status.success());
    let list = kiln(root).args(["keys", "list", "--json"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&alice), "keys list shows a key");

    let server = Server::start(root, &[]);
    assert_eq!(server.get("/healthz", None).status, 200, "healthz needs no key");
    for (auth, what) in
        [(None, "no key"), (Some("kiln_wrong"), "wrong key"), (Some(mallory.as_str()), "revoked key")]
    {
        let r = server.get("/v1/jobs", auth);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("key"), "{what}");
    }
    // A1111 clients send HTTP Basic.
    use base64::Engine;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("user:{bob}")));
    assert_eq!(server.get("/sdapi/v1/sd-models", Some(&basic)).status, 200);

    // Quota: carol may spend 0.02 credits a day; drafts cost 0.01 each.
    let draft = |seed: u64| json!({ "kind": "draft", "prompt": "q", "count": 1, "seed": seed });
    let carols: Vec<i64> = (1..=2)
        .map(|seed| {
            let r = server.post_json("/v1/jobs", Some(&carol), &draft(seed));
            assert_eq!(r.status, 202, "{}", r.text());
            r.json()["id"].as_i64().unwrap()
        })
        .collect();
    let r = server.post_json("/v1/jobs", Some(&carol), &draft(3));
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.retry_after.is_some());
    assert!(r.text().contains("quota"), "{}", r.text());

    // Round-robin: while a long final holds the worker (drafts cannot preempt it: the memory
    // budget has no room for a second model), alice queues three drafts, then bob two; the final
    // is cancelled and they run alice, bob, alice, bob, alice. Nothing here depends on timing.
    for id in carols {
        server.wait(id, Some(&carol));
    }
    drop(server);
    let server = Server::start(root, &["--max-memory", "1K"]);
    let blocker = submit(
        &server,
        Some(&alice),
        json!({ "kind": "generate", "tier": "final", "prompt": "x", "seed": 1, "steps": 1000 }),
    );
    server.wait_running_step(blocker, Some(&alice));
    let mut ids = Vec::new();
    for (k, seed) in [(&alice, 10), (&alice, 11), (&alice, 12), (&bob, 20), (&bob, 21)] {
        ids.push((submit(&server, Some(k), draft(seed)), k == &alice));
    }
    // Only a job's owner may cancel it.
    let r = server.call("DELETE", &format!("/v1/jobs/{blocker}"), Some(&bob), None);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("only its owner"), "{}", r.text());
    assert_eq!(server.call("DELETE", &format!("/v1/jobs/{blocker}"), Some(&alice), None).status, 200);
    let mut runs: Vec<(f64, bool)> = ids
        .iter()
        .map(|(id, is_alice)| (server.wait(*id, Some(&alice))["started_at"].as_f64().unwrap(), *is_alice))
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let order: Vec<&str> = runs.iter().map(|(_, a)| if *a { "alice" } else { "bob" }).collect();
    assert_eq!(order, ["alice", "bob", "alice", "bob", "alice"]);
    assert_eq!(server.wait(blocker, Some(&alice))["state"], "cancelled");
}

#[test]
fn malformed_requests_get_a_4xx_that_says_what_to_fix() {
    let dir = project(2, "");
    let root = dir.path();
    let server = Server::start(root, &[]);
    let png_64 = {
        let mut v = Vec::new();
        image::RgbImage::new(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    };
    let png_32_alpha = {
        let mut v = Vec::new();
        image::RgbaImage::new(32, 32)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    };
    let multipart = |parts: &[(&str, &[u8])]| -> (String, Vec<u8>) {
        let boundary = "kilnboundary";
        let mut body = Vec::new();
        for (name, data) in parts {
            body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n\r\n").as_bytes());
            body.extend_from_slice(data);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    };
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    let json_cases: Vec<(&str, String, &str)> = vec![
        ("/v1/jobs", "{not json".into(), "not a job spec"),
        ("/v1/jobs", json!({ "kind": "paint", "prompt": "x" }).to_string(), "unknown variant"),
        ("/v1/jobs", json!({ "kind": "draft" }).to_string(), "prompt"),
        ("/v1/jobs", json!({ "kind": "draft", "prompt": 5 }).to_string(), "invalid type"),
        ("/v1/jobs", json!({ "kind": "draft", "prompt": "x", "count": -1 }).to_string(), "invalid value"),
        ("/v1/jobs", json!({ "kind": "draft", "prompt": "x", "count": 0 }).to_string(), "count"),
        ("/v1/jobs", json!({ "kind": "draft", "prompt": "x", "count": 100000 }).to_string(), "count"),
        ("/v1/jobs", json!({ "kind": "draft", "prompt": "x", "cuont": 2 }).to_string(), "unknown field"),
        (
            "/v1/jobs",
            json!({ "kind": "generate", "tier": "draft", "prompt": "x", "width": 100000, "height": 100000 })
                .to_string(),
            "width",
        ),
        (
            "/v1/jobs",
            json!({ "kind": "generate", "tier": "nope", "prompt": "x" }).to_string(),
            "unknown tier",
        ),
        ("/v1/jobs", json!({ "kind": "generate", "prompt": "x" }).to_string(), "tier"),
        ("/v1/jobs", json!({ "kind": "generate", "model": "/etc", "prompt": "x" }).to_string(), "path"),
        (
            "/v1/jobs",
            json!({ "kind": "generate", "tier": "draft", "prompt": "x", "out": "/tmp/x.png" }).to_string(),
            "path",
        ),
        (
            "/v1/jobs",
            json!({ "kind": "upscale", "image": { "file": "../../etc/passwd" } }).to_string(),
            "path",
        ),
        (
            "/v1/jobs",
            json!({ "kind": "generate", "tier": "draft", "prompt": "x", "strength": 3.0 }).to_string(),
            "strength",
        ),
        (
            "/v1/jobs",
            json!({ "kind": "generate", "tier": "draft", "prompt": "x", "init_image": { "upload": "zz" } })
                .to_string(),
            "",
        ),
        ("/v1/images/generations", "[]".into(), "invalid request body"),
        ("/v1/images/generations", json!({ "model": "draft" }).to_string(), "prompt"),
        ("/v1/images/generations", json!({ "prompt": "x", "model": "sdxl-ultra" }).to_string(), "not a tier"),
        ("/v1/images/generations", json!({ "prompt": "x", "size": "100000x100000" }).to_string(), "size"),
        ("/v1/images/generations", json!({ "prompt": "x", "size": "big" }).to_string(), "WIDTHxHEIGHT"),
        ("/v1/images/generations", json!({ "prompt": "x", "n": 50 }).to_string(), "n = 50"),
        (
            "/v1/images/generations",
            json!({ "prompt": "x", "response_format": "url" }).to_string(),
            "b64_json",
        ),
        ("/v1/images/generations", json!({ "prompt": "x", "style": "vivid" }).to_string(), "style"),
        (
            "/v1/images/generations",
            json!({ "prompt": "x", "output_format": "gif" }).to_string(),
            "output_format",
        ),
        (
            "/v1/images/generations",
            json!({ "prompt": "x", "background": "transparent" }).to_string(),
            "opaque",
        ),
        ("/v1/images/generations", json!({ "prompt": "x", "frobnicate": true }).to_string(), "unknown field"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "steps": "many" }).to_string(), "steps"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "width": 100000 }).to_string(), "width"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "sampler_name": "Heun++" }).to_string(), "sampler_name"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "x", "enable_hr": true }).to_string(), "enable_hr"),
        ("/sdapi/v1/txt2img", "\"just a string\"".into(), "JSON object"),
        ("/sdapi/v1/img2img", json!({ "prompt": "x" }).to_string(), "init_images"),
        ("/sdapi/v1/img2img", json!({ "prompt": "x", "init_images": ["%%%"] }).to_string(), "base64"),
        (
            "/sdapi/v1/img2img",
            json!({ "prompt": "x", "init_images": [b64(b"not an image")] }).to_string(),
            "image",
        ),
        (
            "/sdapi/v1/img2img",
            json!({ "prompt": "x", "init_images": [b64(&png_64)], "mask": b64(&png_32_alpha) }).to_string(),
            "mask is 32x32",
        ),
        ("/sdapi/v1/options", json!({ "sd_model_checkpoint": "nope" }).to_string(), "unknown tier"),
        ("/sdapi/v1/options", json!({ "sd_model_checkpoint": "upscale" }).to_string(), "upscale tier"),
        ("/sdapi/v1/options", json!({ "CLIP_stop_at_last_layers": 2 }).to_string(), "not one kiln has"),
    ];
    let mut checked = 0;
    for (path, body, expected) in &json_cases {
        let r = server.call("POST", path, None, Some(("application/json", body.clone().into_bytes())));
        assert!((400..500).contains(&r.status), "{path} {body}: {} {}", r.status, r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(expected), "{path} {body}: `{msg}` lacks `{expected}`");
        checked += 1;
    }
    type Case<'a> = (&'a str, &'a str, Option<(String, Vec<u8>)>, u16);
    let other: Vec<Case> = vec![
        ("GET", "/v1/jobs/999", None, 404),
        ("GET", "/v1/jobs/abc", None, 404),
        ("DELETE", "/v1/jobs/999", None, 404),
        ("GET", "/v1/assets/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("GET", "/v1/assets/../../etc/passwd/image", None, 404),
        ("GET", "/v1/assets/424242/image", None, 404),
        ("GET", "/no/such/route", None, 404),
        ("POST", "/v1/images/edits", Some(multipart(&[("prompt", b"x")])), 400),
        (
            "POST",
            "/v1/images/edits",
            Some(("multipart/form-data; boundary=zz".into(), b"garbage".to_vec())),
            400,
        ),
        (
            "POST",
            "/v1/images/edits",
            Some(multipart(&[("image", &png_64), ("mask", &png_32_alpha), ("prompt", b"x")])),
            400,
        ),
        (
            "POST",
            "/v1/images/edits",
            Some(multipart(&[("image", &png_64), ("mask", &png_64), ("prompt", b"x")])),
            400,
        ),
        ("POST", "/v1/images/edits", Some(multipart(&[("image", b"nope"), ("prompt", b"x")])), 400),
        (
            "POST",
            "/v1/images/edits",
            Some(multipart(&[("image", &png_64), ("prompt", b"x"), ("evil", b"1")])),
            400,
        ),
    ];
    for (method, path, body, status) in other {
        let r = server.call(method, path, None, body.as_ref().map(|(ct, b)| (ct.as_str(), b.clone())));
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        checked += 1;
    }
    // A 100 MB body is refused from its declared length, before it is read.
    let status = server.post_declared("/v1/jobs", 100 * 1024 * 1024);
    assert!(status.contains(" 413 "), "{status}");
    checked += 1;
    assert!(checked >= 30, "{checked} cases");
    // Still serving, and nothing was queued by any of them.
    assert_eq!(server.get("/healthz", None).status, 200);
    assert!(server.get("/v1/jobs", None).json()["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn budget_race_runs_exactly_what_fits() {
    // Drafts cost 0.01 a image; the budget fits five.
    let dir = project(2, "[budget]\nlimit = 0.05\n");
    let root = dir.path();
    let server = std::sync::Arc::new(Server::start(root, &[]));
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let s = server.clone();
            std::thread::spawn(move || {
                s.post_json(
                    "/v1/jobs",
                    None,
                    &json!({ "kind": "draft", "prompt": "race", "count": 1, "seed": i }),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let accepted: Vec<i64> =
        results.iter().filter(|r| r.status == 202).map(|r| r.json()["id"].as_i64().unwrap()).collect();
    assert_eq!(accepted.len(), 5, "{:?}", results.iter().map(|r| (r.status, r.text())).collect::<Vec<_>>());
    assert!(results
        .iter()
        .filter(|r| r.status != 202)
        .all(|r| r.status == 429 && r.text().contains("budget")));
    for id in accepted {
        assert_eq!(server.wait(id, None)["state"], "done");
    }
}

#[test]
fn kill_9_loses_nothing_and_sigterm_drains() {
    let dir = project(60, "");
    let root = dir.path();
    let mut server = Server::start(root, &[]);
    let running =
        submit(&server, None, json!({ "kind": "generate", "tier": "final", "prompt": "x", "seed": 5 }));
    let queued: Vec<i64> = (0..3)
        .map(|i| {
            submit(&server, None, json!({ "kind": "generate", "tier": "final", "prompt": "y", "seed": i }))
        })
        .collect();
    server.wait_running_step(running, None);
    server.kill9();

    let mut server = Server::start(root, &[]);
    assert!(server.log().contains("recovered jobs"), "{}", server.log());
    for id in std::iter::once(running).chain(queued.iter().copied()) {
        let job = server.wait(id, None);
        assert_eq!(job["state"], "done", "{job}");
    }
    // Each job recorded exactly once; the library is consistent, with no stray files.
    let assets = server.get("/v1/assets", None).json()["assets"].as_array().unwrap().len();
    assert_eq!(assets, 4);
    let check = kiln(root).args(["assets", "check"]).output().unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let library = kiln_core::library::Project::open(root).unwrap().library().unwrap();
    assert!(library.orphans().unwrap().is_empty(), "{:?}", library.orphans().unwrap());

    // SIGTERM while a job runs: it finishes, then the server exits 0.
    let last =
        submit(&server, None, json!({ "kind": "generate", "tier": "final", "prompt": "z", "seed": 9 }));
    server.wait_running_step(last, None);
    let status = server.terminate();
    assert!(status.success(), "{status:?}: {}", server.log());
    let server = Server::start(root, &[]);
    assert_eq!(server.wait(last, None)["state"], "done");
}

#[test]
fn exposed_address_needs_keys() {
    let dir = project(2, "");
    let o = kiln(dir.path()).args(["serve", "--listen", "0.0.0.0:0", "--device", "cpu"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("kiln keys add"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_draft_that_cannot_fit_beside_the_final_waits_and_says_why() {
    let dir = project(30, "");
    let server = Server::start(dir.path(), &["--max-memory", "1K"]);
    let fin = submit(&server, None, json!({ "kind": "generate", "tier": "final", "prompt": "x", "seed": 1 }));
    server.wait_running_step(fin, None);
    let draft = submit(&server, None, json!({ "kind": "draft", "prompt": "quick", "count": 1, "seed": 3 }));
    let draft_job = server.wait(draft, None);
    let final_job = server.wait(fin, None);
    assert_eq!(draft_job["state"], "done");
    assert!(
        draft_job["started_at"].as_f64().unwrap() >= final_job["finished_at"].as_f64().unwrap(),
        "it ran beside the final"
    );
    let events = server.events(draft, None);
    let why =
        events.iter().find(|e| e["event"] == "waiting").unwrap_or_else(|| panic!("no reason: {events:?}"));
    assert!(why["reason"].as_str().unwrap().contains("--max-memory"), "{why}");
    // The pool stayed within one model: the final's was unloaded for the draft's.
    let report = server.get("/v1/report", None).json();
    assert_eq!(report["models_loaded"].as_array().unwrap().len(), 1, "{report}");
}

#[test]
fn upscales_through_a1111_and_the_native_api() {
    let dir = project(2, "[tiers.upscale]\nmodel = \"./sr.safetensors\"\n");
    let root = dir.path();
    let sr = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sr/srvgg-tiny-x4.safetensors");
    std::fs::copy(sr, root.join("sr.safetensors")).unwrap();
    let server = Server::start(root, &[]);
    let upscalers = server.get("/sdapi/v1/upscalers", None).json();
    assert_eq!(upscalers[0]["name"], "upscale", "{upscalers}");
    let mut png = Vec::new();
    image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([(x * 15) as u8, (y * 20) as u8, 90]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let r = server.post_json(
        "/sdapi/v1/extra-single-image",
        None,
        &json!({ "image": b64, "upscaler_1": "upscale", "upscaling_resize": 4 }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = image::load_from_memory(
        &base64::engine::general_purpose::STANDARD.decode(r.json()["image"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!((out.width(), out.height()), (64, 48));
    // A draft, then its upscale as a native job: the upscaled asset is the draft's child.
    let d = submit(&server, None, json!({ "kind": "draft", "prompt": "x", "count": 1, "seed": 2 }));
    let draft_asset = first_asset(&server.wait(d, None));
    let u = submit(&server, None, json!({ "kind": "upscale", "image": { "asset": draft_asset }, "to": "2" }));
    let job = server.wait(u, None);
    assert_eq!(job["state"], "done", "{job}");
    let up = first_asset(&job);
    let row = server.get(&format!("/v1/assets/{up}"), None).json();
    assert_eq!(row["parent_id"], draft_asset, "{row}");
    assert_eq!((row["width"].as_u64(), row["height"].as_u64()), (Some(128), Some(128)));
}

#[test]
fn cors_is_off_unless_an_origin_is_configured() {
    let dir = project(2, "");
    let server = Server::start(dir.path(), &[]);
    let r = server.raw_get("/v1/tiers", "Origin: https://studio.example\r\n");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("access-control-allow-origin"), "{r}");
    drop(server);
    let server = Server::start(dir.path(), &["--cors-origin", "https://studio.example"]);
    let r = server.raw_get("/v1/tiers", "Origin: https://studio.example\r\n").to_ascii_lowercase();
    assert!(r.contains("access-control-allow-origin: https://studio.example"), "{r}");
    let r = server.raw_get("/v1/tiers", "Origin: https://elsewhere.example\r\n").to_ascii_lowercase();
    assert!(!r.contains("access-control-allow-origin"), "{r}");
}

#[test]
fn uploads_whoami_and_the_job_behind_an_asset() {
    let dir = project(2, "");
    let root = dir.path();
    let o = kiln(root).args(["keys", "add", "dana", "--quota", "5"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string();
    let server = Server::start(root, &[]);
    let me = server.get("/v1/me", Some(&key)).json();
    assert_eq!(me, json!({ "owner": "dana", "quota_credits_per_day": 5.0 }));
    assert_eq!(server.get("/v1/me", None).status, 401);

    // A draft, then a mask uploaded as a PNG body and named by its sha256 in an inpaint job.
    let d = submit(&server, Some(&key), json!({ "kind": "draft", "prompt": "x", "count": 1, "seed": 4 }));
    let draft = first_asset(&server.wait(d, Some(&key)));
    let mut png = Vec::new();
    image::RgbaImage::from_fn(64, 64, |x, _| {
        let v = if x < 24 { 255 } else { 0 };
        image::Rgba([v, v, v, 255])
    })
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    .unwrap();
    let up = server.call("POST", "/v1/uploads", Some(&key), Some(("image/png", png)));
    assert_eq!(up.status, 201, "{}", up.text());
    let up = up.json();
    assert_eq!((up["width"].as_u64(), up["height"].as_u64()), (Some(64), Some(64)), "{up}");
    let sha = up["upload"].as_str().unwrap();
    assert!(root.join(".kiln/uploads").read_dir().unwrap().count() >= 1);
    let spec = json!({ "kind": "inpaint", "tier": "draft", "image": { "asset": draft }, "mask": { "upload": sha },
                       "prompt": "a door", "seed": 1 });
    let job = server.wait(submit(&server, Some(&key), spec), Some(&key));
    assert_eq!(job["state"], "done", "{job}");
    let edited = first_asset(&job);
    let row = server.get(&format!("/v1/assets/{edited}"), Some(&key)).json();
    assert_eq!(row["parent_id"], draft, "{row}");
    // The asset carries the library job that made it: its device seconds and credits.
    assert_eq!(row["job"]["id"], row["job_id"], "{row}");
    assert!(row["job"]["device_seconds"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["job"]["credits"].as_f64().unwrap() > 0.0, "{row}");

    let bad = server.call("POST", "/v1/uploads", Some(&key), Some(("image/png", b"not an image".to_vec())));
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.json()["error"]["message"].as_str().unwrap().contains("upload"), "{}", bad.text());
}

#[test]
fn cutouts_are_jobs_recorded_in_the_library() {
    let dir = project(2, "");
    let root = dir.path();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/cutout");
    let onnx = root.join("u2netp.onnx");
    std::fs::copy(fixtures.join("tiny_u2netp.onnx"), &onnx).unwrap();
    let o = kiln(root).args(["models", "import"]).arg(&onnx).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(root, &[]);

    // An uploaded photo: an RGBA cutout whose alpha is rembg's mask (the fixture's reference).
    let photo = std::fs::read(fixtures.join("photo.png")).unwrap();
    let up = server.call("POST", "/v1/uploads", None, Some(("image/png", photo)));
    assert_eq!(up.status, 201, "{}", up.text());
    let upload = up.json()["upload"].as_str().unwrap().to_string();
    let id = submit(&server, None, json!({ "kind": "cutout", "image": { "upload": upload } }));
    assert_eq!(server.get(&format!("/v1/jobs/{id}"), None).json()["lane"], "draft");
    let job = server.wait(id, None);
    assert_eq!(job["state"], "done", "{job}");
    let cut = first_asset(&job);
    let row = server.get(&format!("/v1/assets/{cut}"), None).json();
    assert_eq!(row["kind"], "cutout", "{row}");
    assert!(row["parent_id"].is_null(), "an upload has no parent asset: {row}");
    let r = server.get(&format!("/v1/assets/{cut}/image"), None);
    let rgba = image::load_from_memory(&r.bytes).unwrap();
    assert_eq!(rgba.color(), image::ColorType::Rgba8);
    let want = image::open(fixtures.join("photo_mask.png")).unwrap().to_luma8();
    let worst = rgba.to_rgba8().pixels().zip(want.pixels()).map(|(p, m)| p.0[3].abs_diff(m.0[0])).max();
    assert!(worst.is_some_and(|d| d <= 2), "alpha differs from rembg's mask by {worst:?}");
    let listed = server.get("/v1/assets?kind=cutout", None).json();
    assert!(listed.to_string().contains(&format!("\"id\":{cut}")), "{listed}");

    // A draft's cutout onto a colour: RGB, the draft's child, with its prompt and the model's hash.
    let d = submit(&server, None, json!({ "kind": "draft", "prompt": "a vase", "count": 1, "seed": 4 }));
    let draft = first_asset(&server.wait(d, None));
    let id = submit(
        &server,
        None,
        json!({ "kind": "cutout", "image": { "asset": draft }, "background": "#00ff00" }),
    );
    let job = server.wait(id, None);
    assert_eq!(job["state"], "done", "{job}");
    let child = server.get(&format!("/v1/assets/{}", first_asset(&job)), None).json();
    assert_eq!(child["parent_id"], draft, "{child}");
    assert_eq!(child["prompt"], "a vase", "{child}");
    assert!(child.to_string().contains("matting"), "the matting model's hash is recorded: {child}");
    let r = server.get(&format!("/v1/assets/{}/image", first_asset(&job)), None);
    assert_eq!(image::load_from_memory(&r.bytes).unwrap().color(), image::ColorType::Rgb8);

    // Refused before queueing: a model path, a bad colour, a colour and an image at once.
    for (spec, needle) in [
        (json!({ "kind": "cutout", "image": { "asset": draft }, "model": "../u2netp.onnx" }), "path"),
        (json!({ "kind": "cutout", "image": { "asset": draft }, "background": "teal-ish" }), "not a colour"),
        (
            json!({ "kind": "cutout", "image": { "asset": draft }, "background": "white", "background_image": { "asset": draft } }),
            "not both",
        ),
        (json!({ "kind": "cutout", "image": { "asset": 999 } }), "999"),
    ] {
        let r = server.post_json("/v1/jobs", None, &spec);
        assert_eq!(r.status, 400, "{spec}: {}", r.text());
        assert!(r.text().contains(needle), "{spec}: {}", r.text());
    }
    // An unknown model fails the job with a message that names it.
    let id =
        submit(&server, None, json!({ "kind": "cutout", "image": { "asset": draft }, "model": "isnet" }));
    let job = server.wait(id, None);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("isnet"), "{job}");
}

#[test]
fn one_worker_per_device_runs_jobs_side_by_side() {
    let dir = project(120, "");
    let server = Server::start(dir.path(), &["--devices", "cpu,cpu"]);
    let ids: Vec<i64> = (0..2)
        .map(|i| {
            submit(&server, None, json!({ "kind": "generate", "tier": "final", "prompt": "x", "seed": i }))
        })
        .collect();
    // Both finals run at once, one on each device's worker.
    let t0 = std::time::Instant::now();
    loop {
        let workers = server.get("/v1/workers", None).json()["workers"].as_array().unwrap().clone();
        let busy: Vec<i64> = workers.iter().filter_map(|w| w["current_job"].as_i64()).collect();
        if busy.len() == 2 {
            assert_eq!(workers.len(), 2, "{workers:?}");
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "never two at once: {workers:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for id in ids {
        assert_eq!(server.wait(id, None)["state"], "done");
    }
}
