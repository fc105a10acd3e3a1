//! `plan(desired, observed, state, policy, caps) -> Plan`: pure, synchronous and deterministic.

use crate::fnv::{FnvMap as HashMap, FnvSet};
use idsync_model::{
    AgreementState, Attr, AttrChange, Capabilities, Conflict, Desired, DesiredPrincipal, Halt,
    HaltReason, Key, Kind, Observed, Op, PKey, PRef, PerKind, Plan, ReadMode, SourceRef, Summary,
    plan::PLAN_FORMAT,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What happens to a principal idsync owns when it leaves the source (or the scope).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deprovision {
    /// Nothing: it stays as it is. The default; nothing is ever deleted.
    #[default]
    None,
    /// Users and service principals are deactivated; groups are kept.
    Deactivate,
    /// It is deleted.
    Delete,
}

/// What a conflict does to the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// The plan halts before any write and the target is left as it was. The default.
    #[default]
    Halt,
    /// The conflicting principals are left out; everything else is applied.
    Skip,
}

/// What an apply does when a write fails or the run is stopped half-way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnApplyError {
    /// What succeeded stays and is recorded; the next run plans what is left. The default.
    #[default]
    Resume,
    /// No further write starts, and this run's writes are undone in reverse order, so the target
    /// is as it was before the run (see [`crate::rollback`]).
    Rollback,
}

/// The rules a plan follows. Serialises for the run's fingerprint of an agreement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// What happens to owned principals that left the source.
    pub deprovision: Deprovision,
    /// Adopt every existing target principal whose key a source principal maps to.
    pub adopt: bool,
    /// Adopt these target principals (folded keys) even when `adopt` is off.
    pub adopt_keys: BTreeSet<PKey>,
    /// What a conflict does.
    pub on_conflict: OnConflict,
    /// Attributes yielded to the target: set on create, never updated afterwards.
    pub yield_attributes: BTreeSet<Attr>,
    /// Group membership yielded to the target: members are added, never removed.
    pub yield_members: bool,
    /// Most deletions and deactivations a run may make without approval.
    pub max_deletions: Option<usize>,
    /// Most deletions and deactivations, as a percentage of the principals idsync owns.
    pub max_deletions_percent: Option<u32>,
    /// Deletions and deactivations approved for this run (`--approve-deletions N`).
    pub approved_deletions: usize,
    /// Allow a plan computed from an empty source snapshot (for decommissioning on purpose).
    pub allow_empty_source: bool,
    /// What an apply does when a write fails. It changes no plan, so it is not part of the
    /// agreement's fingerprint.
    #[serde(skip)]
    pub on_apply_error: OnApplyError,
    /// After this many runs in a row with a failed write to a principal, it is quarantined (0:
    /// never). Not part of the fingerprint.
    #[serde(skip)]
    pub quarantine_after: u32,
    /// A run in which more than this share of the operations it attempted failed (and at least
    /// [`crate::quarantine::HALT_FLOOR`] of them) halts the agreement until a person resumes it
    /// (`None`: never). Not part of the fingerprint.
    #[serde(skip)]
    pub max_failed_percent: Option<u32>,
}

impl Default for Policy {
    /// Nothing deleted, conflicts halt, no threshold, resume after a failed write, quarantine
    /// after 3 failing runs, halt when more than half of a run's operations fail.
    fn default() -> Self {
        Policy {
            deprovision: Deprovision::default(),
            adopt: false,
            adopt_keys: BTreeSet::new(),
            on_conflict: OnConflict::default(),
            yield_attributes: BTreeSet::new(),
            yield_members: false,
            max_deletions: None,
            max_deletions_percent: None,
            approved_deletions: 0,
            allow_empty_source: false,
            on_apply_error: OnApplyError::default(),
            quarantine_after: 3,
            max_failed_percent: Some(50),
        }
    }
}

/// What a plan made on the change alone ([`crate::delta`]) sees: its desired state and picture
/// hold only the principals the change touches (with what they reference), so the rest of the
/// tenant is summed up here as the bulk plan would count it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// The target ids idsync owns that the change touches: only these can be left over.
    pub tids: PerKind<BTreeSet<String>>,
    /// Principals in the whole desired state (for the empty-source guard).
    pub principals: usize,
    /// Principals left over and kept outside the window.
    pub kept_outside: usize,
    /// Memberships of groups outside the scope, in the whole desired state.
    pub dangling: usize,
    /// Memberships of principals the source does not have, in the whole desired state.
    pub missing: usize,
}

/// The principals of `kind` idsync owns, in id order: all of them, or those in `tids` (a window).
pub(crate) fn owned_within<'a>(
    state: &'a AgreementState,
    kind: Kind,
    tids: Option<&'a PerKind<BTreeSet<String>>>,
) -> Box<dyn Iterator<Item = (&'a String, &'a idsync_model::Owned)> + 'a> {
    let all = state.owned.get(kind);
    match tids {
        Some(t) => Box::new(t.get(kind).iter().filter_map(|t| all.get_key_value(t))),
        None => Box::new(all.iter()),
    }
}

/// Reverse lookups needed only when some principal did not resolve through its link.
struct KeyIndex<'a> {
    /// Owned target id → the source id it was made for, per kind.
    reverse: HashMap<(Kind, &'a str), &'a str>,
    /// Source ids in the desired state, per kind.
    sources: FnvSet<(Kind, &'a str)>,
    /// Source ids held back (unmappable, duplicate keys), per kind.
    held: FnvSet<(Kind, &'a str)>,
}

impl<'a> KeyIndex<'a> {
    fn new(desired: &'a Desired, state: &'a AgreementState) -> Self {
        let mut reverse = HashMap::default();
        for kind in Kind::ALL {
            for (tid, owned) in state.owned.get(kind) {
                if let Some(src) = &owned.source {
                    reverse.insert((kind, tid.as_str()), src.as_str());
                }
            }
        }
        let sources = desired
            .principals
            .values()
            .map(|d| (d.source.kind, d.source.id.as_str()))
            .collect();
        let held = desired
            .held_back
            .keys()
            .map(|s| (s.kind, s.id.as_str()))
            .collect();
        KeyIndex {
            reverse,
            sources,
            held,
        }
    }

    fn linked_source(&self, kind: Kind, tid: &str) -> Option<&'a str> {
        self.reverse.get(&(kind, tid)).copied()
    }

    /// In the source: mapped, or held back.
    fn in_source(&self, kind: Kind, id: &str) -> bool {
        self.sources.contains(&(kind, id)) || self.held.contains(&(kind, id))
    }

    fn held_back(&self, kind: Kind, id: &str) -> bool {
        self.held.contains(&(kind, id))
    }
}

/// How one desired principal resolved against the target.
#[derive(Clone, Debug)]
enum Res {
    /// It exists (owned, or adopted in this plan) with this target id.
    Existing(String),
    /// It will be created.
    New,
    /// It is in conflict and left alone; the id is the unowned principal holding its key, if any.
    Skipped(Option<String>),
}

struct Ctx<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    state: &'a AgreementState,
    policy: &'a Policy,
    caps: &'a Capabilities,
    window: Option<&'a Window>,
    ops: Vec<Op>,
    conflicts: Vec<Conflict>,
    notes: Vec<String>,
    summary: Summary,
}

/// What every group's memberships are planned against.
struct Wanting<'r, 'a> {
    res: &'r HashMap<PKey, Res>,
    /// The key each principal is written with, by its folded key.
    written: &'r HashMap<&'a PKey, Key>,
    /// Groups whose member lists are incomplete: members are added, never removed.
    incomplete: &'r BTreeSet<PKey>,
    /// Target principals held back: they keep their memberships.
    held: &'r FnvSet<(Kind, &'a str)>,
}

/// Computes the operations that bring the target in line with `desired`, within `policy` and
/// `caps`. Pure: the same inputs give the same plan, byte for byte.
pub fn plan(
    desired: &Desired,
    observed: &Observed,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
) -> Plan {
    plan_within(desired, observed, state, policy, caps, mode, None)
}

/// [`plan()`], for a desired state and a picture that hold only what a change touches when
/// `window` is given (see [`Window`]): principals idsync owns outside it are neither planned
/// nor counted one by one.
pub fn plan_within(
    desired: &Desired,
    observed: &Observed,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
    window: Option<&Window>,
) -> Plan {
    plan_with(desired, None, observed, state, policy, caps, mode, window)
}

/// [`plan()`], taking the desired state's direct members out of it (`desired.members` is left
/// empty): each group's set is freed once its memberships are planned, so that the plan's
/// member lists do not add to the sets they are made from (a million memberships at a first sync
/// of 100k users). The same plan as [`plan()`].
pub fn plan_taking_members(
    desired: &mut Desired,
    observed: &Observed,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
) -> Plan {
    let taken = std::mem::take(&mut desired.members);
    plan_with(
        desired,
        Some(taken),
        observed,
        state,
        policy,
        caps,
        mode,
        None,
    )
}

#[allow(clippy::too_many_arguments)]
fn plan_with(
    desired: &Desired,
    taken: Option<BTreeMap<PKey, BTreeSet<PKey>>>,
    observed: &Observed,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
    window: Option<&Window>,
) -> Plan {
    let mut cx = Ctx {
        desired,
        observed,
        state,
        policy,
        caps,
        window,
        ops: Vec::new(),
        conflicts: Vec::new(),
        notes: Vec::new(),
        summary: Summary {
            owned: state.owned_count(),
            ..Summary::default()
        },
    };
    let mut res = cx.resolve();
    cx.attributes(&res);
    cx.orphans(&res);
    let rename_order = cx.check_renames(&mut res);
    cx.memberships(&res, taken);
    cx.held_back();
    let (dangling, missing) = match window {
        Some(w) => (w.dangling, w.missing),
        None => (desired.dangling_members, desired.missing_members),
    };
    if dangling > 0 {
        cx.notes.push(format!(
            "{dangling} membership(s) point at groups outside the scope and are not synced (raise the group search depth to include nested groups)"
        ));
    }
    if missing > 0 {
        cx.notes.push(format!(
            "{missing} membership(s) point at users or service principals the source does not have (deleted, or not readable with its credentials); they are not synced"
        ));
    }
    let Ctx {
        mut ops,
        mut conflicts,
        notes,
        mut summary,
        ..
    } = cx;
    ops.sort_by_cached_key(Op::sort_key);
    order_renames(&mut ops, &rename_order);
    conflicts.sort();
    tally(&ops, &mut summary);
    let principals = window.map_or(desired.principals.len(), |w| w.principals);
    let halt = halt(principals, desired, state, policy, &conflicts, &summary);
    Plan {
        format: PLAN_FORMAT,
        agreement: state.agreement.clone(),
        state_version: state.version,
        mode,
        ops,
        conflicts,
        notes,
        halt,
        summary,
        observation: Default::default(),
        trust: None,
        approved_deletions: policy.approved_deletions,
        held_back: 0,
    }
}

fn pref(kind: Kind, key: &str, id: Option<&str>) -> PRef {
    PRef {
        kind,
        key: key.into(),
        id: id.map(str::to_owned),
    }
}

impl Ctx<'_> {
    /// Links first (the id map survives renames), then keys, then creation.
    fn resolve(&mut self) -> HashMap<PKey, Res> {
        let caps = self.caps;
        let mut res: HashMap<PKey, Res> = HashMap::default();
        res.reserve(self.desired.principals.len());
        let mut claimed: BTreeSet<(Kind, &str)> = BTreeSet::new();

        for (key, dp) in &self.desired.principals {
            let kind = key.kind;
            let Some(tid) = self.state.link(kind, &dp.source.id) else {
                continue;
            };
            match self.observed.get(kind, tid) {
                Some(o) if self.state.owns(kind, tid) => {
                    let same_key = caps.folds_to(&o.principal.key, &key.key);
                    if same_key || caps.renamable.contains(&kind) {
                        claimed.insert((kind, tid));
                        res.insert(key.clone(), Res::Existing(tid.to_owned()));
                    } else {
                        self.notes.push(format!(
                            "{} changed its key from {:?} to {:?}; this target cannot rename a {kind}, so a new one is created and the old one is handled by the deprovision policy",
                            dp.source, o.principal.key, dp.principal.key
                        ));
                    }
                }
                Some(_) => {}
                None => self.notes.push(format!(
                    "{} was linked to {kind} id {tid}, which is gone from the target: the link is repaired",
                    dp.source
                )),
            }
        }

        // The key index is needed only for principals no link resolved: in a steady state, none.
        if res.len() == self.desired.principals.len() {
            return res;
        }
        let mut by_key: BTreeMap<PKey, Vec<&str>> = BTreeMap::new();
        // Principals the target holds by the source id they carry as externalId (kinds it can
        // rename): a group renamed in the source since another tool made it is still that group.
        let mut by_external: BTreeMap<(Kind, &str), Vec<&str>> = BTreeMap::new();
        let external = caps.attributes.contains(&Attr::ExternalId);
        for (_, id, o) in self.observed.iter() {
            by_key.entry(caps.pkey(&o.principal)).or_default().push(id);
            if external
                && caps.renamable.contains(&o.principal.kind)
                && let Some(x) = o.principal.external_id.as_deref()
            {
                by_external
                    .entry((o.principal.kind, x))
                    .or_default()
                    .push(id);
            }
        }
        let idx = KeyIndex::new(self.desired, self.state);
        for (key, dp) in &self.desired.principals {
            if res.contains_key(key) {
                continue;
            }
            let candidates: Vec<&str> = by_key
                .get(key)
                .map(|v| {
                    v.iter()
                        .copied()
                        .filter(|id| !claimed.contains(&(key.kind, *id)))
                        .collect()
                })
                .unwrap_or_default();
            let by_external_id = || -> Vec<&str> {
                dp.principal
                    .external_id
                    .as_deref()
                    .and_then(|x| by_external.get(&(key.kind, x)))
                    .map(|v| {
                        v.iter()
                            .copied()
                            .filter(|id| {
                                !claimed.contains(&(key.kind, *id))
                                    && !self.state.owns(key.kind, id)
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let r = match candidates.as_slice() {
                [] => match by_external_id().as_slice() {
                    [tid] => self.claim_by_external_id(key, dp, tid),
                    _ => Res::New,
                },
                [tid] => self.claim_by_key(key, dp, tid, &idx),
                many => {
                    self.conflicts.push(Conflict {
                        key: key.clone(),
                        sources: vec![dp.source.clone()],
                        target_id: None,
                        reason: format!(
                            "the target holds {} principals with this key (ids {}); remove the duplicates",
                            many.len(),
                            many.join(", ")
                        ),
                    });
                    Res::Skipped(None)
                }
            };
            if let Res::Existing(tid) = &r
                && let Some((id, _)) = self
                    .observed
                    .principals
                    .get(key.kind)
                    .get_key_value(tid.as_str())
            {
                claimed.insert((key.kind, id.as_str()));
            }
            res.insert(key.clone(), r);
        }
        res
    }

    /// A principal idsync does not own that carries this source principal's externalId under
    /// another key: adopted (and renamed) when adoption is allowed for the key, else a conflict,
    /// since creating a second one would duplicate it.
    fn claim_by_external_id(&mut self, key: &PKey, dp: &DesiredPrincipal, tid: &str) -> Res {
        let kind = key.kind;
        let current = self
            .observed
            .get(kind, tid)
            .map_or(dp.principal.key.as_str(), |o| o.principal.key.as_str())
            .to_owned();
        let folded = |k: &PKey| PKey::new(k.kind, self.caps.fold(&k.key));
        let old = PKey::new(kind, self.caps.fold(&current));
        if self.policy.adopt
            || self
                .policy
                .adopt_keys
                .iter()
                .any(|k| folded(k) == *key || folded(k) == old)
        {
            self.notes.push(format!(
                "{key} is adopted from {kind} {current:?} (id {tid}), which carries {}'s id as its externalId; it is renamed",
                dp.source
            ));
            self.ops.push(Op::Adopt {
                target: pref(kind, &current, Some(tid)),
                source: dp.source.clone(),
            });
            return Res::Existing(tid.to_owned());
        }
        self.conflicts.push(Conflict {
            key: key.clone(),
            sources: vec![dp.source.clone()],
            target_id: Some(tid.to_owned()),
            reason: format!(
                "the target's {kind} {current:?} (id {tid}) carries {}'s id as its externalId, so it is this principal under its old name, and idsync did not create it; to let idsync take it over (and rename it), set adopt = true or list \"{kind}:{current}\" in adopt_keys",
                dp.source
            ),
        });
        Res::Skipped(Some(tid.to_owned()))
    }

    fn claim_by_key(
        &mut self,
        key: &PKey,
        dp: &DesiredPrincipal,
        tid: &str,
        idx: &KeyIndex<'_>,
    ) -> Res {
        let kind = key.kind;
        let observed = self.observed.get(kind, tid);
        let current = observed.map_or(dp.principal.key.as_str(), |o| o.principal.key.as_str());
        let target = pref(kind, current, Some(tid));
        let adopt_op = Op::Adopt {
            target,
            source: dp.source.clone(),
        };
        if self.state.owns(kind, tid) {
            // Ours. Take it over only if the source principal it stands for is gone (the source
            // object was deleted and re-created): if that one is still in the source under another
            // key, this key now belongs to someone else, and handing them the account would give
            // them its history and grants.
            match idx.linked_source(kind, tid) {
                // It will be deleted in this plan (an orphan, not protected, the read complete):
                // delete it first, and give the new source principal a fresh one.
                Some(other)
                    if other != dp.source.id
                        && idx.in_source(kind, other)
                        && !idx.held_back(kind, other)
                        && self.policy.deprovision == Deprovision::Delete
                        && self.desired.incomplete_groups.is_empty() =>
                {
                    self.notes.push(format!(
                        "{key} was idsync's principal for source {kind} {other}, which moved to another key; it is deleted and {} gets a new one",
                        dp.source
                    ));
                    return Res::New;
                }
                Some(other) if other != dp.source.id && idx.in_source(kind, other) => {
                    self.conflicts.push(Conflict {
                        key: key.clone(),
                        sources: vec![dp.source.clone(), SourceRef { kind, id: other.to_owned() }],
                        target_id: Some(tid.to_owned()),
                        reason: format!(
                            "{key} is idsync's principal for source {kind} {other}, which is still in the source under another key; this target cannot rename it, so the key cannot be handed to {} (remove or rename the old principal in the target first)",
                            dp.source
                        ),
                    });
                    return Res::Skipped(Some(tid.to_owned()));
                }
                _ => {
                    self.notes.push(format!(
                        "{} takes over {key}, which idsync already owns",
                        dp.source
                    ));
                    self.ops.push(adopt_op);
                    return Res::Existing(tid.to_owned());
                }
            }
        }
        if self.state.pending_create(key) {
            // Created by an apply that died before recording it, unless what is there now says it
            // stands for someone else.
            let contradicts = match (
                observed.and_then(|o| o.principal.external_id.as_deref()),
                dp.principal.external_id.as_deref(),
            ) {
                (Some(there), Some(wanted)) => there != wanted,
                _ => false,
            };
            if !contradicts {
                self.notes.push(format!(
                    "{key} was created by an apply that did not finish; idsync recognises it as its own"
                ));
                self.ops.push(adopt_op);
                return Res::Existing(tid.to_owned());
            }
        }
        let folded = |k: &PKey| PKey::new(k.kind, self.caps.fold(&k.key));
        if self.policy.adopt || self.policy.adopt_keys.iter().any(|k| folded(k) == *key) {
            self.ops.push(adopt_op);
            return Res::Existing(tid.to_owned());
        }
        self.conflicts.push(Conflict {
            key: key.clone(),
            sources: vec![dp.source.clone()],
            target_id: Some(tid.to_owned()),
            reason: format!(
                "{key} already exists in the target (id {tid}) and idsync did not create it; to let idsync manage it, set adopt = true or list \"{}:{}\" in adopt_keys; otherwise rename or exclude one of them",
                kind, dp.principal.key
            ),
        });
        Res::Skipped(Some(tid.to_owned()))
    }

    fn attributes(&mut self, res: &HashMap<PKey, Res>) {
        // In key order (not the map's), so the plan is built deterministically.
        for (key, dp) in &self.desired.principals {
            let Some(r) = res.get(key) else {
                continue;
            };
            match r {
                Res::New => {
                    self.ops.push(Op::Create {
                        principal: dp.principal.clone(),
                        source: dp.source.clone(),
                    });
                    if !dp.policies.is_empty() {
                        let group = pref(key.kind, &dp.principal.key, None);
                        self.ops.push(Op::AttachPolicies {
                            group,
                            policies: dp.policies.iter().cloned().collect(),
                        });
                    }
                }
                Res::Existing(tid) => {
                    let Some(o) = self.observed.get(key.kind, tid) else {
                        continue;
                    };
                    let mut changes = Vec::new();
                    for attr in &self.caps.attributes {
                        if self.policy.yield_attributes.contains(attr) {
                            continue;
                        }
                        let differs = match attr {
                            Attr::Key => {
                                self.caps.renamable.contains(&key.kind)
                                    && self.caps.pkey(&o.principal) != *key
                            }
                            _ => !o.principal.same(&dp.principal, *attr),
                        };
                        if differs && (key.kind != Kind::Group || *attr != Attr::Active) {
                            changes.push(AttrChange {
                                attr: *attr,
                                from: o.principal.get(*attr),
                                to: dp.principal.get(*attr),
                            });
                        }
                    }
                    if !changes.is_empty() {
                        let target = pref(key.kind, &o.principal.key, Some(tid));
                        self.ops.push(Op::Update {
                            target,
                            source: dp.source.clone(),
                            changes,
                        });
                    }
                    let missing: Vec<String> =
                        dp.policies.difference(&o.policies).cloned().collect();
                    if !missing.is_empty() {
                        let group = pref(key.kind, &dp.principal.key, Some(tid));
                        self.ops.push(Op::AttachPolicies {
                            group,
                            policies: missing,
                        });
                    }
                }
                Res::Skipped(_) => {}
            }
        }
    }

    /// Makes key changes safe: a rename into a key another principal holds waits for that one to
    /// be renamed away (the returned order), and is a conflict when the holder stays (it is not
    /// idsync's, or idsync keeps it) or when renames form a cycle (a swap). A blocked rename keeps
    /// its other attribute changes. Returns the rank of each rename by its old folded key.
    fn check_renames(&mut self, res: &mut HashMap<PKey, Res>) -> BTreeMap<(Kind, String), usize> {
        let caps = self.caps;
        let any_rename = self
            .ops
            .iter()
            .any(|o| o.phase() == idsync_model::plan::RENAME_PHASE);
        let creates_and_deletes = self.ops.iter().any(|o| matches!(o, Op::Create { .. }))
            && self.ops.iter().any(|o| matches!(o, Op::Delete { .. }));
        if !any_rename && !creates_and_deletes {
            // Without renames every create's key is free: an observed holder would have matched it.
            return BTreeMap::new();
        }
        let mut holder: BTreeMap<PKey, &str> = BTreeMap::new();
        for (_, id, o) in self.observed.iter() {
            holder.insert(caps.pkey(&o.principal), id);
        }
        // old folded key → (op index, new folded key, target id)
        let mut renames: BTreeMap<PKey, (usize, PKey, String)> = BTreeMap::new();
        for (i, op) in self.ops.iter().enumerate() {
            if let Op::Update {
                target, changes, ..
            } = op
                && let Some(c) = changes.iter().find(|c| c.attr == Attr::Key)
                && let idsync_model::AttrValue::Text(Some(new)) = &c.to
            {
                let old = PKey::new(target.kind, caps.fold(&target.key));
                let new = PKey::new(target.kind, caps.fold(new));
                renames.insert(old, (i, new, target.id.clone().unwrap_or_default()));
            }
        }
        // Owned principals this plan deletes anyway: deleting them first frees their keys.
        let deleted: BTreeMap<String, usize> = self
            .ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Op::Delete { target, .. } => target.id.clone().map(|id| (id, i)),
                _ => None,
            })
            .collect();
        let mut early_deletes: BTreeSet<usize> = BTreeSet::new();
        let mut blocked: BTreeMap<usize, String> = BTreeMap::new();
        let mut rank: BTreeMap<(Kind, String), usize> = BTreeMap::new();
        for (old, (i, new, _)) in &renames {
            // Follow the chain of holders: new key → its holder's rename → ...
            let mut chain = vec![old.clone()];
            let mut at = new.clone();
            let verdict = loop {
                match holder.get(&at) {
                    None => break Ok(()),
                    Some(h) if deleted.contains_key(*h) => {
                        early_deletes.insert(deleted[*h]);
                        break Ok(());
                    }
                    Some(h) => match renames.get(&at) {
                        Some(_) if chain.contains(&at) => {
                            break Err(format!(
                                "renames between {} form a cycle (a swap of keys); rename one of them to a temporary name in the source first",
                                chain
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ));
                        }
                        Some((_, next, _)) => {
                            chain.push(at.clone());
                            at = next.clone();
                        }
                        None => {
                            let why = if self.state.owns(at.kind, h) {
                                "idsync owns it, but it left the source and the deprovision policy keeps it"
                            } else {
                                "idsync does not own it"
                            };
                            break Err(format!(
                                "the rename to {at} is blocked: target id {h} holds that key and {why}"
                            ));
                        }
                    },
                }
            };
            match verdict {
                Ok(()) => {
                    if let Op::Update { target, .. } = &self.ops[*i] {
                        rank.insert((target.kind, target.key.to_string()), chain.len());
                    }
                }
                Err(reason) => {
                    blocked.insert(*i, reason);
                }
            }
        }
        // A rename that waits on a blocked one is blocked too; repeat until nothing changes.
        loop {
            let mut more = Vec::new();
            for (old, (i, new, _)) in &renames {
                if blocked.contains_key(i) {
                    continue;
                }
                if let Some((j, _, _)) = renames.get(new)
                    && blocked.contains_key(j)
                {
                    more.push((*i, format!("the rename of {old} waits on a blocked rename")));
                }
            }
            if more.is_empty() {
                break;
            }
            blocked.extend(more);
        }
        // A create whose key is held by a principal this plan deletes: delete it first.
        for op in &self.ops {
            if let Op::Create { principal, .. } = op
                && let Some(h) = holder.get(&caps.pkey(principal))
                && let Some(i) = deleted.get(*h)
            {
                early_deletes.insert(*i);
            }
        }
        for &i in &early_deletes {
            if let Op::Delete { target, frees_key } = &mut self.ops[i] {
                *frees_key = true;
                rank.insert((target.kind, target.key.to_string()), 0);
            }
        }
        // Keys that stay taken after the rename phase: held by a principal that is not renamed.
        let mut still_held: BTreeSet<PKey> = holder
            .keys()
            .filter(|k| !renames.contains_key(*k))
            .cloned()
            .collect();
        for i in &early_deletes {
            if let Op::Delete { target, .. } = &self.ops[*i] {
                still_held.remove(&PKey::new(target.kind, caps.fold(&target.key)));
            }
        }
        for (i, reason) in blocked.into_iter().rev() {
            if let Op::Update {
                target,
                source,
                changes,
            } = &mut self.ops[i]
            {
                changes.retain(|c| c.attr != Attr::Key);
                still_held.insert(PKey::new(target.kind, caps.fold(&target.key)));
                self.conflicts.push(Conflict {
                    key: PKey::new(target.kind, caps.fold(&target.key)),
                    sources: vec![source.clone()],
                    target_id: target.id.clone(),
                    reason,
                });
                rank.remove(&(target.kind, target.key.to_string()));
                if changes.is_empty() {
                    self.ops.remove(i);
                }
            }
        }
        // A create whose key is still taken (by a principal whose rename was blocked) cannot run.
        let mut dropped: BTreeSet<PKey> = BTreeSet::new();
        for op in &self.ops {
            if let Op::Create { principal, source } = op {
                let key = caps.pkey(principal);
                if still_held.contains(&key) {
                    self.conflicts.push(Conflict {
                        key: key.clone(),
                        sources: vec![source.clone()],
                        target_id: None,
                        reason: format!("{key} is still taken by a principal whose rename is blocked (see its conflict); resolve that one first"),
                    });
                    dropped.insert(key);
                }
            }
        }
        if !dropped.is_empty() {
            self.ops.retain(|op| match op {
                Op::Create { principal, .. } => !dropped.contains(&caps.pkey(principal)),
                Op::AttachPolicies { group, .. } => {
                    group.id.is_some()
                        || !dropped.contains(&PKey::new(group.kind, caps.fold(&group.key)))
                }
                _ => true,
            });
            for k in dropped {
                res.insert(k, Res::Skipped(None));
            }
        }
        rank
    }

    /// A member as a membership operation names it: the key it is written with (`written`), and
    /// its target id when it exists (`r`, what the key resolved to).
    fn member_ref(key: &PKey, r: &Res, written: &HashMap<&PKey, Key>) -> Option<PRef> {
        let k = written.get(key)?;
        let id = match r {
            Res::Existing(tid) | Res::Skipped(Some(tid)) => Some(tid.clone()),
            Res::New => None,
            Res::Skipped(None) => return None,
        };
        Some(PRef {
            kind: key.kind,
            key: k.clone(),
            id,
        })
    }

    /// Each group's member additions and removals. `taken`: the desired state's direct members,
    /// taken out of it to be freed group by group as they are planned ([`plan_taking_members`]).
    fn memberships(
        &mut self,
        res: &HashMap<PKey, Res>,
        taken: Option<BTreeMap<PKey, BTreeSet<PKey>>>,
    ) {
        let desired = self.desired;
        let direct = taken.as_ref().unwrap_or(&desired.members);
        let flattened = (!self.caps.nested_groups).then(|| crate::flatten::flatten(direct));
        // A flattened group is only as complete as every group nested in it.
        let incomplete = if self.caps.nested_groups {
            desired.incomplete_groups.clone()
        } else {
            incomplete_closure(direct, &desired.incomplete_groups)
        };
        // Principals held back keep whatever memberships they have: they are not gone.
        let held: FnvSet<(Kind, &str)> = desired
            .held_back
            .keys()
            .filter_map(|s| self.state.link(s.kind, &s.id).map(|t| (s.kind, t)))
            .collect();
        // The key each principal is written with, by its folded key: a membership costs a hash
        // lookup, not a walk down the ordered map of every principal (a million of them at a
        // first sync of 100k users), and names its member with a pointer to the one key, not a
        // copy of it (the folded key itself where folding changed nothing).
        let written: HashMap<&PKey, Key> = desired
            .principals
            .iter()
            .map(|(k, dp)| {
                let w = if *k.key == *dp.principal.key {
                    k.key.clone()
                } else {
                    Key::from(dp.principal.key.as_str())
                };
                (k, w)
            })
            .collect();
        let wanting = Wanting {
            res,
            written: &written,
            incomplete: &incomplete,
            held: &held,
        };
        // Sets planned by value are freed as soon as their group is planned: the plan's member
        // lists grow as the desired state's sets go.
        match (flattened, taken) {
            (Some(flat), taken) => {
                drop(taken);
                for (gkey, wanted) in flat {
                    self.group_members(&gkey, &wanted, &wanting);
                }
            }
            (None, Some(direct)) => {
                for (gkey, wanted) in direct {
                    self.group_members(&gkey, &wanted, &wanting);
                }
            }
            (None, None) => {
                for (gkey, wanted) in &desired.members {
                    self.group_members(gkey, wanted, &wanting);
                }
            }
        }
    }

    /// One group's member additions and removals.
    fn group_members(&mut self, gkey: &PKey, wanted: &BTreeSet<PKey>, w: &Wanting<'_, '_>) {
        let Some(dp) = self.desired.principals.get(gkey) else {
            return;
        };
        let gid = match w.res.get(gkey) {
            Some(Res::Existing(tid)) => Some(tid.as_str()),
            Some(Res::New) => None,
            _ => return,
        };
        let none = idsync_model::MemberIds::default();
        let have = gid
            .and_then(|g| self.observed.members.get(g))
            .unwrap_or(&none);
        // Only additions and removals allocate; members already there are looked up by &str.
        let mut want: Vec<(Kind, &str)> = Vec::with_capacity(wanted.len());
        let mut found = 0usize;
        let mut add = Vec::new();
        for m in wanted {
            if !self.caps.member_allowed(m.kind) || m == gkey {
                continue;
            }
            match w.res.get(m) {
                Some(r @ (Res::Existing(tid) | Res::Skipped(Some(tid)))) => {
                    want.push((m.kind, tid.as_str()));
                    if have.contains(m.kind, tid) {
                        found += 1;
                    } else {
                        add.extend(Self::member_ref(m, r, w.written));
                    }
                }
                Some(r @ Res::New) => add.extend(Self::member_ref(m, r, w.written)),
                _ => {}
            }
        }
        let keep_all = self.policy.yield_members
            || w.incomplete.contains(gkey)
            || self.desired.edge_groups.contains(gkey);
        let mut remove = Vec::new();
        // Every member there is wanted when all of them were found: nothing to remove.
        if !keep_all && found < have.len() {
            let want: FnvSet<(Kind, &str)> = want.into_iter().collect();
            for (mk, mid) in have.iter() {
                if !want.contains(&(mk, mid)) && !w.held.contains(&(mk, mid)) {
                    let key = self
                        .observed
                        .get(mk, mid)
                        .map_or(mid, |o| o.principal.key.as_str());
                    remove.push(pref(mk, key, Some(mid)));
                }
            }
        }
        let group = || pref(Kind::Group, &dp.principal.key, gid);
        if !remove.is_empty() {
            remove.sort();
            self.ops.push(Op::RemoveMembers {
                group: group(),
                members: remove,
            });
        }
        if !add.is_empty() {
            add.sort();
            // Grown by doubling: up to twice the room its members take, kept as long as the
            // plan is (69 MB of room for the 48 MB of a first sync's million members).
            add.shrink_to_fit();
            self.ops.push(Op::AddMembers {
                group: group(),
                members: add,
            });
        }
    }

    fn orphans(&mut self, res: &HashMap<PKey, Res>) {
        let claimed: BTreeSet<(Kind, &str)> = res
            .iter()
            .filter_map(|(k, r)| match r {
                Res::Existing(t) => Some((k.kind, t.as_str())),
                _ => None,
            })
            .collect();
        let protected: BTreeSet<(Kind, &str)> = self
            .desired
            .held_back
            .keys()
            .filter_map(|s| self.state.link(s.kind, &s.id).map(|t| (s.kind, t)))
            .collect();
        let partial = !self.desired.incomplete_groups.is_empty();
        let mut partial_kept = 0;
        let window = self.window;
        for kind in Kind::ALL {
            // In a window, only the principals the change touches (in the same order).
            for (tid, owned) in owned_within(self.state, kind, window.map(|w| &w.tids)) {
                if claimed.contains(&(kind, tid.as_str())) {
                    continue;
                }
                let Some(o) = self.observed.get(kind, tid) else {
                    self.notes.push(format!(
                        "{kind} {:?} (id {tid}) that idsync owned is gone from the target; idsync forgets it",
                        owned.key
                    ));
                    self.ops.push(Op::Forget {
                        target: pref(kind, &owned.key, Some(tid)),
                    });
                    continue;
                };
                if protected.contains(&(kind, tid.as_str())) {
                    continue;
                }
                if partial {
                    partial_kept += 1;
                    continue;
                }
                let target = pref(kind, &o.principal.key, Some(tid));
                match self.policy.deprovision {
                    Deprovision::None => self.summary.kept += 1,
                    Deprovision::Delete => self.ops.push(Op::Delete {
                        target,
                        frees_key: false,
                    }),
                    Deprovision::Deactivate if kind == Kind::Group || !self.caps.deactivate => {
                        self.summary.kept += 1;
                    }
                    Deprovision::Deactivate => {
                        if o.principal.active {
                            self.ops.push(Op::Deactivate { target });
                        }
                    }
                }
            }
        }
        if let Some(w) = window {
            self.summary.kept += w.kept_outside;
        }
        if partial_kept > 0 {
            self.notes.push(format!(
                "the source read was incomplete for {} group(s); {partial_kept} principal(s) missing from it are not deprovisioned this run",
                self.desired.incomplete_groups.len()
            ));
        }
        if self.policy.deprovision == Deprovision::Deactivate && !self.caps.deactivate {
            self.notes.push(
                "this target cannot deactivate principals: deprovision = \"deactivate\" keeps them; use \"delete\" to remove them".into(),
            );
        }
    }

    fn held_back(&mut self) {
        let mut dup: BTreeMap<PKey, Vec<SourceRef>> = BTreeMap::new();
        for (s, h) in &self.desired.held_back {
            match &h.key {
                Some(k) => dup.entry(k.clone()).or_default().push(s.clone()),
                None => self.notes.push(format!("{s} is not synced: {}", h.reason)),
            }
        }
        for (key, sources) in dup {
            let reason = self
                .desired
                .held_back
                .get(&sources[0])
                .map(|h| h.reason.clone())
                .unwrap_or_default();
            self.conflicts.push(Conflict {
                key,
                sources,
                target_id: None,
                reason,
            });
        }
    }
}

/// Groups that are incomplete themselves or reach an incomplete group through nesting.
fn incomplete_closure(
    direct: &BTreeMap<PKey, BTreeSet<PKey>>,
    incomplete: &BTreeSet<PKey>,
) -> BTreeSet<PKey> {
    let mut out = incomplete.clone();
    if out.is_empty() {
        return out;
    }
    loop {
        let more: Vec<PKey> = direct
            .iter()
            .filter(|(g, ms)| {
                !out.contains(*g) && ms.iter().any(|m| m.kind == Kind::Group && out.contains(m))
            })
            .map(|(g, _)| g.clone())
            .collect();
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

/// Orders the rename phase so that a rename runs after the rename that frees its key (the rank is
/// the length of the chain from it to a free key: the shortest chains go first).
fn order_renames(ops: &mut [Op], rank: &BTreeMap<(Kind, String), usize>) {
    let start = ops
        .iter()
        .position(|o| o.phase() == idsync_model::plan::RENAME_PHASE);
    let Some(start) = start else { return };
    let end = start
        + ops[start..]
            .iter()
            .take_while(|o| o.phase() == idsync_model::plan::RENAME_PHASE)
            .count();
    ops[start..end].sort_by_cached_key(|o| {
        let (kind, key) = o.subject();
        rank.get(&(kind, key.to_owned())).copied().unwrap_or(0)
    });
}

/// Counts a plan's operations into its summary.
pub(crate) fn tally(ops: &[Op], s: &mut Summary) {
    for op in ops {
        let (kind, _) = op.subject();
        let name = match op {
            Op::Adopt { .. } => "adopt",
            Op::Forget { .. } => "forget",
            Op::Update { .. } => "update",
            Op::Create { .. } => "create",
            Op::AttachPolicies { .. } => "attachPolicies",
            Op::DetachPolicies { .. } => "detachPolicies",
            Op::RemoveMembers { members, .. } => {
                s.members_removed += members.len();
                "removeMembers"
            }
            Op::AddMembers { members, .. } => {
                s.members_added += members.len();
                "addMembers"
            }
            Op::Deactivate { .. } => "deactivate",
            Op::Delete { .. } => "delete",
        };
        *s.ops.entry(format!("{name} {kind}")).or_default() += 1;
        if op.is_destructive() {
            s.destructive += 1;
        }
    }
}

fn halt(
    principals: usize,
    desired: &Desired,
    state: &AgreementState,
    policy: &Policy,
    conflicts: &[Conflict],
    summary: &Summary,
) -> Option<Halt> {
    let had_something =
        state.owned_count() > 0 || state.last_applied.as_ref().is_some_and(|s| !s.is_empty());
    if principals == 0
        && desired.held_back.is_empty()
        && had_something
        && !policy.allow_empty_source
    {
        return Some(Halt {
            reason: HaltReason::EmptySource,
            message: format!(
                "the source returned no principals, but idsync manages {} in this target; an empty read is never taken to mean that everyone left. Check the source scope and credentials; if the source really is empty, re-run with --allow-empty-source",
                state.owned_count()
            ),
        });
    }
    if !conflicts.is_empty() && policy.on_conflict == OnConflict::Halt {
        return Some(Halt {
            reason: HaltReason::Conflicts,
            message: format!(
                "{} conflict(s): the target was left as it was. Resolve each one as its line says, or set on_conflict = \"skip\" to sync everything else",
                conflicts.len()
            ),
        });
    }
    guards(policy, summary)
}

/// The guards on a plan's operations alone: most of what idsync owns about to be forgotten (a
/// wrong target), and deletions and deactivations over the thresholds, less the approved ones.
/// A saved plan is checked against them again before it is applied.
pub(crate) fn guards(policy: &Policy, summary: &Summary) -> Option<Halt> {
    let forgotten = summary
        .ops
        .iter()
        .filter(|(k, _)| k.starts_with("forget "))
        .map(|(_, v)| *v)
        .sum::<usize>();
    if forgotten > 0 && forgotten * 2 > summary.owned && forgotten > policy.approved_deletions {
        return Some(Halt {
            reason: HaltReason::TargetVanished,
            message: format!(
                "{forgotten} of the {} principals idsync owns are missing from the target: is this the right target, with the right credentials? Nothing was written. If they really were removed, re-run with --approve-deletions {forgotten} to let idsync forget them and create them again",
                summary.owned
            ),
        });
    }
    let n = summary.destructive;
    if n > policy.approved_deletions {
        let mut over = Vec::new();
        if let Some(max) = policy.max_deletions
            && n > max
        {
            over.push(format!("max_deletions = {max}"));
        }
        if let Some(pct) = policy.max_deletions_percent {
            let base = summary.owned.max(1);
            // n / base > pct / 100, in integers.
            if (n as u128) * 100 > (pct as u128) * (base as u128) {
                over.push(format!(
                    "max_deletions_percent = {pct}% of the {} principals idsync owns",
                    summary.owned
                ));
            }
        }
        if !over.is_empty() {
            return Some(Halt {
                reason: HaltReason::Threshold,
                message: format!(
                    "{n} deletion(s)/deactivation(s) exceed {}. Nothing was written. Review the plan; to approve, re-run with --approve-deletions {n}",
                    over.join(" and ")
                ),
            });
        }
    }
    None
}
