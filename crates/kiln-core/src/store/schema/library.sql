-- The asset library: jobs, their assets with lineage, step parameters and QC reports.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    tier TEXT,
    created_at INTEGER NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    model_id TEXT NOT NULL,
    images INTEGER NOT NULL,
    load_seconds REAL NOT NULL,
    text_encode_seconds REAL NOT NULL,
    vae_encode_seconds REAL NOT NULL,
    steps_seconds REAL NOT NULL,
    vae_decode_seconds REAL NOT NULL,
    device_seconds REAL NOT NULL,
    cpu_seconds REAL,
    peak_memory_bytes INTEGER,
    credits REAL NOT NULL,
    timings_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assets (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    parent_id INTEGER REFERENCES assets(id),
    kind TEXT NOT NULL,
    tier TEXT,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed INTEGER,
    prompt TEXT,
    record_json TEXT,
    model_hashes TEXT NOT NULL,
    credits REAL NOT NULL,
    created_at INTEGER NOT NULL
);
-- Parameters of non-generation steps (upscale); a side table so schema-1 libraries gain it
-- on open without a migration.
CREATE TABLE IF NOT EXISTS asset_params (
    asset_id INTEGER PRIMARY KEY REFERENCES assets(id),
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS asset_qc (
    asset_id INTEGER PRIMARY KEY REFERENCES assets(id),
    json TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS assets_parent ON assets(parent_id);
CREATE INDEX IF NOT EXISTS assets_sha ON assets(sha256);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
