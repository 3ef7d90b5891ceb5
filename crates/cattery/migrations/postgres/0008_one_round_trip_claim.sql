-- A warm start's write in one round trip (docs/cluster.md, "Round trips"): the session's row
-- and its instance's promise to it, as one statement (a function runs in the calling
-- statement's transaction, so an exception undoes both writes). The same as the transaction
-- it replaces (BEGIN, INSERT, UPDATE, COMMIT: four round trips):
-- * the session is inserted, or a websocket session recorded at /start while it waits for
--   its client is taken over (its deployment, coldStart, update time and node change); an
--   ended or otherwise taken one is not: unique_violation, nothing written;
-- * the instance is promised to the session only while it is promised to nobody (or to this
--   session): the update takes the row's lock, so a second claim waits for the first and then
--   finds it promised: unique_violation, nothing written;
-- * an instance with no record (its record missing): the session alone; returns false.
-- Returns whether the instance's record now names the session.
CREATE FUNCTION cattery_insert_session_for_instance(
    p_id UUID, p_org TEXT, p_agent_id UUID, p_deployment_id UUID, p_created_ms BIGINT,
    p_updated_ms BIGINT, p_bot_start_ms BIGINT, p_cold_start BOOLEAN, p_transport TEXT,
    p_node_id TEXT, p_instance_id UUID)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    n BIGINT;
BEGIN
    INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms,
        bot_start_ms, cold_start, transport, node_id)
    VALUES (p_id, p_org, p_agent_id, p_deployment_id, p_created_ms, p_updated_ms,
        p_bot_start_ms, p_cold_start, p_transport, p_node_id)
    ON CONFLICT (id) DO UPDATE SET deployment_id = excluded.deployment_id,
        cold_start = excluded.cold_start, updated_ms = excluded.updated_ms,
        node_id = excluded.node_id
    WHERE sessions.ended_ms IS NULL AND sessions.cold_start IS NULL
        AND sessions.bot_start_ms IS NULL AND sessions.org = excluded.org
        AND sessions.agent_id = excluded.agent_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION 'session % is already recorded', p_id USING ERRCODE = 'unique_violation';
    END IF;
    UPDATE instances SET session_id = p_id
    WHERE id = p_instance_id AND (session_id IS NULL OR session_id = p_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 1 THEN
        RETURN TRUE;
    END IF;
    IF EXISTS (SELECT 1 FROM instances WHERE id = p_instance_id) THEN
        RAISE EXCEPTION 'instance % is promised to another session', p_instance_id
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN FALSE;
END
$$;
