//! The layout cache from the CLI: two processes loading the same model at once both succeed and
//! publish one cache file per component; `kiln cache list|prune` show and bound it.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use support::{fixture_model, kiln};

fn generate(project: &Path, out: &str) -> std::process::Child {
    kiln(project)
        .args(["generate", "--model"])
        .arg(fixture_model())
        .args(["--prompt", "a lighthouse", "--steps", "2", "--seed", "5", "--device", "cpu", "-q", "--out"])
        .arg(project.join(out))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn cache_files(project: &Path) -> Vec<String> {
    let dir = project.join(".data/layout-cache");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn list(project: &Path) -> serde_json::Value {
    let o = kiln(project).args(["cache", "list", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn two_processes_loading_at_once_share_one_cache_file_per_component() {
    let project = tempfile::tempdir().unwrap();
    let p = project.path();
    let (a, b) = (generate(p, "a.png"), generate(p, "b.png"));
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let files = cache_files(p);
    assert_eq!(files.len(), 3, "one file per component, no leftovers: {files:?}");
    assert!(files.iter().all(|f| f.ends_with(".kiln-layout")), "{files:?}");
    let (a, b) = (std::fs::read(p.join("a.png")).unwrap(), std::fs::read(p.join("b.png")).unwrap());
    assert_eq!(a, b);

    // A third process maps the files and makes the same image.
    let o = generate(p, "c.png").wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(std::fs::read(p.join("c.png")).unwrap(), a);
    assert_eq!(cache_files(p), files);

    let listed = list(p);
    let components: Vec<&str> =
        listed["files"].as_array().unwrap().iter().map(|f| f["component"].as_str().unwrap()).collect();
    assert_eq!(components.len(), 3, "{listed}");
    for c in ["text_encoder", "unet", "vae"] {
        assert!(components.contains(&c), "{listed}");
    }

    let o = kiln(p).args(["cache", "prune", "--max-size", "nonsense"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a size"));
    let o = kiln(p).args(["cache", "prune", "--all", "--json"]).output().unwrap();
    assert!(o.status.success());
    let removed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(removed["removed"].as_array().unwrap().len(), 3);
    assert!(cache_files(p).is_empty());

    // With the cache off nothing is written, and the image is the same.
    let o = kiln(p)
        .env("KILN_LAYOUT_CACHE", "off")
        .args(["generate", "--model"])
        .arg(fixture_model())
        .args(["--prompt", "a lighthouse", "--steps", "2", "--seed", "5", "--device", "cpu", "-q", "--out"])
        .arg(p.join("d.png"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(std::fs::read(p.join("d.png")).unwrap(), a);
    assert!(cache_files(p).is_empty());
}
