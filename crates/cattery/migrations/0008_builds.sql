-- Builds of uploaded contexts (docs/builds.md): one row per build; the cache looks builds up
-- by (org, context_hash, region, dockerfile_path).
CREATE TABLE builds (
    id              TEXT PRIMARY KEY,
    org             TEXT NOT NULL,
    status          TEXT NOT NULL,
    region          TEXT NOT NULL,
    context_hash    TEXT NOT NULL,
    dockerfile_path TEXT NOT NULL,
    artifact        TEXT,
    python          TEXT,
    builder         TEXT,
    error_message   TEXT,
    context_size    INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    started_ms      INTEGER,
    completed_ms    INTEGER,
    updated_ms      INTEGER NOT NULL
);
CREATE INDEX builds_by_org ON builds (org, created_ms);
CREATE INDEX builds_by_hash ON builds (org, context_hash);
