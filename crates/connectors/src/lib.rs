//! idsync's connectors: sources under [`source`], targets under [`target`], one module each.
//! Sources implement [`idsync_engine::Source`]; targets implement [`idsync_engine::Target`]; both
//! talk HTTP through [`http`].

pub mod entra_auth;
pub mod http;
pub mod source;
pub mod target;
