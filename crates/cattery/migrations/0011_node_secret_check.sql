-- What each node derives from its cluster secret and its id (docs/cluster.md, "Nodes"): a node
-- whose own secret derives another value for that id has another secret, and refuses to start
-- (core::cluster::cluster_secret_differs), also when both start at the same moment.
ALTER TABLE nodes ADD COLUMN secret_check BLOB;
