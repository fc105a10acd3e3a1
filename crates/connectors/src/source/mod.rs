//! Sources.

pub mod file;
pub mod memory;
