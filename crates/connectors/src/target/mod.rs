//! Targets.

pub mod file;
