//! LoRAs through the `kiln` binary: the library (`kiln loras import|list|show`), `--lora` and
//! `<lora:NAME:WEIGHT>` on `kiln generate`, what the PNG records, bit-exact replay, and clear
//! errors with nothing written for a LoRA that does not fit or a weight out of range.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lora(name: &str) -> String {
    fixtures().join("lora").join(name).display().to_string()
}

fn kiln(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_PROJECT", root)
        .env("KILN_DATA_DIR", root.join("data"))
        .env("XDG_CONFIG_HOME", root.join("no-user-config"))
        .output()
        .unwrap()
}

fn ok(root: &Path, args: &[&str]) -> String {
    let o = kiln(root, args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kiln {args:?} failed: {stderr}");
    String::from_utf8(o.stdout).unwrap()
}

fn fails(root: &Path, args: &[&str]) -> String {
    let o = kiln(root, args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-lora");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn generate<'a>(model: &'a str, prompt: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate", "--model", model, "--prompt", prompt, "--width", "96", "--height", "64", "--steps", "3",
        "--seed", "7", "--device", "cpu", "-q", "--out", out,
    ]
}

fn text_chunk(path: &Path, key: &str) -> String {
    kiln_core::image::png_meta::read_png_text(path)
        .unwrap()
        .into_iter()
        .find(|c| c.keyword == key)
        .map(|c| c.text)
        .unwrap_or_default()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn library_generate_metadata_replay_and_refusals() {
    let root = scratch();
    let model = fixtures().join("pipelines/sd1/model").display().to_string();

    // The library: import, list, show.
    let out = ok(
        &root,
        &["loras", "import", &lora("sd1_kohya.safetensors"), &lora("sdxl_peft.safetensors"), "--json"],
    );
    let imported: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(imported["imported"].as_array().unwrap().len(), 2, "{out}");
    let list = ok(&root, &["loras", "list"]);
    assert!(
        list.contains("sd1_kohya") && list.contains("sdxl_peft") && list.contains("astrostyle"),
        "{list}"
    );
    let show = ok(&root, &["loras", "show", "sd1_kohya"]);
    assert!(
        show.contains("sd_v1") && show.contains("(96, 64)") && show.contains("family:        sd1"),
        "{show}"
    );

    // A bad file in a batch imports nothing.
    let bad = root.join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file at all").unwrap();
    let err = fails(&root, &["loras", "import", &lora("sd1_locon.safetensors"), bad.to_str().unwrap()]);
    assert!(err.contains("bad.safetensors"), "{err}");
    assert!(!ok(&root, &["loras", "list"]).contains("sd1_locon"));

    // --lora by name and the same LoRA as a prompt tag: the same image.
    let a = root.join("a.png");
    let b = root.join("b.png");
    let plain = root.join("plain.png");
    let mut args = generate(&model, "a lighthouse", a.to_str().unwrap());
    args.extend(["--lora", "sd1_kohya:0.8"]);
    ok(&root, &args);
    ok(&root, &generate(&model, "a lighthouse <lora:sd1_kohya:0.8>", b.to_str().unwrap()));
    ok(&root, &generate(&model, "a lighthouse", plain.to_str().unwrap()));
    assert_eq!(pixels(&a), pixels(&b));
    assert_ne!(pixels(&a), pixels(&plain));

    // What the PNG records: A1111's tag and Lora hashes, kiln's sha256 + weight.
    let params = text_chunk(&a, "parameters");
    assert!(params.starts_with("a lighthouse <lora:sd1_kohya:0.8>"), "{params}");
    let sha = kiln_core::loaders::weights::sha256_file(Path::new(&lora("sd1_kohya.safetensors"))).unwrap();
    assert!(params.contains(&format!("Lora hashes: \"sd1_kohya: {}\"", &sha[..12])), "{params}");
    let record: Value = serde_json::from_str(&text_chunk(&a, "kiln")).unwrap();
    assert_eq!(record["prompt"], "a lighthouse");
    assert_eq!(record["loras"][0]["sha256"], sha.as_str());
    assert_eq!(record["loras"][0]["weight"], 0.8);

    // Replay merges the recorded LoRA again: bit-exact.
    let again = root.join("again.png");
    let rp: Value = serde_json::from_str(&ok(
        &root,
        &["replay", a.to_str().unwrap(), "--out", again.to_str().unwrap(), "--device", "cpu", "--json", "-q"],
    ))
    .unwrap();
    assert_eq!(rp["bit_exact"], true, "{rp}");

    // Inpainting takes LoRAs the same way and records them.
    let mask = root.join("mask.png");
    image::GrayImage::from_fn(96, 64, |x, _| image::Luma([if x > 48 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let edited = root.join("edited.png");
    ok(
        &root,
        &[
            "inpaint",
            a.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--model",
            &model,
            "--prompt",
            "a red door <lora:sd1_kohya:0.5>",
            "--steps",
            "3",
            "--seed",
            "2",
            "--device",
            "cpu",
            "-q",
            "--out",
            edited.to_str().unwrap(),
        ],
    );
    let record: Value = serde_json::from_str(&text_chunk(&edited, "kiln")).unwrap();
    assert_eq!(record["prompt"], "a red door");
    assert_eq!(record["loras"][0]["weight"], 0.5, "{record}");

    // A LoRA for another family, and a weight out of range: clear errors, nothing written.
    let no = root.join("no.png");
    let mut args = generate(&model, "a lighthouse", no.to_str().unwrap());
    args.extend(["--lora", "sdxl_peft"]);
    let err = fails(&root, &args);
    assert!(err.contains("sdxl_peft") && err.contains("does not fit"), "{err}");
    let mut args = generate(&model, "a lighthouse", no.to_str().unwrap());
    args.extend(["--lora", "sd1_kohya:12"]);
    let err = fails(&root, &args);
    assert!(err.contains("outside"), "{err}");
    let err = fails(&root, &generate(&model, "a lighthouse <lora:nobody:1>", no.to_str().unwrap()));
    assert!(err.contains("nobody") && err.contains("kiln loras"), "{err}");
    assert!(!no.exists());
}

#[test]
fn tier_loras_are_merged_pinned_by_the_lock_and_drafts_take_more() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-lora-tier");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let model = fixtures().join("pipelines/sd1/model").display().to_string();
    let style = root.join("style.safetensors");
    std::fs::copy(lora("sd1_kohya.safetensors"), &style).unwrap();
    std::fs::write(
        root.join("kiln.toml"),
        format!(
            "[tiers.draft]\nmodel = \"{model}\"\nwidth = 96\nheight = 64\nsteps = 2\nloras = [\"./style.safetensors:0.8\"]\n"
        ),
    )
    .unwrap();
    let draft = |extra: &[&str]| {
        let mut args =
            vec!["draft", "a lighthouse", "-n", "1", "--seed", "3", "--device", "cpu", "--json", "-q"];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: &[String]| -> Value {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&ok(&root, &args)).unwrap()
    };
    let first = run(&draft(&[]));
    let path = |v: &Value| PathBuf::from(v["images"][0]["path"].as_str().unwrap_or_else(|| panic!("{v}")));
    let record: Value = serde_json::from_str(&text_chunk(&path(&first), "kiln")).unwrap();
    assert_eq!(record["loras"][0]["name"], "style", "{record}");
    let lock = std::fs::read_to_string(root.join("kiln.lock")).unwrap();
    let sha = kiln_core::loaders::weights::sha256_file(&style).unwrap();
    assert!(lock.contains("component = \"lora\"") && lock.contains(&sha), "{lock}");

    // A job's LoRA comes after the tier's, changes the image, and leaves the lock alone.
    let more = run(&draft(&["--lora", &format!("{}:-0.5", lora("sd1_locon.safetensors"))]));
    let record: Value = serde_json::from_str(&text_chunk(&path(&more), "kiln")).unwrap();
    assert_eq!(record["loras"].as_array().unwrap().len(), 2, "{record}");
    assert_ne!(pixels(&path(&first)), pixels(&path(&more)));
    assert_eq!(std::fs::read_to_string(root.join("kiln.lock")).unwrap(), lock);

    // The tier's LoRA file changed under it: drift, refused until accepted.
    std::fs::copy(lora("sd1_locon.safetensors"), &style).unwrap();
    let args = draft(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&root, &args);
    assert!(err.contains("drifted") && err.contains("lora/style"), "{err}");
}
