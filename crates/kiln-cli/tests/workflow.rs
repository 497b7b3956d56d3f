//! The tiered workflow end to end on the tiny SD1 fixture: draft batches and contact sheets,
//! promotion in both modes, the asset library and replay, the ledger and budget, the drift
//! guard, bad input, and a kill -9 in the middle of a draft batch.
#![allow(clippy::unwrap_used)]

use kiln_core::image::compare::{psnr, ssim};
use kiln_core::library::Project;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/model")
}

/// A project whose draft and final tiers both point at a copy of the tiny model (the final at
/// a larger size, with a VAE override, a different scheduler and a per-second price).
fn project(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture_model(), &dir.path().join("model"));
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "{extra}
[tiers.draft]
model = \"./model\"
width = 64
height = 64
steps = 2
[tiers.final]
model = \"./model\"
vae = \"./model\"
width = 128
height = 96
steps = 4
"
        ),
    )
    .unwrap();
    dir
}

fn kiln(project: &Path, args: &[&str]) -> Output {
    command(project, args).output().unwrap()
}

fn command(project: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args);
    if matches!(args.first(), Some(&("draft" | "promote" | "replay" | "generate"))) {
        c.args(["--device", "cpu"]);
    }
    c.env("KILN_PROJECT", project)
        .env("KILN_DATA_DIR", std::env::temp_dir().join("kiln-cli-test-data"))
        .env("XDG_CONFIG_HOME", project.join("no-user-config"));
    c
}

fn ok_json(project: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = kiln(project, &a);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn pixels(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

fn record(p: &Path) -> Value {
    let chunks = kiln_core::image::png_meta::read_png_text(p).unwrap();
    serde_json::from_str(&chunks.iter().find(|c| c.keyword == "kiln").unwrap().text).unwrap()
}

#[test]
fn draft_batch_promote_and_replay() {
    let dir = project("");
    let root = dir.path();
    let d = ok_json(root, &["draft", "a lighthouse at dusk", "-n", "4", "--seed", "10", "-q"]);
    let images = d["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    let seeds: Vec<u64> = images.iter().map(|i| i["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [10, 11, 12, 13]);
    let paths: Vec<PathBuf> = images.iter().map(|i| PathBuf::from(i["path"].as_str().unwrap())).collect();
    let px: Vec<image::RgbImage> = paths.iter().map(|p| pixels(p)).collect();
    for i in 1..4 {
        assert_ne!(px[0], px[i], "variants must differ");
    }
    assert_eq!(px[0].dimensions(), (64, 64));
    let rec = record(&paths[2]);
    assert_eq!(
        (rec["tier"].as_str(), rec["seed"].as_u64(), rec["steps"].as_u64()),
        (Some("draft"), Some(12), Some(2))
    );
    assert_eq!(rec["scheduler"], "euler-a"); // from the built-in draft tier
    assert_eq!(rec["guidance"], 0.0);

    // The contact sheet: a 2×2 grid of 64 px thumbnails with labels underneath.
    let sheet = pixels(Path::new(d["sheet"].as_str().unwrap()));
    assert_eq!(sheet.width(), 4 + 2 * (64 + 4));
    assert!(sheet.height() > 4 + 2 * (64 + 4));
    let thumb = image::imageops::crop_imm(&sheet, 4, 4, 64, 64).to_image();
    assert_eq!(thumb, px[0]);
    // Each cell's label strip (index and seed) is inked and differs from every other cell's.
    let cell_h = (sheet.height() - 4) / 2 - 4;
    let strips: Vec<image::RgbImage> = (0..4u32)
        .map(|i| {
            let (x, y) = (4 + (i % 2) * 68, 4 + (i / 2) * (cell_h + 4));
            image::imageops::crop_imm(&sheet, x, y + 64, 64, cell_h - 64).to_image()
        })
        .collect();
    for (i, s) in strips.iter().enumerate() {
        let first = s.get_pixel(0, 0);
        assert!(s.pixels().any(|p| p != first), "label {i} has no text");
        for t in &strips[i + 1..] {
            assert_ne!(s, t, "labels must name different indices and seeds");
        }
    }

    // A batched draft equals the single image of the same seed (model kept warm, per-image RNG).
    let single = root.join("single.png");
    let o = kiln(
        root,
        &[
            "generate",
            "--tier",
            "draft",
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "13",
            "-q",
            "--out",
            single.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pixels(&single), px[3]);

    // Promote draft #2 (asset id) with img2img: the final tier's size, the draft as parent.
    let draft_id = images[2]["asset_id"].as_i64().unwrap();
    let p = ok_json(root, &["promote", &draft_id.to_string(), "--strength", "0.5", "-q"]);
    let final_path = PathBuf::from(p["path"].as_str().unwrap());
    let fin = pixels(&final_path);
    assert_eq!(fin.dimensions(), (128, 96));
    assert_eq!(p["parent_asset_id"].as_i64(), Some(draft_id));
    assert_eq!(p["seed"], 12);
    let frec = record(&final_path);
    assert_eq!((frec["mode"].as_str(), frec["strength"].as_f64()), (Some("img2img"), Some(0.5)));
    assert_eq!(frec["init_image"]["sha256"], kiln_core::loaders::weights::sha256_file(&paths[2]).unwrap());
    assert!(frec["vae"]["id"].as_str().unwrap().ends_with("model"));
    // The reported closeness is the final downscaled to the draft's size, against the draft.
    let small = kiln_core::image::resize_rgb(&fin, 64, 64);
    assert!((p["ssim"].as_f64().unwrap() - ssim(&small, &px[2]).unwrap()).abs() < 1e-12);
    assert!((p["psnr"].as_f64().unwrap() - psnr(&small, &px[2]).unwrap()).abs() < 1e-12);
    // It is the img2img of that draft: the same as `generate --init-image` with the final tier.
    let direct = root.join("direct.png");
    let o = kiln(
        root,
        &[
            "generate",
            "--tier",
            "final",
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "12",
            "--init-image",
            paths[2].to_str().unwrap(),
            "--strength",
            "0.5",
            "-q",
            "--out",
            direct.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pixels(&direct), fin);

    // Reseed from the PNG path: txt2img with the final tier and the draft's seed and prompt.
    let r = ok_json(root, &["promote", paths[1].to_str().unwrap(), "--mode", "reseed", "-q"]);
    let reseeded = pixels(Path::new(r["path"].as_str().unwrap()));
    let txt = root.join("txt.png");
    let o = kiln(
        root,
        &[
            "generate",
            "--tier",
            "final",
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "11",
            "-q",
            "--out",
            txt.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    assert_eq!(pixels(&txt), reseeded);
    assert_eq!(r["parent_asset_id"].as_i64(), images[1]["asset_id"].as_i64());

    // Lineage: draft → final.
    let show = ok_json(root, &["assets", "show", &p["asset_id"].to_string()]);
    let lineage: Vec<&str> =
        show["lineage"].as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert_eq!(lineage, ["final", "draft"]);

    // Replay the img2img final by asset id and a draft by PNG: bit-exact from stored parameters.
    for source in [p["asset_id"].to_string(), paths[3].display().to_string()] {
        let out = root.join(format!("replay-{}.png", source.len()));
        let rp = ok_json(root, &["replay", &source, "--out", out.to_str().unwrap(), "--strict", "-q"]);
        assert_eq!(rp["bit_exact"], true, "{rp}");
        let original = PathBuf::from(rp["original"].as_str().unwrap());
        assert_eq!(pixels(&out), pixels(&original));
    }

    // The library is consistent and the ledger adds up.
    let check = ok_json(root, &["assets", "check"]);
    assert_eq!(check["consistent"], true, "{check}");
    let lib = Project::open(root).unwrap().library().unwrap();
    let jobs = lib.jobs().unwrap();
    // draft, generate --tier draft, promote, generate --tier final, promote, generate --tier final,
    // replay ×2.
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["draft", "generate", "promote", "generate", "promote", "generate", "replay", "replay"]
    );
    for j in &jobs {
        let t = &j.timings;
        let stages =
            t.load + t.text_encode + t.vae_encode + t.steps.iter().sum::<f64>() + t.vae_decode + t.upscale;
        assert!((j.device_seconds - stages).abs() < 1e-9);
    }
    // Draft: 0.01 per image (built-in price); final: 0.05 per device-second.
    assert!((jobs[0].credits - 0.04).abs() < 1e-12);
    assert!((jobs[1].credits - 0.01).abs() < 1e-12);
    assert!((jobs[2].credits - 0.05 * jobs[2].device_seconds).abs() < 1e-12);
    assert!((jobs[3].credits - 0.05 * jobs[3].device_seconds).abs() < 1e-12);
    let report = ok_json(root, &["report"]);
    let total: f64 = jobs.iter().map(|j| j.credits).sum();
    let secs: f64 = jobs.iter().map(|j| j.device_seconds).sum();
    assert!((report["total_credits"].as_f64().unwrap() - total).abs() < 1e-9);
    assert!((report["total_device_seconds"].as_f64().unwrap() - secs).abs() < 1e-9);
    let day_sum: f64 =
        report["days"].as_array().unwrap().iter().map(|d| d["credits"].as_f64().unwrap()).sum();
    assert!((day_sum - total).abs() < 1e-9);
    // `generate --tier` images count as their tier's assets: 4 + 1 drafts, 2 promoted + 2 finals.
    assert_eq!((report["drafts"].as_u64(), report["finals"].as_u64()), (Some(5), Some(4)));
    assert_eq!(report["drafts_per_final"], 1.25);
    assert!((report["cost_per_delivered"].as_f64().unwrap() - total / 4.0).abs() < 1e-9);
    let o = kiln(root, &["report"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("draft:final 5:4 = "), "{table}");
}

#[test]
fn budget_warns_then_refuses() {
    // Each draft image costs 0.01: the first batch of 3 passes the warning line, the second is refused.
    let dir = project("[budget]\nlimit = 0.05\nwarn_at = 0.02\n");
    let root = dir.path();
    let o = kiln(root, &["draft", "x", "-n", "3", "--seed", "1", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("warning: budget"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let before = count_files(&root.join("assets"));
    let o = kiln(root, &["draft", "x", "-n", "3", "--seed", "1", "-q"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("budget exhausted"), "{stderr}");
    assert_eq!(count_files(&root.join("assets")), before, "a refused job writes nothing");
    let report = ok_json(root, &["report"]);
    assert!((report["budget_left"].as_f64().unwrap() - 0.02).abs() < 1e-9);
}

#[test]
fn promote_with_upscale_is_refused_up_front_past_the_budget() {
    // 3 drafts spend 0.03 of 0.035: the final alone fits (no history: estimated 0 + actual
    // seconds), the final plus the upscale (0.02 per image) does not, so nothing runs.
    let dir = project("[budget]\nlimit = 0.035\n");
    let root = dir.path();
    let d = ok_json(root, &["draft", "x", "-n", "3", "--seed", "1", "-q"]);
    let id = d["images"][0]["asset_id"].to_string();
    assert_fails(root, &["promote", &id, "--upscale", "4"], "budget exhausted");
    assert_eq!(count_files(&root.join("assets/finals")), 0);
    assert!(kiln(root, &["promote", &id, "-q"]).status.success());
    assert_eq!(count_files(&root.join("assets/finals")), 1);
}

#[test]
fn explicitly_unpinned_weights_are_trusted_on_first_use_with_a_warning() {
    let dir = project("");
    let root = dir.path();
    let toml = std::fs::read_to_string(root.join("kiln.toml")).unwrap();
    let toml = toml.replacen(
        "steps = 2\n",
        "steps = 2\nweights = { \"unet/diffusion_pytorch_model.safetensors\" = \"unpinned\" }\n",
        1,
    );
    std::fs::write(root.join("kiln.toml"), toml).unwrap();
    let first = kiln(root, &["draft", "x", "-n", "1", "--seed", "1"]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "tier `draft` is not fully pinned (unet/diffusion_pytorch_model.safetensors = \"unpinned\")"
        ),
        "{stderr}"
    );
    let unet = root.join("model/unet/diffusion_pytorch_model.safetensors");
    let sha = kiln_core::loaders::weights::sha256_file(&unet).unwrap();
    assert!(std::fs::read_to_string(root.join("kiln.lock")).unwrap().contains(&sha));
    // Locked from then on: no warning, and a changed file is drift.
    let second = kiln(root, &["draft", "x", "-n", "1", "--seed", "1"]);
    assert!(!String::from_utf8_lossy(&second.stderr).contains("not fully pinned"));
    let mut bytes = std::fs::read(&unet).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&unet, bytes).unwrap();
    assert_fails(root, &["draft", "x", "-n", "1"], "unet/diffusion_pytorch_model.safetensors changed");
}

#[test]
fn drift_guard_refuses_changed_weights_until_accepted() {
    let dir = project("");
    let root = dir.path();
    assert!(kiln(root, &["draft", "x", "-n", "1", "--seed", "1", "-q"]).status.success());
    assert!(root.join("kiln.lock").is_file());
    let vae = root.join("model/vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&vae, bytes).unwrap();
    let o = kiln(root, &["draft", "x", "-n", "1", "--seed", "1", "-q"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "drift must be refused");
    assert!(
        stderr.contains("vae/diffusion_pytorch_model.safetensors changed")
            && stderr.contains("--accept-drift"),
        "{stderr}"
    );
    let o = kiln(root, &["draft", "x", "-n", "1", "--seed", "1", "-q", "--accept-drift"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("accepted drift"));
    assert!(kiln(root, &["draft", "x", "-n", "1", "--seed", "1", "-q"]).status.success());
}

fn assert_fails(root: &Path, args: &[&str], needle: &str) {
    let o = kiln(root, args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = project("[tiers.broken]\nmodel = \"./missing-model\"\n");
    let root = dir.path();
    assert_fails(root, &["report"], "asset library not found");
    assert!(!root.join(".kiln").exists(), "a read-only command creates nothing");
    assert_fails(root, &["draft", "x", "--tier", "sketch"], "unknown tier `sketch`");
    assert_fails(root, &["generate", "--tier", "sketch", "--prompt", "x"], "unknown tier `sketch`");
    assert_fails(root, &["draft", "x", "--tier", "broken"], "tier `broken` model");
    assert_fails(root, &["draft", "x", "--tier", "upscale"], "upscale tier");
    assert_fails(root, &["draft", "x", "-n", "0"], "invalid count");
    let plain = root.join("plain.png");
    image::RgbImage::new(16, 16).save(&plain).unwrap();
    assert_fails(root, &["promote", plain.to_str().unwrap()], "has no kiln metadata");
    assert_fails(root, &["replay", plain.to_str().unwrap()], "has no kiln metadata");
    assert_fails(root, &["promote", "/no/such.png"], "not found");
    assert_fails(root, &["promote", "999"], "no asset with id 999");
    assert_fails(root, &["promote", "999", "--mode", "sideways"], "invalid mode");
    assert_fails(root, &["promote", "999", "--upscale", "banana"], "invalid upscale");
    assert_fails(
        root,
        &["promote", "999", "--upscale", "4k", "--upscale-tier", "final"],
        "not an upscale tier",
    );
    // A contact sheet has no generation record.
    let d = ok_json(root, &["draft", "x", "-n", "2", "--seed", "3", "-q"]);
    assert_fails(root, &["promote", &d["sheet_asset_id"].to_string()], "no generation record");
    assert_fails(
        root,
        &["promote", &d["images"][0]["asset_id"].to_string(), "--strength", "1.5"],
        "invalid strength",
    );
    // The built-in upscale tier names a store model this data dir has not imported: refused
    // before the final is rendered.
    let finals = count_files(&root.join("assets/finals"));
    let draft0 = d["images"][0]["asset_id"].to_string();
    assert_fails(root, &["promote", &draft0, "--upscale", "4k"], "tier `upscale` model `realesrgan-x4plus`");
    assert_eq!(count_files(&root.join("assets/finals")), finals, "nothing rendered");
    // A corrupt library database.
    std::fs::write(
        root.join(".kiln/library.db"),
        b"this is not a database, it is a text file of some length....",
    )
    .unwrap();
    for args in [&["assets", "list"][..], &["report"][..], &["draft", "x", "-n", "1"][..]] {
        assert_fails(root, args, "library.db");
    }
    // A corrupt kiln.toml names itself.
    std::fs::write(root.join("kiln.toml"), "[budget\n").unwrap();
    assert_fails(root, &["report"], "kiln.toml");
}

#[test]
fn kill_9_during_a_draft_batch_leaves_the_library_consistent() {
    let dir = project("");
    let root = dir.path();
    // One complete job first, so the library has content to protect.
    assert!(kiln(root, &["draft", "before", "-n", "2", "--seed", "1", "-q"]).status.success());
    let drafts = root.join("assets/drafts");
    let mut interrupted = 0;
    for round in 0..4u64 {
        let before = count_files(&drafts);
        let mut child =
            command(root, &["draft", "killed", "-n", "48", "--seed", &(100 * round).to_string(), "-q"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
        // Rounds 0-1: kill as soon as the batch starts writing; 2-3: after a while (generating,
        // writing or recording, whichever it reached).
        let t0 = std::time::Instant::now();
        loop {
            let writing = count_files(&drafts) > before;
            let waited = t0.elapsed().as_millis() as u64;
            if (round < 2 && writing) || (round >= 2 && waited > 150 * round) || waited > 60_000 {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let lib = Project::open(root).unwrap().library().unwrap();
        assert_eq!(lib.check().unwrap(), Vec::<String>::new(), "round {round}");
        // Either the whole job was recorded or none of it.
        let killed: Vec<_> = lib
            .list_assets(&Default::default())
            .unwrap()
            .into_iter()
            .filter(|a| a.prompt.as_deref() == Some("killed") && a.seed.is_some_and(|s| s / 100 == round))
            .collect();
        assert!(killed.is_empty() || killed.len() == 48, "round {round}: {} assets recorded", killed.len());
        let orphans = lib.orphans().unwrap().len();
        eprintln!("round {round}: {} recorded, {orphans} orphan files", killed.len());
        interrupted += usize::from(killed.is_empty());
    }
    // The kill must have landed mid-job at least once, or the test proves nothing.
    assert!(interrupted > 0, "every killed batch had already finished");
    // The library still works afterwards.
    let check = ok_json(root, &["assets", "check"]);
    assert_eq!(check["consistent"], true);
    assert!(kiln(root, &["draft", "after", "-n", "1", "--seed", "1", "-q"]).status.success());
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn bench_synthetic_and_real_on_cpu() {
    let dir = project("");
    let root = dir.path();
    let empty = tempfile::tempdir().unwrap();
    let chart = root.join("chart.png");
    // Synthetic: the shipped tiers' architectures (SD-Turbo, SDXL), widths / 16, 64 px, 2 steps.
    let b = ok_json(
        empty.path(),
        &[
            "bench",
            "--synthetic",
            "--shrink",
            "16",
            "--size",
            "64",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--project",
            empty.path().to_str().unwrap(),
            "--chart",
            chart.to_str().unwrap(),
        ],
    );
    let results = b["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(
            (r["width"].as_u64(), r["steps"].as_u64(), r["synthetic"].as_bool()),
            (Some(64), Some(2), Some(true))
        );
        let sum = r["text_encode"].as_f64().unwrap()
            + r["steps_total"].as_f64().unwrap()
            + r["vae_decode"].as_f64().unwrap();
        assert!((r["per_image"].as_f64().unwrap() - sum).abs() < 1e-9);
    }
    // Built-in tiers: SD-Turbo runs without CFG (guidance 0), SDXL with it; SDXL is the larger model.
    assert_eq!((results[0]["cfg"].as_bool(), results[1]["cfg"].as_bool()), (Some(false), Some(true)));
    assert!(results[1]["parameters"].as_u64() > results[0]["parameters"].as_u64());
    assert!(image::open(&chart).unwrap().width() > 300);
    // The upscale tier: random x4plus-shaped RRDBNet (widths / 16) on the final's 64 px output.
    let ups = b["upscale"].as_array().unwrap();
    assert_eq!(ups.len(), 1);
    let u = &ups[0];
    assert_eq!((u["synthetic"].as_bool(), u["scale"].as_u64()), (Some(true), Some(4)));
    assert_eq!((u["input_width"].as_u64(), u["output_width"].as_u64()), (Some(64), Some(256)));
    assert!(u["architecture"].as_str().unwrap().starts_with("RRDBNet x4"));
    // RRDBNet x4plus with 4 features and growth 2: 23 blocks of 15 convolutions.
    let x4plus_shrunk = {
        let conv = |i: u64, o: u64| i * o * 9 + o;
        let (f, g) = (4, 2);
        let rdb = conv(f, g) + conv(f + g, g) + conv(f + 2 * g, g) + conv(f + 3 * g, g) + conv(f + 4 * g, f);
        conv(3, f) + 23 * 3 * rdb + conv(f, f) * 4 + conv(f, 3)
    };
    assert_eq!(u["parameters"].as_u64(), Some(x4plus_shrunk));
    let mp = 256.0 * 256.0 / 1e6;
    assert!(
        (u["megapixels_per_second"].as_f64().unwrap() * u["upscale"].as_f64().unwrap() - mp).abs() < 1e-9
    );
    assert!(u["peak_host_memory_bytes"].as_u64().unwrap() > 0);
    // Real weights: the project's tiers (the tiny model) through the pipeline, steady state:
    // one untimed image, then the fastest of two per stage.
    let project_arg = root.to_str().unwrap();
    let args = ["bench", "--device", "cpu", "--project", project_arg, "--warmup", "1", "--repeats", "2"];
    let r = ok_json(root, &args);
    let results = r["results"].as_array().unwrap();
    assert_eq!((results[0]["steps"].as_u64(), results[1]["steps"].as_u64()), (Some(2), Some(4)));
    assert_eq!((results[1]["width"].as_u64(), results[1]["height"].as_u64()), (Some(128), Some(96)));
    for r in results {
        assert_eq!((r["warmup"].as_u64(), r["repeats"].as_u64()), (Some(1), Some(2)));
        // The fastest whole image is no faster than the sum of the fastest stages.
        let stages = r["text_encode"].as_f64().unwrap()
            + r["steps_total"].as_f64().unwrap()
            + r["vae_decode"].as_f64().unwrap();
        assert!(r["per_image"].as_f64().unwrap() >= stages - 1e-12);
    }
    assert_fails(
        root,
        &["bench", "--device", "cpu", "--project", project_arg, "--repeats", "0"],
        "invalid repeats",
    );
}

/// The synthetic SD-Turbo build has exactly the published parameter count: UNet 865,910,724 +
/// OpenCLIP-H text encoder 340,387,840 + VAE 83,653,863. Needs ~3 GB of memory:
/// `cargo test -p kiln-cli --test workflow -- --ignored full_size`.
#[test]
#[ignore]
fn full_size_synthetic_draft_has_the_published_parameter_count() {
    let dir = tempfile::tempdir().unwrap();
    let b = ok_json(
        dir.path(),
        &[
            "bench",
            "--synthetic",
            "--tiers",
            "draft",
            "--size",
            "8",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--dtype",
            "f16",
            "--project",
            dir.path().to_str().unwrap(),
        ],
    );
    assert_eq!(b["results"][0]["parameters"], 1_289_952_427u64);
}

fn sr_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sr/srvgg-tiny-x4.safetensors")
}

#[test]
fn promote_with_upscale_records_the_upscaled_child() {
    // The upscale tier points at a copy of the tiny SRVGG x4 model (price from the built-in tier).
    let dir = project("[tiers.upscale]\nmodel = \"./sr.safetensors\"\n");
    let root = dir.path();
    std::fs::copy(sr_fixture(), root.join("sr.safetensors")).unwrap();
    let d = ok_json(root, &["draft", "a lighthouse at dusk", "-n", "1", "--seed", "5", "-q"]);
    let draft_id = d["images"][0]["asset_id"].as_i64().unwrap();
    let p = ok_json(root, &["promote", &draft_id.to_string(), "--upscale", "4", "-q"]);
    let final_id = p["asset_id"].as_i64().unwrap();
    let up = &p["upscaled"];
    assert_eq!(up["parent_asset_id"].as_i64(), Some(final_id));
    assert_eq!(up["input_size"], serde_json::json!([128, 96]));
    assert_eq!(up["output_size"], serde_json::json!([512, 384]));
    let up_path = PathBuf::from(up["path"].as_str().unwrap());
    let upscaled = pixels(&up_path);
    assert_eq!(upscaled.dimensions(), (512, 384));
    // The same pixels as `kiln upscale` on the final with the same model.
    // `kiln upscale` of the final with the tier's model, outside the library.
    let upscale_final = |scale: &str, out: &Path| {
        let sr = root.join("sr.safetensors");
        let final_path = p["path"].as_str().unwrap();
        let args = ["upscale", final_path, "--model", sr.to_str().unwrap(), "--scale", scale, "-q", "--out"];
        let mut args = args.to_vec();
        args.push(out.to_str().unwrap());
        let o = kiln(root, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let direct = root.join("direct-up.png");
    upscale_final("4", &direct);
    assert_eq!(pixels(&direct), upscaled);

    // Library: its own asset, lineage upscaled → final → draft, parameters and model hash.
    let show = ok_json(root, &["assets", "show", &up["asset_id"].to_string()]);
    let lineage: Vec<&str> =
        show["lineage"].as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert_eq!(lineage, ["upscaled", "final", "draft"]);
    let lib = Project::open(root).unwrap().library().unwrap();
    let asset = lib.asset(up["asset_id"].as_i64().unwrap()).unwrap();
    assert_eq!((asset.kind.as_str(), asset.tier.as_deref()), ("upscaled", Some("upscale")));
    assert_eq!((asset.width, asset.height), (512, 384));
    let sr_sha = kiln_core::loaders::weights::sha256_file(&sr_fixture()).unwrap();
    assert_eq!(asset.model_hashes.len(), 1);
    assert_eq!(
        (asset.model_hashes[0].component.as_str(), asset.model_hashes[0].file.as_str()),
        ("file", "sr.safetensors")
    );
    assert_eq!(asset.model_hashes[0].sha256, sr_sha);
    let params = asset.params.as_ref().unwrap();
    assert_eq!(
        (params["step"].as_str(), params["arch"].as_str()),
        (Some("upscale"), Some("SRVGGNetCompact"))
    );
    assert_eq!(params["output_size"], serde_json::json!([512, 384]));
    assert_eq!(params["target"], serde_json::json!({ "Scale": 4.0 }));
    // Ledger: an `upscale` job whose stages sum to its device seconds, priced per image.
    let jobs = lib.jobs().unwrap();
    let job = jobs.iter().find(|j| j.kind == "upscale").unwrap();
    assert_eq!((job.tier.as_deref(), job.images), (Some("upscale"), 1));
    let t = &job.timings;
    assert!(t.upscale > 0.0 && t.steps.is_empty());
    assert!((job.device_seconds - (t.load + t.upscale)).abs() < 1e-9);
    assert!((job.credits - 0.02).abs() < 1e-12, "{}", job.credits);
    assert!((up["credits"].as_f64().unwrap() - 0.02).abs() < 1e-12);
    let report = ok_json(root, &["report"]);
    let total: f64 = jobs.iter().map(|j| j.credits).sum();
    assert!((report["total_credits"].as_f64().unwrap() - total).abs() < 1e-9);
    assert_eq!(report["finals"], 1);
    // The lock pins the upscale model too.
    let lock = std::fs::read_to_string(root.join("kiln.lock")).unwrap();
    assert!(lock.contains("[tiers.upscale]") && lock.contains(&sr_sha), "{lock}");

    // Replay of the upscaled asset (by id, and by its PNG): generation + recorded upscale, bit-exact.
    for source in [up["asset_id"].to_string(), up_path.display().to_string()] {
        let out = root.join(format!("replay-up-{}.png", source.len()));
        let rp = ok_json(root, &["replay", &source, "--out", out.to_str().unwrap(), "--strict", "-q"]);
        assert_eq!(rp["bit_exact"], true, "{rp}");
        assert_eq!(pixels(&out), upscaled);
        assert!(rp["timings"]["upscale"].as_f64().unwrap() > 0.0);
    }
    // Each replay is billed per part: the final tier's seconds for the generation, the upscale
    // tier's per-image price for the upscale step.
    let lib = Project::open(root).unwrap().library().unwrap();
    for j in lib.jobs().unwrap().iter().filter(|j| j.kind == "replay") {
        let generation = j.device_seconds - j.timings.upscale;
        assert!((j.credits - (0.05 * generation + 0.02)).abs() < 1e-9, "{j:?}");
    }
    // An upscaled PNG the library does not know (made by `kiln upscale`) is refused, not misread.
    // (`direct` is byte-identical to the recorded asset, so the library finds it: use x2.)
    let unknown = root.join("unknown-up.png");
    upscale_final("2", &unknown);
    assert_fails(root, &["replay", unknown.to_str().unwrap()], "upscaled image the library does not know");

    // A fit target (WxH): inside 300×300 keeping the aspect ratio.
    let p2 = ok_json(root, &["promote", &draft_id.to_string(), "--upscale", "300x300", "-q"]);
    assert_eq!(p2["upscaled"]["output_size"], serde_json::json!([300, 225]));
    assert_eq!(pixels(Path::new(p2["upscaled"]["path"].as_str().unwrap())).dimensions(), (300, 225));

    // Drift of the SR weights is refused before the final is rendered.
    let mut bytes = std::fs::read(root.join("sr.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(root.join("sr.safetensors"), bytes).unwrap();
    let finals = count_files(&root.join("assets/finals"));
    assert_fails(root, &["promote", &draft_id.to_string(), "--upscale", "4"], "sr.safetensors changed");
    assert_eq!(count_files(&root.join("assets/finals")), finals);
    let check = ok_json(root, &["assets", "check"]);
    assert_eq!(check["consistent"], true, "{check}");
}

#[test]
fn kill_9_during_an_upscale_leaves_the_library_consistent() {
    // The tiny RRDBNet at 8K (three x4 passes, the last streamed to disk) runs long enough to
    // be killed mid-write.
    let dir = project("[tiers.upscale]\nmodel = \"./sr.pth\"\n");
    let root = dir.path();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sr/rrdb-tiny-x4.pth"),
        root.join("sr.pth"),
    )
    .unwrap();
    let d = ok_json(root, &["draft", "x", "-n", "1", "--seed", "1", "-q"]);
    let id = d["images"][0]["asset_id"].to_string();
    let mut child = command(root, &["promote", &id, "--upscale", "8k", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the streamed writer's temp file appears (the last pass is writing rows).
    let t0 = std::time::Instant::now();
    let mut finished = false;
    while count_files(&root.join("assets/upscaled")) == 0 && t0.elapsed().as_secs() < 120 {
        if child.try_wait().unwrap().is_some() {
            finished = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    finished |= child.try_wait().unwrap().is_some();
    child.kill().unwrap();
    child.wait().unwrap();
    let lib = Project::open(root).unwrap().library().unwrap();
    assert_eq!(lib.check().unwrap(), Vec::<String>::new());
    let upscaled = lib
        .list_assets(&kiln_core::library::assets::AssetFilter {
            kind: Some("upscaled".into()),
            ..Default::default()
        })
        .unwrap();
    // No finished-looking PNG without its record: only a temp file may be left (an orphan).
    let pngs: Vec<PathBuf> = std::fs::read_dir(root.join("assets/upscaled"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let complete: Vec<&PathBuf> = pngs.iter().filter(|p| !p.to_string_lossy().ends_with(".tmp")).collect();
    assert_eq!(complete.len(), upscaled.len(), "{pngs:?}");
    assert!(!pngs.is_empty(), "killed before the upscale wrote anything");
    eprintln!("finished before the kill: {finished}; upscaled recorded: {}; files {pngs:?}", upscaled.len());
    assert!(!finished, "the upscale finished before the kill: the test proves nothing");
    assert!(upscaled.is_empty());
    let check = ok_json(root, &["assets", "check"]);
    assert_eq!(check["consistent"], true);
}

/// Inpaint and outpaint outputs (made with a tier, so recorded in the library) replay through
/// the inpainting pipeline bit for bit, by PNG and by asset id.
#[test]
fn inpaint_and_outpaint_outputs_replay_bit_exactly() {
    let dir = project("");
    let root = dir.path();
    let img = root.join("photo.png");
    image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 120]))
        .save(&img)
        .unwrap();
    let mask = root.join("mask.png");
    image::GrayImage::from_fn(96, 64, |x, y| {
        image::Luma([if (30..60).contains(&x) && (20..44).contains(&y) { 255 } else { 0 }])
    })
    .save(&mask)
    .unwrap();
    let (img, mask) = (img.display().to_string(), mask.display().to_string());
    let inpainted = root.join("inpainted.png");
    let outpainted = root.join("outpainted.png");
    for (args, out) in [
        (vec!["inpaint", &img, "--mask", &mask, "--prompt", "a fox"], &inpainted),
        (vec!["outpaint", &img, "--right", "32", "--prompt", "a field"], &outpainted),
    ] {
        let mut a = args.clone();
        a.extend(["--tier", "draft", "--seed", "5", "--device", "cpu", "--out", out.to_str().unwrap(), "-q"]);
        let o = kiln(root, &a);
        assert!(o.status.success(), "{a:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let lib = Project::open(root).unwrap().library().unwrap();
    let inpaint_asset = lib.asset_for_file(&inpainted).unwrap().map(|a| a.id.to_string());
    assert!(inpaint_asset.is_some(), "a tier's inpaint job is recorded in the library");
    let mut sources = vec![outpainted.display().to_string(), inpainted.display().to_string()];
    sources.extend(inpaint_asset);
    for (i, source) in sources.iter().enumerate() {
        let out = root.join(format!("replay-ip-{i}.png"));
        let rp = ok_json(root, &["replay", source, "--out", out.to_str().unwrap(), "--strict", "-q"]);
        assert_eq!(rp["bit_exact"], true, "{source}: {rp}");
        assert_eq!(pixels(&out), pixels(Path::new(rp["original"].as_str().unwrap())));
    }
    // Inpainting changed the masked region, so a plain img2img/txt2img replay could not match.
    assert_ne!(pixels(&inpainted), pixels(Path::new(&img)));
}
