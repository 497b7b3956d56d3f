//! A queue worker: takes the jobs it can run from the project's queue (its tiers, its memory,
//! preferring models it holds), runs them through the [`Engine`], and records how each ended.
//! The same loop runs inside `kiln serve` and as `kiln worker` in another process or on
//! another box (then the queue is in PostgreSQL).
//!
//! - Leases: every claimed job carries a lease that a heartbeat thread renews; a worker that
//!   dies stops renewing, and the job goes back to the queue for another worker. A run whose
//!   lease was taken from it is cancelled at its next step; its record would be refused anyway
//!   (the library records a job only for the attempt that holds it), so a result is recorded
//!   once even when two workers race after an expiry.
//! - Preemption: a running final yields to a waiting draft at its next step boundary. The
//!   draft runs inside the final's step callback while the final's latents and scheduler state
//!   wait untouched in memory, so the final resumes to exactly the bytes it would have made.
//! - Draining: once [`Worker::stop`] is set, the job in progress finishes and no other starts.

use super::engine::Engine;
use super::events::{EventSink, JobEvent};
use super::queue::{Claim, Claimer, Finish, Queue};
use super::spec::Lane;
use super::workers::WorkerAd;
use crate::error::Result;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where a worker's job events go: the server's live hub, or the database for servers in
/// other processes.
pub trait Publish: Send + Sync {
    fn publish(&self, job: i64, event: JobEvent);
}

/// Publishes into the queue's event table ([`Queue::push_event`]); a server relays them.
pub struct DbPublish {
    queue: Mutex<Queue>,
}

impl DbPublish {
    pub fn new(queue: Queue) -> Self {
        Self { queue: Mutex::new(queue) }
    }
}

impl Publish for DbPublish {
    fn publish(&self, job: i64, event: JobEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = q.push_event(job, &event) {
            tracing::warn!(job, "an event was not relayed: {e}");
        }
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Who it is and what it runs (tiers, memory); free memory and warm models are filled in.
    pub ad: WorkerAd,
    /// How long a claimed job stays this worker's without a heartbeat.
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,
    /// How often an idle worker looks for work without being woken.
    pub poll: Duration,
    /// Send a preview every this many denoising steps.
    pub preview_every: usize,
    /// Whether finals yield to waiting drafts.
    pub preempt: bool,
    /// Whether it takes only jobs whose model fits its memory budget. A server's own worker
    /// takes any job (its pool loads a model larger than the budget alone, as one box always
    /// has); `kiln worker`s leave such jobs to workers that can hold them.
    pub place_by_memory: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            ad: WorkerAd::default(),
            lease_seconds: 30.0,
            heartbeat_seconds: 5.0,
            poll: Duration::from_millis(200),
            preview_every: 2,
            preempt: true,
            place_by_memory: true,
        }
    }
}

/// A queue worker (see the module docs).
pub struct Worker {
    pub engine: Arc<Engine>,
    publish: Arc<dyn Publish>,
    pub options: WorkerOptions,
    /// Set to drain: the running job finishes, no other starts.
    pub stop: Arc<AtomicBool>,
    /// Notified when a job is queued in this process (an idle worker claims at once).
    pub wake: Arc<(Mutex<bool>, Condvar)>,
    /// The runs it holds leases for (a final and the draft running inside it).
    held: Mutex<Vec<(i64, i64)>>,
    /// Jobs whose lease another worker took: they stop at their next step.
    lost: Mutex<HashSet<i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Worker {
    pub fn new(engine: Arc<Engine>, publish: Arc<dyn Publish>, options: WorkerOptions) -> Arc<Self> {
        Arc::new(Self {
            engine,
            publish,
            options,
            stop: Arc::new(AtomicBool::new(false)),
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            held: Mutex::new(Vec::new()),
            lost: Mutex::new(HashSet::new()),
        })
    }

    /// Wakes an idle worker (a job was queued).
    pub fn notify(&self) {
        let (flag, cv) = &*self.wake;
        *lock(flag) = true;
        cv.notify_all();
    }

    /// Asks the worker to drain and wakes it.
    pub fn drain(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Its advertisement now: free model memory and the models it holds.
    fn ad(&self) -> WorkerAd {
        let pool = &self.engine.pool;
        let mut ad = self.options.ad.clone();
        ad.max_memory = ad.max_memory.or(pool.budget());
        ad.free_memory = ad.max_memory.map(|b| b.saturating_sub(pool.held_bytes()));
        // As the queue names what a job needs ([`super::queue::model_key`]): `tier:NAME`
        // (pool keys also carry the model's path, which listings must not show).
        let mut warm: Vec<String> = pool
            .entries()
            .into_iter()
            .filter_map(|e| {
                e.model.strip_prefix("tier:").map(|rest| rest.split(':').next().unwrap_or(rest).to_string())
            })
            .map(|tier| format!("tier:{tier}"))
            .collect();
        warm.dedup();
        ad.warm_models = warm;
        ad.heartbeat_seconds = self.options.heartbeat_seconds;
        ad
    }

    fn claimer(&self) -> Claimer {
        let ad = self.ad();
        Claimer {
            id: ad.id,
            tiers: ad.tiers,
            max_memory: ad.max_memory.filter(|_| self.options.place_by_memory),
            warm_models: ad.warm_models,
            lease_seconds: self.options.lease_seconds,
        }
    }

    fn state_name(&self) -> &'static str {
        match (self.stop.load(Ordering::SeqCst), lock(&self.held).is_empty()) {
            (true, _) => "draining",
            (false, true) => "idle",
            (false, false) => "running",
        }
    }

    /// One heartbeat: the advertisement, and every held lease renewed.
    fn beat(&self, queue: &mut Queue) -> Result<()> {
        let held = lock(&self.held).clone();
        queue.heartbeat(&self.ad(), self.state_name(), held.last().map(|h| h.0))?;
        for (id, attempt) in held {
            if !queue.renew_lease(id, attempt, self.options.lease_seconds)? {
                tracing::warn!(job = id, "its lease was taken by another worker; stopping it");
                lock(&self.lost).insert(id);
            }
        }
        Ok(())
    }

    /// Runs until drained; the job in progress finishes first.
    pub fn run(self: &Arc<Self>) -> Result<()> {
        let mut queue = Queue::open(&self.engine.project)?;
        let mut beats = Queue::open(&self.engine.project)?;
        self.beat(&mut beats)?;
        let done = Arc::new(AtomicBool::new(false));
        let heart = {
            let me = self.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let period = Duration::from_secs_f64(me.options.heartbeat_seconds.max(0.05));
                loop {
                    // Short slices, so a drained worker exits promptly.
                    let since = std::time::Instant::now();
                    while since.elapsed() < period && !done.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if done.load(Ordering::SeqCst) {
                        return beats;
                    }
                    if let Err(e) = me.beat(&mut beats) {
                        tracing::warn!("heartbeat failed: {e}");
                    }
                }
            })
        };
        while !self.stop.load(Ordering::SeqCst) {
            match queue.claim_as(Some(&self.claimer()), None) {
                Ok(Some(claim)) => self.run_claim(&mut queue, claim, self.options.preempt),
                Ok(None) => {
                    let (flag, cv) = &*self.wake;
                    let mut woken = lock(flag);
                    if !*woken {
                        woken = cv
                            .wait_timeout(woken, self.options.poll)
                            .map(|r| r.0)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    *woken = false;
                }
                Err(e) => {
                    tracing::error!("claiming a job failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        done.store(true, Ordering::SeqCst);
        let mut beats = match heart.join() {
            Ok(q) => q,
            Err(_) => queue,
        };
        beats.heartbeat(&self.ad(), "stopped", None)?;
        Ok(())
    }

    /// Runs one claimed job to its end and records how it ended.
    fn run_claim(self: &Arc<Self>, queue: &mut Queue, claim: Claim, may_yield: bool) {
        let id = claim.id;
        let engine = &self.engine;
        tracing::info!(job = id, kind = claim.spec.kind().as_str(), owner = %claim.owner, lane = claim.lane.as_str(), "started");
        lock(&self.held).push((id, claim.attempt));
        // Listings show the job at once, not at the next heartbeat.
        let _ = queue.heartbeat(&self.ad(), self.state_name(), Some(id));
        self.publish.publish(id, JobEvent::Started);
        let mut sink = WorkerSink {
            worker: self.clone(),
            id,
            may_yield: may_yield && claim.lane == Lane::Final,
            checks: Queue::open(&engine.project).ok(),
            told_to_wait: HashSet::new(),
        };
        let ctx = super::RunContext { queue_claim: Some((id, claim.attempt)) };
        let result = engine.run(&claim.spec, &ctx, &mut sink);
        let root = engine.project.root.clone();
        match result {
            Ok(out) => {
                let mut value = serde_json::to_value(&out).unwrap_or_default();
                relativise_paths(&mut value, &root);
                self.share_outputs(queue, &out);
                if let Err(e) =
                    queue.finish(id, claim.attempt, Finish::Done { result: &value, credits: out.credits })
                {
                    tracing::error!(job = id, "recording the end failed: {e}");
                }
                let _ = queue.count_job_done(&self.options.ad.id);
                tracing::info!(job = id, seconds = out.device_seconds, credits = out.credits, "done");
                self.publish.publish(id, JobEvent::Done { result: value });
            }
            Err(e) => {
                let lost = lock(&self.lost).remove(&id);
                // Files this attempt wrote but could not record (cancelled, failed, or its
                // lease was taken) are removed: a failed run leaves nothing behind.
                let _ = queue.remove_unrecorded_files(&[(id, claim.attempt)]);
                if lost {
                    tracing::warn!(job = id, "stopped: another worker runs it now");
                } else if matches!(e, crate::Error::Cancelled) {
                    let _ = queue.finish(id, claim.attempt, Finish::Cancelled);
                    tracing::info!(job = id, "cancelled");
                    self.publish.publish(id, JobEvent::Cancelled);
                } else {
                    let msg = e.to_string().replace(&format!("{}/", root.display()), "");
                    let _ = queue.finish(id, claim.attempt, Finish::Failed(&msg));
                    tracing::warn!(job = id, "failed: {msg}");
                    self.publish.publish(id, JobEvent::Failed { error: msg });
                }
            }
        }
        lock(&self.held).retain(|h| h.0 != id);
        let current = lock(&self.held).last().map(|h| h.0);
        let _ = queue.heartbeat(&self.ad(), self.state_name(), current);
    }

    /// With a shared (PostgreSQL) library, the output images' bytes go into the database, so a
    /// server on another box can serve them.
    fn share_outputs(&self, queue: &mut Queue, out: &super::JobOutput) {
        for image in &out.images {
            let path = self.engine.project.root.join(&image.path);
            if let Err(e) = queue.library().share_file(&path) {
                tracing::warn!("{} not shared through the database: {e}", path.display());
            }
        }
    }
}

/// Paths inside the project become relative to it (clients never see the server's folders).
pub fn relativise_paths(v: &mut serde_json::Value, root: &std::path::Path) {
    let prefix = format!("{}/", root.display());
    match v {
        serde_json::Value::String(s) if s.starts_with(&prefix) => *s = s[prefix.len()..].to_string(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| relativise_paths(x, root)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| relativise_paths(x, root)),
        _ => {}
    }
}

struct WorkerSink {
    worker: Arc<Worker>,
    id: i64,
    may_yield: bool,
    /// A connection for cancel checks and preemption (the job's own writes use another).
    checks: Option<Queue>,
    /// Drafts already told why they wait.
    told_to_wait: HashSet<i64>,
}

impl EventSink for WorkerSink {
    fn emit(&mut self, event: JobEvent) {
        self.worker.publish.publish(self.id, event);
    }

    fn cancelled(&mut self) -> bool {
        lock(&self.worker.lost).contains(&self.id)
            || self.checks.as_ref().is_some_and(|q| q.cancel_requested(self.id).unwrap_or(false))
    }

    fn preview_every(&self) -> usize {
        self.worker.options.preview_every
    }

    fn yield_point(&mut self) {
        if !self.may_yield {
            return;
        }
        let Some(queue) = self.checks.as_mut() else { return };
        if !queue.has_waiting(Lane::Draft).unwrap_or(false) {
            return;
        }
        // Both models must fit: with a memory budget that the final's model already fills
        // half of, the draft waits for the final instead.
        let pool = &self.worker.engine.pool;
        if let Some(budget) = pool.budget() {
            if pool.held_bytes().saturating_mul(2) > budget {
                for id in queue.waiting(Lane::Draft).unwrap_or_default() {
                    if self.told_to_wait.insert(id) {
                        let reason = format!(
                            "job {} holds {} MB of the {} MB model budget (--max-memory); this draft runs when it ends",
                            self.id,
                            pool.held_bytes() / 1_000_000,
                            budget / 1_000_000
                        );
                        self.worker.publish.publish(id, JobEvent::Waiting { reason });
                    }
                }
                return;
            }
        }
        let mut resumed = false;
        let claimer = self.worker.claimer();
        while let Ok(Some(draft)) = queue.claim_as(Some(&claimer), Some(Lane::Draft)) {
            self.worker.publish.publish(self.id, JobEvent::Yielded { to: draft.id });
            self.worker.run_claim(queue, draft, false);
            resumed = true;
        }
        if resumed {
            self.worker.publish.publish(self.id, JobEvent::Resumed);
        }
    }
}
