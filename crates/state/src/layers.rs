//! A stored state in layers, so that a commit costs what changed.
//!
//! The document `<agreement>.state` is a small head ([`crate::codec::HEAD_FORMAT`]): the
//! agreement's cursors, journal, trust and the rest of its small fields, and the list of layer
//! objects that hold the big ones (the id map, the owned set and the last applied snapshot):
//!
//! - one **base**, `<agreement>.state-<version>-<nonce>.base`: those three whole (the snapshot's
//!   memberships as positions in its own lists since head format 3, `crate::compact`);
//! - then zero or more **deltas**, `<agreement>.state-<version>-<nonce>.delta`: what one commit
//!   changed in them (entries set or removed; a changed group whole).
//!
//! A commit whose big fields did not change (the journal written before an apply's first write;
//! a run with no change) writes the head alone. One that changed a few writes a delta beside the
//! ones before it. Once the deltas add up to a quarter of the base, or there are
//! [`MAX_DELTAS`] of them, the commit writes a new base instead and removes the layers it
//! replaces. Layer objects are written once, under a name no other writer uses, before the head
//! that names them: the head's compare-and-swap stays the one commit point, and a reader sees
//! either the old head and its layers or the new ones.

use crate::StateError;
use crate::codec::{corrupt, from_gzip, to_gzip};
use idsync_model::source::{Group, Kind, Member, ServicePrincipal, Snapshot, User};
use idsync_model::state::{Owned, PerKind, Shared};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// How many deltas a head names at most before a commit writes a new base.
pub const MAX_DELTAS: usize = 16;

/// Which kind of layer an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LayerKind {
    /// The big fields, whole.
    Base,
    /// What one commit changed in them.
    Delta,
}

/// A layer as the head names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerRef {
    /// The object's key, beside the head.
    pub key: String,
    /// Base or delta.
    pub kind: LayerKind,
    /// Its stored size, which decides when the deltas are compacted into a new base.
    pub bytes: u64,
}

/// The big fields of a state: what the layers hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Content {
    /// Source id → target id, per kind.
    pub links: idsync_model::Links,
    /// Owned target principals, per kind.
    pub owned: idsync_model::OwnedMaps,
    /// The last applied snapshot.
    pub snapshot: Option<Arc<Snapshot>>,
}

impl Content {
    /// How many entries it holds, counted as [`entries`] counts a state's. A state that holds
    /// more has a delta from this of at least the difference: every entry a delta adds counts
    /// (a group added whole with its members, a changed group with its added members), while
    /// removals only make the state smaller.
    pub(crate) fn entries(&self) -> usize {
        count(&self.links, &self.owned, self.snapshot.as_deref())
    }

    /// The big fields of `state`, copied.
    pub(crate) fn of(state: &idsync_model::AgreementState) -> Self {
        Content {
            links: state.links.clone(),
            owned: state.owned.clone(),
            snapshot: state.last_applied.clone(),
        }
    }
}

/// The key of a new layer written by the commit of `version`: unique to its writer, so two runs
/// racing never write the same object (only one of their heads then wins).
pub(crate) fn layer_key(agreement: &str, version: u64, kind: LayerKind) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ext = match kind {
        LayerKind::Base => "base",
        LayerKind::Delta => "delta",
    };
    format!(
        "{agreement}.state-{version}-{:08x}{t:032x}{n:08x}.{ext}",
        std::process::id()
    )
}

/// The version that wrote `key` and its kind, when `key` is a layer of `agreement`.
pub(crate) fn layer_of(agreement: &str, key: &str) -> Option<(u64, LayerKind)> {
    let rest = key.strip_prefix(agreement)?.strip_prefix(".state-")?;
    let (rest, kind) = if let Some(r) = rest.strip_suffix(".base") {
        (r, LayerKind::Base)
    } else {
        (rest.strip_suffix(".delta")?, LayerKind::Delta)
    };
    let (version, nonce) = rest.split_once('-')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) || !hex(nonce) {
        return None;
    }
    Some((version.parse().ok()?, kind))
}

/// Whether a head's layers are a base then deltas, each named as a layer of `agreement`: else
/// what is wrong (a head edited or copied by hand), said for the head's error.
pub(crate) fn check_refs(agreement: &str, refs: &[LayerRef]) -> Result<(), String> {
    for (i, r) in refs.iter().enumerate() {
        let expected = if i == 0 {
            LayerKind::Base
        } else {
            LayerKind::Delta
        };
        if r.kind != expected || layer_of(agreement, &r.key).map(|(_, k)| k) != Some(expected) {
            return Err(format!(
                "it names {:?} as its layer {}, which is not a {expected:?} layer of this agreement",
                r.key,
                i + 1
            ));
        }
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BaseOut<'a> {
    agreement: &'a str,
    version: u64,
    links: &'a idsync_model::Links,
    owned: &'a idsync_model::OwnedMaps,
    /// The last applied snapshot, its members as positions ([`crate::compact`]).
    snapshot: Option<crate::compact::SnapshotOut<'a>>,
}

/// Every layer struct refuses fields it does not know: a layer written by a newer build is
/// refused, never read with part of it dropped (and saved back that way by the next base).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BaseIn {
    agreement: String,
    version: u64,
    #[serde(default)]
    links: idsync_model::Links,
    #[serde(default)]
    owned: idsync_model::OwnedMaps,
    /// The last applied snapshot as bases before head format 3 held it (every member whole).
    #[serde(default)]
    last_applied: Option<Snapshot>,
    /// The last applied snapshot, its members as positions ([`crate::compact`]).
    #[serde(default)]
    snapshot: Option<crate::compact::SnapshotIn>,
}

/// What one commit changed in the big fields: entries set (`Some`) or removed (`None`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Delta {
    #[serde(default)]
    links: PerKind<BTreeMap<String, Option<String>>>,
    #[serde(default)]
    owned: PerKind<BTreeMap<String, Option<Owned>>>,
    /// `None`: the snapshot did not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotDelta>,
}

/// What changed in the last applied snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SnapshotDelta {
    /// `false`: there is no snapshot any more (the other fields are empty).
    present: bool,
    #[serde(default)]
    users: BTreeMap<String, Option<Arc<User>>>,
    #[serde(default)]
    service_principals: BTreeMap<String, Option<ServicePrincipal>>,
    /// Groups new (whole) or gone.
    #[serde(default)]
    groups: BTreeMap<String, Option<Group>>,
    /// Groups in both that changed: their members added and removed (a group of 100k members
    /// that lost one is one entry, not 100k), their other fields when those changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    group_changes: BTreeMap<String, GroupChange>,
    #[serde(default)]
    edge_groups: BTreeMap<String, Option<Group>>,
    /// The incompletely read groups, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incomplete_groups: Option<BTreeSet<String>>,
}

/// What changed in a group both snapshots hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GroupChange {
    /// The group without its members, when a field other than its members changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fields: Option<Group>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    added: BTreeSet<Member>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    removed: BTreeSet<Member>,
}

/// The groups of `new` that `old` lacks (whole) and those it has that `new` lacks (`None`); and
/// for those in both that differ, what changed.
#[allow(clippy::type_complexity)]
fn diff_groups(
    old: &BTreeMap<String, Group>,
    new: &BTreeMap<String, Group>,
) -> (
    BTreeMap<String, Option<Group>>,
    BTreeMap<String, GroupChange>,
) {
    let mut whole = BTreeMap::new();
    let mut changes = BTreeMap::new();
    for (id, g) in diff_map(old, new) {
        match (old.get(&id), g) {
            (Some(before), Some(after)) => {
                let bare = |g: &Group| Group {
                    members: Default::default(),
                    ..g.clone()
                };
                let fields = bare(&after);
                changes.insert(
                    id,
                    GroupChange {
                        fields: (bare(before) != fields).then_some(fields),
                        added: after.members.difference(&before.members).cloned().collect(),
                        removed: before.members.difference(&after.members).cloned().collect(),
                    },
                );
            }
            (_, g) => {
                whole.insert(id, g);
            }
        }
    }
    (whole, changes)
}

#[derive(Serialize)]
struct DeltaOut<'a> {
    agreement: &'a str,
    version: u64,
    delta: &'a Delta,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeltaIn {
    agreement: String,
    version: u64,
    delta: Delta,
}

impl Delta {
    /// Whether nothing changed.
    pub(crate) fn is_empty(&self) -> bool {
        per_kind_empty(&self.links) && per_kind_empty(&self.owned) && self.snapshot.is_none()
    }

    /// How many entries it sets or removes (a group whole counts its members).
    pub(crate) fn entries(&self) -> usize {
        let snapshot = self.snapshot.as_ref().map_or(0, |d| {
            let groups = |m: &BTreeMap<String, Option<Group>>| {
                m.values()
                    .map(|g| 1 + g.as_ref().map_or(0, |g| g.members.len()))
                    .sum::<usize>()
            };
            d.users.len()
                + d.service_principals.len()
                + groups(&d.groups)
                + groups(&d.edge_groups)
                + d.group_changes
                    .values()
                    .map(|c| 1 + c.added.len() + c.removed.len())
                    .sum::<usize>()
        });
        per_kind_len(&self.links) + per_kind_len(&self.owned) + snapshot
    }
}

/// How many entries the big fields of `state` hold (a group counts its members), to weigh a
/// delta against.
pub(crate) fn entries(state: &idsync_model::AgreementState) -> usize {
    count(&state.links, &state.owned, state.last_applied.as_deref())
}

fn count(
    links: &idsync_model::Links,
    owned: &idsync_model::OwnedMaps,
    snapshot: Option<&Snapshot>,
) -> usize {
    let snapshot = snapshot.map_or(0, |s| {
        s.users.len()
            + s.service_principals.len()
            + s.groups
                .values()
                .map(|g| 1 + g.members.len())
                .sum::<usize>()
            + s.edge_groups.len()
    });
    Kind::ALL
        .iter()
        .map(|k| links.get(*k).len() + owned.get(*k).len())
        .sum::<usize>()
        + snapshot
}

/// Whether a delta of `entries` entries, against a state of `total`, is written as a new base.
pub(crate) fn calls_for_a_base(entries: usize, total: usize) -> bool {
    entries > DELTA_ENTRIES_FOR_A_BASE && entries > total / 4
}

/// A delta of more entries than this, and more than a quarter of the state's, is not encoded: the
/// commit writes a new base instead (the delta's stored size would call for one anyway, and at
/// the first sync of a large tenant its encoding is the largest allocation of the run).
pub(crate) const DELTA_ENTRIES_FOR_A_BASE: usize = 10_000;

fn per_kind_empty<V>(p: &PerKind<BTreeMap<String, V>>) -> bool {
    per_kind_len(p) == 0
}

fn per_kind_len<V>(p: &PerKind<BTreeMap<String, V>>) -> usize {
    p.users.len() + p.service_principals.len() + p.groups.len()
}

/// The entries of `new` that differ from `old`'s (set), and the keys `old` has and `new` has not
/// (removed): one walk of both, in order.
fn diff_map<V: Clone + PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> BTreeMap<String, Option<V>> {
    use std::cmp::Ordering;
    let mut out = BTreeMap::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.insert((*k).clone(), None);
                a.next();
            }
            (None, Some((k, v))) => {
                out.insert((*k).clone(), Some((*v).clone()));
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.insert((*ka).clone(), None);
                    a.next();
                }
                Ordering::Greater => {
                    out.insert((*kb).clone(), Some((*vb).clone()));
                    b.next();
                }
                Ordering::Equal => {
                    if va != vb {
                        out.insert((*kb).clone(), Some((*vb).clone()));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

fn diff_per_kind<V: Clone + PartialEq>(
    old: &PerKind<Shared<BTreeMap<String, V>>>,
    new: &PerKind<Shared<BTreeMap<String, V>>>,
) -> PerKind<BTreeMap<String, Option<V>>> {
    // A map no write touched is still the loaded one: nothing to compare.
    let diff = |a: &Shared<BTreeMap<String, V>>, b: &Shared<BTreeMap<String, V>>| {
        if a.shares(b) {
            BTreeMap::new()
        } else {
            diff_map(a, b)
        }
    };
    PerKind {
        users: diff(&old.users, &new.users),
        service_principals: diff(&old.service_principals, &new.service_principals),
        groups: diff(&old.groups, &new.groups),
    }
}

fn diff_snapshot(
    old: &Option<Arc<Snapshot>>,
    new: &Option<Arc<Snapshot>>,
) -> Option<SnapshotDelta> {
    let new = match (old, new) {
        (None, None) => return None,
        (Some(a), Some(b)) if Arc::ptr_eq(a, b) => return None,
        (_, None) => return Some(SnapshotDelta::default()),
        (_, Some(b)) => b,
    };
    let empty = Snapshot::default();
    let old_s = old.as_deref().unwrap_or(&empty);
    let (groups, group_changes) = diff_groups(&old_s.groups, &new.groups);
    let d = SnapshotDelta {
        present: true,
        users: diff_map(&old_s.users, &new.users),
        service_principals: diff_map(&old_s.service_principals, &new.service_principals),
        groups,
        group_changes,
        edge_groups: diff_map(&old_s.edge_groups, &new.edge_groups),
        incomplete_groups: (old_s.incomplete_groups != new.incomplete_groups)
            .then(|| new.incomplete_groups.clone()),
    };
    let unchanged = old.is_some()
        && d.users.is_empty()
        && d.service_principals.is_empty()
        && d.groups.is_empty()
        && d.group_changes.is_empty()
        && d.edge_groups.is_empty()
        && d.incomplete_groups.is_none();
    (!unchanged).then_some(d)
}

/// What changed from `old` to the big fields of `state`.
pub(crate) fn diff(old: &Content, state: &idsync_model::AgreementState) -> Delta {
    Delta {
        links: diff_per_kind(&old.links, &state.links),
        owned: diff_per_kind(&old.owned, &state.owned),
        snapshot: diff_snapshot(&old.snapshot, &state.last_applied),
    }
}

/// `patch` on a shared map, which stays shared with every copy of it when nothing changes.
fn patch_shared<V: Clone>(
    map: &mut Shared<BTreeMap<String, V>>,
    changes: BTreeMap<String, Option<V>>,
) {
    if !changes.is_empty() {
        patch(map.make_mut(), changes);
    }
}

fn patch<V>(map: &mut BTreeMap<String, V>, changes: BTreeMap<String, Option<V>>) {
    for (k, v) in changes {
        match v {
            Some(v) => {
                map.insert(k, v);
            }
            None => {
                map.remove(&k);
            }
        }
    }
}

fn patch_per_kind<V: Clone>(
    p: &mut PerKind<Shared<BTreeMap<String, V>>>,
    d: PerKind<BTreeMap<String, Option<V>>>,
) {
    patch_shared(&mut p.users, d.users);
    patch_shared(&mut p.service_principals, d.service_principals);
    patch_shared(&mut p.groups, d.groups);
}

/// `content` with the id map and owned set of `delta` applied (its snapshot left as it is).
pub(crate) fn apply_maps(content: &mut Content, delta: Delta) {
    patch_per_kind(&mut content.links, delta.links);
    patch_per_kind(&mut content.owned, delta.owned);
}

/// `content` with all of `delta` applied, or what in it does not fit `content` (a change to a
/// group it does not hold).
pub(crate) fn apply(content: &mut Content, mut delta: Delta) -> Result<(), String> {
    if let Some(d) = delta.snapshot.take() {
        if d.present {
            let s = Arc::make_mut(content.snapshot.get_or_insert_with(Default::default));
            patch(&mut s.users, d.users);
            patch(&mut s.service_principals, d.service_principals);
            patch(&mut s.groups, d.groups);
            for (id, c) in d.group_changes {
                let g = s.groups.get_mut(&id).ok_or_else(|| {
                    format!("it changes group {id:?}, which the layers before it do not hold")
                })?;
                if let Some(fields) = c.fields {
                    let members = std::mem::take(&mut g.members);
                    *g = Group { members, ..fields };
                }
                for m in &c.removed {
                    g.members.remove(m);
                }
                g.members.extend(c.added);
            }
            patch(&mut s.edge_groups, d.edge_groups);
            if let Some(ig) = d.incomplete_groups {
                s.incomplete_groups = ig;
            }
        } else {
            content.snapshot = None;
        }
    }
    apply_maps(content, delta);
    Ok(())
}

/// The stored bytes of a base holding the big fields of `state`, written by the commit of
/// `version`.
pub(crate) fn encode_base(
    state: &idsync_model::AgreementState,
    version: u64,
    location: &str,
) -> Result<Vec<u8>, StateError> {
    to_gzip(
        &BaseOut {
            agreement: &state.agreement,
            version,
            links: &state.links,
            owned: &state.owned,
            snapshot: state
                .last_applied
                .as_deref()
                .map(crate::compact::SnapshotOut),
        },
        location,
    )
}

/// The stored bytes of `delta`, written by the commit of `version`.
pub(crate) fn encode_delta(
    agreement: &str,
    version: u64,
    delta: &Delta,
    location: &str,
) -> Result<Vec<u8>, StateError> {
    to_gzip(
        &DeltaOut {
            agreement,
            version,
            delta,
        },
        location,
    )
}

fn check_layer(
    agreement: &str,
    head_version: u64,
    found: (&str, u64),
    location: &str,
) -> Result<(), StateError> {
    if found.0 != agreement {
        return Err(corrupt(
            location,
            format!(
                "a layer of agreement {:?}, named by the head of {agreement:?}",
                found.0
            ),
        ));
    }
    if found.1 > head_version {
        return Err(corrupt(
            location,
            format!(
                "a layer written at version {}, named by a head of version {head_version}",
                found.1
            ),
        ));
    }
    Ok(())
}

/// Reads a base of `agreement` named by a head of `head_version`.
pub(crate) fn decode_base(
    bytes: &[u8],
    agreement: &str,
    head_version: u64,
    location: &str,
) -> Result<Content, StateError> {
    let b: BaseIn = from_gzip(bytes, location)?;
    check_layer(agreement, head_version, (&b.agreement, b.version), location)?;
    let snapshot = match (b.snapshot, b.last_applied) {
        (Some(_), Some(_)) => {
            return Err(corrupt(
                location,
                "a base holds the last applied snapshot twice, as `lastApplied` and as \
                 `snapshot`: idsync writes one or the other"
                    .into(),
            ));
        }
        (Some(compact), None) => Some(
            compact
                .into_snapshot()
                .map_err(|e| corrupt(location, format!("the last applied snapshot: {e}")))?,
        ),
        (None, older) => older,
    };
    Ok(Content {
        links: b.links,
        owned: b.owned,
        snapshot: snapshot.map(Arc::new),
    })
}

/// Reads a delta of `agreement` named by a head of `head_version`.
pub(crate) fn decode_delta(
    bytes: &[u8],
    agreement: &str,
    head_version: u64,
    location: &str,
) -> Result<Delta, StateError> {
    let d: DeltaIn = from_gzip(bytes, location)?;
    check_layer(agreement, head_version, (&d.agreement, d.version), location)?;
    Ok(d.delta)
}

/// Whether a commit adding a delta of `new_bytes` to `layers` should write a new base instead.
pub(crate) fn compact(layers: &[LayerRef], new_bytes: u64) -> bool {
    let base = layers
        .iter()
        .find(|l| l.kind == LayerKind::Base)
        .map_or(0, |l| l.bytes);
    let deltas: Vec<&LayerRef> = layers
        .iter()
        .filter(|l| l.kind == LayerKind::Delta)
        .collect();
    deltas.len() >= MAX_DELTAS || deltas.iter().map(|l| l.bytes).sum::<u64>() + new_bytes > base / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, name: &str) -> User {
        User {
            id: id.into(),
            user_name: name.into(),
            display_name: name.into(),
            emails: vec![],
            active: true,
            user_type: Default::default(),
            external_id: None,
            attributes: BTreeMap::new(),
        }
    }

    fn state() -> idsync_model::AgreementState {
        let mut st = idsync_model::AgreementState::new("a");
        let mut s = Snapshot::default();
        for i in 0..5 {
            s.users.insert(
                format!("u{i}"),
                std::sync::Arc::new(user(&format!("u{i}"), &format!("n{i}"))),
            );
            st.links.users.insert(format!("u{i}"), format!("t{i}"));
        }
        s.groups.insert(
            "g".into(),
            Group {
                id: "g".into(),
                display_name: "G".into(),
                description: None,
                security_enabled: true,
                mail_enabled: false,
                members: [Member::user("u1"), Member::user("u2")].into(),
            },
        );
        s.incomplete_groups.insert("g".into());
        st.last_applied = Some(Arc::new(s));
        st
    }

    #[test]
    fn a_delta_applied_to_what_it_was_made_from_gives_the_new_content() {
        let old = state();
        let mut new = old.clone();
        let s = Arc::make_mut(new.last_applied.as_mut().unwrap());
        s.users.remove("u0");
        s.users
            .insert("u9".into(), std::sync::Arc::new(user("u9", "nine")));
        s.user_mut("u3").unwrap().active = false;
        let g = s.groups.get_mut("g").unwrap();
        g.members.remove(&Member::user("u1"));
        g.members.insert(Member::user("u9"));
        g.display_name = "G2".into();
        s.incomplete_groups.clear();
        new.links.users.remove("u0");
        new.links.users.insert("u9".into(), "t9".into());
        new.links.users.insert("u4".into(), "t44".into());
        new.owned.groups.insert(
            "tg".into(),
            Owned {
                key: "G".into(),
                how: idsync_model::state::Ownership::Created,
                source: None,
            },
        );
        let d = diff(&Content::of(&old), &new);
        assert!(!d.is_empty());
        // Only what changed is in it.
        let sd = d.snapshot.as_ref().unwrap();
        assert_eq!(sd.users.len(), 3, "{:?}", sd.users.keys());
        assert_eq!(d.links.users.len(), 3);
        // Through its stored form.
        let bytes = encode_delta("a", 2, &d, "x").unwrap();
        let back = decode_delta(&bytes, "a", 2, "x").unwrap();
        assert_eq!(back, d);
        // A group that lost a member and changed its name is one change, not its members whole.
        let gc = &sd.group_changes["g"];
        assert_eq!(gc.removed, [Member::user("u1")].into());
        assert_eq!(gc.added, [Member::user("u9")].into());
        assert!(gc.fields.as_ref().is_some_and(|f| f.members.is_empty()));
        assert!(sd.groups.is_empty());
        let mut c = Content::of(&old);
        apply(&mut c, back.clone()).unwrap();
        assert_eq!(c, Content::of(&new));
        // Applied to layers that lack the group, it is refused, not guessed.
        let mut lacking = Content::of(&old);
        Arc::make_mut(lacking.snapshot.as_mut().unwrap())
            .groups
            .clear();
        let e = apply(&mut lacking, back).unwrap_err();
        assert!(e.contains("\"g\""), "{e}");
        // Unchanged: empty, whether or not the snapshot is the same allocation.
        assert!(diff(&Content::of(&new), &new).is_empty());
        let mut copy = new.clone();
        copy.last_applied = Some(Arc::new((**new.last_applied.as_ref().unwrap()).clone()));
        assert!(diff(&Content::of(&new), &copy).is_empty());
        // Cleared, and made again from nothing.
        let mut cleared = new.clone();
        cleared.last_applied = None;
        let d = diff(&Content::of(&new), &cleared);
        let mut c = Content::of(&new);
        apply(&mut c, d).unwrap();
        assert_eq!(c.snapshot, None);
        let mut empty = new.clone();
        empty.last_applied = Some(Arc::default());
        let d = diff(&c, &empty);
        assert!(!d.is_empty(), "no snapshot and an empty one differ");
        apply(&mut c, d).unwrap();
        assert_eq!(c.snapshot.as_deref(), Some(&Snapshot::default()));
    }

    #[test]
    fn a_delta_holds_at_least_what_the_state_grew_by() {
        // From nothing (a first sync's commit against its journal), from a smaller state, and
        // with removals beside additions: the growth never exceeds the delta's entries, so a
        // commit may skip the comparison when the growth alone calls for a base.
        let empty = idsync_model::AgreementState::new("a");
        let full = state();
        let mut grown = full.clone();
        let s = Arc::make_mut(grown.last_applied.as_mut().unwrap());
        s.groups.remove("g");
        for i in 0..40 {
            let id = format!("g{i}");
            s.groups.insert(
                id.clone(),
                Group {
                    id,
                    display_name: format!("G{i}"),
                    description: None,
                    security_enabled: true,
                    mail_enabled: false,
                    members: (0..5).map(|u| Member::user(format!("u{u}"))).collect(),
                },
            );
        }
        grown.links.users.remove("u0");
        grown.links.groups.insert("g1".into(), "tg1".into());
        for (old, new) in [(&empty, &full), (&empty, &grown), (&full, &grown)] {
            let before = Content::of(old);
            let growth = entries(new) - before.entries();
            assert!(growth > 0);
            assert!(
                diff(&before, new).entries() >= growth,
                "{} < {growth}",
                diff(&before, new).entries()
            );
        }
        assert_eq!(Content::of(&full).entries(), entries(&full));
        assert!(calls_for_a_base(DELTA_ENTRIES_FOR_A_BASE + 1, 0));
        assert!(!calls_for_a_base(
            DELTA_ENTRIES_FOR_A_BASE + 1,
            4 * DELTA_ENTRIES_FOR_A_BASE + 8
        ));
        assert!(!calls_for_a_base(DELTA_ENTRIES_FOR_A_BASE, 0));
    }

    #[test]
    fn maps_a_commit_did_not_write_stay_shared_with_the_loaded_ones() {
        let old = state();
        let loaded = Content::of(&old);
        let mut new = old.clone();
        new.links.groups.insert("g".into(), "tg".into());
        // The users' maps are the loaded ones: the delta holds the groups' link alone.
        assert!(new.links.users.shares(&loaded.links.users));
        let d = diff(&loaded, &new);
        assert_eq!(d.links.groups.len(), 1);
        assert!(d.links.users.is_empty() && d.owned.users.is_empty());
        // Applying it copies the one map it changes.
        let mut c = loaded.clone();
        apply_maps(&mut c, d);
        assert!(c.links.users.shares(&loaded.links.users));
        assert!(c.owned.groups.shares(&loaded.owned.groups));
        assert!(!c.links.groups.shares(&loaded.links.groups));
        assert_eq!(c.links, new.links);
        // Unchanged maps that are not shared are still compared entry by entry.
        let mut copy = new.clone();
        copy.links.users = Shared::new((*new.links.users).clone());
        copy.links.users.insert("u9".into(), "t9".into());
        assert_eq!(diff(&Content::of(&new), &copy).links.users.len(), 1);
    }

    #[test]
    fn a_base_holding_two_snapshots_is_refused() {
        let base = br#"{"agreement": "a", "version": 1, "lastApplied": {}, "snapshot": {}}"#;
        let e = decode_base(base, "a", 1, "a.base").unwrap_err();
        assert!(
            e.to_string().contains("`lastApplied` and as `snapshot`"),
            "{e}"
        );
        let one = br#"{"agreement": "a", "version": 1, "snapshot": {}}"#;
        let c = decode_base(one, "a", 1, "a.base").unwrap();
        assert_eq!(c.snapshot.as_deref(), Some(&Snapshot::default()));
    }

    #[test]
    fn layer_names_belong_to_one_agreement() {
        let k = layer_key("a.b", 7, LayerKind::Delta);
        assert_eq!(layer_of("a.b", &k), Some((7, LayerKind::Delta)));
        assert_eq!(layer_of("a", &k), None, "{k}");
        let k = layer_key("a", 3, LayerKind::Base);
        assert_eq!(layer_of("a", &k), Some((3, LayerKind::Base)));
        for other in [
            "a.state",
            "a.lease",
            "a.state-1-zz.base",
            "a.state--ab.base",
            "a.state-1-ab.base.state",
            "a.state-x-ab.delta",
        ] {
            assert_eq!(layer_of("a", other), None, "{other}");
        }
        // An agreement whose name looks like a layer of another keeps its own objects.
        assert_eq!(layer_of("a", &format!("{k}.state")), None);
    }

    #[test]
    fn deltas_are_compacted_by_count_and_by_size() {
        let base = LayerRef {
            key: "b".into(),
            kind: LayerKind::Base,
            bytes: 4000,
        };
        let delta = |bytes| LayerRef {
            key: "d".into(),
            kind: LayerKind::Delta,
            bytes,
        };
        assert!(!compact(std::slice::from_ref(&base), 100));
        assert!(compact(std::slice::from_ref(&base), 1001));
        let mut layers = vec![base];
        layers.extend((0..MAX_DELTAS - 1).map(|_| delta(10)));
        assert!(!compact(&layers, 10));
        layers.push(delta(10));
        assert!(compact(&layers, 10));
    }
}
