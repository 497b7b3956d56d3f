//! The studio page served by `kiln serve`, driven in Debian's chromium by Playwright for Python
//! (tests/clients/webui_scenario.py, from .venv-clients): generate, promote, inpaint with a
//! brushed mask, outpaint (to an aspect, and by dragging the frame's edge), upscale, QC view,
//! library, costs, a dropped connection, queue cancel, bad input, and two keys in two browser
//! contexts. The scenario fails on any console error or failed request;
//! this test then checks what the clicks did against the API, and prints the latencies the
//! browser measured next to the API's own.
//!
//! Screenshots of each step go to $KILN_UI_SCREENSHOTS when set (the README's come from there),
//! else to a temporary directory.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::Value;
use support::{kiln, project, run_client, Server};

const CHROMIUM: &str = "/usr/bin/chromium";

fn add_key(root: &std::path::Path, name: &str) -> String {
    let o = kiln(root).args(["keys", "add", name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string()
}

fn asset(server: &Server, key: &str, id: &Value) -> Value {
    let r = server.get(&format!("/v1/assets/{}", id.as_i64().unwrap()), Some(key));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn studio_page_in_chromium() {
    assert!(
        std::path::Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the web UI test drives Debian's chromium (`apt-get install chromium`; .ci/run does)"
    );
    // Drafts take 4 steps, so each shows a preview (every 2 steps, never after the last one);
    // finals take 24 steps: slow enough that the sixth of six waits in the queue to be cancelled.
    let dir = project(
        24,
        "[tiers.upscale]\nmodel = \"./sr.safetensors\"\n\
         [presets.house]\ndescription = \"house look\"\nprompt = \"{prompt}, warm light\"\ntier = \"draft\"\nseed = 777\n",
    );
    let root = dir.path();
    let toml = std::fs::read_to_string(root.join("kiln.toml")).unwrap();
    let draft_2_steps = "height = 64\nsteps = 2\n";
    assert!(toml.contains(draft_2_steps), "{toml}");
    std::fs::write(root.join("kiln.toml"), toml.replace(draft_2_steps, "height = 64\nsteps = 4\n")).unwrap();
    let sr = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sr/srvgg-tiny-x4.safetensors");
    std::fs::copy(sr, root.join("sr.safetensors")).unwrap();
    let alice = add_key(root, "alice");
    let bob = add_key(root, "bob");
    // A LoRA in the library for the form's picker (it fits the tiny SD1 model of the tiers).
    let lora = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora/sd1_kohya.safetensors");
    let imported = kiln(root).args(["loras", "import"]).arg(&lora).output().unwrap();
    assert!(imported.status.success(), "{}", String::from_utf8_lossy(&imported.stderr));
    let server = Server::start(root, &[]);

    // The page and its files load without a key; the API does not.
    let page = server.get("/", None);
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<script type=\"module\" src=\"/ui/app.js\">"), "{}", page.text());
    assert_eq!(server.get("/ui/favicon.svg", None).status, 200);
    assert_eq!(server.get("/ui/nope.js", Some(&alice)).status, 404);
    assert_eq!(server.get("/v1/me", None).status, 401);
    assert_eq!(server.get("/v1/me", Some(&alice)).json()["owner"], "alice");

    let shots = match std::env::var_os("KILN_UI_SCREENSHOTS") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            (None, std::path::PathBuf::from(d))
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let r = run_client("webui_scenario.py", &[&server.base, &alice, &bob, shots.1.to_str().unwrap()]);

    // Every step left its screenshot.
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 9, "{r}");
    for (i, s) in steps.iter().enumerate() {
        let png = shots.1.join(format!("{i:02}-{}.png", s.as_str().unwrap()));
        assert!(image::open(&png).is_ok(), "{} is not a screenshot", png.display());
    }

    // What the clicks made, as the library has it: draft → final → inpainted → outpainted
    // (16:9) → upscaled, each the child of the one before.
    let drafts = r["drafts"].as_array().unwrap();
    assert_eq!(drafts.len(), 4, "{r}");
    for (i, d) in drafts.iter().enumerate() {
        let a = asset(&server, &alice, d);
        assert_eq!(a["kind"], "draft", "{a}");
        assert_eq!(a["seed"], 100 + i as u64, "{a}");
    }
    let chain = [&drafts[1], &r["final"], &r["inpainted"], &r["outpainted"], &r["upscaled"]];
    for pair in chain.windows(2) {
        let child = asset(&server, &alice, pair[1]);
        assert_eq!(&child["parent_id"], pair[0], "{child}");
    }
    // The draft made with the preset picked in the form records it, with its template applied.
    let pd = asset(&server, &alice, &r["preset_draft"]);
    assert_eq!(pd["record"]["preset"]["name"], "house", "{pd}");
    assert!(pd["record"]["prompt"].as_str().unwrap().ends_with(", warm light"), "{pd}");
    assert_eq!(pd["seed"], 777, "{pd}");
    // The draft made with the LoRA picked in the form records it with its weight.
    let ld = asset(&server, &alice, &r["lora_draft"]);
    assert_eq!(ld["record"]["loras"][0]["name"], "sd1_kohya", "{ld}");
    assert_eq!(ld["record"]["loras"][0]["weight"], 0.7, "{ld}");
    let listed = server.get("/v1/loras", Some(&alice)).json();
    assert_eq!(listed["loras"][0]["name"], "sd1_kohya", "{listed}");
    assert!(listed["loras"][0].get("source").is_none(), "no file names over HTTP: {listed}");
    let a1111 = server.get("/sdapi/v1/loras", Some(&alice)).json();
    assert_eq!(a1111[0]["name"], "sd1_kohya", "{a1111}");

    // Touch and pen strokes painted the mask (checked in the scenario); their record.
    let strokes = &r["mask_strokes"];
    assert!(strokes["touch"].as_f64().unwrap() > 0.0 && strokes["pen_firm"].as_f64().unwrap() > 0.0, "{r}");
    eprintln!("mask strokes (share of the mask each painted): {strokes}");
    let final_row = asset(&server, &alice, &r["final"]);
    assert_eq!(final_row["record"]["strength"], 0.6, "the strength slider's value: {final_row}");
    let out = asset(&server, &alice, &r["outpainted"]);
    let (w, h) = (out["width"].as_f64().unwrap(), out["height"].as_f64().unwrap());
    assert!((w / h - 16.0 / 9.0).abs() < 0.1, "outpainted to {w}x{h}, not 16:9");
    // Dragging the frame's right edge extended the final by that many pixels, on the right only.
    let framed = asset(&server, &alice, &r["frame_outpainted"]);
    assert_eq!(framed["parent_id"], r["final"], "{framed}");
    let right = r["frame_right"].as_u64().unwrap();
    assert!(right > 0, "{r}");
    assert_eq!(framed["width"].as_u64().unwrap(), final_row["width"].as_u64().unwrap() + right, "{framed}");
    assert_eq!(framed["height"], final_row["height"], "{framed}");
    let up = asset(&server, &alice, &r["upscaled"]);
    assert_eq!(up["width"].as_f64().unwrap(), 2.0 * w, "{up}");
    assert_eq!(r["qc_size"], serde_json::json!([up["width"], up["height"]]), "{r}");
    assert!(r["ssim"].as_f64().unwrap() > 0.0, "{r}");

    // Bad input got the server's words, and the cancelled job is cancelled.
    assert!(r["empty_mask_message"].as_str().unwrap().contains("the mask is empty"), "{r}");
    assert!(r["too_big_message"].as_str().unwrap().contains("exceeds the server's 2048 px limit"), "{r}");
    let cancelled = server.get(&format!("/v1/jobs/{}", r["cancelled_job"]), Some(&alice)).json();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["owner"], "alice", "{cancelled}");
    let bobs = server.get(&format!("/v1/jobs/{}", r["bob_job"]), Some(&bob)).json();
    assert_eq!(bobs["owner"], "bob", "{bobs}");

    let l = &r["latency_ms"];
    let get = |k: &str, stat: &str| l[k][stat].as_f64().unwrap_or_else(|| panic!("no {k}.{stat} in {l}"));
    let line = |k: &str| format!("{:7.1} ms (median {:7.1})", get(k, "min"), get(k, "median"));
    eprintln!(
        "web UI latency on the tiny model, warm, 7 runs each, minimum (median):\n  \
         click Generate -> first preview on screen: {}   API alone, POST -> preview event: {}\n  \
         click Generate -> first draft on screen:   {}   API alone, POST -> done event:    {}\n  \
         added by the page: click -> request sent {}; with event received -> painted:\n    \
         preview {}, draft {} (not counting the draft image's fetch, {}, which any client pays)",
        line("ui_click_to_preview_shown"),
        line("api_post_to_preview_event"),
        line("ui_click_to_draft_shown"),
        line("api_post_to_done_event"),
        line("ui_click_to_request"),
        line("ui_added_to_preview"),
        line("ui_added_to_draft"),
        line("ui_draft_image_fetch"),
    );
    // What the page adds to the API's own events: click to request, and an event's arrival to
    // its pixels on screen. Minimums, so a busy machine's scheduling noise does not decide.
    assert!(get("ui_added_to_preview", "min") < 50.0, "the page is slow to show a preview: {l}");
    assert!(get("ui_added_to_draft", "min") < 50.0, "the page is slow to show a finished draft: {l}");
}
