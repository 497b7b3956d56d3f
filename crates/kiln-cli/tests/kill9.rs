//! kill -9 at several points of every recording job kind (generate, inpaint, outpaint, erase,
//! replay, promote with upscale and re-detail): after each kill the library is consistent
//! (`assets check`: every recorded file whole and hashing right, lineage acyclic, ledger sums
//! right) and every job is recorded whole or not at all; the library keeps working afterwards.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").canonicalize().unwrap()
}

fn command(root: &Path, args: &[&str]) -> Command {
    let mut c = support::kiln(root);
    c.args(args).current_dir(root);
    c
}

fn check(root: &Path) -> serde_json::Value {
    let o = command(root, &["assets", "check", "--json"]).output().unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

fn jobs(root: &Path) -> usize {
    let o = command(root, &["report", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["jobs"].as_u64().unwrap() as usize
}

#[test]
fn kill_9_at_several_points_of_each_recording_job_kind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let f = fixtures();
    std::fs::write(
        root.join("kiln.toml"),
        format!(
            "[tiers.draft]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 2\nlane = \"draft\"\n\
             [tiers.final]\nmodel = \"{0}\"\nwidth = 64\nheight = 64\nsteps = 6\n\
             [tiers.fill]\nmodel = \"{2}\"\nsteps = 6\n\
             [tiers.upscale]\nmodel = \"{1}\"\n",
            f.join("pipelines/sd1/model").display(),
            f.join("sr/srvgg-tiny-x4.safetensors").display(),
            f.join("inpaint/plain4/model").display(),
        ),
    )
    .unwrap();
    let o = command(root, &["draft", "base", "-n", "1", "--seed", "1", "-q", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (image, mask) = (f.join("inpaint/image.png"), f.join("inpaint/mask.png"));
    let (image, mask) = (image.to_str().unwrap(), mask.to_str().unwrap());
    let kinds: Vec<(&str, Vec<&str>)> = vec![
        (
            "generate",
            vec![
                "generate", "--tier", "final", "--prompt", "killed", "--count", "4", "--device", "cpu", "-q",
            ],
        ),
        (
            "inpaint",
            vec![
                "inpaint", image, "--mask", mask, "--tier", "fill", "--prompt", "killed", "--count", "3",
                "--device", "cpu", "-q",
            ],
        ),
        (
            "outpaint",
            vec![
                "outpaint", image, "--to", "16:9", "--tier", "fill", "--count", "3", "--device", "cpu", "-q",
            ],
        ),
        (
            "erase",
            vec!["erase", image, "--mask", mask, "--tier", "fill", "--count", "3", "--device", "cpu", "-q"],
        ),
        ("replay", vec!["replay", "1", "--device", "cpu", "-q"]),
        (
            "promote+upscale+redetail",
            vec![
                "promote",
                "1",
                "--upscale",
                "2",
                "--redetail",
                "--redetail-tile",
                "64",
                "--redetail-strength",
                "0.5",
                "--device",
                "cpu",
                "-q",
            ],
        ),
    ];
    let mut mid_job = 0;
    for (name, args) in &kinds {
        for delay_ms in [15u64, 60, 150, 400, 900] {
            let before = jobs(root);
            let mut child = command(root, args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_millis(delay_ms) && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
            let finished = child.try_wait().unwrap().is_some();
            child.kill().ok(); // SIGKILL on Unix
            child.wait().unwrap();
            let c = check(root);
            assert_eq!(c["consistent"], true, "{name} killed at {delay_ms} ms: {c}");
            mid_job += usize::from(!finished && jobs(root) == before);
        }
    }
    // The kills must have landed mid-job, or the test proves nothing.
    assert!(mid_job >= 4, "only {mid_job} kills landed before a job was recorded");
    let o = command(root, &["draft", "after", "-n", "1", "--seed", "2", "-q", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(check(root)["consistent"], true);
}
