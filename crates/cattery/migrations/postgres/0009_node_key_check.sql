-- A value each node seals with its secrets key (docs/cluster.md, "Secrets"): another node
-- that cannot open it has another key, and refuses to start (core::cluster::secrets_key_differs).
ALTER TABLE nodes ADD COLUMN key_check BYTEA;
