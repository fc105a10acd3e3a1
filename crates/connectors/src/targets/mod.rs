//! Targets.

pub mod databricks;
pub mod file;
pub mod lakefs;
pub mod scim;
