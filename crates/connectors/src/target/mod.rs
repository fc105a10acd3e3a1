//! Targets.

pub mod file;
pub mod lakefs;
