-- Cattery schema, version 1. Times are Unix milliseconds (UTC) unless named *_ns.
CREATE TABLE orgs (
    name         TEXT PRIMARY KEY,
    verbose_name TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    properties   TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    org         TEXT NOT NULL REFERENCES orgs(name),
    kind        TEXT NOT NULL CHECK (kind IN ('public', 'private', 'token')),
    name        TEXT NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER,
    -- The whole key, kept for public keys only (the CLI lists them and `keys use` needs them);
    -- NULL for private keys and tokens, which exist only as key_hash.
    public_key  TEXT
);

CREATE TABLE agents (
    id                    TEXT PRIMARY KEY,
    org                   TEXT NOT NULL REFERENCES orgs(name),
    name                  TEXT NOT NULL,
    region                TEXT NOT NULL,
    min_agents            INTEGER NOT NULL,
    max_agents            INTEGER NOT NULL,
    desired_deployment_id TEXT NOT NULL,
    created_ms            INTEGER NOT NULL,
    updated_ms            INTEGER NOT NULL,
    deleted_ms            INTEGER
);
CREATE UNIQUE INDEX agents_live_name ON agents(org, name) WHERE deleted_ms IS NULL;

CREATE TABLE deployments (
    id         TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents(id),
    spec       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX deployments_agent ON deployments(agent_id, created_ms);

CREATE TABLE sessions (
    id                TEXT PRIMARY KEY,
    org               TEXT NOT NULL,
    agent_id          TEXT NOT NULL REFERENCES agents(id),
    deployment_id     TEXT NOT NULL,
    created_ms        INTEGER NOT NULL,
    updated_ms        INTEGER NOT NULL,
    ended_ms          INTEGER,
    bot_start_ms      INTEGER,
    cold_start        INTEGER,
    completion_status TEXT,
    end_reason        TEXT,
    exit_code         INTEGER,
    exit_signal       INTEGER,
    end_message       TEXT,
    transport         TEXT,
    metrics           TEXT
);
CREATE INDEX sessions_agent_created ON sessions(agent_id, created_ms);
CREATE INDEX sessions_active ON sessions(agent_id) WHERE ended_ms IS NULL;

CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL,
    deployment_id  TEXT NOT NULL,
    session_id     TEXT,
    pid            INTEGER NOT NULL,
    pid_start      INTEGER NOT NULL,
    port           INTEGER NOT NULL,
    cgroup         TEXT,
    dir            TEXT NOT NULL,
    stdout_offset  INTEGER NOT NULL DEFAULT 0,
    stderr_offset  INTEGER NOT NULL DEFAULT 0,
    created_ms     INTEGER NOT NULL
);

CREATE TABLE logs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    org           TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    deployment_id TEXT,
    session_id    TEXT,
    instance_id   TEXT,
    ts_ns         INTEGER NOT NULL,
    stream        TEXT NOT NULL,
    line          TEXT NOT NULL
);
CREATE INDEX logs_agent_ts ON logs(agent_id, ts_ns);
CREATE INDEX logs_session ON logs(session_id, ts_ns);

CREATE TABLE secret_sets (
    org        TEXT NOT NULL REFERENCES orgs(name),
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('secret', 'imagePullSecret')),
    region     TEXT NOT NULL,
    -- Registry host of an image pull secret (with a trailing '/'); NULL for regular sets.
    host       TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (org, name)
);

-- Values are sealed with XChaCha20-Poly1305 under the data dir's key file.
CREATE TABLE secrets (
    org        TEXT NOT NULL,
    set_name   TEXT NOT NULL,
    key        TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (org, set_name, key),
    FOREIGN KEY (org, set_name) REFERENCES secret_sets(org, name) ON DELETE CASCADE
);

-- The sealed values of a deployment's bound secret set, copied from `secrets` in the same
-- transaction that creates the deployment. Instances of one deployment (warm or cold, before
-- or after a restart) all get exactly these values; a changed value reaches instances only
-- through a new deployment (forceRedeploy). Values stay sealed under the same key and the
-- same associated data (org, set_name, key) as in `secrets`.
CREATE TABLE deployment_secrets (
    deployment_id TEXT NOT NULL REFERENCES deployments(id),
    org           TEXT NOT NULL,
    set_name      TEXT NOT NULL,
    key           TEXT NOT NULL,
    nonce         BLOB NOT NULL,
    ciphertext    BLOB NOT NULL,
    PRIMARY KEY (deployment_id, key)
);
