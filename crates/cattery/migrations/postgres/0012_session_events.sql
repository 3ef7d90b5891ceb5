-- Session events from every node (docs/cluster.md, "Session events from every node").
--
-- A node with at least one open `GET /v1/sessions/events` stream holds a row here, renewed
-- while it has one and deleted when its last one closes; a row whose lease ran out (a node
-- that died with a stream open) counts for nothing.
CREATE TABLE session_watchers (
    node_id TEXT PRIMARY KEY,
    until   TIMESTAMPTZ NOT NULL
);

-- While some node watches, every session change an event stream tells about (the record
-- stored, delivered, ended) is announced at commit on channel `cattery_sessions`, as
-- `<writing node>:<session id>:<org>` (the writing node: the `cattery.node` setting of the
-- connection, empty for a connection without one). Its own channel: nodes of an earlier version
-- listen to `cattery_changes` alone, and would take an unknown payload there for "reread
-- every agent".
CREATE FUNCTION cattery_notify_session() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM session_watchers WHERE until > now()) THEN
        PERFORM pg_notify('cattery_sessions',
            coalesce(current_setting('cattery.node', true), '') || ':' || NEW.id::text || ':' || NEW.org);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER sessions_stored AFTER INSERT ON sessions
    FOR EACH ROW EXECUTE FUNCTION cattery_notify_session();
CREATE TRIGGER sessions_changed AFTER UPDATE OF bot_start_ms, ended_ms ON sessions
    FOR EACH ROW
    WHEN (OLD.bot_start_ms IS DISTINCT FROM NEW.bot_start_ms OR OLD.ended_ms IS DISTINCT FROM NEW.ended_ms)
    EXECUTE FUNCTION cattery_notify_session();
