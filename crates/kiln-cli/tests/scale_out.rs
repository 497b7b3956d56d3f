//! Scale-out on PostgreSQL, end to end with real processes: one `kiln serve` that runs no jobs
//! itself, three `kiln worker`s on one shared database, 40 mixed jobs (drafts, finals,
//! upscales) from three API keys. One worker is killed (-9) while it runs a job and another is
//! started; then the server is killed (-9) and restarted. Every job ends done exactly once,
//! the killed worker's job on another worker; the library and ledger are consistent and no
//! file is left unrecorded.
//!
//! Needs KILN_TEST_POSTGRES (CI starts a server and sets KILN_REQUIRE_POSTGRES, so this cannot
//! pass unrun there); skipped with a message otherwise.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::{kiln, Server};

/// A fresh database on the test server; dropped by [`Scratch`]'s Drop.
struct Scratch {
    admin: String,
    name: String,
    url: String,
}

impl Scratch {
    fn new() -> Option<Scratch> {
        let admin = match std::env::var(kiln_core::env::KILN_TEST_POSTGRES).ok().filter(|u| !u.is_empty()) {
            Some(a) => a,
            None if kiln_core::env::flag(kiln_core::env::KILN_REQUIRE_POSTGRES) => {
                panic!("KILN_REQUIRE_POSTGRES is set but KILN_TEST_POSTGRES names no server")
            }
            None => {
                eprintln!("KILN_TEST_POSTGRES unset: the scale-out test is skipped");
                return None;
            }
        };
        let name = format!("kiln_scale_{}", std::process::id());
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let url = format!("{base}/{name}");
        Some(Scratch { admin, name, url })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

fn project_on(root: &Path, url: &str) -> kiln_core::library::Project {
    kiln_core::library::Project::open(root).unwrap().with_database(Some(url.to_string())).unwrap()
}

fn worker(root: &Path, url: &str, name: &str) -> Child {
    kiln(root)
        .env(kiln_core::env::KILN_DATABASE_URL, url)
        .args([
            "worker",
            "--device",
            "cpu",
            "--name",
            name,
            "--lease-seconds",
            "3",
            "--heartbeat-seconds",
            "0.5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn add_key(root: &Path, url: &str, name: &str) -> String {
    let o =
        kiln(root).env(kiln_core::env::KILN_DATABASE_URL, url).args(["keys", "add", name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().last().unwrap().trim().to_string()
}

fn submit(server: &Server, key: &str, spec: Value) -> i64 {
    let r = server.post_json("/v1/jobs", Some(key), &spec);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_i64().unwrap()
}

fn workers(server: &Server, key: &str) -> Vec<Value> {
    server.get("/v1/workers", Some(key)).json()["workers"].as_array().unwrap().clone()
}

#[test]
fn three_workers_a_kill_9_of_one_and_of_the_server_lose_nothing() {
    let Some(db) = Scratch::new() else { return };
    let sr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sr/srvgg-tiny-x4.safetensors");
    // Finals of 200 steps (a second or two each), so a worker can be caught running one.
    let dir = support::project(
        200,
        &format!("[tiers.upscale]\nmodel = \"{}\"\n", sr.canonicalize().unwrap().display()),
    );
    let root = dir.path();
    let alice = add_key(root, &db.url, "alice");
    let bob = add_key(root, &db.url, "bob");
    let carol = add_key(root, &db.url, "carol");
    let url = db.url.as_str();
    let start_server = || {
        let mut c = kiln(root);
        c.env(kiln_core::env::KILN_DATABASE_URL, url);
        Server::start_with(c, &["--no-worker"])
    };
    let mut server = start_server();
    let mut workers_running: BTreeMap<String, Child> =
        ["w1", "w2", "w3"].iter().map(|n| (n.to_string(), worker(root, url, n))).collect();

    // A draft to upscale, then 40 jobs: 24 drafts, 10 finals, 6 upscales, from two keys.
    let seed_job =
        submit(&server, &alice, json!({ "kind": "draft", "prompt": "base", "count": 1, "seed": 1 }));
    let done = server.wait(seed_job, Some(&alice));
    assert_eq!(done["state"], "done", "{done}");
    let source = done["result"]["images"][0]["asset_id"].as_i64().unwrap();
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let key = [&alice, &bob, &carol][i as usize % 3];
        let spec = match i % 20 {
            0..=11 => json!({ "kind": "draft", "prompt": format!("d{i}"), "count": 1, "seed": i }),
            12..=16 => json!({ "kind": "generate", "tier": "final", "prompt": format!("f{i}"), "seed": i }),
            _ => json!({ "kind": "upscale", "image": { "asset": source } }),
        };
        ids.push(submit(&server, key, spec));
    }

    // kill -9 a worker while it runs a final; start another.
    let t0 = Instant::now();
    let victim = loop {
        let busy = workers(&server, &alice).into_iter().find_map(|w| {
            let (name, job) = (w["id"].as_str()?.to_string(), w["current_job"].as_i64()?);
            let row = server.get(&format!("/v1/jobs/{job}"), Some(&alice)).json();
            let running_final = row["state"] == "running" && row["tier"] == "final";
            (workers_running.contains_key(&name) && running_final).then_some((name, job))
        });
        if let Some(v) = busy {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no worker ever ran a final: {}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut killed = workers_running.remove(&victim.0).unwrap();
    killed.kill().unwrap();
    let _ = killed.wait();
    // The replacement runs on "another box": its own project folder, same kiln.toml, nothing
    // shared with the others but the database.
    let box2 = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("kiln.toml"), box2.path().join("kiln.toml")).unwrap();
    workers_running.insert("w4".into(), worker(box2.path(), url, "w4"));

    // kill -9 the server with jobs still queued; clients reconnect to its successor.
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    let server = start_server();

    let t0 = Instant::now();
    for &id in &ids {
        let job = server.wait(id, Some(&alice));
        assert_eq!(job["state"], "done", "job {id}: {job}\n{}", server.log());
        assert!(t0.elapsed() < Duration::from_secs(600));
    }
    // The killed worker's job ran again elsewhere: a second attempt, recorded once.
    let rerun = server.get(&format!("/v1/jobs/{}", victim.1), Some(&alice)).json();
    assert_eq!(rerun["state"], "done", "{rerun}");
    assert!(rerun["attempts"].as_i64().unwrap() >= 2, "{rerun}");

    // Exactly once: one library job per queue job, each its own.
    let library_jobs: BTreeSet<i64> = ids
        .iter()
        .chain(std::iter::once(&seed_job))
        .map(|id| {
            server.get(&format!("/v1/jobs/{id}"), Some(&alice)).json()["library_job_id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(library_jobs.len(), 41);
    let library = project_on(root, &db.url).library().unwrap();
    assert_eq!(library.jobs().unwrap().len(), 41, "a job was recorded twice or lost");
    // Assets only the other box has (before anything here fetches them).
    let made_on_box2: Vec<i64> = library
        .list_assets(&Default::default())
        .unwrap()
        .into_iter()
        .filter(|a| box2.path().join(&a.path).is_file() && !root.join(&a.path).is_file())
        .map(|a| a.id)
        .collect();
    // Consistent: files whole and hashing right, lineage acyclic, the ledger equal to the
    // per-job timings and prices; nothing on disk that the library does not record.
    let problems = library.check().unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(library.orphans().unwrap().is_empty(), "{:?}", library.orphans().unwrap());
    // Images made only on the other box are served by the server all the same (from the
    // database); that box fetched the drafts it upscaled, and keeps no stray file either.
    assert!(!made_on_box2.is_empty(), "the second box ran no job");
    for id in &made_on_box2 {
        let r = server.get(&format!("/v1/assets/{id}/image"), Some(&alice));
        assert_eq!(r.status, 200, "asset {id}: {}", r.text());
        assert!(image::load_from_memory(&r.bytes).is_ok());
    }
    let box2_library = project_on(box2.path(), &db.url).library().unwrap();
    assert!(box2_library.orphans().unwrap().is_empty(), "{:?}", box2_library.orphans().unwrap());
    // The workers that ran are listed with their counts; the killed one shows as down.
    std::thread::sleep(Duration::from_secs(2));
    let listed = workers(&server, &alice);
    let state = |name: &str| {
        listed.iter().find(|w| w["id"] == name).map(|w| w["state"].as_str().unwrap().to_string()).unwrap()
    };
    assert_eq!(state(&victim.0), "down", "{listed:?}");
    let done_total: i64 = listed.iter().map(|w| w["jobs_done"].as_i64().unwrap_or(0)).sum();
    assert!(done_total >= 41, "{listed:?}");
    // SIGTERM drains: each worker exits 0 and is listed as stopped.
    for (name, mut w) in workers_running {
        let status = support::terminate(&mut w);
        assert!(status.success(), "{name}: {status:?}");
        let listed = workers(&server, &alice);
        let row = listed.iter().find(|w| w["id"] == name.as_str()).unwrap();
        assert_eq!(row["state"], "stopped", "{row}");
    }
}
