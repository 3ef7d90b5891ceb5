-- The log cap's fair share (docs/logs.md, "Retention"): over the cap, lines are deleted from
-- the org that holds the most, its oldest first. `log_counts` holds each org's number of
-- lines, kept by every write that adds or deletes lines, so the prune after a batch reads one
-- row per org instead of counting; `logs_org` finds an org's oldest lines.
CREATE INDEX logs_org ON logs(org, seq);
CREATE TABLE log_counts (
    org   TEXT PRIMARY KEY,
    lines INTEGER NOT NULL
);
INSERT INTO log_counts (org, lines) SELECT org, COUNT(*) FROM logs GROUP BY org;
