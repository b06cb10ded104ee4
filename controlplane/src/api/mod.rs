//! The HTTP API of `lain controlplane` (docs/api.md): request and response types.

pub mod types;
