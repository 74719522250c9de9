//! Notices to a business's own n8n workflow (CONTRACT.md §5): what happened to
//! its calls and bookings, signed with Standard Webhooks, sent by the worker.
//!
//! - `guard`: which addresses a notice may go to (server-side request forgery);
//! - `client`: one signed POST with timeouts and no redirects;
//! - `classify`: what the receiver's answer means (done, retry, park, turn off).

pub mod classify;
pub mod client;
pub mod consumer;
pub mod deliver;
pub mod guard;
pub mod notice;
pub mod queue;
pub mod record;
pub mod relay;
