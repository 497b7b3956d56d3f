//! Live job events for HTTP clients: every event a worker emits is kept per job (so a client
//! that subscribes late sees the whole story) and broadcast to the job's subscribers.

use kiln_core::jobs::JobEvent;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// How many finished jobs' event histories are kept in memory.
const KEEP_FINISHED: usize = 256;

struct Channel {
    history: Vec<JobEvent>,
    tx: broadcast::Sender<JobEvent>,
    finished: bool,
}

/// What the A1111 `/progress` route reports.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub job: Option<i64>,
    pub step: usize,
    pub steps: usize,
    pub preview: Option<String>,
}

/// Per-job event channels.
#[derive(Default)]
pub struct EventHub {
    channels: Mutex<HashMap<i64, Channel>>,
    finished_order: Mutex<Vec<i64>>,
    current: Mutex<Current>,
}

/// True for the events that end a job.
pub fn is_terminal(e: &JobEvent) -> bool {
    matches!(e, JobEvent::Done { .. } | JobEvent::Failed { .. } | JobEvent::Cancelled)
}

impl EventHub {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<i64, Channel>) -> R) -> R {
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Records and broadcasts `event` for `job`.
    pub fn publish(&self, job: i64, event: JobEvent) {
        let terminal = is_terminal(&event);
        {
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            match &event {
                JobEvent::Started => *cur = Current { job: Some(job), ..Default::default() },
                JobEvent::Step { step, steps, .. } if cur.job == Some(job) => {
                    cur.step = *step;
                    cur.steps = *steps;
                }
                JobEvent::Preview { png_base64, .. } if cur.job == Some(job) => {
                    cur.preview = Some(png_base64.clone())
                }
                e if is_terminal(e) && cur.job == Some(job) => *cur = Current::default(),
                _ => {}
            }
        }
        // Previews are big and only useful live: keep just the latest in the history.
        self.with(|map| {
            let ch = map.entry(job).or_insert_with(|| Channel {
                history: Vec::new(),
                tx: broadcast::channel(256).0,
                finished: false,
            });
            if matches!(event, JobEvent::Preview { .. }) {
                ch.history.retain(|e| !matches!(e, JobEvent::Preview { .. }));
            }
            // A worker can take the job before its submitter reports it queued: the story
            // still starts with `queued`.
            if matches!(event, JobEvent::Queued { .. }) && !ch.history.is_empty() {
                ch.history.insert(0, event);
                return;
            }
            ch.history.push(event.clone());
            ch.finished |= terminal;
            // No subscriber is fine: the history has it.
            let _ = ch.tx.send(event);
        });
        if terminal {
            let mut order = self.finished_order.lock().unwrap_or_else(|p| p.into_inner());
            order.push(job);
            if order.len() > KEEP_FINISHED {
                let old = order.remove(0);
                self.with(|map| map.remove(&old));
            }
        }
    }

    /// The events so far and a receiver for the rest (None when the hub never saw the job).
    pub fn subscribe(&self, job: i64) -> (Vec<JobEvent>, broadcast::Receiver<JobEvent>) {
        self.with(|map| {
            let ch = map.entry(job).or_insert_with(|| Channel {
                history: Vec::new(),
                tx: broadcast::channel(256).0,
                finished: false,
            });
            (ch.history.clone(), ch.tx.subscribe())
        })
    }

    pub fn current(&self) -> Current {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
