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
use crate::library::{Library, Project};
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde::Serialize;

/// The queue's table, created with the library's schema.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    lane INTEGER NOT NULL,
    owner TEXT NOT NULL,
    tier TEXT,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    reserved_credits REAL NOT NULL DEFAULT 0,
    credits REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    library_job_id INTEGER,
    result_json TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS queue_state ON queue(state, lane, id);
";

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

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

const COLUMNS: &str = "id, kind, lane, owner, tier, state, spec_json, created_at, started_at, finished_at, \
                       attempts, reserved_credits, credits, library_job_id, result_json, error";

fn row_to_job(r: &rusqlite::Row) -> rusqlite::Result<QueuedJob> {
    let spec: String = r.get(6)?;
    let result: Option<String> = r.get(14)?;
    Ok(QueuedJob {
        id: r.get(0)?,
        kind: r.get(1)?,
        lane: Lane::from_index(r.get(2)?),
        owner: r.get(3)?,
        tier: r.get(4)?,
        state: JobState::parse(&r.get::<_, String>(5)?),
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

    fn err(&self, e: rusqlite::Error) -> Error {
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
        let json = serde_json::to_string(spec).map_err(|e| Error::arg("spec", e.to_string()))?;
        let path = self.lib.path.clone();
        let err = |e: rusqlite::Error| Error::Library { path: path.clone(), msg: e.to_string() };
        let tx = self.lib.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        if let Some(limit) = budget_limit {
            let spent: f64 =
                tx.query_row("SELECT COALESCE(SUM(credits), 0) FROM jobs", [], |r| r.get(0)).map_err(err)?;
            let reserved: f64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(reserved_credits), 0) FROM queue WHERE state IN ('queued', 'running')",
                    [],
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
        tx.execute(
            "INSERT INTO queue (kind, lane, owner, tier, spec_json, state, reserved_credits, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7)",
            params![spec.kind().as_str(), lane as i64, owner, spec.tier(), json, estimate, now()],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// Takes the next job: the best lane with waiting jobs, the owner served least recently in
    /// it, that owner's oldest job. None when nothing waits.
    pub fn claim(&mut self) -> Result<Option<Claim>> {
        self.claim_in(None)
    }

    /// [`Queue::claim`] limited to one lane (a paused final lets only drafts run).
    pub fn claim_in(&mut self, only: Option<Lane>) -> Result<Option<Claim>> {
        let path = self.lib.path.clone();
        let err = |e: rusqlite::Error| Error::Library { path: path.clone(), msg: e.to_string() };
        let tx = self.lib.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let lane: Option<i64> = match only {
            Some(l) => tx
                .query_row(
                    "SELECT lane FROM queue WHERE state = 'queued' AND lane = ?1 LIMIT 1",
                    [l as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(err)?,
            None => tx
                .query_row("SELECT MIN(lane) FROM queue WHERE state = 'queued'", [], |r| r.get(0))
                .map_err(err)?,
        };
        let Some(lane) = lane else { return Ok(None) };
        // Owners waiting in the lane, least recently served first (never served = first),
        // then by their oldest waiting job.
        let picked: Option<(i64, String, String, i64)> = tx
            .query_row(
                "SELECT q.id, q.owner, q.spec_json, q.attempts FROM queue q \
                 WHERE q.state = 'queued' AND q.lane = ?1 \
                 ORDER BY (SELECT MAX(started_at) FROM queue s WHERE s.owner = q.owner AND s.lane = ?1) \
                          IS NOT NULL, \
                          (SELECT MAX(started_at) FROM queue s WHERE s.owner = q.owner AND s.lane = ?1), \
                          q.id \
                 LIMIT 1",
                [lane],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(err)?;
        let Some((id, owner, spec_json, attempts)) = picked else { return Ok(None) };
        let attempt = attempts + 1;
        tx.execute(
            "UPDATE queue SET state = 'running', started_at = ?1, attempts = ?2 WHERE id = ?3",
            params![now(), attempt, id],
        )
        .map_err(err)?;
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

    /// Whether a job waits in `lane`.
    pub fn has_waiting(&self, lane: Lane) -> Result<bool> {
        self.lib
            .conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM queue WHERE state = 'queued' AND lane = ?1)",
                [lane as i64],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// The ids of the jobs waiting in `lane`, oldest first.
    pub fn waiting(&self, lane: Lane) -> Result<Vec<i64>> {
        let mut stmt = self
            .lib
            .conn
            .prepare("SELECT id FROM queue WHERE state = 'queued' AND lane = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let ids = stmt
            .query_map([lane as i64], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .map_err(|e| self.err(e));
        ids
    }

    /// Ends a run. Ignored when the row is no longer that attempt's (it was recovered meanwhile).
    pub fn finish(&mut self, id: i64, attempt: i64, how: Finish) -> Result<()> {
        let (state, result, credits, error) = match how {
            Finish::Done { result, credits } => ("done", Some(result.to_string()), Some(credits), None),
            Finish::Failed(msg) => ("failed", None, None, Some(msg.to_string())),
            Finish::Cancelled => ("cancelled", None, None, None),
        };
        self.lib
            .conn
            .execute(
                "UPDATE queue SET state = ?1, result_json = ?2, credits = ?3, error = ?4, finished_at = ?5, \
                 reserved_credits = 0 WHERE id = ?6 AND attempts = ?7 AND state = 'running'",
                params![state, result, credits, error, now(), id, attempt],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Asks a job to stop: a queued job is cancelled at once, a running one at its next step.
    /// Returns the job's state after the request.
    pub fn cancel(&mut self, id: i64) -> Result<JobState> {
        let changed = self
            .lib
            .conn
            .execute(
                "UPDATE queue SET state = 'cancelled', finished_at = ?1, reserved_credits = 0 \
                 WHERE id = ?2 AND state = 'queued'",
                params![now(), id],
            )
            .map_err(|e| self.err(e))?;
        if changed == 0 {
            self.lib
                .conn
                .execute("UPDATE queue SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'", [id])
                .map_err(|e| self.err(e))?;
        }
        Ok(self.get(id)?.state)
    }

    /// Whether a cancel was asked for the running job.
    pub fn cancel_requested(&self, id: i64) -> Result<bool> {
        self.lib
            .conn
            .query_row("SELECT cancel_requested FROM queue WHERE id = ?1", [id], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.unwrap_or(0) != 0)
            .map_err(|e| self.err(e))
    }

    /// One job, with its position when queued.
    pub fn get(&self, id: i64) -> Result<QueuedJob> {
        let mut job = self
            .lib
            .conn
            .query_row(&format!("SELECT {COLUMNS} FROM queue WHERE id = ?1"), [id], row_to_job)
            .optional()
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
            .conn
            .query_row(
                "SELECT COUNT(*) FROM queue WHERE state = 'queued' AND (lane < ?1 OR (lane = ?1 AND id < ?2))",
                params![job.lane as i64, job.id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(|e| self.err(e))
    }

    /// Running and queued jobs, then the most recent finished ones (at most `limit` in all).
    pub fn list(&self, limit: usize) -> Result<Vec<QueuedJob>> {
        let mut stmt = self
            .lib
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM queue ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 \
                 ELSE 2 END, CASE WHEN state IN ('running', 'queued') THEN lane ELSE 0 END, \
                 CASE WHEN state IN ('running', 'queued') THEN id ELSE -id END LIMIT ?1"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([limit as i64], row_to_job)
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        drop(stmt);
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
            .conn
            .query_row(
                "SELECT COALESCE(SUM(COALESCE(credits, 0) + reserved_credits), 0) FROM queue \
                 WHERE owner = ?1 AND created_at >= ?2",
                params![owner, since],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// After a crash: rows left running are re-queued (their unrecorded files removed), or
    /// done when their library record was committed; leftover temp files are removed.
    pub fn recover(&mut self) -> Result<Recovery> {
        let mut report = Recovery::default();
        let rows: Vec<(i64, Option<i64>)> = {
            let mut stmt = self
                .lib
                .conn
                .prepare("SELECT id, library_job_id FROM queue WHERE state = 'running'")
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.err(e))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.err(e))?;
            rows
        };
        for (id, library_job) in rows {
            match library_job {
                Some(job) => {
                    let result = serde_json::json!({ "recovered": true, "library_job_id": job });
                    self.lib
                        .conn
                        .execute(
                            "UPDATE queue SET state = 'done', result_json = ?1, finished_at = ?2, \
                             reserved_credits = 0 WHERE id = ?3",
                            params![result.to_string(), now(), id],
                        )
                        .map_err(|e| self.err(e))?;
                    report.completed.push(id);
                }
                None => {
                    self.lib
                        .conn
                        .execute("UPDATE queue SET state = 'queued', started_at = NULL WHERE id = ?1", [id])
                        .map_err(|e| self.err(e))?;
                    report.requeued.push(id);
                }
            }
        }
        // Files of runs that never recorded: named q<id>-..., or atomic-write temp files.
        let prefixes: Vec<String> = report.requeued.iter().map(|id| format!("q{id}-")).collect();
        for path in self.lib.orphans()? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let stray_tmp = name.starts_with(".kiln-") && (name.ends_with(".tmp") || name.ends_with(".part"));
            let stray_run = prefixes.iter().any(|pre| name.starts_with(pre));
            if (stray_tmp || stray_run) && std::fs::remove_file(&path).is_ok() {
                report.removed_files += 1;
            }
        }
        Ok(report)
    }
}
