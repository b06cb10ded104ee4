//! `lain logship`: ships container, file and access logs to Kafka, Elasticsearch or local
//! files, at least once. See ARCHITECTURE.md for its place in the system.

pub mod buffer;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod event;
pub mod indexer;
pub mod logs_cli;
pub mod metrics;
pub mod pipeline;
pub mod sink;
pub mod source;

pub use sink::elasticsearch::discover_query;
