//! Plans made on the change alone. After a clean, complete apply the target holds what the last
//! applied snapshot maps to ([`crate::observe`]), so a principal that neither snapshot changed
//! plans to nothing: only what a change touches needs mapping, picturing and planning. This module
//! cuts both snapshots down to that *region*, maps and plans the two cuts, and carries the counts
//! over the rest of the tenant forward from the [`Totals`] the last apply recorded.
//!
//! The region holds:
//! - every principal that differs between the snapshots (a group also when its members differ);
//! - in full: every such group, and every group with such a principal among its direct members
//!   (a member renamed, gone or back); for a target that does not nest, also every group above
//!   those (its flattened members change) and every group below one in the region (its members
//!   make the flattened ones). Of their memberships, only those that can plan to something: the
//!   changed principals', those a changed group gained or lost, and every nested group (the
//!   flattening follows them). A membership that is in both snapshots between principals that
//!   did not change plans to nothing and counts alike in both, so leaving it out of both cuts
//!   changes neither the plan nor the counts' difference. When members are yielded to the target,
//!   groups are read with their members, and are cut with all of them;
//! - by reference only: the nested groups of those groups, so that every membership resolves
//!   as it does in the whole snapshot. A group referenced only keeps its members in the target
//!   (it is cut as a group beyond the search depth is).
//!
//! A plan on the change equals the plan on the whole tenant (`tests/properties.rs` holds it to
//! that). Where it could not, [`plan_on_delta`] says so and the caller plans in full: a source
//! read that was incomplete, a principal held back (a template that fails, two principals on one
//! key), a key the change takes that a principal idsync owns outside the region holds (or that a
//! live read finds on one), a group of both snapshots planned onto another target group (the
//! whole plan adds every member), or no totals recorded (a state from an earlier build).

use crate::apply::{Target, TargetError};
use crate::fnv::FnvSet;
use crate::mapping::{Mapping, map_snapshot};
use crate::observe::plan_incrementally_within;
use crate::plan::{Deprovision, Policy, Window};
use idsync_model::{
    AgreementState, Capabilities, Desired, Group, Kind, Member, Op, PKey, PerKind, Plan, ReadMode,
    Snapshot, Totals,
};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// The two snapshots cut down to what a change touches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// The last applied snapshot's cut.
    pub prev: Snapshot,
    /// The new snapshot's cut.
    pub next: Snapshot,
}

/// Adds to `out` the ids whose entries differ between `a` and `b` (present in one only, or not
/// equal), walking both maps once in key order.
fn differ<'a, V: PartialEq>(
    a: &'a BTreeMap<String, V>,
    b: &'a BTreeMap<String, V>,
    out: &mut BTreeSet<&'a str>,
) {
    let mut x = a.iter().peekable();
    let mut y = b.iter().peekable();
    loop {
        match (x.peek(), y.peek()) {
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.insert(ka.as_str());
                    x.next();
                }
                Ordering::Greater => {
                    out.insert(kb.as_str());
                    y.next();
                }
                Ordering::Equal => {
                    if va != vb {
                        out.insert(ka.as_str());
                    }
                    x.next();
                    y.next();
                }
            },
            (Some((ka, _)), None) => {
                out.insert(ka.as_str());
                x.next();
            }
            (None, Some((kb, _))) => {
                out.insert(kb.as_str());
                y.next();
            }
            (None, None) => return,
        }
    }
}

/// The direct members of a group that are groups (they sort last: [`Kind::Group`] is the
/// greatest kind).
fn nested(g: &Group) -> impl Iterator<Item = &Member> {
    g.members.groups()
}

/// A group of either snapshot, in full (with its members).
fn is_full(prev: &Snapshot, next: &Snapshot, id: &str) -> bool {
    prev.groups.contains_key(id) || next.groups.contains_key(id)
}

/// Cuts both snapshots down to what differs between them (see the module's documentation), the
/// groups in full with only the memberships that change (`whole`: with all of them). `None` when
/// a plan on the change could not equal the whole plan: a source read that was incomplete.
pub fn region<'a>(
    prev: &'a Snapshot,
    next: &'a Snapshot,
    caps: &Capabilities,
    whole: bool,
) -> Option<Region> {
    if !prev.incomplete_groups.is_empty() || !next.incomplete_groups.is_empty() {
        return None;
    }
    if std::ptr::eq(prev, next) {
        return Some(Region::default());
    }
    let mut dirty: PerKind<BTreeSet<&str>> = PerKind::default();
    differ(&prev.users, &next.users, &mut dirty.users);
    differ(
        &prev.service_principals,
        &next.service_principals,
        &mut dirty.service_principals,
    );
    differ(&prev.groups, &next.groups, &mut dirty.groups);
    differ(&prev.edge_groups, &next.edge_groups, &mut dirty.groups);
    if Kind::ALL.iter().all(|k| dirty.get(*k).is_empty()) {
        return Some(Region::default());
    }

    // Groups planned in full: those that changed, and those holding a changed principal. A
    // group that lost one differs itself, so only the new snapshot is searched.
    let mut full: BTreeSet<&str> = dirty
        .groups
        .iter()
        .copied()
        .filter(|g| is_full(prev, next, g))
        .collect();
    let touched: FnvSet<(Kind, &str)> = Kind::ALL
        .iter()
        .flat_map(|k| dirty.get(*k).iter().map(move |id| (*k, *id)))
        .collect();
    for g in next.groups.values() {
        if !full.contains(g.id.as_str())
            && g.members
                .iter()
                .any(|m| touched.contains(&(m.kind, m.id.as_str())))
        {
            full.insert(&g.id);
        }
    }
    if !caps.nested_groups {
        // Flattened: every group above one in the region sees its members change, and every
        // group below one in the region makes its members.
        let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in [prev, next] {
            for g in s.groups.values() {
                for m in nested(g) {
                    parents.entry(m.id.as_str()).or_default().push(&g.id);
                }
            }
        }
        let mut stack: Vec<&str> = full.iter().copied().collect();
        while let Some(g) = stack.pop() {
            for p in parents.get(g).into_iter().flatten() {
                if full.insert(p) {
                    stack.push(p);
                }
            }
        }
        let mut stack: Vec<&str> = full.iter().copied().collect();
        while let Some(g) = stack.pop() {
            for s in [prev, next] {
                let Some(group) = s.groups.get(g) else {
                    continue;
                };
                for m in nested(group) {
                    if is_full(prev, next, &m.id) && full.insert(&m.id) {
                        stack.push(&m.id);
                    }
                }
            }
        }
    }

    // The memberships compared: those of the changed principals, and those a changed group gained
    // or lost. A membership of neither kind is the same in both snapshots, so it plans to nothing
    // and counts alike in both (nested groups are always kept: they carry the flattening).
    let mut compared = touched;
    // Nested groups a group gained or lost.
    let mut edges: Vec<&str> = Vec::new();
    for g in &dirty.groups {
        let members = |s: &'a Snapshot| s.groups.get(*g).map(|g| &g.members);
        let changed: Box<dyn Iterator<Item = &Member>> = match (members(prev), members(next)) {
            (Some(a), Some(b)) => Box::new(a.symmetric_difference(b)),
            (Some(x), None) | (None, Some(x)) => Box::new(x.iter()),
            (None, None) => Box::new(std::iter::empty()),
        };
        for m in changed {
            compared.insert((m.kind, m.id.as_str()));
            if m.kind == Kind::Group {
                edges.push(&m.id);
            }
        }
    }
    if !caps.nested_groups {
        // A nested group gained or lost brings or takes every member below it: those
        // memberships of the groups above change too.
        let mut stack = edges;
        let mut seen: BTreeSet<&str> = stack.iter().copied().collect();
        while let Some(g) = stack.pop() {
            for s in [prev, next] {
                let Some(group) = s.groups.get(g) else {
                    continue;
                };
                for m in &group.members {
                    if m.kind != Kind::Group {
                        compared.insert((m.kind, m.id.as_str()));
                    } else if seen.insert(&m.id) {
                        stack.push(&m.id);
                    }
                }
            }
        }
    }
    let keep =
        |m: &Member| whole || m.kind == Kind::Group || compared.contains(&(m.kind, m.id.as_str()));

    // Everything else referenced: the changed principals, and the members kept of groups in full.
    let mut refs: PerKind<BTreeSet<&str>> = PerKind::default();
    for kind in Kind::ALL {
        refs.get_mut(kind).extend(dirty.get(kind).iter().copied());
    }
    for s in [prev, next] {
        for g in &full {
            if let Some(group) = s.groups.get(*g) {
                for m in group.members.iter().filter(|m| keep(m)) {
                    refs.get_mut(m.kind).insert(&m.id);
                }
            }
        }
    }
    let cut = |s: &Snapshot| {
        let mut c = Snapshot::default();
        for id in &refs.users {
            if let Some(u) = s.users.get(*id) {
                c.users.insert(u.id.clone(), u.clone());
            }
        }
        for id in &refs.service_principals {
            if let Some(p) = s.service_principals.get(*id) {
                c.service_principals.insert(p.id.clone(), p.clone());
            }
        }
        for id in full.iter().chain(refs.groups.iter()) {
            if c.groups.contains_key(*id) || c.edge_groups.contains_key(*id) {
                continue;
            }
            if let Some(e) = s.edge_groups.get(*id) {
                c.edge_groups.insert(e.id.clone(), e.clone());
            } else if let Some(g) = s.groups.get(*id) {
                if full.contains(id) {
                    let kept = Group {
                        id: g.id.clone(),
                        display_name: g.display_name.clone(),
                        description: g.description.clone(),
                        security_enabled: g.security_enabled,
                        mail_enabled: g.mail_enabled,
                        members: g.members.iter().filter(|m| keep(m)).cloned().collect(),
                    };
                    c.groups.insert(kept.id.clone(), kept);
                } else {
                    // Referenced only: its members are left as the target holds them.
                    let mut e = g.clone();
                    e.members.clear();
                    c.edge_groups.insert(e.id.clone(), e);
                }
            }
        }
        c
    };
    Some(Region {
        prev: cut(prev),
        next: cut(next),
    })
}

/// Whether a principal idsync owns but has no reason to keep claiming is counted as kept by the
/// plan of a run with no change after a clean apply (it was deleted under `delete`, and a user
/// deactivated under `deactivate` is neither written nor kept).
fn kept_when_left(kind: Kind, policy: &Policy, caps: &Capabilities) -> bool {
    match policy.deprovision {
        Deprovision::None => true,
        Deprovision::Deactivate => kind == Kind::Group || !caps.deactivate,
        Deprovision::Delete => false,
    }
}

/// `base - minus + plus`, or `None` when the counts do not add up (a state the totals do not
/// describe): the caller then plans in full.
fn carry(base: u64, minus: usize, plus: usize) -> Option<usize> {
    usize::try_from(base)
        .ok()?
        .checked_sub(minus)?
        .checked_add(plus)
}

/// The window a plan on `region` sees: the target ids it touches and the counts over the rest.
/// `None` when the region's plan could not equal the whole plan (see the module's documentation).
fn window(
    prev: &Desired,
    next: &Desired,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    totals: &Totals,
) -> Option<Window> {
    if !prev.held_back.is_empty() || !next.held_back.is_empty() {
        return None;
    }
    let mut sources: FnvSet<(Kind, &str)> = FnvSet::default();
    let mut tids: PerKind<BTreeSet<String>> = PerKind::default();
    let mut claimed_before: FnvSet<(Kind, &str)> = FnvSet::default();
    for (d, before) in [(prev, true), (next, false)] {
        for dp in d.principals.values() {
            let kind = dp.source.kind;
            sources.insert((kind, dp.source.id.as_str()));
            if let Some(tid) = state.link(kind, &dp.source.id) {
                tids.get_mut(kind).insert(tid.to_owned());
                if before {
                    claimed_before.insert((kind, tid));
                }
            }
        }
    }
    let keys: FnvSet<&PKey> = next.principals.keys().collect();
    for kind in Kind::ALL {
        let mine = tids.get_mut(kind);
        for (tid, owned) in state.owned.get(kind) {
            if mine.contains(tid) {
                continue;
            }
            if owned
                .source
                .as_deref()
                .is_some_and(|s| sources.contains(&(kind, s)))
            {
                mine.insert(tid.clone());
                continue;
            }
            // A key the change takes that a principal outside the region holds: only the whole
            // plan says whose it is.
            if keys.contains(&PKey::new(kind, caps.fold(&owned.key))) {
                return None;
            }
        }
    }
    // What the region's principals that idsync owns and no longer claims added to `kept`.
    let mut kept_before = 0;
    for kind in Kind::ALL {
        for tid in tids.get(kind) {
            if state.owns(kind, tid)
                && !claimed_before.contains(&(kind, tid.as_str()))
                && kept_when_left(kind, policy, caps)
            {
                kept_before += 1;
            }
        }
    }
    Some(Window {
        principals: carry(
            totals.principals,
            prev.principals.len(),
            next.principals.len(),
        )?,
        kept_outside: carry(totals.kept, kept_before, 0)?,
        dangling: carry(
            totals.dangling,
            prev.dangling_members,
            next.dangling_members,
        )?,
        missing: carry(totals.missing, prev.missing_members, next.missing_members)?,
        tids,
    })
}

/// The counts a clean, complete apply of a plan made on the whole `desired` state leaves for the
/// next plan on the change.
pub fn totals(desired: &Desired, plan: &Plan) -> Totals {
    Totals {
        principals: desired.principals.len() as u64,
        kept: plan.summary.kept as u64,
        dangling: desired.dangling_members as u64,
        missing: desired.missing_members as u64,
    }
}

/// Plans `next` against the picture of `prev` (the last applied snapshot, which the state's
/// trust vouches for) on what changed between them alone, reading live what the plan touches as
/// [`crate::observe::plan_incrementally`] does, with the totals the next plan on the change
/// starts from. `Ok(None)`: plan the whole tenant instead.
#[allow(clippy::too_many_arguments)]
pub async fn plan_on_delta(
    target: &dyn Target,
    prev: &Snapshot,
    next: &Snapshot,
    mapping: &Mapping,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
    since: u64,
    limit: usize,
    totals: &Totals,
) -> Result<Option<(Plan, Totals)>, TargetError> {
    // Groups whose members are yielded to the target are read with their members: only their
    // whole member lists compare with what is read.
    let Some(region) = region(prev, next, caps, policy.yield_members) else {
        return Ok(None);
    };
    let before = map_snapshot(&region.prev, mapping, caps);
    let after = map_snapshot(&region.next, mapping, caps);
    let Some(w) = window(&before, &after, state, policy, caps, totals) else {
        return Ok(None);
    };
    let Some(plan) = plan_incrementally_within(
        target,
        &after,
        &before,
        state,
        policy,
        caps,
        mode,
        since,
        limit,
        Some(&w),
    )
    .await?
    else {
        return Ok(None);
    };
    // A group of both cuts planned onto another target group, new or taken over (its key
    // changed and the target cannot rename a group, or it is gone from the target), gets every
    // member in the whole plan, but the cut holds only those that changed.
    let recreated = plan.ops.iter().any(|op| {
        matches!(op, Op::Create { source, .. } | Op::Adopt { source, .. }
            if source.kind == Kind::Group && region.prev.groups.contains_key(&source.id))
    });
    if recreated && !policy.yield_members {
        return Ok(None);
    }
    let totals = Totals {
        principals: w.principals as u64,
        kept: plan.summary.kept as u64,
        dangling: w.dangling as u64,
        missing: w.missing as u64,
    };
    Ok(Some((plan, totals)))
}
