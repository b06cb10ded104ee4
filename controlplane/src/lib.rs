//! `lain controlplane`: turns lain.yaml apps into containers on Docker engines and publishes
//! the cluster state the data plane serves. See ARCHITECTURE.md for its place in the system.

pub mod api;
pub mod build;
pub mod cli;
pub mod client;
pub mod config;
pub mod docker;
pub mod engine;
pub mod lainyaml;
pub mod leader;
pub mod metrics;
pub mod publish;
pub mod resources;
pub mod secrets;
pub mod yaml;

pub use engine::{Engine, EngineError, EngineSettings, NodeSpec, ScaleChange};
pub use lainyaml::{LainConf, LocatedError};
