//! Micro8gents webhook worker.
//!
//! The folders tell the data flow:
//! - `ingress`: what receives (axum handlers, one per provider);
//! - `verify`: what verifies (pure signature checks, no I/O);
//! - `events`: what is carried (the versioned envelope and the typed events);
//! - `bus`: how it is carried (RabbitMQ topology, connection, confirmed publishing);
//! - `workers/` (top level): what applies (consumers, one module per event family);
//! - `store`: what stores (pool, migrations, secret lookups);
//! - `providers`: who sends (the one registry of providers and their families);
//! - `twilio_api`: the one client of Twilio's REST API (used by the calls worker only).

pub mod app;
pub mod bus;
pub mod config;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingress;
pub mod notify;
pub mod ops;
pub mod providers;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod twilio_api;
pub mod verify;
#[path = "../workers/mod.rs"]
pub mod workers;
