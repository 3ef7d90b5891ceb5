//! End-to-end tests: each drives the real `cattery` binary over HTTP, with real agent processes
//! and a real SQLite file (see `docs/TESTING.md`). One test binary for all of them: one link
//! instead of one per file.

#[path = "../common/mod.rs"]
mod common;
#[path = "../lifecycle_util/mod.rs"]
mod lifecycle_util;

mod api;
mod builds;
mod cli_compat;
mod cluster_capacity;
mod cluster_counts;
mod cluster_docker;
mod cluster_events;
mod cluster_forward;
mod cluster_ownership;
mod connections;
mod container;
mod dashboard;
mod docker;
mod docker_faults;
mod fork_server;
mod isolation;
mod lifecycle;
mod lifecycle_pool;
mod lifecycle_server;
mod load_balancer;
mod ops;
mod postgres;
mod python_bots;
mod secrets_logs;
mod spare_slots;
mod storage_faults;
mod store_copy;
mod telephony;
mod transport;
mod upgrade;
mod web;
mod webhooks;
mod whatsapp;
