-- The Daily room Cattery made for a session (docs/daily.md), kept with the session so that
-- its deletion survives the node: whichever node records the session's end (its own, the
-- one that takes over a lost node) deletes it. `daily_room_keep`: kept when the session
-- reached its agent (`keepDailyRooms` when the room was made).
ALTER TABLE sessions ADD COLUMN daily_room TEXT;
ALTER TABLE sessions ADD COLUMN daily_room_keep BOOLEAN NOT NULL DEFAULT FALSE;

-- `cattery_insert_session_for_instance` (0008) with the room: a warm start's write stays one
-- round trip. The function of 0008 stays for nodes of the previous version during an upgrade.
CREATE FUNCTION cattery_insert_session_for_instance(
    p_id UUID, p_org TEXT, p_agent_id UUID, p_deployment_id UUID, p_created_ms BIGINT,
    p_updated_ms BIGINT, p_bot_start_ms BIGINT, p_cold_start BOOLEAN, p_transport TEXT,
    p_node_id TEXT, p_instance_id UUID, p_daily_room TEXT, p_daily_room_keep BOOLEAN)
RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    n BIGINT;
BEGIN
    INSERT INTO sessions (id, org, agent_id, deployment_id, created_ms, updated_ms,
        bot_start_ms, cold_start, transport, node_id, daily_room, daily_room_keep)
    VALUES (p_id, p_org, p_agent_id, p_deployment_id, p_created_ms, p_updated_ms,
        p_bot_start_ms, p_cold_start, p_transport, p_node_id, p_daily_room, p_daily_room_keep)
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
