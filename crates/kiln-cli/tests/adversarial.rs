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
            "[tiers.draft]\nmodel = \"{}\"\nwidth = 64\nheight = 64\nsteps = 2\n\
             [tiers.upscale]\nmodel = \"{}\"\n",
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
    assert_eq!(o.status.code(), Some(1), "{args:?}: not a clean exit: {stderr}");
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
