//! Cattery: a self-hosted session platform for Pipecat voice agents that speaks the Pipecat
//! Cloud REST API.
//!
//! Layers: [`api`] translates HTTP; [`core`] decides (agents, sessions, warm pool,
//! supervision); [`store`] keeps durable state behind a trait (SQLite by default);
//! [`runtime`] runs agent instances behind a trait (local process trees by default).

#![recursion_limit = "256"]

pub mod api;
pub mod backup;
pub mod build;
pub mod build_info;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod http_server;
pub mod model;
pub mod redact;
pub mod runtime;
pub mod secrets_key;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod web;
