-- Outbound webhooks (core/webhooks.rs): an org's endpoints, and each event's delivery to
-- each endpoint, queued until delivered or given up, then kept as the delivery log.
CREATE TABLE webhook_endpoints (
    id          UUID PRIMARY KEY,
    org         TEXT NOT NULL,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL,
    description TEXT NOT NULL,
    nonce       BYTEA NOT NULL,
    ciphertext  BYTEA NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_org ON webhook_endpoints (org, created_ms);

CREATE TABLE webhook_deliveries (
    seq             BIGSERIAL PRIMARY KEY,
    id              UUID NOT NULL UNIQUE,
    endpoint_id     UUID NOT NULL,
    org             TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_status     BIGINT,
    last_error      TEXT,
    finished_ms     BIGINT
);
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (state, endpoint_id, seq);
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, seq);
