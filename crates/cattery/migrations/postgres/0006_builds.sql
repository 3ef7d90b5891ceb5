-- Builds of uploaded contexts (docs/builds.md): one row per build; the cache looks builds up
-- by (org, context_hash, region, dockerfile_path).
CREATE TABLE builds (
    id              UUID PRIMARY KEY,
    org             TEXT NOT NULL,
    status          TEXT NOT NULL,
    region          TEXT NOT NULL,
    context_hash    TEXT NOT NULL,
    dockerfile_path TEXT NOT NULL,
    artifact        TEXT,
    python          TEXT,
    builder         TEXT,
    error_message   TEXT,
    context_size    BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    started_ms      BIGINT,
    completed_ms    BIGINT,
    updated_ms      BIGINT NOT NULL
);
CREATE INDEX builds_by_org ON builds (org, created_ms);
CREATE INDEX builds_by_hash ON builds (org, context_hash);
