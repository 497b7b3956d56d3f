-- The durable job queue.
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
