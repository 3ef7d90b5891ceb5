-- Cluster-wide capacity, websocket tokens and the change feed (docs/cluster.md).

-- Every instance not yet gone holds one slot of its agent's maxAgents, whichever node runs it.
CREATE TABLE capacity_slots (
    instance_id UUID PRIMARY KEY,
    agent_id    UUID NOT NULL,
    node_id     TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE INDEX capacity_slots_agent ON capacity_slots(agent_id);
CREATE INDEX capacity_slots_node ON capacity_slots(node_id);

-- Slots held per agent: the count that a reservation increments in one conditional statement
-- (`used < max`, re-checked under the row lock), always changed in the same statement as the
-- slot rows.
CREATE TABLE agent_capacity (
    agent_id UUID PRIMARY KEY,
    used     BIGINT NOT NULL CHECK (used >= 0)
);

-- Instances recorded before this version hold their slot from now on.
INSERT INTO capacity_slots (instance_id, agent_id, node_id, created_ms)
    SELECT id, agent_id, '', created_ms FROM instances;
INSERT INTO agent_capacity (agent_id, used)
    SELECT agent_id, COUNT(*) FROM capacity_slots GROUP BY agent_id;

-- Single-use websocket tokens announced by /start, by SHA-256 of the token.
CREATE TABLE ws_tokens (
    hash       BYTEA PRIMARY KEY,
    org        TEXT NOT NULL,
    agent      TEXT NOT NULL,
    session_id UUID NOT NULL,
    body       BYTEA,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX ws_tokens_expires ON ws_tokens(expires_ms);
CREATE INDEX ws_tokens_session ON ws_tokens(session_id);

-- Changes other nodes must see, on channel `cattery_changes` (sent at commit): `agent:<id>`
-- for any write to an agent, `key` for any write to an API key.
CREATE FUNCTION cattery_notify_agent() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cattery_changes', 'agent:' || NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER agents_changed AFTER INSERT OR UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION cattery_notify_agent();

CREATE FUNCTION cattery_notify_key() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cattery_changes', 'key');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION cattery_notify_key();
