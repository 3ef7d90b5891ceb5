-- Outbound webhooks (core/webhooks.rs): an org's endpoints, and each event's delivery to
-- each endpoint, queued until delivered or given up, then kept as the delivery log.
CREATE TABLE webhook_endpoints (
    id          TEXT PRIMARY KEY,
    org         TEXT NOT NULL,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL,
    description TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE INDEX webhook_endpoints_org ON webhook_endpoints (org, created_ms);

CREATE TABLE webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    endpoint_id     TEXT NOT NULL,
    org             TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    finished_ms     INTEGER
);
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (state, endpoint_id, seq);
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, seq);
