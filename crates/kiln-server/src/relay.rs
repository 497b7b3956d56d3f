//! The server's side of the queue workers: its own in-process worker publishes straight into
//! the live hub, and a relay thread carries what workers in other processes (`kiln worker`,
//! here or on other boxes) write to the database — their job events — into the same hub, so
//! every SSE client sees every job, whoever runs it. The relay also returns the jobs of
//! workers that stopped heartbeating to the queue, even when no worker is claiming.

use crate::hub::EventHub;
use crate::state::AppState;
use kiln_core::jobs::worker::Publish;
use kiln_core::jobs::JobEvent;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the relay reads new events (a remote step reaches SSE clients within this).
const POLL: Duration = Duration::from_millis(50);
/// How often the relay reaps expired leases and prunes old events.
const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// Relayed events are kept this long (a client reconnecting later reads the job's record).
const KEEP_EVENTS_SECONDS: f64 = 3600.0;

impl Publish for EventHub {
    fn publish(&self, job: i64, event: JobEvent) {
        EventHub::publish(self, job, event);
    }
}

/// Runs until the server shuts down.
pub fn run(state: Arc<AppState>) {
    let mut queue = match state.queue() {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("the event relay cannot open the queue: {e:?}");
            return;
        }
    };
    // Events from before this server started belong to jobs it has no clients for.
    let mut last = queue.last_event_id().unwrap_or(0);
    let mut housekeeping = Instant::now();
    while !state.shutting_down.load(Ordering::SeqCst) {
        match queue.events_after(last, 500) {
            Ok(events) => {
                for (id, job, event) in events {
                    last = id;
                    state.hub.publish(job, event);
                }
            }
            Err(e) => tracing::warn!("reading relayed events failed: {e}"),
        }
        if housekeeping.elapsed() >= HOUSEKEEPING {
            housekeeping = Instant::now();
            match queue.reap_expired() {
                Ok(runs) if !runs.is_empty() => {
                    let ids: Vec<i64> = runs.iter().map(|r| r.0).collect();
                    tracing::warn!(jobs = ?ids, "leases ran out (their worker stopped heartbeating): queued again");
                    let _ = queue.remove_unrecorded_files(&runs);
                    state.notify_worker();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reaping expired leases failed: {e}"),
            }
            let _ = queue.prune_events(KEEP_EVENTS_SECONDS);
        }
        std::thread::sleep(POLL);
    }
}
