//! The worker: takes queued jobs one at a time and runs them through the engine. A running
//! final yields to a waiting draft at its next step boundary: the draft runs inside the final's
//! step callback, while the final's latents and scheduler state wait untouched in memory, so the
//! final resumes to exactly the bytes it would have made uninterrupted.

use crate::state::AppState;
use kiln_core::jobs::queue::{Claim, Finish, Queue};
use kiln_core::jobs::spec::Lane;
use kiln_core::jobs::{EventSink, JobEvent, RunContext};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Send a preview every this many denoising steps.
const PREVIEW_EVERY: usize = 2;

/// Runs until the server shuts down; the job in progress finishes first.
pub fn run(state: Arc<AppState>) {
    let mut queue = match state.queue() {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("worker cannot open the queue: {e}");
            return;
        }
    };
    loop {
        if state.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        match queue.claim() {
            Ok(Some(claim)) => run_claim(&state, &mut queue, claim, true),
            Ok(None) => {
                let (lock, cv) = &state.wake;
                let mut woken = lock.lock().unwrap_or_else(|p| p.into_inner());
                if !*woken {
                    woken = cv
                        .wait_timeout(woken, Duration::from_millis(500))
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
}

/// Runs one claimed job to its end and records how it ended.
fn run_claim(state: &Arc<AppState>, queue: &mut Queue, claim: Claim, may_yield: bool) {
    let id = claim.id;
    tracing::info!(job = id, kind = claim.spec.kind().as_str(), owner = %claim.owner, lane = claim.lane.as_str(), "started");
    state.hub.publish(id, JobEvent::Started);
    let yields = may_yield && claim.lane == Lane::Final;
    let mut sink = WorkerSink {
        state: state.clone(),
        id,
        may_yield: yields,
        checks: state.queue().ok(),
        told_to_wait: Default::default(),
    };
    let ctx = RunContext { queue_claim: Some((id, claim.attempt)) };
    let result = state.engine.run(&claim.spec, &ctx, &mut sink);
    let root = state.engine.project.root.clone();
    match result {
        Ok(out) => {
            let mut value = serde_json::to_value(&out).unwrap_or_default();
            relativise_paths(&mut value, &root);
            if let Err(e) =
                queue.finish(id, claim.attempt, Finish::Done { result: &value, credits: out.credits })
            {
                tracing::error!(job = id, "recording the end failed: {e}");
            }
            tracing::info!(job = id, seconds = out.device_seconds, credits = out.credits, "done");
            state.hub.publish(id, JobEvent::Done { result: value });
        }
        Err(kiln_core::Error::Cancelled) => {
            let _ = queue.finish(id, claim.attempt, Finish::Cancelled);
            tracing::info!(job = id, "cancelled");
            state.hub.publish(id, JobEvent::Cancelled);
        }
        Err(e) => {
            let msg = e.to_string().replace(&format!("{}/", root.display()), "");
            let _ = queue.finish(id, claim.attempt, Finish::Failed(&msg));
            tracing::warn!(job = id, "failed: {msg}");
            state.hub.publish(id, JobEvent::Failed { error: msg });
        }
    }
}

/// Paths inside the project become relative to it (clients never see the server's folders).
fn relativise_paths(v: &mut serde_json::Value, root: &std::path::Path) {
    let prefix = format!("{}/", root.display());
    match v {
        serde_json::Value::String(s) if s.starts_with(&prefix) => *s = s[prefix.len()..].to_string(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| relativise_paths(x, root)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| relativise_paths(x, root)),
        _ => {}
    }
}

struct WorkerSink {
    state: Arc<AppState>,
    id: i64,
    may_yield: bool,
    /// A connection for cancel checks and preemption (the job's own writes use another).
    checks: Option<Queue>,
    /// Drafts already told why they wait.
    told_to_wait: std::collections::HashSet<i64>,
}

impl EventSink for WorkerSink {
    fn emit(&mut self, event: JobEvent) {
        self.state.hub.publish(self.id, event);
    }

    fn cancelled(&mut self) -> bool {
        self.checks.as_ref().is_some_and(|q| q.cancel_requested(self.id).unwrap_or(false))
    }

    fn preview_every(&self) -> usize {
        PREVIEW_EVERY
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
        let pool = &self.state.engine.pool;
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
                        self.state.hub.publish(id, JobEvent::Waiting { reason });
                    }
                }
                return;
            }
        }
        let mut resumed = false;
        while let Ok(Some(draft)) = queue.claim_in(Some(Lane::Draft)) {
            self.state.hub.publish(self.id, JobEvent::Yielded { to: draft.id });
            run_claim(&self.state, queue, draft, false);
            resumed = true;
        }
        if resumed {
            self.state.hub.publish(self.id, JobEvent::Resumed);
        }
    }
}
