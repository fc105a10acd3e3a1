//! idsync's identity model: what sources say ([`source`]), what targets hold ([`target`]), plans
//! ([`plan`]) and what idsync remembers per agreement ([`state`]). Plain data with serde; no IO.

pub mod fnv;
pub mod plan;
pub mod secret;
pub mod source;
pub mod state;
pub mod target;
pub mod time;

pub use plan::{
    AttrChange, Conflict, Halt, HaltReason, Observation, Op, PRef, Plan, PlanFile, ReadMode, Stage,
    Summary,
};
pub use secret::Secret;
pub use source::{
    Change, Directory, Group, Id, Ids, Kind, Member, Members, ServicePrincipal, Snapshot, User,
    UserType,
};
pub use state::{
    AgreementState, AgreementStatus, Journal, Links, Owned, OwnedMaps, Ownership, PerKind, Shared,
    Strikes, Totals, Trust,
};
pub use target::{
    Attr, AttrValue, Capabilities, Desired, DesiredPrincipal, HeldBack, Key, MemberIds, Observed,
    ObservedPrincipal, PKey, Principal, SourceRef,
};
pub use time::{civil, parse_rfc3339, unix_of};

/// A file's bytes without a UTF-8 byte order mark (editors on Windows write one; JSON parsers
/// then fail at "line 1 column 1").
pub fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}
