//! What idsync remembers about one agreement (one source × one target) between runs.

use crate::source::{Kind, Snapshot};
use crate::target::PKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The version of the state format this build writes. A newer one is refused, never overwritten.
pub const STATE_FORMAT: u32 = 1;

/// A value kept per principal kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PerKind<T> {
    /// For users.
    #[serde(default)]
    pub users: T,
    /// For service principals.
    #[serde(default)]
    pub service_principals: T,
    /// For groups.
    #[serde(default)]
    pub groups: T,
}

impl<T> PerKind<T> {
    /// The value for a kind.
    pub fn get(&self, kind: Kind) -> &T {
        match kind {
            Kind::User => &self.users,
            Kind::ServicePrincipal => &self.service_principals,
            Kind::Group => &self.groups,
        }
    }

    /// The value for a kind, mutably.
    pub fn get_mut(&mut self, kind: Kind) -> &mut T {
        match kind {
            Kind::User => &mut self.users,
            Kind::ServicePrincipal => &mut self.service_principals,
            Kind::Group => &mut self.groups,
        }
    }
}

/// A value shared between copies until one of them changes it: cloning copies a pointer, and the
/// first write through a copy that is shared copies the value (`Arc::make_mut`), so every copy
/// keeps value semantics. A state's id maps are held this way: the store's memory of the loaded
/// state, the state a run works on and the copy an apply keeps to go back to are one map until
/// the apply writes to it, and maps no write touched compare equal without being read.
#[derive(Default)]
pub struct Shared<T>(std::sync::Arc<T>);

impl<T> Shared<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Shared(std::sync::Arc::new(value))
    }

    /// Whether two copies are still one value (no write since one was cloned from the other).
    pub fn shares(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T: Clone> Shared<T> {
    /// The value, mutably: copied first if another copy shares it.
    pub fn make_mut(&mut self) -> &mut T {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(std::sync::Arc::clone(&self.0))
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Writing through a shared copy copies the value first (see [`Shared`]).
impl<T: Clone> std::ops::DerefMut for Shared<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.make_mut()
    }
}

impl<'a, T> IntoIterator for &'a Shared<T>
where
    &'a T: IntoIterator,
{
    type Item = <&'a T as IntoIterator>::Item;
    type IntoIter = <&'a T as IntoIterator>::IntoIter;
    fn into_iter(self) -> Self::IntoIter {
        (&*self.0).into_iter()
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Shared::new(value)
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        self.shares(other) || *self.0 == *other.0
    }
}

impl<T: Eq> Eq for Shared<T> {}

impl<T: std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Shared::new)
    }
}

/// Source id → target id, per kind (see [`AgreementState::links`]).
pub type Links = PerKind<Shared<BTreeMap<String, String>>>;

/// Owned target principals by target id, per kind (see [`AgreementState::owned`]).
pub type OwnedMaps = PerKind<Shared<BTreeMap<String, Owned>>>;

/// How idsync came to own a target principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Ownership {
    /// idsync created it.
    Created,
    /// It existed and was adopted (`adopt = true`, or named in `adopt_keys`).
    Adopted,
}

/// One owned target principal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// Its key when last seen, for messages and for `state show`.
    pub key: String,
    /// How idsync came to own it.
    pub how: Ownership,
    /// The source principal it was created or adopted for. Kept when that source principal moves
    /// to another target principal (a rename the target cannot do), so this one is never handed
    /// to someone else while the original is still in the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Where the agreement stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgreementStatus {
    /// idsync has authority over what it owns.
    #[default]
    Active,
    /// Authority was handed to the target: idsync owns nothing and will not sync again.
    Finalised,
    /// What idsync created was removed and the agreement ended.
    Terminated,
}

/// The journal of an apply in progress. Written before the first write and cleared after the last,
/// so a run that crashed in between recognises the principals it created as its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    /// Identifies the apply (the plan's hash).
    pub plan_id: String,
    /// Creates that were started and not confirmed, by folded key.
    pub pending_creates: BTreeSet<PKey>,
    /// With `on_apply_error = "rollback"`: the operations that undo this apply, in the order they
    /// run (written before the first write; empty otherwise). A run that finds them finishes the
    /// rollback before it plans anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo: Vec<crate::plan::Op>,
    /// The apply failed or halted and its rollback began: `undo` holds what is left to undo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolling_back: bool,
}

/// A principal whose writes failed in runs in a row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Strikes {
    /// Runs in a row in which a write to it failed.
    pub runs: u32,
    /// The last failure.
    pub error: String,
    /// When it first failed, in seconds since the Unix epoch.
    pub since: u64,
    /// Quarantined until then (seconds since the Unix epoch): its operations are held back. 0
    /// while it is not quarantined.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub until: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Everything idsync remembers about one agreement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgreementState {
    /// Format version ([`STATE_FORMAT`]).
    pub format: u32,
    /// The agreement's name.
    pub agreement: String,
    /// Incremented on every commit; plans record it as their precondition.
    pub version: u64,
    /// Active, finalised or terminated.
    #[serde(default)]
    pub status: AgreementStatus,
    /// Source id → target id, per kind.
    #[serde(default)]
    pub links: Links,
    /// Target principals idsync created or adopted, by target id, per kind.
    #[serde(default)]
    pub owned: OwnedMaps,
    /// The source snapshot last applied in full (the base for change feeds).
    #[serde(default)]
    pub last_applied: Option<std::sync::Arc<Snapshot>>,
    /// Change-feed cursors (delta tokens), advanced only after a successful apply.
    #[serde(default)]
    pub cursors: BTreeMap<String, String>,
    /// The apply in progress, if a run stopped in the middle of one.
    #[serde(default)]
    pub journal: Option<Journal>,
    /// Principals whose writes failed in the last runs, by `kind:folded key`: after
    /// `quarantine_after` runs in a row they are quarantined (their operations held back) until
    /// a time that grows with every failure. A success, or `idsync agreement release`, clears one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failing: BTreeMap<String, Strikes>,
    /// Why the agreement was halted (too large a share of a run's operations failed): runs refuse
    /// to write until a person resumes it (`idsync agreement resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    /// Whether the last applied snapshot is a faithful picture of the target, so an incremental
    /// run may read only what changed. Set by a clean, complete apply; cleared when an apply
    /// starts, fails, or stops between stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Trust>,
    /// For a target that cannot be read (Kanidm): the cursor it was left at by the last
    /// successful flush (Kanidm's sync cookie). The state's picture of the target holds only
    /// while the target is still at this cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cursor: Option<String>,
    /// When `cursors` were last committed (seconds since the Unix epoch). A run whose source
    /// reported no change does not commit the newer cursors it was handed until these are
    /// [`CURSOR_REFRESH_SECS`] old: reading from an older cursor yields the same (no) changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursors_at: Option<u64>,
    /// What the last run planned when it found nothing to do, valid only in the version of the
    /// state it was committed with: the next run whose source reports no change says the same
    /// without mapping and planning the whole tenant again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<Settled>,
}

/// How old committed cursors may grow before a run that found no change commits the newer ones
/// its source handed it: six hours, well inside the shortest life of a cursor idsync reads (a
/// Microsoft Graph delta token is kept 7 days).
pub const CURSOR_REFRESH_SECS: u64 = 6 * 3600;

/// The plan of a run that found nothing to do, as far as it does not come from the source read:
/// what a run whose source reports no change would plan again, kept with the state it holds for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settled {
    /// The state version this holds for: the version the commit that recorded it wrote. Any
    /// other commit since (an apply, `idsync agreement`, an import) makes it stale.
    pub version: u64,
    /// The fingerprint of the mapping, capabilities and policy it was planned under.
    pub fingerprint: String,
    /// Whether an empty source was allowed when it was planned.
    pub allow_empty_source: bool,
    /// The plan's own notes (the read's are drawn again from the snapshot).
    pub notes: Vec<String>,
    /// The plan's counts.
    pub summary: crate::plan::Summary,
    /// The idsync build that planned it: another build plans afresh (its planner may say
    /// something else of the same state).
    #[serde(default)]
    pub build: String,
}

/// What lets an incremental run trust the last applied snapshot instead of observing the whole
/// target: the target was observed in full at `observed_at`, and every apply since then was clean
/// and complete under the same mapping, capabilities and policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trust {
    /// When the target was last observed in full (seconds since the Unix epoch).
    pub observed_at: u64,
    /// A digest of the mapping, capabilities and policy the picture was made with.
    pub fingerprint: String,
    /// Counts over the whole tenant as the last applied snapshot maps to them, which a plan made
    /// on the change alone cannot see (none from an earlier build: the next run plans in full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
}

/// Counts over the whole desired state that a plan made on the change alone carries forward: what
/// a run with no change would count after a clean, complete apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Principals in the desired state.
    pub principals: u64,
    /// Principals idsync owns that left the source and are kept (the plan's `kept`).
    pub kept: u64,
    /// Memberships of groups outside the scope.
    pub dangling: u64,
    /// Memberships of users or service principals the source does not have.
    pub missing: u64,
}

impl AgreementState {
    /// A fresh state for an agreement.
    pub fn new(agreement: impl Into<String>) -> Self {
        AgreementState {
            format: STATE_FORMAT,
            agreement: agreement.into(),
            version: 0,
            status: AgreementStatus::Active,
            links: PerKind::default(),
            owned: PerKind::default(),
            last_applied: None,
            cursors: BTreeMap::new(),
            journal: None,
            failing: BTreeMap::new(),
            halted: None,
            trust: None,
            target_cursor: None,
            cursors_at: None,
            settled: None,
        }
    }

    /// Whether idsync owns the target principal with this kind and id.
    pub fn owns(&self, kind: Kind, target_id: &str) -> bool {
        self.owned.get(kind).contains_key(target_id)
    }

    /// Number of owned principals.
    pub fn owned_count(&self) -> usize {
        Kind::ALL.iter().map(|k| self.owned.get(*k).len()).sum()
    }

    /// The target id linked to a source principal.
    pub fn link(&self, kind: Kind, source_id: &str) -> Option<&str> {
        self.links.get(kind).get(source_id).map(String::as_str)
    }

    /// Whether a create of this key was started by an apply that did not finish.
    pub fn pending_create(&self, key: &PKey) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.pending_creates.contains(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AgreementState {
        let mut st = AgreementState::new("a");
        st.links.users.insert("u1".into(), "t1".into());
        st.owned.users.insert(
            "t1".into(),
            Owned {
                key: "ada".into(),
                how: Ownership::Created,
                source: Some("u1".into()),
            },
        );
        st
    }

    #[test]
    fn a_copy_shares_its_maps_until_one_side_writes() {
        let st = state();
        let mut copy = st.clone();
        assert!(copy.links.users.shares(&st.links.users));
        assert!(copy.owned.users.shares(&st.owned.users));

        // Reads leave them shared.
        assert_eq!(copy.link(Kind::User, "u1"), Some("t1"));
        assert!(copy.owns(Kind::User, "t1"));
        assert!(copy.links.users.shares(&st.links.users));

        // A write copies the one map it writes to; the original keeps its value.
        copy.links.users.insert("u2".into(), "t2".into());
        assert!(!copy.links.users.shares(&st.links.users));
        assert!(copy.owned.users.shares(&st.owned.users));
        assert!(copy.links.groups.shares(&st.links.groups));
        assert_eq!(st.link(Kind::User, "u2"), None);
        assert_eq!(copy.link(Kind::User, "u2"), Some("t2"));
        assert_ne!(copy, st);

        // Two maps that are no longer one still compare by value.
        copy.links.users.remove("u2");
        assert!(!copy.links.users.shares(&st.links.users));
        assert_eq!(copy, st);
    }

    #[test]
    fn shared_maps_are_stored_as_the_plain_maps() {
        let st = state();
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["links"]["users"], serde_json::json!({"u1": "t1"}));
        assert_eq!(json["owned"]["users"]["t1"]["key"], "ada");
        let back: AgreementState = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
        assert!(!back.links.users.shares(&st.links.users));
    }
}
