//! Sources: where lines are read from.

pub mod file;
pub mod docker;
