-- Cattery schema, version 2.
-- Instances: the runtime's kind and its own placement record (JSON, opaque to the store)
-- replace the process runtime's columns; the never used output offsets go.
CREATE TABLE instances_v2 (
    id            TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL,
    deployment_id TEXT NOT NULL,
    session_id    TEXT,
    runtime       TEXT NOT NULL,
    placement     TEXT NOT NULL,
    created_ms    INTEGER NOT NULL
);
INSERT INTO instances_v2 (id, agent_id, deployment_id, session_id, runtime, placement, created_ms)
SELECT id, agent_id, deployment_id, session_id, 'process',
       json_object('pid', pid, 'pid_start', pid_start, 'port', port, 'cgroup', cgroup, 'dir', dir),
       created_ms
FROM instances;
DROP TABLE instances;
ALTER TABLE instances_v2 RENAME TO instances;

-- Sessions: resource samples (a JSON array of {"t", "c", "m"}: Unix seconds, millicores,
-- bytes) replace the stored `resourceMetrics` body, which the API now builds from them.
ALTER TABLE sessions ADD COLUMN samples TEXT;
UPDATE sessions SET samples = json_extract(metrics, '$.timeseries')
WHERE metrics IS NOT NULL AND json_valid(metrics);
ALTER TABLE sessions DROP COLUMN metrics;
