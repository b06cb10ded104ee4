//! `lain dns`: the cluster DNS server. It answers for the cluster zones from an in-memory
//! zone compiled from the watched cluster state, forwards other names for allowed clients,
//! and refuses the rest. See ARCHITECTURE.md for its place in the system.

pub mod cli;
pub mod config;
pub mod forward;
pub mod handler;
pub mod metrics;
pub mod server;
pub mod udp;
pub mod zone;
