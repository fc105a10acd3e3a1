//! idsync's engine. [`plan()`] is pure and synchronous: from the desired state (a mapped source
//! snapshot), the observed target, the agreement's state and a policy, it computes a [`Plan`].
//! [`apply()`] executes a plan against a [`Target`] in order, with bounded concurrency, and records
//! in the state what succeeded. Everything else here (mapping, scope, flattening) is pure too.
//!
//! [`Plan`]: idsync_model::Plan

pub mod apply;
pub mod delta;
pub mod flatten;
pub use idsync_model::fnv;
pub mod fold;
pub mod mapping;
pub mod memory;
pub mod observe;
pub mod ondemand;
pub mod plan;
pub mod progress;
pub mod quarantine;
pub mod recheck;
pub mod rollback;
mod schedule;
pub mod scope;
pub mod source;
pub mod target;
pub mod template;

pub use apply::{ApplyOptions, ApplyReport, apply};
pub use fold::{Folded, Lookup, fold};
pub use mapping::{Mapping, map_snapshot};
pub use memory::MemoryTarget;
pub use plan::{Deprovision, OnApplyError, OnConflict, Policy, plan, plan_taking_members};
pub use scope::Scope;
pub use source::{Changes, Read, Source, SourceError, SourceErrorKind};
pub use target::{
    Ending, Outcome, Requests, Seeding, Sight, Target, TargetError, TargetErrorKind, TargetIdentity,
};
pub use template::Template;
