//! What workers share through the database besides the queue: their advertisements and
//! heartbeats (`kiln workers`, `/v1/workers`, placement) and job events relayed to servers in
//! other processes. Image bytes for other boxes: [`crate::library::shared`].

use super::events::JobEvent;
use super::queue::Queue;
use crate::error::Result;
use crate::library::now_seconds as now;
use crate::vals;
use serde::Serialize;

/// A worker counts as down after this many heartbeat periods without one.
pub const DOWN_AFTER_MISSED: f64 = 3.0;

/// What a worker tells the others about itself (refreshed with every heartbeat).
#[derive(Debug, Clone, Default, Serialize, PartialEq, schemars::JsonSchema)]
pub struct WorkerAd {
    pub id: String,
    pub host: String,
    pub device: String,
    /// Tiers it runs; empty = every tier.
    pub tiers: Vec<String>,
    pub max_memory: Option<u64>,
    pub free_memory: Option<u64>,
    /// Model keys it holds loaded.
    pub warm_models: Vec<String>,
    /// Its heartbeat period: silent for [`DOWN_AFTER_MISSED`] periods, it is shown as down.
    pub heartbeat_seconds: f64,
}

/// A worker as `kiln workers` lists it: its advertisement and how it is doing.
#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
pub struct WorkerRow {
    #[serde(flatten)]
    pub ad: WorkerAd,
    /// idle | running | draining | stopped | down (no heartbeat for a while).
    pub state: String,
    pub current_job: Option<i64>,
    pub jobs_done: i64,
    pub started_at: f64,
    pub heartbeat_at: f64,
    /// Seconds since its last heartbeat.
    pub silent_seconds: f64,
}

fn to_i64(v: Option<u64>) -> Option<i64> {
    v.map(|b| i64::try_from(b).unwrap_or(i64::MAX))
}

impl Queue {
    /// Adds or refreshes `ad` with its state (`idle`, `running`, `draining`, `stopped`) and
    /// job, and stamps its heartbeat.
    pub fn heartbeat(&mut self, ad: &WorkerAd, state: &str, current_job: Option<i64>) -> Result<()> {
        let lib = self.library();
        let tiers = serde_json::to_string(&ad.tiers).unwrap_or_else(|_| "[]".into());
        let warm = serde_json::to_string(&ad.warm_models).unwrap_or_else(|_| "[]".into());
        // Heartbeats are stamped with the database's clock, as leases are.
        let sql = format!(
            "INSERT INTO workers (id, host, device, tiers, max_memory, free_memory, warm_models, state, \
             current_job, jobs_done, started_at, heartbeat_at, heartbeat_seconds) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, {now}, {now}, ?10) \
                 ON CONFLICT (id) DO UPDATE SET host = excluded.host, device = excluded.device, \
                 tiers = excluded.tiers, max_memory = excluded.max_memory, free_memory = excluded.free_memory, \
                 warm_models = excluded.warm_models, state = excluded.state, current_job = excluded.current_job, \
             heartbeat_at = excluded.heartbeat_at, heartbeat_seconds = excluded.heartbeat_seconds",
            now = lib.db.now_sql()
        );
        lib.db
            .execute(
                &sql,
                vals![
                    ad.id,
                    ad.host,
                    ad.device,
                    tiers,
                    to_i64(ad.max_memory),
                    to_i64(ad.free_memory),
                    warm,
                    state,
                    current_job,
                    ad.heartbeat_seconds
                ],
            )
            .map_err(|e| lib.err(e))?;
        Ok(())
    }

    /// Counts a finished job to worker `id`.
    pub fn count_job_done(&mut self, id: &str) -> Result<()> {
        let lib = self.library();
        lib.db
            .execute("UPDATE workers SET jobs_done = jobs_done + 1 WHERE id = ?1", vals![id])
            .map_err(|e| lib.err(e))?;
        Ok(())
    }

    /// Every worker that ever registered, most recent heartbeat first. One silent for more
    /// than [`DOWN_AFTER_MISSED`] of its heartbeat periods is shown as `down`.
    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        let lib = self.library();
        let parse = |s: String| serde_json::from_str::<Vec<String>>(&s).unwrap_or_default();
        lib.db
            .query_map(
                &format!(
                    "SELECT id, host, device, tiers, max_memory, free_memory, warm_models, state, current_job, \
                     jobs_done, started_at, heartbeat_at, heartbeat_seconds, {} FROM workers \
                     ORDER BY heartbeat_at DESC",
                    lib.db.now_sql()
                ),
                vals![],
                |r| {
                    let heartbeat_at: f64 = r.get(11)?;
                    let heartbeat_seconds: f64 = r.get(12)?;
                    let silent = (r.get::<f64>(13)? - heartbeat_at).max(0.0);
                    let mut state: String = r.get(7)?;
                    if state != "stopped" && silent > DOWN_AFTER_MISSED * heartbeat_seconds {
                        state = "down".into();
                    }
                    Ok(WorkerRow {
                        ad: WorkerAd {
                            id: r.get(0)?,
                            host: r.get(1)?,
                            device: r.get(2)?,
                            tiers: parse(r.get(3)?),
                            max_memory: r.get(4)?,
                            free_memory: r.get(5)?,
                            warm_models: parse(r.get(6)?),
                            heartbeat_seconds,
                        },
                        state,
                        current_job: r.get(8)?,
                        jobs_done: r.get(9)?,
                        started_at: r.get(10)?,
                        heartbeat_at,
                        silent_seconds: silent,
                    })
                },
            )
            .map_err(|e| lib.err(e))
    }

    /// Appends an event of job `job` for servers in other processes ([`Queue::events_after`]).
    pub fn push_event(&mut self, job: i64, event: &JobEvent) -> Result<()> {
        let lib = self.library();
        let json = serde_json::to_string(event).unwrap_or_default();
        lib.db
            .execute(
                "INSERT INTO job_events (job_id, event_json, created_at) VALUES (?1, ?2, ?3)",
                vals![job, json, now()],
            )
            .map_err(|e| lib.err(e))?;
        Ok(())
    }

    /// Events appended after event id `after`, oldest first: (event id, job id, event).
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<(i64, i64, JobEvent)>> {
        let lib = self.library();
        let rows: Vec<(i64, i64, String)> = lib
            .db
            .query_map(
                "SELECT id, job_id, event_json FROM job_events WHERE id > ?1 ORDER BY id LIMIT ?2",
                vals![after, limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| lib.err(e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, job, json)| serde_json::from_str(&json).ok().map(|e| (id, job, e)))
            .collect())
    }

    /// The newest event id (a relay starting now skips what came before).
    pub fn last_event_id(&self) -> Result<i64> {
        let lib = self.library();
        lib.db
            .query_row("SELECT COALESCE(MAX(id), 0) FROM job_events", vals![], |r| r.get(0))
            .map_err(|e| lib.err(e))
    }

    /// Drops relayed events older than `seconds`.
    pub fn prune_events(&mut self, seconds: f64) -> Result<u64> {
        let lib = self.library();
        lib.db
            .execute("DELETE FROM job_events WHERE created_at < ?1", vals![now() - seconds])
            .map_err(|e| lib.err(e))
    }
}
