-- The log cap's fair share (docs/logs.md, "Retention"): over the cap, lines are deleted from
-- the org that holds the most, its oldest first. `log_counts` holds each org's number of
-- lines, so the prune after a batch reads one row per org instead of counting; `logs_org`
-- finds an org's oldest lines.
--
-- The counts are kept by statement-level triggers (one per statement, not per line), so every
-- writer keeps them: this version's nodes, `cattery store copy`, and the nodes of the previous
-- version that still write lines during a rolling upgrade. The index is made first: it holds
-- back every other writer of `logs` until this migration commits, so the counts taken here and
-- the triggers miss no line.
CREATE INDEX logs_org ON logs(org, seq);
CREATE TABLE log_counts (
    org   TEXT PRIMARY KEY,
    lines BIGINT NOT NULL
);
INSERT INTO log_counts (org, lines) SELECT org, COUNT(*) FROM logs GROUP BY org;

-- Rows of `log_counts` are locked in the order of their orgs by both triggers, so statements
-- of several orgs' lines on different nodes wait for each other instead of deadlocking.
CREATE FUNCTION cattery_count_logs_added() RETURNS trigger AS $$
BEGIN
    INSERT INTO log_counts (org, lines)
        SELECT org, COUNT(*) FROM added GROUP BY org ORDER BY org
        ON CONFLICT (org) DO UPDATE SET lines = log_counts.lines + excluded.lines;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE FUNCTION cattery_count_logs_deleted() RETURNS trigger AS $$
BEGIN
    PERFORM 1 FROM log_counts WHERE org IN (SELECT org FROM deleted) ORDER BY org FOR UPDATE;
    UPDATE log_counts k SET lines = k.lines - d.n
        FROM (SELECT org, COUNT(*) AS n FROM deleted GROUP BY org) d
        WHERE k.org = d.org;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER logs_added AFTER INSERT ON logs REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION cattery_count_logs_added();
CREATE TRIGGER logs_deleted AFTER DELETE ON logs REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION cattery_count_logs_deleted();
