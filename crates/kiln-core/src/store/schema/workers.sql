-- Workers in other processes and on other boxes.
-- A running job's lease: the worker that holds it and until when (Unix seconds); a lease
-- that runs out puts the job back in the queue. model_key and need_bytes place jobs.
ALTER TABLE queue ADD COLUMN worker TEXT;
ALTER TABLE queue ADD COLUMN lease_until REAL;
ALTER TABLE queue ADD COLUMN model_key TEXT;
ALTER TABLE queue ADD COLUMN need_bytes INTEGER NOT NULL DEFAULT 0;
-- Each worker's advertisement and heartbeat. tiers and warm_models are JSON lists.
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    tiers TEXT NOT NULL,
    max_memory INTEGER,
    free_memory INTEGER,
    warm_models TEXT NOT NULL,
    state TEXT NOT NULL,
    current_job INTEGER,
    jobs_done INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    heartbeat_seconds REAL NOT NULL
);
-- Job events from workers in other processes, relayed to the servers' event streams.
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    event_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, id);
-- Image bytes by sha256, so any server can serve an asset another box wrote.
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    created_at REAL NOT NULL
);
