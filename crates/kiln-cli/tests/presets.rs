//! Presets (brand kits) end to end on the tiny SD1 fixture: a preset's template, negative
//! prompt, steps, seed, two LoRAs and grade applied to `kiln generate`, recorded (name, hash,
//! LoRAs, grade) and replayed bit-exact; a changed preset reported; an unknown one refused; a
//! final promoted from a preset's draft takes the preset's grade (and, when named, its LoRAs).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

/// A warm 2-point LUT: red lifted, blue lowered.
const WARM_CUBE: &str = "TITLE \"warm\"\nLUT_3D_SIZE 2\n\
    0.1 0 0\n1 0 0\n0.1 1 0\n1 1 0\n\
    0.1 0 0.8\n1 0 0.8\n0.1 1 0.8\n1 1 0.8\n";

/// Two LoRAs of the fixtures that fit the tiny SD1 model (kohya UNet + text encoder, LoCon).
fn loras() -> [String; 2] {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora").canonicalize().unwrap();
    [
        format!("{}:0.7", dir.join("sd1_kohya.safetensors").display()),
        format!("{}:-0.5", dir.join("sd1_locon.safetensors").display()),
    ]
}

fn preset_toml(steps: usize) -> String {
    let [a, b] = loras();
    format!(
        "[presets.brand]\ndescription = \"house look\"\nprompt = \"{{prompt}}, studio light\"\n\
         negative_prompt = \"blur\"\nseed = 11\nsteps = {steps}\nloras = [\"{a}\", \"{b}\"]\n\
         [presets.brand.grade]\nlut = \"warm.cube\"\nstrength = 0.7\n"
    )
}

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    support::kiln(root).args(args).output().unwrap()
}

fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_preset_shapes_grades_records_and_replays() {
    let dir = support::project(2, &preset_toml(3));
    let root = dir.path();
    std::fs::write(root.join("warm.cube"), WARM_CUBE).unwrap();

    let shown = ok(&run(root, &["presets", "show", "brand", "--json"]));
    let sha = shown["sha256"].as_str().unwrap().to_string();
    ok(&run(
        root,
        &[
            "generate", "--tier", "draft", "--prompt", "a vase", "--preset", "brand", "--device", "cpu",
            "--json",
        ],
    ));
    let asset = ok(&run(root, &["assets", "show", "1", "--json"]));
    let record = &asset["asset"]["record"];
    let record = if record.is_null() { &asset["record"] } else { record };
    assert_eq!(record["prompt"], "a vase, studio light", "{asset}");
    assert_eq!(record["negative_prompt"], "blur", "{asset}");
    assert_eq!(record["seed"], 11, "{asset}");
    assert_eq!(record["steps"], 3, "{asset}");
    assert_eq!(record["preset"]["name"], "brand", "{asset}");
    assert_eq!(record["preset"]["sha256"], sha.as_str(), "{asset}");
    assert!((record["grade"]["strength"].as_f64().unwrap() - 0.7).abs() < 1e-6, "{asset}");
    assert_eq!(record["loras"].as_array().map(Vec::len), Some(2), "{asset}");
    let made = asset["asset"]["path"].as_str().or(asset["path"].as_str()).unwrap().to_string();
    let made = support::file_pixels(&root.join(made));

    // The preset is exactly its settings plus its grade: the same job spelt out, then graded.
    let plain = root.join("plain.png");
    let [a, b] = loras();
    ok(&run(
        root,
        &[
            "generate",
            "--lora",
            &a,
            "--lora",
            &b,
            "--tier",
            "draft",
            "--prompt",
            "a vase, studio light",
            "--negative",
            "blur",
            "--seed",
            "11",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--out",
            plain.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_ne!(support::file_pixels(&plain), made, "the grade changed nothing");
    let graded = root.join("graded.png");
    let lut = root.join("warm.cube");
    ok(&run(
        root,
        &[
            "grade",
            plain.to_str().unwrap(),
            "--lut",
            lut.to_str().unwrap(),
            "--strength",
            "0.7",
            "--out",
            graded.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(support::file_pixels(&graded), made, "preset image = its settings, then its grade");

    // Replay (the preset's two LoRAs merged again, then its grade) is bit for bit.
    let r = ok(&run(root, &["replay", "1", "--device", "cpu", "--json"]));
    assert_eq!(r["bit_exact"], true, "{r}");

    // The preset changes: the next job says so; the hash follows.
    std::fs::write(
        root.join("kiln.toml"),
        std::fs::read_to_string(root.join("kiln.toml")).unwrap().replace("steps = 3", "steps = 4"),
    )
    .unwrap();
    let o = run(
        root,
        &[
            "generate", "--tier", "draft", "--prompt", "a cup", "--preset", "brand", "--device", "cpu",
            "--json",
        ],
    );
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("preset `brand` changed since asset"), "{err}");
    let changed = ok(&run(root, &["presets", "show", "brand", "--json"]));
    assert_ne!(changed["sha256"].as_str().unwrap(), sha);

    // An unknown preset is refused before anything runs, naming the known ones.
    let o =
        run(root, &["generate", "--tier", "draft", "--prompt", "x", "--preset", "brnad", "--device", "cpu"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown preset `brnad`") && err.contains("brand"), "{err}");
}

#[test]
fn grading_an_asset_records_a_child() {
    let dir = support::project(2, "");
    let root = dir.path();
    std::fs::write(root.join("warm.cube"), WARM_CUBE).unwrap();
    support::generate_pixels(root, "a boat", 5, &[]);
    let lut = root.join("warm.cube");
    let jobs =
        ok(&run(root, &["grade", "asset:1", "--lut", lut.to_str().unwrap(), "--strength", "0.5", "--json"]));
    assert_eq!(jobs[0]["kind"], "grade", "{jobs}");
    let graded = jobs[0]["detail"]["asset_id"].as_i64().unwrap();
    let shown = ok(&run(root, &["assets", "show", &graded.to_string(), "--json"]));
    assert_eq!(shown["asset"]["kind"], "graded", "{shown}");
    assert_eq!(shown["asset"]["parent_id"], 1, "{shown}");
    assert_eq!(shown["asset"]["prompt"], "a boat", "the source's record travels with it: {shown}");
    assert_eq!(shown["asset"]["params"]["step"], "grade", "{shown}");
    let sha = shown["asset"]["params"]["lut_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{shown}");
    // Its pixels are the file grade of the source.
    let source =
        root.join(ok(&run(root, &["assets", "show", "1", "--json"]))["asset"]["path"].as_str().unwrap());
    let by_file = root.join("by-file.png");
    ok(&run(
        root,
        &[
            "grade",
            source.to_str().unwrap(),
            "--lut",
            lut.to_str().unwrap(),
            "--strength",
            "0.5",
            "--out",
            by_file.to_str().unwrap(),
            "--json",
        ],
    ));
    let recorded = root.join(shown["asset"]["path"].as_str().unwrap());
    assert_eq!(support::file_pixels(&recorded), support::file_pixels(&by_file));
    let check = ok(&run(root, &["assets", "check", "--json"]));
    assert_eq!(check["consistent"], true, "{check}");
    // Replay walks back through the grade: the source regenerated, then graded again.
    let r = ok(&run(root, &["replay", &graded.to_string(), "--device", "cpu", "--json"]));
    assert_eq!(r["bit_exact"], true, "{r}");
    // A graded file outside the library is refused, naming what to replay instead.
    let o = run(root, &["replay", by_file.to_str().unwrap(), "--device", "cpu"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("graded image the library does not know"), "{err}");
    // --out is for files; an asset's grade goes to the project.
    let o = run(root, &["grade", "asset:1", "--lut", lut.to_str().unwrap(), "--out", "x.png"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--out"));
}

#[test]
fn a_final_takes_its_drafts_grade_and_a_named_presets_loras() {
    let toml = format!("{}[presets.plain]\nsteps = 3\n", preset_toml(3));
    let dir = support::project(2, &toml);
    let root = dir.path();
    std::fs::write(root.join("warm.cube"), WARM_CUBE).unwrap();
    let asset = |id: i64| {
        let shown = ok(&run(root, &["assets", "show", &id.to_string(), "--json"]));
        (shown["asset"]["record"].clone(), root.join(shown["asset"]["path"].as_str().unwrap()))
    };
    let promote = |extra: &[&str]| -> i64 {
        let mut args = vec!["promote", "asset:1", "--device", "cpu", "--json"];
        args.extend_from_slice(extra);
        let out = ok(&run(root, &args));
        out["asset_id"].as_i64().unwrap_or_else(|| panic!("{out}"))
    };
    ok(&run(root, &["draft", "a vase", "--count", "1", "--preset", "brand", "--device", "cpu", "--json"]));
    let (draft, _) = asset(1);
    assert_eq!(draft["preset"]["name"], "brand", "{draft}");

    // No preset named: the final gets the draft preset's grade, not its LoRAs.
    let inherited = promote(&[]);
    let (record, graded_final) = asset(inherited);
    assert_eq!(record["preset"]["name"], "brand", "{record}");
    assert!((record["grade"]["strength"].as_f64().unwrap() - 0.7).abs() < 1e-6, "{record}");
    assert!(record["loras"].as_array().is_none_or(Vec::is_empty), "{record}");
    // It is the ungraded final (a preset without a grade) graded by the LUT.
    let (plain_record, plain_final) = asset(promote(&["--preset", "plain"]));
    assert!(plain_record["grade"].is_null(), "{plain_record}");
    let regraded = root.join("regraded.png");
    let lut = root.join("warm.cube");
    ok(&run(
        root,
        &[
            "grade",
            plain_final.to_str().unwrap(),
            "--lut",
            lut.to_str().unwrap(),
            "--strength",
            "0.7",
            "--out",
            regraded.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(support::file_pixels(&regraded), support::file_pixels(&graded_final));

    // The preset named: its two LoRAs are merged into the final's model, then a job LoRA.
    let [a, _] = loras();
    let named = promote(&["--preset", "brand", "--lora", &a]);
    let (record, _) = asset(named);
    assert_eq!(record["loras"].as_array().map(Vec::len), Some(3), "{record}");
    assert_eq!(record["preset"]["name"], "brand", "{record}");
    // A promoted final replays bit-exact: LoRAs merged again, grade applied again.
    let r = ok(&run(root, &["replay", &named.to_string(), "--device", "cpu", "--json"]));
    assert_eq!(r["bit_exact"], true, "{r}");
}
