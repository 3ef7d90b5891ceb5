-- Capacity slots and websocket tokens in the store (docs/cluster.md). Every instance not yet
-- gone holds one slot of its agent's maxAgents; a slot is reserved before the instance starts
-- and freed with the instance's record.
CREATE TABLE capacity_slots (
    instance_id TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE INDEX capacity_slots_agent ON capacity_slots(agent_id);
CREATE INDEX capacity_slots_node ON capacity_slots(node_id);

-- Single-use websocket tokens announced by /start, by SHA-256 of the token.
CREATE TABLE ws_tokens (
    hash       BLOB PRIMARY KEY,
    org        TEXT NOT NULL,
    agent      TEXT NOT NULL,
    session_id TEXT NOT NULL,
    body       BLOB,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX ws_tokens_expires ON ws_tokens(expires_ms);
CREATE INDEX ws_tokens_session ON ws_tokens(session_id);

-- Instances recorded before this version hold their slot from now on.
INSERT INTO capacity_slots (instance_id, agent_id, node_id, created_ms)
    SELECT id, agent_id, '', created_ms FROM instances;
