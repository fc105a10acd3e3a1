//! idsync's connectors: sources under [`sources`], targets under [`targets`], one module each.
//! Sources implement [`idsync_engine::Source`]; targets implement [`idsync_engine::Target`]; both
//! talk HTTP through [`http`].

pub mod entra_auth;
pub mod http;
pub mod registry;
pub mod sources;
pub mod targets;
