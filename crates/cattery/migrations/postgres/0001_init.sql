-- Cattery schema on PostgreSQL, version 1: the SQLite schema of migrations/0001-0003 with
-- PostgreSQL's types (UUID, BIGINT, BYTEA, BOOLEAN). Times are Unix milliseconds (UTC) unless
-- named *_ns. `seq` columns keep arrival order where SQLite used its rowid.
CREATE TABLE orgs (
    name         TEXT PRIMARY KEY,
    verbose_name TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    properties   TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE api_keys (
    id          UUID PRIMARY KEY,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY,
    org         TEXT NOT NULL REFERENCES orgs(name),
    kind        TEXT NOT NULL CHECK (kind IN ('public', 'private', 'token')),
    name        TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT,
    -- The whole key, kept for public keys only; NULL for private keys and tokens.
    public_key  TEXT
);
CREATE INDEX api_keys_org ON api_keys(org, created_ms, seq);

CREATE TABLE agents (
    id                    UUID PRIMARY KEY,
    org                   TEXT NOT NULL REFERENCES orgs(name),
    name                  TEXT NOT NULL,
    region                TEXT NOT NULL,
    min_agents            BIGINT NOT NULL,
    max_agents            BIGINT NOT NULL,
    desired_deployment_id UUID NOT NULL,
    created_ms            BIGINT NOT NULL,
    updated_ms            BIGINT NOT NULL,
    deleted_ms            BIGINT
);
CREATE UNIQUE INDEX agents_live_name ON agents(org, name) WHERE deleted_ms IS NULL;

CREATE TABLE deployments (
    id         UUID PRIMARY KEY,
    seq        BIGINT GENERATED ALWAYS AS IDENTITY,
    agent_id   UUID NOT NULL REFERENCES agents(id),
    spec       TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX deployments_agent ON deployments(agent_id, created_ms, seq);

CREATE TABLE sessions (
    id                UUID PRIMARY KEY,
    seq               BIGINT GENERATED ALWAYS AS IDENTITY,
    org               TEXT NOT NULL,
    agent_id          UUID NOT NULL REFERENCES agents(id),
    deployment_id     UUID NOT NULL,
    created_ms        BIGINT NOT NULL,
    updated_ms        BIGINT NOT NULL,
    ended_ms          BIGINT,
    bot_start_ms      BIGINT,
    cold_start        BOOLEAN,
    completion_status TEXT,
    end_reason        TEXT,
    exit_code         BIGINT,
    exit_signal       BIGINT,
    end_message       TEXT,
    transport         TEXT,
    -- JSON array of {"t", "c", "m"}: Unix seconds, millicores, bytes.
    samples           TEXT,
    -- The deadline (Unix ms) at which a requested stop's grace ends.
    stop_deadline_ms  BIGINT
);
CREATE INDEX sessions_agent_created ON sessions(agent_id, created_ms, seq);
CREATE INDEX sessions_active ON sessions(agent_id) WHERE ended_ms IS NULL;

CREATE TABLE instances (
    id            UUID PRIMARY KEY,
    agent_id      UUID NOT NULL,
    deployment_id UUID NOT NULL,
    session_id    UUID,
    runtime       TEXT NOT NULL,
    -- The runtime's own record (JSON text, opaque to the store).
    placement     TEXT NOT NULL,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE logs (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org           TEXT NOT NULL,
    agent_id      UUID NOT NULL,
    deployment_id UUID,
    session_id    UUID,
    instance_id   UUID,
    ts_ns         BIGINT NOT NULL,
    stream        TEXT NOT NULL,
    line          TEXT NOT NULL
);
CREATE INDEX logs_agent_ts ON logs(agent_id, ts_ns);
CREATE INDEX logs_session ON logs(session_id, ts_ns);
CREATE INDEX logs_ts ON logs(ts_ns);

CREATE TABLE secret_sets (
    org        TEXT NOT NULL REFERENCES orgs(name),
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('secret', 'imagePullSecret')),
    region     TEXT NOT NULL,
    host       TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (org, name)
);

-- Values sealed with XChaCha20-Poly1305 (docs/secrets.md): the store never sees plaintext.
CREATE TABLE secrets (
    org        TEXT NOT NULL,
    set_name   TEXT NOT NULL,
    key        TEXT NOT NULL,
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    PRIMARY KEY (org, set_name, key),
    FOREIGN KEY (org, set_name) REFERENCES secret_sets(org, name) ON DELETE CASCADE
);

-- A deployment's snapshot of its bound set's sealed values (see the SQLite migration 0001).
CREATE TABLE deployment_secrets (
    deployment_id UUID NOT NULL REFERENCES deployments(id),
    org           TEXT NOT NULL,
    set_name      TEXT NOT NULL,
    key           TEXT NOT NULL,
    nonce         BYTEA NOT NULL,
    ciphertext    BYTEA NOT NULL,
    PRIMARY KEY (deployment_id, key)
);
