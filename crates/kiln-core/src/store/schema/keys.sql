-- API keys (sha256 hashes) with optional daily quotas.
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    quota REAL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
