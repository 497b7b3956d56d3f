//! Tier registry layering, tier model loading (with a VAE override), weight pins and the drift
//! guard, on the tiny SD1 pipeline fixture.
#![allow(clippy::unwrap_used)]

use kiln_core::candle::{DType, Device};
use kiln_core::pipeline::generate::{generate, NoProgress};
use kiln_core::pipeline::metadata::ImageRecord;
use kiln_core::tiers::drift::{self, DriftOutcome};
use kiln_core::tiers::load::{load_tier_model, tier_request, Overrides};
use kiln_core::tiers::{TierKind, TierRegistry};
use std::path::{Path, PathBuf};

fn fixture_model() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/pipelines/sd1/model"))
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
fn layers_override_single_keys_and_resolve_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user-tiers.toml");
    std::fs::write(
        &user,
        r#"
[tiers.draft]
steps = 2
price = { credits_per_gpu_second = 0.5 }
[tiers.sketch]
model = "someone/sketch-model"
revision = "0123abc"
steps = 4
"#,
    )
    .unwrap();
    let project = dir.path().join("proj");
    copy_dir(&fixture_model(), &project.join("model"));
    std::fs::write(
        project.join("kiln.toml"),
        r#"
[budget]
limit = 3.0
[tiers.draft]
model = "./model"
width = 64
[tiers.final]
model = "model"
vae = "model"
weights = { "unet/diffusion_pytorch_model.safetensors" = "0000000000000000000000000000000000000000000000000000000000000000" }
"#,
    )
    .unwrap();
    let reg = TierRegistry::load(Some(&user), Some(&project.join("kiln.toml"))).unwrap();
    assert_eq!(reg.layers.len(), 3);
    let draft = reg.get("draft").unwrap();
    // Project sets model + width, user sets steps + per-second price, built-in the rest.
    assert_eq!(Path::new(&draft.model), project.join("model"));
    assert_eq!(draft.width, Some(64));
    assert_eq!(draft.height, Some(512));
    assert_eq!(draft.steps, Some(2));
    assert_eq!(draft.scheduler.as_deref(), Some("euler-a"));
    assert_eq!(draft.price.credits_per_gpu_second, 0.5);
    assert_eq!(draft.price.credits_per_image, 0.01);
    assert!(draft.defined_in.ends_with("kiln.toml"));
    // A local folder is its own pin; the weights are not pinned.
    assert_eq!(draft.pin_status(), "revision pinned, weights unpinned");
    let fin = reg.get("final").unwrap();
    assert_eq!(Path::new(fin.vae.as_deref().unwrap()), project.join("model"));
    assert_eq!(fin.steps, Some(30));
    assert_eq!(fin.weights.len(), 1);
    let sketch = reg.get("sketch").unwrap();
    assert_eq!((sketch.revision.as_deref(), sketch.steps), (Some("0123abc"), Some(4)));
    assert_eq!(reg.get("upscale").unwrap().kind, TierKind::Upscale);

    // The final tier's pin is wrong: loading names the file and both hashes.
    let err = load_tier_model(fin, &Device::Cpu, DType::F32, false).err().unwrap().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors: pinned 0000"), "{err}");
}

#[test]
fn bad_layers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln.toml");
    let cases = [
        ("[tiers.draft]\nstep = 2\n", "unknown field `step`"),
        ("[tiers.draft]\nscheduler = \"heun\"\n", "tier `draft`"),
        ("[tiers.draft]\ndtype = \"f8\"\n", "--dtype"),
        ("[tiers.new]\nsteps = 2\n", "no `model` set"),
        ("[tiers.draft]\nweights = { \"unet/x\" = \"abc\" }\n", "not a sha256"),
        ("[tiers.draft\n", "kiln.toml"),
    ];
    for (text, needle) in cases {
        std::fs::write(&file, text).unwrap();
        let err = TierRegistry::load(None, Some(&file)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(needle), "`{text}`: expected `{needle}` in `{err}`");
    }
    // A tier pointing to a missing model names the tier and the layer.
    std::fs::write(&file, "[tiers.draft]\nmodel = \"./gone\"\n").unwrap();
    let reg = TierRegistry::load(None, Some(&file)).unwrap();
    let err = load_tier_model(reg.get("draft").unwrap(), &Device::Cpu, DType::F32, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tier `draft` model") && err.contains("gone") && err.contains("kiln.toml"), "{err}");
}

#[test]
fn vae_override_loads_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    // A bare VAE folder (config.json + weights at its root, the sdxl-vae-fp16-fix layout).
    let vae = dir.path().join("vae-only");
    copy_dir(&fixture_model().join("vae"), &vae);
    let toml = dir.path().join("kiln.toml");
    let m = fixture_model();
    std::fs::write(
        &toml,
        format!(
            "[tiers.plain]\nmodel = \"{m}\"\nsteps = 2\nwidth = 64\nheight = 64\n\
             [tiers.withvae]\nmodel = \"{m}\"\nvae = \"./vae-only\"\nsteps = 2\nwidth = 64\nheight = 64\n",
            m = m.display()
        ),
    )
    .unwrap();
    let reg = TierRegistry::load(None, Some(&toml)).unwrap();
    let mut pixels = Vec::new();
    for name in ["plain", "withvae"] {
        let tier = reg.get(name).unwrap();
        let model = load_tier_model(tier, &Device::Cpu, DType::F32, false).unwrap();
        let req = tier_request(tier, &model, "a red barn", vec![5], &Overrides::default()).unwrap();
        assert_eq!((req.steps, req.width, req.guidance), (2, 64, 7.5));
        let out = generate(&model, &req, &mut NoProgress).unwrap();
        let record = ImageRecord::build(&model, &req, out.scheduler, 5, 0, None, None);
        if name == "withvae" {
            let v = record.vae.as_ref().unwrap();
            assert_eq!(Path::new(&v.id), vae);
            assert_eq!(v.files.len(), 1);
            assert_eq!(v.files[0].component, "vae");
        } else {
            assert!(record.vae.is_none());
        }
        pixels.push(out.images[0].pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    // Same VAE weights through either route: identical pixels.
    assert_eq!(pixels[0], pixels[1]);
}

#[test]
fn drift_is_detected_after_a_weight_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture_model(), &dir.path().join("model"));
    let toml = dir.path().join("kiln.toml");
    std::fs::write(&toml, "[tiers.draft]\nmodel = \"./model\"\n").unwrap();
    let lock = dir.path().join(drift::LOCK_FILE);
    let reg = TierRegistry::load(None, Some(&toml)).unwrap();
    let tier = reg.get("draft").unwrap();
    let load = || load_tier_model(tier, &Device::Cpu, DType::F32, false).unwrap();

    assert_eq!(drift::check(&lock, tier, &load(), false).unwrap(), DriftOutcome::Pinned);
    assert_eq!(drift::check(&lock, tier, &load(), false).unwrap(), DriftOutcome::Unchanged);
    let locked = drift::Lock::read(&lock).unwrap();
    assert_eq!(locked.tiers["draft"].files.len(), 3);

    // Change one byte of the UNet weights (still a loadable file, a different model).
    let unet = dir.path().join("model/unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&unet).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&unet, &bytes).unwrap();
    let err = drift::check(&lock, tier, &load(), false).err().unwrap().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors changed"), "{err}");
    assert!(err.contains("--accept-drift"), "{err}");
    // The refused check leaves the lock as it was.
    assert_eq!(drift::Lock::read(&lock).unwrap(), locked);

    match drift::check(&lock, tier, &load(), true).unwrap() {
        DriftOutcome::Accepted(changes) => assert_eq!(changes.len(), 1, "{changes:?}"),
        other => panic!("expected Accepted, got {other:?}"),
    }
    assert_eq!(drift::check(&lock, tier, &load(), false).unwrap(), DriftOutcome::Unchanged);

    // A corrupt lock is a clear error naming the file.
    std::fs::write(&lock, "tiers = 3").unwrap();
    let err = drift::check(&lock, tier, &load(), false).err().unwrap().to_string();
    assert!(err.contains("kiln.lock"), "{err}");
}

#[test]
fn upscale_tier_pins_and_drift() {
    use kiln_core::tiers::load::load_upscale_tier_model;
    let dir = tempfile::tempdir().unwrap();
    let sr = dir.path().join("sr.safetensors");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr/srvgg-tiny-x4.safetensors"),
        &sr,
    )
    .unwrap();
    let sha = kiln_core::loaders::weights::sha256_file(&sr).unwrap();
    let toml = dir.path().join("kiln.toml");
    let write = |weights: &str| {
        std::fs::write(&toml, format!("[tiers.upscale]\nmodel = \"./sr.safetensors\"\n{weights}")).unwrap();
        TierRegistry::load(None, Some(&toml)).unwrap().get("upscale").unwrap().clone()
    };
    // Setting the model drops the built-in store pin; the file is recorded as file/NAME.
    let tier = write("");
    assert!(tier.weights.is_empty());
    let (up, records) = load_upscale_tier_model(&tier, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(up.spec().scale(), 4);
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].component.as_str(), records[0].file.as_str()), ("file", "sr.safetensors"));
    assert_eq!(records[0].sha256, sha);
    // A matching pin loads; a wrong one names both hashes; pins for other files are refused.
    let ok = write(&format!("weights = {{ \"file/sr.safetensors\" = \"{sha}\" }}\n"));
    assert!(load_upscale_tier_model(&ok, &Device::Cpu, DType::F32).is_ok());
    let zeros = "0".repeat(64);
    let bad = write(&format!("weights = {{ \"file/sr.safetensors\" = \"{zeros}\" }}\n"));
    let err = load_upscale_tier_model(&bad, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("file/sr.safetensors: pinned 0000") && err.contains(&sha), "{err}");
    let other = write(&format!("weights = {{ \"store/realesrgan-x4plus.safetensors\" = \"{zeros}\" }}\n"));
    let err = load_upscale_tier_model(&other, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("none of the pinned files"), "{err}");
    // A scale that contradicts the model, and a missing model, are clear errors.
    let x2 = write("scale = 2\n");
    let err = load_upscale_tier_model(&x2, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("x2") && err.contains("x4"), "{err}");
    std::fs::write(&toml, "[tiers.upscale]\nmodel = \"./gone.safetensors\"\n").unwrap();
    let gone = TierRegistry::load(None, Some(&toml)).unwrap().get("upscale").unwrap().clone();
    let err = load_upscale_tier_model(&gone, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("tier `upscale` model") && err.contains("gone.safetensors"), "{err}");
    // An ncnn pair records both halves.
    let param = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/sr/rrdb-tiny-x4.param");
    std::fs::write(&toml, format!("[tiers.upscale]\nmodel = \"{param}\"\n")).unwrap();
    let ncnn = TierRegistry::load(None, Some(&toml)).unwrap().get("upscale").unwrap().clone();
    let (_, pair) = load_upscale_tier_model(&ncnn, &Device::Cpu, DType::F32).unwrap();
    let files: Vec<&str> = pair.iter().map(|r| r.file.as_str()).collect();
    assert_eq!(files, ["rrdb-tiny-x4.param", "rrdb-tiny-x4.bin"]);
    let bin = Path::new(param).with_extension("bin");
    assert_eq!(pair[1].sha256, kiln_core::loaders::weights::sha256_file(&bin).unwrap());
    // A diffusion tier is not an upscaler.
    let reg = TierRegistry::builtin().unwrap();
    let err = load_upscale_tier_model(reg.get("draft").unwrap(), &Device::Cpu, DType::F32).err().unwrap();
    assert!(err.to_string().contains("not an upscale tier"), "{err}");

    // Drift: pinned on first use, refused after the file changes, re-pinned when accepted.
    let lock = dir.path().join(drift::LOCK_FILE);
    assert_eq!(drift::check_files(&lock, &tier, &records, false).unwrap(), DriftOutcome::Pinned);
    let mut bytes = std::fs::read(&sr).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&sr, &bytes).unwrap();
    let (_, changed) = load_upscale_tier_model(&tier, &Device::Cpu, DType::F32).unwrap();
    let err = drift::check_files(&lock, &tier, &changed, false).err().unwrap().to_string();
    assert!(err.contains("file/sr.safetensors changed"), "{err}");
    assert!(matches!(drift::check_files(&lock, &tier, &changed, true).unwrap(), DriftOutcome::Accepted(_)));
    assert_eq!(drift::check_files(&lock, &tier, &changed, false).unwrap(), DriftOutcome::Unchanged);
}

#[test]
fn explicit_unpinned_values() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("kiln.toml");
    std::fs::write(
        &toml,
        "[tiers.t]\nmodel = \"org/repo\"\nrevision = \"unpinned\"\n\
         weights = { \"unet/a.safetensors\" = \"unpinned\", \"vae/b.safetensors\" = \"ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789\" }\n",
    )
    .unwrap();
    let reg = TierRegistry::load(None, Some(&toml)).unwrap();
    let t = reg.get("t").unwrap();
    assert_eq!(t.revision, None);
    // Not a layering of the built-in final: a new model without a VAE drops SDXL's fp16-fix VAE.
    std::fs::write(&toml, "[tiers.final]\nmodel = \"org/other\"\n").unwrap();
    let fin = TierRegistry::load(None, Some(&toml)).unwrap().get("final").unwrap().clone();
    assert_eq!((fin.vae, fin.vae_revision, fin.revision), (None, None, None));
    assert!(fin.weights.is_empty() && fin.unpinned.is_empty());
    assert_eq!(fin.steps, Some(30)); // non-model keys still layer
    assert_eq!(t.unpinned, ["revision", "unet/a.safetensors"]);
    // Hashes are compared case-insensitively: stored lower-case.
    assert_eq!(
        t.weights["vae/b.safetensors"],
        "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    );
    let w = t.trust_on_first_use_warning().unwrap();
    assert!(w.contains("revision, unet/a.safetensors") && w.contains("kiln.lock"), "{w}");
}
