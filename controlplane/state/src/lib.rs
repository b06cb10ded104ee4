//! The cluster-state contract between lain's control plane and its data plane.
//!
//! Every key and value that crosses etcd is defined here: [`keys`] builds and parses keys,
//! [`records`] holds the typed, versioned values, [`snapshot`] is the immutable view readers
//! see, and [`watcher`] is the single component that reads etcd for the data plane.
//!
//! Architecture invariant: this crate never writes to etcd. Only the control plane does,
//! using the key builders and encoders defined here.

pub mod keys;
pub mod metrics;
pub mod records;
pub mod snapshot;
pub mod watcher;

pub use keys::{Keyspace, Kind, StateKey};
pub use metrics::StateMetrics;
pub use records::*;
pub use snapshot::{Item, Rejected, Snapshot, StateDocument, Table};
pub use watcher::{EtcdConfig, Source, StateHandle, Watcher};
