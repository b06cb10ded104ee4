//! `lain proxy`: the edge proxy. Routes and endpoints come from the cluster-state watcher and
//! are compiled into an immutable route table swapped in place; pingora proxies the requests.

pub mod access_log;
pub mod cli;
pub mod config;
pub mod h1;
pub mod header_guard;
pub mod health;
pub mod metrics;
pub mod server;
pub mod service;
pub mod stream;
pub mod table;
pub mod tls;
pub mod upgrade;
pub mod upstream;
