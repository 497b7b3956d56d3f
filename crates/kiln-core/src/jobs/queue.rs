//! The durable job queue, a table of the project library (SQLite, WAL): queued → running →
//! done / failed / cancelled, with the full spec, owner (API key name), lane and timestamps.
//!
//! - Scheduling: the draft lane before the final lane; within a lane, round-robin between
//!   owners (the owner served least recently goes next), each owner's jobs oldest first.
//! - Budget: a job's estimated credits are reserved inside the enqueue transaction (spent +
//!   reserved + estimate ≤ limit), so concurrent requests cannot overspend.
//! - Exactly once: a claim increments the row's attempt; the library records a job only while
//!   its row is still running that attempt ([`crate::library::Library::claim_for_queue`]).
//! - Crash recovery ([`Queue::recover`]): a row left running is re-queued (its unrecorded files
//!   removed), or marked done when its library record was already committed.

use super::spec::{JobSpec, Lane};
use crate::error::{Error, Result};
use crate::library::now_seconds as now;
use crate::library::{Library, Project};
use crate::store::{DbResult, Row, Value};
use crate::vals;
use serde::Serialize;

/// A job's state in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Failed,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// One queue row as clients see it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct QueuedJob {
    pub id: i64,
    pub kind: String,
    pub lane: Lane,
    pub owner: String,
    pub tier: Option<String>,
    pub state: JobState,
    /// Jobs that run before it (queued jobs only).
    pub position: Option<usize>,
    pub spec: serde_json::Value,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub attempts: i64,
    pub reserved_credits: f64,
    pub credits: Option<f64>,
    pub library_job_id: Option<i64>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// A claimed job: run it, then [`Queue::finish`] it with the same attempt.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: i64,
    pub attempt: i64,
    pub lane: Lane,
    pub owner: String,
    pub spec: JobSpec,
}

/// How a run ended.
pub enum Finish<'a> {
    Done { result: &'a serde_json::Value, credits: f64 },
    Failed(&'a str),
    Cancelled,
}

/// What [`Queue::recover`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Recovery {
    pub requeued: Vec<i64>,
    pub completed: Vec<i64>,
    pub removed_files: usize,
}

/// The queue over the project library.
pub struct Queue {
    lib: Library,
}

const COLUMNS: &str = "id, kind, lane, owner, tier, state, spec_json, created_at, started_at, finished_at, \
                       attempts, reserved_credits, credits, library_job_id, result_json, error";

fn row_to_job(r: &Row) -> DbResult<QueuedJob> {
    let spec: String = r.get(6)?;
    let result: Option<String> = r.get(14)?;
    Ok(QueuedJob {
        id: r.get(0)?,
        kind: r.get(1)?,
        lane: Lane::from_index(r.get(2)?),
        owner: r.get(3)?,
        tier: r.get(4)?,
        state: JobState::parse(&r.get::<String>(5)?),
        position: None,
        spec: serde_json::from_str(&spec).unwrap_or(serde_json::Value::Null),
        created_at: r.get(7)?,
        started_at: r.get(8)?,
        finished_at: r.get(9)?,
        attempts: r.get(10)?,
        reserved_credits: r.get(11)?,
        credits: r.get(12)?,
        library_job_id: r.get(13)?,
        result: result.and_then(|s| serde_json::from_str(&s).ok()),
        error: r.get(15)?,
    })
}

impl Queue {
    /// Opens the queue of `project` (its library, created on first use).
    pub fn open(project: &Project) -> Result<Self> {
        Ok(Self { lib: project.library()? })
    }

    fn err(&self, e: crate::store::DbError) -> Error {
        self.lib.err(e)
    }

    /// Adds a job. With a budget, `estimate` credits are reserved in the same transaction that
    /// checks spent + reserved + estimate against the limit.
    pub fn enqueue(
        &mut self,
        spec: &JobSpec,
        owner: &str,
        lane: Lane,
        estimate: f64,
        budget_limit: Option<f64>,
    ) -> Result<i64> {
        self.enqueue_placed(spec, owner, lane, estimate, budget_limit, 0)
    }

    /// [`Queue::enqueue`], with the memory the job's model needs (`need_bytes`, 0 = unknown):
    /// only a worker that can hold it takes the job.
    pub fn enqueue_placed(
        &mut self,
        spec: &JobSpec,
        owner: &str,
        lane: Lane,
        estimate: f64,
        budget_limit: Option<f64>,
        need_bytes: u64,
    ) -> Result<i64> {
        let json = serde_json::to_string(spec).map_err(|e| Error::arg("spec", e.to_string()))?;
        let err = |e| crate::library::library_error(&self.lib.path, e);
        let tx = self.lib.db.begin_serialised("kiln-budget").map_err(err)?;
        if let Some(limit) = budget_limit {
            let spent: f64 = tx
                .query_row("SELECT COALESCE(SUM(credits), 0) FROM jobs", vals![], |r| r.get(0))
                .map_err(err)?;
            let reserved: f64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(reserved_credits), 0) FROM queue WHERE state IN ('queued', 'running')",
                    vals![],
                    |r| r.get(0),
                )
                .map_err(err)?;
            if spent + reserved + estimate > limit + 1e-9 {
                return Err(Error::Budget(format!(
                    "this job needs about {estimate:.4} credits; {spent:.4} are spent and {reserved:.4} reserved by \
                     queued jobs, of a {limit:.4} limit (raise [budget] limit in kiln.toml or wait for the queue)"
                )));
            }
        }
        let need = i64::try_from(need_bytes).unwrap_or(i64::MAX);
        let id = tx
            .insert_id(
                "INSERT INTO queue (kind, lane, owner, tier, spec_json, state, reserved_credits, created_at, \
                 model_key, need_bytes) VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?9) RETURNING id",
                vals![spec.kind().as_str(), lane as i64, owner, spec.tier(), json, estimate, now(), model_key(spec), need],
            )
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// Takes the next job: the best lane with waiting jobs, the owner served least recently in
    /// it, that owner's oldest job. None when nothing waits.
    pub fn claim(&mut self) -> Result<Option<Claim>> {
        self.claim_as(None, None)
    }

    /// [`Queue::claim`] limited to one lane (a paused final lets only drafts run).
    pub fn claim_in(&mut self, only: Option<Lane>) -> Result<Option<Claim>> {
        self.claim_as(None, only)
    }

    /// Takes the next job `worker` can run (its tiers, its memory), preferring one whose model
    /// it already holds; the job's lease runs `worker.lease_seconds` from now and is renewed by
    /// [`Queue::heartbeat`]. Expired leases are returned to the queue first. Without a worker,
    /// any job is taken, unleased (the server's own in-process worker before leases).
    pub fn claim_as(&mut self, worker: Option<&Claimer>, only: Option<Lane>) -> Result<Option<Claim>> {
        let reaped = self.reap_expired()?;
        if !reaped.is_empty() {
            // The dead runs' files on this box (the same project folder); other boxes clean
            // theirs when their reaper or restarted worker sees them.
            self.remove_unrecorded_files(&reaped)?;
        }
        let err = |e| crate::library::library_error(&self.lib.path, e);
        let tx = self.lib.db.begin_serialised("kiln-claim").map_err(err)?;
        // What this worker can take: its tiers (none listed = all), and finals only where the
        // model fits its memory.
        let mut filter = String::from("q.state = 'queued'");
        let mut params: Vec<Value> = Vec::new();
        if let Some(l) = only {
            params.push(Value::Int(l as i64));
            filter.push_str(&format!(" AND q.lane = ?{}", params.len()));
        }
        let mut affinity = String::new();
        if let Some(w) = worker {
            if !w.tiers.is_empty() {
                let mut alts = Vec::new();
                for t in &w.tiers {
                    params.push(Value::Text(t.clone()));
                    alts.push(format!("?{}", params.len()));
                }
                filter.push_str(&format!(" AND q.tier IN ({})", alts.join(", ")));
            }
            if let Some(max) = w.max_memory {
                params.push(Value::Int(i64::try_from(max).unwrap_or(i64::MAX)));
                filter.push_str(&format!(" AND q.need_bytes <= ?{}", params.len()));
            }
            if !w.warm_models.is_empty() {
                let mut alts = Vec::new();
                for m in &w.warm_models {
                    params.push(Value::Text(m.clone()));
                    alts.push(format!("?{}", params.len()));
                }
                affinity = format!("CASE WHEN q.model_key IN ({}) THEN 0 ELSE 1 END, ", alts.join(", "));
            }
        }
        // Lane first (drafts before finals, across every worker); then, within the lane, the
        // owner served least recently (never served = first); then a job whose model this
        // worker holds; then age.
        let sql = format!(
            "SELECT q.id, q.owner, q.spec_json, q.attempts, q.lane FROM queue q WHERE {filter} \
             ORDER BY q.lane, \
                      (SELECT MAX(started_at) FROM queue s WHERE s.owner = q.owner AND s.lane = q.lane) IS NOT NULL, \
                      (SELECT MAX(started_at) FROM queue s WHERE s.owner = q.owner AND s.lane = q.lane), \
                      {affinity}q.id \
             LIMIT 1{}",
            tx.skip_locked()
        );
        let picked: Option<(i64, String, String, i64, i64)> = tx
            .query_opt(&sql, &params, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .map_err(err)?;
        let Some((id, owner, spec_json, attempts, lane)) = picked else { return Ok(None) };
        let attempt = attempts + 1;
        // The lease ends `lease_seconds` from now on the database's clock (NULL: unleased).
        let (worker_id, lease_seconds) = match worker {
            Some(w) => (Some(w.id.clone()), Some(w.lease_seconds)),
            None => (None, None),
        };
        let sql = format!(
            "UPDATE queue SET state = 'running', started_at = ?1, attempts = ?2, worker = ?3, \
             lease_until = {} + ?4 WHERE id = ?5",
            tx.now_sql()
        );
        tx.execute(&sql, vals![now(), attempt, worker_id, lease_seconds, id]).map_err(err)?;
        tx.commit().map_err(err)?;
        let spec: JobSpec = match serde_json::from_str(&spec_json) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("stored spec no longer parses: {e}");
                self.finish(id, attempt, Finish::Failed(&msg))?;
                return Err(Error::Library {
                    path: self.lib.path.clone(),
                    msg: format!("queue job {id}: {msg}"),
                });
            }
        };
        Ok(Some(Claim { id, attempt, lane: Lane::from_index(lane), owner, spec }))
    }

    /// Extends the lease of the running job `id` (attempt `attempt`) to `seconds` from now.
    /// False when the job is no longer this attempt's: its lease ran out and it was given to
    /// another worker, so this run's result will not be recorded.
    pub fn renew_lease(&mut self, id: i64, attempt: i64, seconds: f64) -> Result<bool> {
        let n = self
            .lib
            .db
            .execute(
                &format!(
                    "UPDATE queue SET lease_until = {} + ?1 WHERE id = ?2 AND attempts = ?3 AND state = 'running'",
                    self.lib.db.now_sql()
                ),
                vals![seconds, id, attempt],
            )
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    /// Running jobs whose lease ran out (their worker died or lost the database) go back to
    /// the queue, or are marked done when their library record was already committed.
    pub fn reap_expired(&mut self) -> Result<Vec<(i64, i64)>> {
        let expired: Vec<(i64, Option<i64>, i64)> = self
            .lib
            .db
            .query_map(
                &format!(
                    "SELECT id, library_job_id, attempts FROM queue WHERE state = 'running' \
                     AND lease_until IS NOT NULL AND lease_until < {}",
                    self.lib.db.now_sql()
                ),
                vals![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| self.err(e))?;
        let mut requeued = Vec::new();
        for (id, library_job, attempt) in expired {
            if self.settle_running(id, attempt, library_job)? {
                requeued.push((id, attempt));
            }
        }
        Ok(requeued)
    }

    /// Ends a running row whose worker is gone: done when it was recorded, else queued again.
    /// Guarded by the attempt, so two reapers (or a reaper and a late finish) act once.
    /// True when the job went back to the queue.
    fn settle_running(&mut self, id: i64, attempt: i64, library_job: Option<i64>) -> Result<bool> {
        match library_job {
            Some(job) => {
                let result = serde_json::json!({ "recovered": true, "library_job_id": job });
                self.lib
                    .db
                    .execute(
                        "UPDATE queue SET state = 'done', result_json = ?1, finished_at = ?2, reserved_credits = 0, \
                         lease_until = NULL WHERE id = ?3 AND attempts = ?4 AND state = 'running'",
                        vals![result.to_string(), now(), id, attempt],
                    )
                    .map_err(|e| self.err(e))?;
                Ok(false)
            }
            None => {
                let n = self
                    .lib
                    .db
                    .execute(
                        "UPDATE queue SET state = 'queued', started_at = NULL, worker = NULL, lease_until = NULL \
                         WHERE id = ?1 AND attempts = ?2 AND state = 'running'",
                        vals![id, attempt],
                    )
                    .map_err(|e| self.err(e))?;
                Ok(n == 1)
            }
        }
    }

    /// Whether a job waits in `lane`.
    pub fn has_waiting(&self, lane: Lane) -> Result<bool> {
        self.lib
            .db
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM queue WHERE state = 'queued' AND lane = ?1)",
                vals![lane as i64],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// The ids of the jobs waiting in `lane`, oldest first.
    pub fn waiting(&self, lane: Lane) -> Result<Vec<i64>> {
        self.lib
            .db
            .query_map(
                "SELECT id FROM queue WHERE state = 'queued' AND lane = ?1 ORDER BY id",
                vals![lane as i64],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Ends a run. Ignored when the row is no longer that attempt's (it was recovered meanwhile).
    pub fn finish(&mut self, id: i64, attempt: i64, how: Finish) -> Result<()> {
        let (state, result, credits, error) = match how {
            Finish::Done { result, credits } => ("done", Some(result.to_string()), Some(credits), None),
            Finish::Failed(msg) => ("failed", None, None, Some(msg.to_string())),
            Finish::Cancelled => ("cancelled", None, None, None),
        };
        self.lib
            .db
            .execute(
                "UPDATE queue SET state = ?1, result_json = ?2, credits = ?3, error = ?4, finished_at = ?5, \
                 reserved_credits = 0, lease_until = NULL WHERE id = ?6 AND attempts = ?7 AND state = 'running'",
                vals![state, result, credits, error, now(), id, attempt],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Asks a job to stop: a queued job is cancelled at once, a running one at its next step.
    /// Returns the job's state after the request.
    pub fn cancel(&mut self, id: i64) -> Result<JobState> {
        let changed = self
            .lib
            .db
            .execute(
                "UPDATE queue SET state = 'cancelled', finished_at = ?1, reserved_credits = 0 \
                 WHERE id = ?2 AND state = 'queued'",
                vals![now(), id],
            )
            .map_err(|e| self.err(e))?;
        if changed == 0 {
            self.lib
                .db
                .execute(
                    "UPDATE queue SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'",
                    vals![id],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(self.get(id)?.state)
    }

    /// Whether a cancel was asked for the running job.
    pub fn cancel_requested(&self, id: i64) -> Result<bool> {
        self.lib
            .db
            .query_opt("SELECT cancel_requested FROM queue WHERE id = ?1", vals![id], |r| r.get::<i64>(0))
            .map(|v| v.unwrap_or(0) != 0)
            .map_err(|e| self.err(e))
    }

    /// One job, with its position when queued.
    pub fn get(&self, id: i64) -> Result<QueuedJob> {
        let mut job = self
            .lib
            .db
            .query_opt(&format!("SELECT {COLUMNS} FROM queue WHERE id = ?1"), vals![id], row_to_job)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| Error::UnknownId { what: "job".into(), id: id.to_string() })?;
        if job.state == JobState::Queued {
            job.position = Some(self.position(&job)?);
        }
        Ok(job)
    }

    /// Queued jobs that run before `job` (lane first, then age; round-robin may reorder owners).
    fn position(&self, job: &QueuedJob) -> Result<usize> {
        self.lib
            .db
            .query_row(
                "SELECT COUNT(*) FROM queue WHERE state = 'queued' AND (lane < ?1 OR (lane = ?1 AND id < ?2))",
                vals![job.lane as i64, job.id],
                |r| r.get::<i64>(0),
            )
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    /// Running and queued jobs, then the most recent finished ones (at most `limit` in all).
    pub fn list(&self, limit: usize) -> Result<Vec<QueuedJob>> {
        let rows = self
            .lib
            .db
            .query_map(
                &format!(
                    "SELECT {COLUMNS} FROM queue ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 \
                     ELSE 2 END, CASE WHEN state IN ('running', 'queued') THEN lane ELSE 0 END, \
                     CASE WHEN state IN ('running', 'queued') THEN id ELSE -id END LIMIT ?1"
                ),
                vals![limit as i64],
                row_to_job,
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for mut j in rows {
            if j.state == JobState::Queued {
                j.position = Some(self.position(&j)?);
            }
            out.push(j);
        }
        Ok(out)
    }

    /// Credits an owner's jobs used or reserved since `since` (Unix seconds).
    pub fn owner_credits_since(&self, owner: &str, since: f64) -> Result<f64> {
        self.lib
            .db
            .query_row(
                "SELECT COALESCE(SUM(COALESCE(credits, 0) + reserved_credits), 0) FROM queue \
                 WHERE owner = ?1 AND created_at >= ?2",
                vals![owner, since],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// After a crash of a process that ran jobs: rows left running unleased, or leased to one
    /// of `own_workers` (this process's worker ids, so their previous life's), are re-queued (their
    /// unrecorded files removed), or done when their library record was committed; expired
    /// leases likewise. Rows leased to other workers may still be running: they are settled
    /// when their lease runs out.
    pub fn recover(&mut self, own_workers: &[&str]) -> Result<Recovery> {
        let mut report = Recovery::default();
        let mut runs = Vec::new();
        let mut sql = String::from(
            "SELECT id, library_job_id, attempts FROM queue WHERE state = 'running' \
                                    AND (lease_until IS NULL",
        );
        for i in 1..=own_workers.len() {
            sql.push_str(&format!(" OR worker = ?{i}"));
        }
        sql.push(')');
        let params: Vec<Value> = own_workers.iter().map(|w| Value::Text(w.to_string())).collect();
        let rows: Vec<(i64, Option<i64>, i64)> = self
            .lib
            .db
            .query_map(&sql, &params, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?;
        for (id, library_job, attempt) in rows {
            if self.settle_running(id, attempt, library_job)? {
                runs.push((id, attempt));
            } else if library_job.is_some() {
                report.completed.push(id);
            }
        }
        runs.extend(self.reap_expired()?);
        report.requeued = runs.iter().map(|r| r.0).collect();
        report.removed_files = self.remove_unrecorded_files(&runs)?;
        Ok(report)
    }

    /// Removes this box's files of runs that never recorded: named `q<id>a<attempt>-…` for the
    /// given (job, attempt) runs, and atomic-write temp files. The number removed.
    pub fn remove_unrecorded_files(&self, runs: &[(i64, i64)]) -> Result<usize> {
        let prefixes: Vec<String> = runs.iter().map(|(id, attempt)| format!("q{id}a{attempt}-")).collect();
        let mut removed = 0;
        // Only files named like those are candidates; each is checked against the library on
        // its own, rather than listing every asset (this runs after every failed job).
        for path in self.lib.asset_files() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // Temp files only when old: a worker beside this one may be writing one now.
            let old = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > STRAY_TEMP_AGE_SECONDS);
            let stray_tmp =
                old && name.starts_with(".kiln-") && (name.ends_with(".tmp") || name.ends_with(".part"));
            let stray_run = prefixes.iter().any(|pre| {
                name.starts_with(pre) || name.strip_prefix(".kiln-").is_some_and(|rest| rest.starts_with(pre))
            });
            if !(stray_tmp || stray_run) || self.lib.records_file(&path)? {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The library under the queue (workers, events and blobs share its connection).
    pub fn library(&self) -> &Library {
        &self.lib
    }
}

/// A temp file older than this is a dead writer's (no write of kiln's takes this long).
const STRAY_TEMP_AGE_SECONDS: u64 = 3600;

/// What a worker claims with: who it is, what it runs and holds, how long its leases last.
#[derive(Debug, Clone, Default)]
pub struct Claimer {
    pub id: String,
    /// Tiers it runs; empty = every tier.
    pub tiers: Vec<String>,
    /// Bytes of model it can hold; None = no limit.
    pub max_memory: Option<u64>,
    /// Model keys it has loaded ([`model_key`]), preferred when choosing a job.
    pub warm_models: Vec<String>,
    pub lease_seconds: f64,
}

/// What a job needs loaded, for placement: its tier, else its model, else its kind.
pub fn model_key(spec: &JobSpec) -> String {
    match spec.tier() {
        Some(t) => format!("tier:{t}"),
        None => format!("kind:{}", spec.kind().as_str()),
    }
}
