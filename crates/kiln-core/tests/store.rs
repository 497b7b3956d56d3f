//! The queue and library behaviour suite, run on both database engines: the embedded SQLite
//! library and a real PostgreSQL server (KILN_TEST_POSTGRES names one; CI starts it and sets
//! KILN_REQUIRE_POSTGRES, so these cannot pass without running on PostgreSQL there). Each
//! PostgreSQL case gets a fresh database, dropped at the end.

#![allow(clippy::unwrap_used)]

use kiln_core::jobs::queue::{Claimer, Finish, JobState, Queue};
use kiln_core::jobs::spec::{JobSpec, Lane};
use kiln_core::jobs::JobEvent;
use kiln_core::library::assets::{AssetKind, JobTimings, NewAsset, NewJob, RecordKind};
use kiln_core::library::Project;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A project on one engine, with what to clean up.
struct Backend {
    name: &'static str,
    project: Project,
    _dir: tempfile::TempDir,
    drop_db: Option<(String, String)>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some((admin, db)) = self.drop_db.take() {
            if let Ok(mut c) = postgres::Client::connect(&admin, postgres::NoTls) {
                // Pooled connections of this process still hold the database: end them first.
                let _ = c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&db],
                );
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {db}"));
            }
        }
    }
}

static SCRATCH: AtomicUsize = AtomicUsize::new(0);

/// SQLite always; PostgreSQL when a server is configured.
fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let project = Project::open(dir.path()).unwrap().with_database(None).unwrap();
    out.push(Backend { name: "sqlite", project, _dir: dir, drop_db: None });
    match std::env::var(kiln_core::env::KILN_TEST_POSTGRES).ok().filter(|u| !u.is_empty()) {
        Some(admin) => {
            let db = format!("kiln_test_{}_{}", std::process::id(), SCRATCH.fetch_add(1, Ordering::SeqCst));
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                .unwrap_or_else(|e| panic!("KILN_TEST_POSTGRES={admin}: {e}"));
            c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
            let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
            let url = format!("{base}/{db}");
            let dir = tempfile::tempdir().unwrap();
            let project = Project::open(dir.path()).unwrap().with_database(Some(url)).unwrap();
            out.push(Backend { name: "postgres", project, _dir: dir, drop_db: Some((admin, db)) });
        }
        None if kiln_core::env::flag(kiln_core::env::KILN_REQUIRE_POSTGRES) => {
            panic!("KILN_REQUIRE_POSTGRES is set but KILN_TEST_POSTGRES names no server")
        }
        None => eprintln!("KILN_TEST_POSTGRES unset: the PostgreSQL half of this suite is skipped"),
    }
    out
}

fn spec(kind: &str, prompt: &str) -> JobSpec {
    let v = match kind {
        "draft" => serde_json::json!({ "kind": "draft", "prompt": prompt }),
        "promote" => serde_json::json!({ "kind": "promote", "draft": { "asset": 1 } }),
        _ => serde_json::json!({ "kind": "upscale", "image": { "asset": 1 } }),
    };
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn claimer(id: &str, lease: f64) -> Claimer {
    Claimer { id: id.into(), lease_seconds: lease, ..Default::default() }
}

/// A tiny PNG written into the project's assets, for records.
fn asset_file(project: &Project, name: &str) -> NewAsset {
    let dir = project.assets_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    image::RgbImage::from_pixel(4, 3, image::Rgb([name.len() as u8, 7, 9])).save(&path).unwrap();
    NewAsset {
        kind: AssetKind::Draft,
        tier: Some("draft".into()),
        path,
        parent_id: None,
        width: 4,
        height: 3,
        seed: Some(42),
        prompt: Some("p".into()),
        record: None,
        model_hashes: Vec::new(),
        credits: 0.5,
    }
}

fn new_job(credits: f64) -> NewJob {
    NewJob {
        kind: RecordKind::Draft,
        tier: Some("draft".into()),
        device: "cpu".into(),
        dtype: "f32".into(),
        model_id: "m".into(),
        images: 1,
        timings: JobTimings { load: 0.25, steps: vec![0.5], ..Default::default() },
        credits,
    }
}

#[test]
fn lanes_round_robin_cancel_and_finish_once() {
    for b in backends() {
        let mut q = Queue::open(&b.project).unwrap();
        let f1 = q.enqueue(&spec("promote", ""), "alice", Lane::Final, 0.0, None).unwrap();
        let a1 = q.enqueue(&spec("draft", "a1"), "alice", Lane::Draft, 0.0, None).unwrap();
        let a2 = q.enqueue(&spec("draft", "a2"), "alice", Lane::Draft, 0.0, None).unwrap();
        let b1 = q.enqueue(&spec("draft", "b1"), "bob", Lane::Draft, 0.0, None).unwrap();
        assert_eq!(q.get(a2).unwrap().position, Some(1), "{}", b.name);
        let order: Vec<i64> = (0..3).map(|_| q.claim().unwrap().unwrap().id).collect();
        // Drafts first; alice, then bob (not served yet), then alice again.
        assert_eq!(order, vec![a1, b1, a2], "{}", b.name);
        assert_eq!(q.cancel(f1).unwrap(), JobState::Cancelled, "{}", b.name);
        assert!(q.claim().unwrap().is_none(), "{}", b.name);
        // A finish for a stale attempt changes nothing.
        q.finish(a1, 7, Finish::Failed("stale")).unwrap();
        assert_eq!(q.get(a1).unwrap().state, JobState::Running, "{}", b.name);
        q.finish(a1, 1, Finish::Done { result: &serde_json::json!({ "ok": true }), credits: 0.5 }).unwrap();
        let done = q.get(a1).unwrap();
        assert_eq!((done.state, done.credits), (JobState::Done, Some(0.5)), "{}", b.name);
        assert_eq!(q.list(10).unwrap().len(), 4, "{}", b.name);
    }
}

#[test]
fn concurrent_budget_reservations_never_overspend() {
    for b in backends() {
        let accepted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut q = Queue::open(&b.project).unwrap();
                    for _ in 0..5 {
                        if q.enqueue(&spec("draft", "x"), "k", Lane::Draft, 1.0, Some(7.0)).is_ok() {
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 7, "{}", b.name);
    }
}

#[test]
fn concurrent_workers_claim_every_job_exactly_once() {
    for b in backends() {
        let mut q = Queue::open(&b.project).unwrap();
        for i in 0..40 {
            let lane = if i % 3 == 0 { Lane::Final } else { Lane::Draft };
            q.enqueue(
                &spec(if i % 3 == 0 { "promote" } else { "draft" }, "x"),
                &format!("k{}", i % 4),
                lane,
                0.0,
                None,
            )
            .unwrap();
        }
        let claimed: Vec<Vec<i64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|w| {
                    let project = &b.project;
                    s.spawn(move || {
                        let mut q = Queue::open(project).unwrap();
                        let me = claimer(&format!("w{w}"), 60.0);
                        let mut mine = Vec::new();
                        while let Some(c) = q.claim_as(Some(&me), None).unwrap() {
                            q.finish(
                                c.id,
                                c.attempt,
                                Finish::Done { result: &serde_json::json!({}), credits: 0.0 },
                            )
                            .unwrap();
                            mine.push(c.id);
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<i64> = claimed.concat();
        all.sort();
        assert_eq!(all, (1..=40).collect::<Vec<_>>(), "{}: {claimed:?}", b.name);
    }
}

#[test]
fn an_expired_lease_reruns_the_job_and_records_it_once() {
    for b in backends() {
        let mut q = Queue::open(&b.project).unwrap();
        let id = q.enqueue(&spec("draft", "x"), "k", Lane::Draft, 0.0, None).unwrap();
        let first = q.claim_as(Some(&claimer("dead", 0.3)), None).unwrap().unwrap();
        assert_eq!(first.attempt, 1);
        // The lease holds while it is renewed...
        assert!(q.renew_lease(id, 1, 0.3).unwrap(), "{}", b.name);
        assert!(q.claim_as(Some(&claimer("other", 30.0)), None).unwrap().is_none(), "{}", b.name);
        // ...and runs out when it is not: another worker takes the job.
        std::thread::sleep(std::time::Duration::from_millis(450));
        let second = q.claim_as(Some(&claimer("other", 30.0)), None).unwrap().unwrap();
        assert_eq!((second.id, second.attempt), (id, 2), "{}", b.name);
        assert!(!q.renew_lease(id, 1, 30.0).unwrap(), "{}: the dead worker's lease came back", b.name);
        // Both runs try to record: only the attempt holding the job succeeds.
        let mut late = b.project.library().unwrap();
        late.claim_for_queue(id, 1);
        let refused = late.record_job(&new_job(1.0), &[asset_file(&b.project, "q1a1-late.png")]);
        assert!(refused.unwrap_err().to_string().contains("no longer running"), "{}", b.name);
        let mut current = b.project.library().unwrap();
        current.claim_for_queue(id, 2);
        current.record_job(&new_job(1.0), &[asset_file(&b.project, "q1a2-ok.png")]).unwrap();
        q.finish(id, 2, Finish::Done { result: &serde_json::json!({}), credits: 1.0 }).unwrap();
        let lib = b.project.library().unwrap();
        assert_eq!(lib.jobs().unwrap().len(), 1, "{}", b.name);
        assert_eq!(lib.spent().unwrap(), 1.0, "{}", b.name);
        // The late run's file is an orphan, removed by the cleanup for its attempt only.
        assert_eq!(q.remove_unrecorded_files(&[(id, 1)]).unwrap(), 1, "{}", b.name);
        assert!(lib.orphans().unwrap().is_empty(), "{}", b.name);
    }
}

#[test]
fn placement_follows_tiers_memory_and_warm_models() {
    for b in backends() {
        let mut q = Queue::open(&b.project).unwrap();
        let big = q.enqueue_placed(&spec("promote", ""), "k", Lane::Final, 0.0, None, 20 << 30).unwrap();
        let up = q.enqueue(&spec("upscale", ""), "k", Lane::Final, 0.0, None).unwrap();
        let drafts_only = Claimer { tiers: vec!["draft".into()], ..claimer("d", 30.0) };
        assert!(q.claim_as(Some(&drafts_only), None).unwrap().is_none(), "{}", b.name);
        // Too little memory for the final: the small job is taken instead...
        let small = Claimer { max_memory: Some(8 << 30), ..claimer("s", 30.0) };
        assert_eq!(q.claim_as(Some(&small), None).unwrap().unwrap().id, up, "{}", b.name);
        assert!(q.claim_as(Some(&small), None).unwrap().is_none(), "{}", b.name);
        // ...and a worker with the memory takes the final.
        let large = Claimer { max_memory: Some(24 << 30), ..claimer("l", 30.0) };
        assert_eq!(q.claim_as(Some(&large), None).unwrap().unwrap().id, big, "{}", b.name);
        // Affinity: among equals, the job whose model the worker holds goes first.
        let cold = q.enqueue(&spec("promote", ""), "k2", Lane::Final, 0.0, None).unwrap();
        let warm = q.enqueue(&spec("upscale", ""), "k2", Lane::Final, 0.0, None).unwrap();
        let holder = Claimer { warm_models: vec!["tier:upscale".into()], ..claimer("h", 30.0) };
        assert_eq!(q.claim_as(Some(&holder), None).unwrap().unwrap().id, warm, "{}", b.name);
        assert_eq!(q.claim_as(Some(&holder), None).unwrap().unwrap().id, cold, "{}", b.name);
    }
}

#[test]
fn workers_events_and_blobs_are_shared() {
    for b in backends() {
        let mut q = Queue::open(&b.project).unwrap();
        let ad = kiln_core::jobs::workers::WorkerAd {
            id: "box1:cpu:1".into(),
            host: "box1".into(),
            device: "cpu".into(),
            tiers: vec!["draft".into()],
            max_memory: Some(1 << 30),
            free_memory: Some(1 << 29),
            warm_models: vec!["tier:draft".into()],
            heartbeat_seconds: 0.1,
        };
        q.heartbeat(&ad, "running", Some(3)).unwrap();
        q.count_job_done(&ad.id).unwrap();
        let listed = q.workers().unwrap();
        assert_eq!(listed.len(), 1, "{}", b.name);
        let w = &listed[0];
        assert_eq!((w.state.as_str(), w.current_job, w.jobs_done), ("running", Some(3), 1), "{}", b.name);
        assert!(w.silent_seconds < 0.3, "{}", b.name);
        assert_eq!(w.ad, ad, "{}", b.name);
        // Silent for longer than three heartbeats: shown as down.
        std::thread::sleep(std::time::Duration::from_millis(400));
        assert_eq!(q.workers().unwrap()[0].state, "down", "{}", b.name);

        let before = q.last_event_id().unwrap();
        q.push_event(9, &JobEvent::Step { step: 1, steps: 4, seconds: 0.5, first_image: 0, images: 1 })
            .unwrap();
        q.push_event(9, &JobEvent::Done { result: serde_json::json!({ "x": 1 }) }).unwrap();
        let events = q.events_after(before, 10).unwrap();
        assert_eq!(events.len(), 2, "{}", b.name);
        assert_eq!(events[1].1, 9);
        assert_eq!(events[1].2, JobEvent::Done { result: serde_json::json!({ "x": 1 }) }, "{}", b.name);

        let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let lib = q.library();
        lib.put_blob("abc", &bytes).unwrap();
        lib.put_blob("abc", &bytes).unwrap();
        assert_eq!(lib.blob("abc").unwrap().as_deref(), Some(&bytes[..]), "{}", b.name);
        assert_eq!(lib.blob("nope").unwrap(), None, "{}", b.name);
    }
}

#[test]
fn library_records_lineage_and_ledger_on_both_engines() {
    for b in backends() {
        let mut lib = b.project.library().unwrap();
        let (job, ids) = lib.record_job(&new_job(0.5), &[asset_file(&b.project, "a.png")]).unwrap();
        let mut child = asset_file(&b.project, "child.png");
        child.parent_id = Some(ids[0]);
        child.kind = AssetKind::Final;
        child.credits = 1.5;
        let params = [Some(serde_json::json!({ "scale": 4 }))];
        let (_, kids) = lib.record_job_with_params(&new_job(1.5), &[child], &params).unwrap();
        assert_eq!(lib.job(job).unwrap().unwrap().credits, 0.5, "{}", b.name);
        let lineage: Vec<i64> = lib.lineage(kids[0]).unwrap().iter().map(|a| a.id).collect();
        assert_eq!(lineage, vec![kids[0], ids[0]], "{}", b.name);
        assert_eq!(lib.children(ids[0]).unwrap().len(), 1, "{}", b.name);
        assert_eq!(lib.asset(kids[0]).unwrap().params, Some(serde_json::json!({ "scale": 4 })), "{}", b.name);
        assert_eq!(lib.spent().unwrap(), 2.0, "{}", b.name);
        assert_eq!(lib.seconds_per_image("draft").unwrap(), Some(0.75), "{}", b.name);
        let sha = lib.asset(ids[0]).unwrap().sha256;
        assert_eq!(lib.asset_by_sha256(&sha).unwrap().map(|a| a.id), Some(ids[0]), "{}", b.name);
        assert!(lib.check().unwrap().is_empty(), "{}: {:?}", b.name, lib.check());
        // Opening again applies no migration twice.
        drop(lib);
        assert_eq!(b.project.library().unwrap().jobs().unwrap().len(), 2, "{}", b.name);
    }
}
