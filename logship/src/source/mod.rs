//! Sources: where lines are read from.

pub mod docker;
pub mod file;
