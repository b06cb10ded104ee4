//! `lain proxy`: see ARCHITECTURE.md for its place in the system.

pub mod cli;
