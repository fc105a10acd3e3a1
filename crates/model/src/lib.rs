//! idsync's identity model: what sources say ([`source`]), what targets hold ([`target`]), plans
//! ([`plan`]) and what idsync remembers per agreement ([`state`]). Plain data with serde; no IO.

pub mod plan;
pub mod secret;
pub mod source;
pub mod state;
pub mod target;

pub use plan::{
    AttrChange, Conflict, Halt, HaltReason, Observation, Op, PRef, Plan, PlanFile, ReadMode, Stage,
    Summary,
};
pub use secret::Secret;
pub use source::{
    Change, Directory, Group, Kind, Member, ServicePrincipal, Snapshot, User, UserType,
};
pub use state::{AgreementState, AgreementStatus, Journal, Owned, Ownership, PerKind, Trust};
pub use target::{
    Attr, AttrValue, Capabilities, Desired, DesiredPrincipal, HeldBack, MemberIds, Observed,
    ObservedPrincipal, PKey, Principal, SourceRef,
};
