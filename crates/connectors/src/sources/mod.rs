//! Sources.

pub mod entra;
pub mod file;
pub mod memory;
