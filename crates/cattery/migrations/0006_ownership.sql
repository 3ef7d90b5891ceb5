-- Ownership (docs/cluster.md): the node that owns each instance and session. Records made
-- before have '' (the node that recovers them first takes them).
ALTER TABLE instances ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_open_by_node ON sessions (node_id) WHERE ended_ms IS NULL;
CREATE INDEX instances_by_node ON instances (node_id);
