-- The intent to stop a session, recorded before its instance gets SIGTERM: the deadline
-- (Unix ms) at which the stop grace ends. A server restarted during the grace finishes the
-- stop (the rest of the grace, then SIGKILL) instead of forgetting it.
ALTER TABLE sessions ADD COLUMN stop_deadline_ms INTEGER;
