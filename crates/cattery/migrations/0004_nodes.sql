-- Nodes and their heartbeats (docs/cluster.md). A single SQLite server has one row.
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    advertise_url TEXT,
    version       TEXT NOT NULL,
    started_ms    INTEGER NOT NULL,
    heartbeat_ms  INTEGER NOT NULL,
    instances     INTEGER NOT NULL,
    busy          INTEGER NOT NULL
);
