//! Sources.

pub mod entra;
pub mod file;
pub mod ldap;
pub mod memory;
