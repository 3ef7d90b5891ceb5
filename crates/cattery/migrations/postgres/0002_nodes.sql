-- Nodes and their heartbeats (docs/cluster.md).
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    advertise_url TEXT,
    version       TEXT NOT NULL,
    started_ms    BIGINT NOT NULL,
    heartbeat_ms  BIGINT NOT NULL,
    instances     BIGINT NOT NULL,
    busy          BIGINT NOT NULL
);
