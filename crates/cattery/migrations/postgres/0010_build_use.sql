-- Build retention (docs/builds.md, "Retention"): when a deploy last took the build (retention
-- counts from then, else from its completion), and the node that made it (the one whose data
-- dir holds its directory; '' for builds made before this column).
ALTER TABLE builds ADD COLUMN last_used_ms BIGINT;
ALTER TABLE builds ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
