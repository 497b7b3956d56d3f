//! Bad input, tampering and faults, as a hostile user would try them: every case must fail with
//! a non-zero exit and a message that names the problem, never panic, leave no file behind in
//! the working folder, and leave the library as it was.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").canonicalize().unwrap()
}

/// A project with a draft tier on the tiny SD1 model and an upscale tier on the tiny SRVGG.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "[tiers.draft]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 2\n\
             [tiers.final]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 2\n\
             [tiers.upscale]\nmodel = \"{1}\"\n",
            f.join("pipelines/sd1/model").display(),
            f.join("sr/srvgg-tiny-x4.safetensors").display()
        ),
    )
    .unwrap();
    dir
}

fn kiln(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(root)
        .env("KILN_PROJECT", root)
        .env("KILN_DATA_DIR", root.join(".data"))
        .env("XDG_CONFIG_HOME", root.join(".no-user-config"))
        .output()
        .unwrap()
}

/// Every file under `root` (paths relative to it), for "nothing was left behind".
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn library_digest(root: &Path) -> String {
    let o = kiln(root, &["assets", "list", "--json"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `args` and checks the failure contract.
fn refuse(root: &Path, args: &[&str], needle: &str) {
    let before = files(root);
    let library = library_digest(root);
    let o = kiln(root, args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    // 1: kiln refused the job; 2: the command line itself was malformed (clap). Anything else
    // (101 = panic, none = killed by a signal such as an allocation abort) is a defect.
    assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: not a clean exit ({:?}): {stderr}", o.status);
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: `{needle}` not in: {stderr}");
    let after = files(root);
    assert_eq!(before, after, "{args:?} left files behind");
    assert_eq!(library_digest(root), library, "{args:?} changed the library");
}

#[test]
fn hostile_inputs_are_refused_cleanly() {
    let dir = project();
    let root = dir.path();
    let f = fixtures();
    let sd1 = f.join("pipelines/sd1/model");
    let sd1 = sd1.to_str().unwrap();
    let img = f.join("sr/input_40x32.png");
    let img = img.to_str().unwrap();
    let sr = f.join("sr/srvgg-tiny-x4.safetensors");
    let sr = sr.to_str().unwrap();
    // One recorded asset to protect.
    let o = kiln(
        root,
        &["generate", "--tier", "draft", "--prompt", "x", "--seed", "1", "--device", "cpu", "-q", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let asset = v["outputs"][0]["path"].as_str().unwrap().to_string();
    let asset_bytes = std::fs::read(&asset).unwrap();
    let folder = root.join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let folder = folder.to_str().unwrap().to_string();
    let jpg = root.join("input_40x32.jpg");
    image::open(img).unwrap().save(&jpg).unwrap();
    let jpg = jpg.to_str().unwrap().to_string();
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate", "--model", sd1, "--prompt", "x", "--device", "cpu", "-q", "--width", "64",
            "--height", "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        // 1. Writing over what is not ours.
        (gen(&["--out", "/dev/null"]), "not a regular file"),
        (gen(&["--out", &folder]), "not a regular file"),
        (
            ["generate", "--tier", "draft", "--prompt", "y", "--device", "cpu", "-q", "--out", &asset]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "is asset",
        ),
        (
            ["upscale", img, &jpg, "--model", sr, "--out", &folder].iter().map(|s| s.to_string()).collect(),
            "would both be written",
        ),
        // 4. Unbounded numbers.
        (
            ["upscale", img, "--model", sr, "--halo", "4294967295"].iter().map(|s| s.to_string()).collect(),
            "invalid halo",
        ),
        (
            ["upscale", img, "--model", sr, "--border", "100000"].iter().map(|s| s.to_string()).collect(),
            "invalid border",
        ),
        (
            ["upscale", img, "--model", sr, "--feather", "99999"].iter().map(|s| s.to_string()).collect(),
            "invalid feather",
        ),
        (gen(&["--steps", "100000"]), "invalid steps"),
        (gen(&["--count", "100000"]), "count"),
        (
            ["bench", "--synthetic", "--steps", "100000"].iter().map(|s| s.to_string()).collect(),
            "invalid steps",
        ),
        (
            ["bench", "--synthetic", "--warmup", "1000000"].iter().map(|s| s.to_string()).collect(),
            "invalid warmup",
        ),
        (
            ["bench", "--synthetic", "--size", "100000"].iter().map(|s| s.to_string()).collect(),
            "invalid size",
        ),
        (
            ["bench", "--synthetic", "--upscale-size", "1000000"].iter().map(|s| s.to_string()).collect(),
            "invalid upscale-size",
        ),
        // 9. Zero where zero makes no sense.
        (
            ["upscale", img, "--model", sr, "--tile", "0"].iter().map(|s| s.to_string()).collect(),
            "invalid tile",
        ),
        (
            ["upscale", img, "--model", sr, "--batch", "0"].iter().map(|s| s.to_string()).collect(),
            "invalid batch",
        ),
        (gen(&["--batch", "0"]), "invalid batch"),
        (["bench", "--synthetic", "--steps", "0"].iter().map(|s| s.to_string()).collect(), "invalid steps"),
        (
            ["bench", "--synthetic", "--repeats", "0"].iter().map(|s| s.to_string()).collect(),
            "invalid repeats",
        ),
        (["assets", "list", "--kind", "bogus"].iter().map(|s| s.to_string()).collect(), "not an asset kind"),
        // 5. Mistakes that would silently change behaviour.
        (
            ["generate", "--project", "/no/such/project", "--tier", "draft", "--prompt", "x"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "project folder not found",
        ),
        // Keys and the server.
        (["keys", "add", "a b"].iter().map(|s| s.to_string()).collect(), "NAME"),
        (["keys", "revoke", "nobody"].iter().map(|s| s.to_string()).collect(), "does not exist"),
        (["serve", "--max-memory", "0"].iter().map(|s| s.to_string()).collect(), "max-memory"),
        (["serve", "--max-memory", "banana"].iter().map(|s| s.to_string()).collect(), "max-memory"),
        (["serve", "--listen", "0.0.0.0:0"].iter().map(|s| s.to_string()).collect(), "kiln keys add"),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refuse(root, &args, needle);
    }
    assert!(!Path::new("/no/such/project").exists());
    assert_eq!(std::fs::read(&asset).unwrap(), asset_bytes, "the recorded asset was touched");
    let m = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(!m.file_type().is_file(), "/dev/null was replaced");
}

#[test]
fn config_and_library_faults_are_refused() {
    let dir = project();
    let root = dir.path();
    // A misspelt table would otherwise leave the project without a budget.
    let toml = std::fs::read_to_string(root.join("kiln.toml")).unwrap();
    std::fs::write(root.join("kiln.toml"), format!("[budgett]\nlimit = 1\n{toml}")).unwrap();
    refuse(root, &["draft", "x", "-n", "1", "--device", "cpu"], "budgett");
    std::fs::write(root.join("kiln.toml"), toml).unwrap();
    // An empty library file is not a fresh library.
    std::fs::create_dir_all(root.join(".kiln")).unwrap();
    std::fs::write(root.join(".kiln/library.db"), b"").unwrap();
    let o = kiln(root, &["draft", "x", "-n", "1", "--device", "cpu"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(root.join(".kiln/library.db")).unwrap().len(),
        0,
        "the library was replaced"
    );
    // A tampered store model is refused, not used.
    std::fs::remove_file(root.join(".kiln/library.db")).unwrap();
    let o =
        kiln(root, &["models", "import", fixtures().join("sr/srvgg-tiny-x4.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let blobs = root.join(".data/models/blobs");
    let blob = std::fs::read_dir(&blobs).unwrap().flatten().next().unwrap().path();
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let img = fixtures().join("sr/input_40x32.png");
    refuse(
        root,
        &["upscale", img.to_str().unwrap(), "--model", "srvgg-tiny-x4", "--out", "up.png"],
        "changed on disk",
    );
}

/// `kiln assets check` verifies what it claims: an edited database or file is reported by
/// name (lineage cycle, a recorded file that hashes right but is no image, a ledger whose sums
/// disagree), with a failing exit, and `assets show` still terminates on a cycle.
#[test]
fn assets_check_finds_a_tampered_library() {
    let dir = project();
    let root = dir.path();
    let mut paths = Vec::new();
    for seed in ["1", "2"] {
        let o = kiln(
            root,
            &[
                "generate", "--tier", "draft", "--prompt", "x", "--seed", seed, "--device", "cpu", "-q",
                "--json",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        paths.push(PathBuf::from(v["outputs"][0]["path"].as_str().unwrap()));
    }
    let check = || {
        let o = kiln(root, &["assets", "check", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let problems: Vec<String> =
            v["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        assert_eq!(o.status.success(), problems.is_empty(), "exit status disagrees with {problems:?}");
        problems
    };
    assert_eq!(check(), Vec::<String>::new());
    let db = rusqlite::Connection::open(root.join(".kiln/library.db")).unwrap();
    let sql = |q: &str| db.execute_batch(q).unwrap();

    sql("UPDATE assets SET parent_id = 2 WHERE id = 1; UPDATE assets SET parent_id = 1 WHERE id = 2;");
    let p = check();
    assert!(p.len() == 1 && p[0].contains("lineage cycle: #1 -> #2 -> #1"), "{p:?}");
    let o = kiln(root, &["assets", "show", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sql("UPDATE assets SET parent_id = NULL;");

    // Half a PNG whose recorded hash was updated to match: only decoding can tell.
    let bytes = std::fs::read(&paths[1]).unwrap();
    std::fs::write(&paths[1], &bytes[..bytes.len() / 2]).unwrap();
    let sha = kiln_core::loaders::weights::sha256_file(&paths[1]).unwrap();
    sql(&format!("UPDATE assets SET sha256 = '{sha}' WHERE id = 2;"));
    let p = check();
    assert!(p.len() == 1 && p[0].contains("asset 2 file does not decode"), "{p:?}");
    std::fs::write(&paths[1], &bytes).unwrap();
    let first = std::fs::read(&paths[0]).unwrap();
    std::fs::remove_file(&paths[0]).unwrap();
    let p = check();
    assert!(
        p.len() == 2 && p[0].contains("asset 1 file missing") && p[1].contains("asset 2 file changed"),
        "{p:?}"
    );
    std::fs::write(&paths[0], &first).unwrap();
    sql(&format!(
        "UPDATE assets SET sha256 = '{}' WHERE id = 2;",
        kiln_core::loaders::weights::sha256_file(&paths[1]).unwrap()
    ));
    assert_eq!(check(), Vec::<String>::new());

    sql("UPDATE jobs SET credits = credits + 1 WHERE id = 1; UPDATE jobs SET device_seconds = device_seconds + 5 WHERE id = 2;");
    let p = check();
    assert!(p.len() == 2, "{p:?}");
    assert!(p[0].contains("job 1 costs") && p[0].contains("its assets carry"), "{p:?}");
    assert!(p[1].contains("job 2 records") && p[1].contains("stages sum to"), "{p:?}");

    // Values kiln never writes, and a library from another version: said in words.
    sql("UPDATE assets SET width = -5 WHERE id = 1;");
    let o = kiln(root, &["assets", "list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("-5") && err.contains("edited outside kiln"), "{err}");
    sql("UPDATE meta SET value = '999' WHERE key = 'schema_version';");
    let o = kiln(root, &["assets", "list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("schema version is `999`"), "{err}");
}

/// Rewrites one tensor's shape in a safetensors header (same element count, so the file is
/// still well-formed): weights that no longer fit the architecture they claim.
fn reshaped_safetensors(src: &Path, dst: &Path, tensor: &str, shape: &[usize]) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header[tensor]["shape"] = serde_json::json!(shape);
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(n.max(json.len()).next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn imports_refuse_wrong_shapes_and_taken_names_and_survive_link_loops() {
    let dir = project();
    let root = dir.path();
    let sr = fixtures().join("sr");
    let inputs = tempfile::tempdir().unwrap();
    let bad = inputs.path().join("bent.safetensors");
    reshaped_safetensors(&sr.join("srvgg-tiny-x4.safetensors"), &bad, "body.4.weight", &[8, 8, 9, 1]);
    refuse(root, &["models", "import", bad.to_str().unwrap()], "do not fit");

    let o = kiln(root, &["models", "import", sr.join("srvgg-tiny-x4.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Other weights under a taken name: refused, store unchanged; the same weights again: fine.
    let other = inputs.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(sr.join("rrdb-tiny-x4.pth"), other.join("srvgg-tiny-x4.pth")).unwrap();
    let other_pth = other.join("srvgg-tiny-x4.pth");
    refuse(root, &["models", "import", other_pth.to_str().unwrap()], "already imported");
    let o = kiln(root, &["models", "import", sr.join("srvgg-tiny-x4.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kiln(root, &["models", "import", "--replace", other_pth.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kiln(root, &["models", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["models"][0]["arch"], "RRDBNet", "{v}");

    // A folder that links back to itself holds one model, imported once.
    let looped = inputs.path().join("looped");
    std::fs::create_dir(&looped).unwrap();
    for f in ["srvgg-tiny-x2.param", "srvgg-tiny-x2.bin"] {
        std::fs::copy(sr.join(f), looped.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(&looped, looped.join("again")).unwrap();
    std::os::unix::fs::symlink(looped.join("srvgg-tiny-x2.param"), looped.join("alias.param")).unwrap();
    let o = kiln(root, &["models", "import", "--json", looped.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["imported"].as_array().unwrap().len(), 1, "{v}");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG of a few dozen bytes whose header declares `w`×`h` pixels.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    chunk(b"IHDR", &[&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat());
    chunk(b"IDAT", &[0x78, 0x01, 0x00, 0x00, 0x00, 0xff, 0xff]);
    out
}

/// Bad values for every subcommand's options and inputs: each refused with a message naming
/// the problem, nothing written, the library untouched.
#[test]
fn every_subcommand_refuses_bad_values() {
    let dir = project();
    let root = dir.path();
    let o =
        kiln(root, &["generate", "--tier", "draft", "--prompt", "x", "--seed", "1", "--device", "cpu", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inputs = tempfile::tempdir().unwrap();
    let put = |name: &str, bytes: &[u8]| {
        let p = inputs.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let f = fixtures();
    let fx = |rel: &str| f.join(rel).to_str().unwrap().to_string();
    let good = std::fs::read(f.join("inpaint/image.png")).unwrap();
    let (txt, empty) = (put("notes.txt", b"hello"), put("empty.png", b""));
    let huge = put("huge.png", &png_declaring(200_000, 200_000));
    let big = put("big12k.png", &png_declaring(12_000, 12_000));
    let trunc = put("trunc.png", &good[..good.len() / 2]);
    let fake_jpg = put("fake.jpg", b"\xff\xd8\xff\xe0garbage");
    let npy_header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }\n";
    let npy_huge = put(
        "huge.npy",
        &[&b"\x93NUMPY\x01\x00"[..], &(npy_header.len() as u16).to_le_bytes(), npy_header.as_bytes()]
            .concat(),
    );
    let npy_text = put("text.npy", b"not numpy");
    let empty_dir = inputs.path().join("empty-dir");
    std::fs::create_dir(&empty_dir).unwrap();
    let empty_dir = empty_dir.to_str().unwrap().to_string();
    let (sd1, img, mask, sr, small) = (
        fx("pipelines/sd1/model"),
        fx("inpaint/image.png"),
        fx("inpaint/mask.png"),
        fx("sr/srvgg-tiny-x4.safetensors"),
        fx("sr/input_40x32.png"),
    );
    let g = |extra: &[&str]| -> Vec<String> {
        ["generate", "--model", &sd1, "--prompt", "x", "--device", "cpu", "-q"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let ip = |cmd: &str, extra: &[&str]| -> Vec<String> {
        [cmd, &img, "--mask", &mask, "--prompt", "x", "--model", &sd1, "--device", "cpu", "-q"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let op = |extra: &[&str]| -> Vec<String> {
        ["outpaint", &img, "--model", &sd1, "--device", "cpu", "-q"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let up = |extra: &[&str]| -> Vec<String> {
        ["upscale", &small, "--model", &sr, "-q"].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let a = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        // generate: sizes, counts and numbers
        (g(&["--width", "-64"]), "'-64' for '--width <WIDTH>': expected a whole number"),
        (g(&["--width", "63", "--height", "64"]), "multiple of the VAE factor 8"),
        (g(&["--width", "100000"]), "exceeds the 4096 px limit"),
        (g(&["--width", "0"]), "invalid width: 0"),
        (g(&["--height", "abc"]), "'abc' for '--height <HEIGHT>'"),
        (g(&["--steps", "0"]), "invalid steps: 0 is outside 1..=1000"),
        (g(&["--steps", "-3"]), "'-3' for '--steps <STEPS>'"),
        (g(&["--count", "0"]), "0 (expected 1..=1000)"),
        (g(&["--guidance", "nan"]), "must be a finite number >= 0"),
        (g(&["--guidance", "-1e30"]), "must be a finite number >= 0"),
        (g(&["--guidance", "inf"]), "must be a finite number >= 0"),
        (g(&["--seed", "-1"]), "'-1' for '--seed <SEED>'"),
        (g(&["--seed", "99999999999999999999999"]), "the number is too large"),
        (g(&["--batch", "1000"]), "invalid batch: 1000 is outside 1..=64"),
        (g(&["--batch", "0"]), "invalid batch: 0"),
        // generate: img2img and latents
        (g(&["--init-image", &img, "--strength", "0"]), "must be in (0, 1]"),
        (g(&["--init-image", &img, "--strength", "1.5"]), "must be in (0, 1]"),
        (g(&["--init-image", &img, "--strength", "nan"]), "must be in (0, 1]"),
        (g(&["--init-image", &txt]), "not a recognised image format"),
        (g(&["--init-image", &empty]), "not a recognised image format"),
        (g(&["--init-image", &huge]), "exceeds kiln's limit"),
        (g(&["--init-image", &big, "--width", "64", "--height", "64"]), "cannot decode"),
        (g(&["--init-image", &trunc, "--width", "64", "--height", "64"]), "unexpected end of file"),
        (g(&["--init-image", "/no/such.png"]), "No such file"),
        (g(&["--init-image", &empty_dir]), "cannot"),
        (g(&["--init-latents", &npy_huge]), "npy elements"),
        (g(&["--init-latents", &npy_text]), "no .npy magic"),
        (g(&["--init-latents", "/no/such.npy"]), "init_latents not found"),
        // generate: model, scheduler, device, dtype, tiling
        (g(&["--scheduler", "bogus"]), "expected one of ddim"),
        (a(&["generate", "--model", &sd1, "--prompt", "x", "--device", "tpu"]), "expected auto, cpu, cuda"),
        (g(&["--dtype", "f64"]), "expected f32, f16 or bf16"),
        (g(&["--dtype", "bf16"]), "bf16 is not supported on the CPU"),
        (g(&["--vae-tiling", "maybe"]), "is not one of on, off, auto"),
        (g(&["--vae-tiling", "on", "--vae-tile", "0"]), "outside 32..=8192"),
        (g(&["--vae-tiling", "on", "--vae-tile", "100000"]), "outside 32..=8192"),
        (
            a(&["generate", "--model", "/no/such/model", "--prompt", "x", "--device", "cpu"]),
            "model folder not found",
        ),
        (
            a(&["generate", "--model", &empty_dir, "--prompt", "x", "--device", "cpu"]),
            "model_index.json not found",
        ),
        (a(&["generate", "--model", &txt, "--prompt", "x", "--device", "cpu"]), "model folder not found"),
        (a(&["generate", "--prompt", "x", "--device", "cpu"]), "--model <MODEL>"),
        (a(&["generate", "--model", &sd1, "--tier", "draft", "--prompt", "x"]), "cannot be used with"),
        (a(&["generate", "--tier", "nosuch", "--prompt", "x", "--device", "cpu"]), "unknown tier `nosuch`"),
        (a(&["generate", "--model", &sd1, "--device", "cpu"]), "--prompt <PROMPT>"),
        // draft
        (a(&["draft", "x", "-n", "0", "--device", "cpu"]), "invalid count: 0"),
        (a(&["draft", "x", "-n", "100000", "--device", "cpu"]), "invalid count: 100000"),
        (a(&["draft", "x", "-n", "-2", "--device", "cpu"]), "'-2' for '--count <COUNT>'"),
        (a(&["draft", "x", "--tier", "nosuch", "--device", "cpu"]), "unknown tier `nosuch`"),
        (a(&["draft", "x", "--width", "65", "--device", "cpu"]), "multiple of the VAE factor 8"),
        (a(&["draft", "x", "--height", "100000", "--device", "cpu"]), "limit"),
        (a(&["draft", "x", "--steps", "0", "--device", "cpu"]), "invalid steps: 0"),
        (a(&["draft", "x", "--batch", "0", "--device", "cpu"]), "invalid batch: 0"),
        (a(&["draft", "--device", "cpu"]), "<PROMPT>"),
        (a(&["draft", "x", "--device", "cpu", "--dtype", "bf16"]), "bf16 is not supported on the CPU"),
        // promote
        (a(&["promote", "999", "--device", "cpu"]), "no asset with id 999"),
        (a(&["promote", "abc", "--device", "cpu"]), "draft image not found: abc"),
        (a(&["promote", &txt, "--device", "cpu"]), "not a readable PNG"),
        (a(&["promote", &img, "--device", "cpu"]), "has no kiln metadata"),
        (a(&["promote", "1", "--strength", "0", "--device", "cpu"]), "must be in (0, 1]"),
        (a(&["promote", "1", "--strength", "-1", "--device", "cpu"]), "must be in (0, 1]"),
        (a(&["promote", "1", "--mode", "sideways", "--device", "cpu"]), "expected img2img or reseed"),
        (a(&["promote", "1", "--upscale", "banana", "--device", "cpu"]), "expected 4k, 8k, WIDTHxHEIGHT"),
        // Refused before the final renders (nothing written, nothing billed).
        (a(&["promote", "1", "--upscale", "100000x100000", "--device", "cpu"]), "exceeds the limit"),
        (
            a(&["promote", "1", "--upscale", "64", "--width", "4096", "--height", "4096", "--device", "cpu"]),
            "exceeds the limit",
        ),
        (a(&["promote", "1", "--tier", "nosuch", "--device", "cpu"]), "unknown tier `nosuch`"),
        (a(&["promote", "1", "--tile", "0", "--upscale", "4k", "--device", "cpu"]), "invalid --tile: 0"),
        // inpaint / erase / outpaint
        (a(&["inpaint", &img, "--prompt", "x", "--model", &sd1]), "--mask <MASK>"),
        (ip("inpaint", &["--strength", "0"]), "must be in (0, 1]"),
        (ip("inpaint", &["--mask-blur", "-1"]), "mask_blur"),
        (ip("inpaint", &["--mask-blur", "100000"]), "must be in 0..=256 px"),
        (ip("inpaint", &["--region", "everywhere"]), "expected auto, whole or only-masked"),
        (ip("inpaint", &["--blend", "photoshop"]), "expected kiln or diffusers"),
        (ip("inpaint", &["--reimpose", "sometimes"]), "expected auto, on or off"),
        (ip("inpaint", &["--init-latents", &npy_huge]), "npy elements"),
        (ip("inpaint", &["--scheduler", "bogus"]), "expected one of ddim"),
        (ip("inpaint", &["--steps", "0"]), "invalid steps: 0"),
        (ip("inpaint", &["--count", "0"]), "count"),
        (a(&["inpaint", &img, "--mask", &huge, "--prompt", "x", "--model", &sd1]), "exceeds kiln's limit"),
        (a(&["inpaint", &huge, "--mask", &mask, "--prompt", "x", "--model", &sd1]), "exceeds kiln's limit"),
        (
            a(&["inpaint", &trunc, "--mask", &mask, "--prompt", "x", "--model", &sd1]),
            "unexpected end of file",
        ),
        (a(&["inpaint", &img, "--mask", &trunc, "--prompt", "x", "--model", &sd1]), "unexpected end of file"),
        (a(&["inpaint", &img, "--mask", &fake_jpg, "--prompt", "x", "--model", &sd1]), "image"),
        (a(&["inpaint", "/no/such.png", "--mask", &mask, "--prompt", "x", "--model", &sd1]), "No such file"),
        (ip("erase", &["--grow", "100000"]), "use a smaller grow"),
        (a(&["erase", &img, "--model", &sd1]), "--mask <MASK>"),
        (op(&["--left", "100000"]), "exceeds kiln's limit of 16384 px"),
        (op(&["--left", "-8"]), "'-8' for '--left <LEFT>'"),
        (op(&["--to", "0:9"]), "expected an aspect ratio such as 16:9"),
        (op(&["--to", "abc"]), "expected an aspect ratio such as 16:9"),
        (op(&["--to", "1000:1"]), "exceeds kiln's limit of 16384 px"),
        (op(&["--left", "8", "--fill", "glitter"]), "expected edge or noise"),
        (op(&["--left", "8", "--overlap", "100000"]), "nothing would be kept"),
        (op(&["--left", "8", "--to", "16:9"]), "cannot be used with"),
        // upscale
        (a(&["upscale", &txt, "--model", &sr]), "unknown image format"),
        (a(&["upscale", &empty, "--model", &sr]), "unexpected end of file"),
        (a(&["upscale", &huge, "--model", &sr]), "exceeds the input limit"),
        (a(&["upscale", &trunc, "--model", &sr]), "unexpected end of file"),
        (a(&["upscale", &fake_jpg, "--model", &sr]), "Jpeg"),
        (a(&["upscale", &empty_dir, "--model", &sr]), "no PNG/JPEG/WebP images in folder"),
        (a(&["upscale", "/no/such.png", "--model", &sr]), "input not found"),
        (
            a(&["upscale", &small, "--model", "nosuch"]),
            "model `nosuch` (neither a file nor an imported name)",
        ),
        (a(&["upscale", &small, "--model", &txt]), "weight file extension `.txt`"),
        (a(&["upscale", &small, "--model", &img]), "weight file extension `.png`"),
        (up(&["--scale", "0"]), "0 is not a positive scale"),
        (up(&["--scale", "-2"]), "is not a positive scale"),
        (up(&["--scale", "nan"]), "NaN is not a positive scale"),
        (up(&["--scale", "100000"]), "exceeds the limit"),
        (up(&["--to", "banana"]), "expected 4k, 8k or WIDTHxHEIGHT"),
        (up(&["--to", "0x0"]), "expected 4k, 8k or WIDTHxHEIGHT"),
        (up(&["--to", "100000x100000"]), "exceeds the limit"),
        (up(&["--scale", "2", "--to", "4k"]), "cannot be used with"),
        (up(&["--tile", "8"]), "invalid tile"),
        (up(&["--tile", "100000"]), "invalid tile"),
        (up(&["--batch", "100"]), "invalid batch"),
        (up(&["--halo", "-1"]), "'-1' for '--halo <HALO>'"),
        (up(&["--dtype", "bf16"]), "bf16 is not supported on the CPU"),
        (up(&["--device", "cuda:0"]), "built without CUDA"),
        // replay, assets, report, tiers
        (a(&["replay", "999"]), "no asset with id 999"),
        (a(&["replay", "0"]), "no asset with id 0"),
        (a(&["replay", &txt]), "not a readable PNG"),
        (a(&["replay", &img]), "has no kiln metadata"),
        (a(&["assets", "show", "999"]), "no asset with id 999"),
        (a(&["assets", "show", "abc"]), "'abc' for '<ID>'"),
        (a(&["assets", "list", "--kind", "final,bogus"]), "is not an asset kind"),
        (a(&["assets", "lineage", "1"]), "unrecognized subcommand"),
        (a(&["report", "--project", "/no/such"]), "project folder not found"),
        (a(&["tiers", "--project", "/no/such"]), "project folder not found"),
        (a(&["assets", "list", "--project", &txt]), "is not a folder"),
        // bench
        (a(&["bench", "--synthetic", "--shrink", "3"]), "3 is not one of 1, 2, 4, 8, 16, 32"),
        (a(&["bench", "--synthetic", "--tiers", "nosuch"]), "unknown tier `nosuch`"),
        (a(&["bench", "--synthetic", "--size", "7"]), "invalid size: 7"),
        (a(&["bench", "--synthetic", "--repeats", "1000"]), "invalid repeats"),
        (a(&["bench", "--synthetic", "--dtype", "f64"]), "expected f32, f16 or bf16"),
        // models, keys, serve
        (a(&["models", "import", "/no/such/file.pth"]), "import path not found"),
        (a(&["models", "import", &txt]), "weight file extension `.txt`"),
        (a(&["models", "import", &empty_dir]), "super-resolution weights"),
        (a(&["models", "import", &put("bad.pth", b"PK\x03\x04 not a zip")]), "bad.pth"),
        (
            a(&["models", "import", &put("bad.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7f{")]),
            "bad.safetensors",
        ),
        (a(&["models", "import", &put("bad.param", b"7767517\n1 1\nInput data 0 1 data\n")]), "bad.param"),
        (a(&["models", "import", &put("bad.onnx", b"\x08\x07garbage")]), "bad.onnx"),
        (a(&["keys", "add", ""]), "use 1-64 letters"),
        (a(&["keys", "add", "alice", "--quota", "-5"]), "quota"),
        (a(&["keys", "add", "alice", "--quota", "abc"]), "'abc' for '--quota <QUOTA>'"),
        (a(&["serve", "--listen", "not-an-address"]), "invalid socket address syntax"),
        (a(&["serve", "--listen", "127.0.0.1:99999"]), "invalid socket address syntax"),
        (a(&["serve", "--max-body", "0"]), "must be > 0"),
        (a(&["serve", "--max-body", "100T"]), "expected e.g. 8G"),
        (a(&["serve", "--preload", "nosuch"]), "unknown tier `nosuch`"),
        (a(&["serve", "--cors-origin", "not a url"]), "expected an origin such as"),
        (a(&["serve", "--cors-origin", "https://studio.example/path"]), "expected an origin such as"),
        // grade
        (a(&["grade", &img, "--lut", &img]), "not a .cube LUT: the file is not text"),
        (a(&["grade", &img, "--lut", "/no/such.cube"]), "No such file"),
        (a(&["grade", &img, "--lut", &put("big.cube", b"LUT_3D_SIZE 99\n")]), "LUT_3D_SIZE must be 2..=65"),
        (
            a(&["grade", &img, "--lut", &put("short.cube", b"LUT_3D_SIZE 2\n0 0 0\n")]),
            "needs 8 rows, the file has 1",
        ),
        (a(&["grade", &img, "--lut", &put("one_d.cube", b"LUT_1D_SIZE 4\n")]), "1D LUT"),
        (a(&["grade", &img, "--lut", &fx("lut/grade2.cube"), "--strength", "2"]), "must be in 0..=1"),
        (
            a(&["grade", &img, "--lut", &fx("lut/grade2.cube"), "--interp", "cubic"]),
            "expected trilinear or tetrahedral",
        ),
        (
            a(&["grade", &txt, "--lut", &fx("lut/grade2.cube"), "--out", "x.png"]),
            "not a recognised image format",
        ),
        // qc, cutout
        (a(&["qc", &txt]), "pass --source SRC"),
        (a(&["qc", &small, "--source", &txt]), "not a recognised image format"),
        (a(&["qc", &small, "--source", &small, "--tile", "0"]), "invalid tile: 0"),
        (a(&["qc", &small, "--source", &small, "--bp-threshold", "nan"]), "thresholds must be positive"),
        (a(&["qc", &small, "--source", &small, "--hf-threshold", "-1"]), "thresholds must be positive"),
        (a(&["cutout", &small, "--background", "#zzzzzz"]), "neither a colour"),
        (a(&["cutout", &small, "--replace", "sea"]), "--replace needs a model"),
        (a(&["cutout", &txt]), "matting model"),
    ];
    assert!(cases.len() >= 150, "{} cases", cases.len());
    // Every case runs; the failures are reported together.
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(args, needle)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            std::panic::catch_unwind(|| refuse(root, &args, needle))
                .err()
                .map(|e| e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{args:?} failed")))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
