//! Incremental observation: an incremental run reads from the target only the principals the
//! source changes touch, and trusts the last applied snapshot for the rest.
//!
//! After a clean, complete apply the target holds what the last applied snapshot maps to, under
//! the ids the state links. That *picture* stands in for a bulk observation: the engine plans
//! against it, reads live every principal the plan would touch (by id, or by key for a create),
//! lays what it read over the picture, and plans again until the plan touches nothing it has not
//! read. Writes are therefore always computed from the target's real state; only drift on
//! principals no source change touches waits for the next full observation, which
//! `--full-sync`, any failure or conflict, a changed mapping or policy, and the reconcile interval
//! all force.

use crate::apply::{Target, TargetError};
use crate::fnv::Fnv;
use crate::plan::{Deprovision, Policy, Window, plan_within};
use crate::{Mapping, flatten};
use idsync_model::{
    AgreementState, Attr, AttrValue, Capabilities, Desired, Kind, MemberIds, Observed,
    ObservedPrincipal, Op, PerKind, Plan, Principal, ReadMode,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hasher;

/// What to read live from a target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Principals by target id. An id the target does not hold any more is left out of the answer.
    pub ids: BTreeSet<(Kind, String)>,
    /// The key the picture holds for each id in `ids`: a target that reads best by key (one
    /// filtered list for many keys) may look the id up by it, and fall back to the id when the key
    /// no longer finds it.
    pub hints: BTreeMap<String, String>,
    /// Groups in `ids` whose members must be read too (the picture does not know them).
    pub members: BTreeSet<String>,
    /// Natural keys about to be created, adopted or renamed to: whatever holds one must be seen
    /// before writing. A group found by key comes with its members.
    pub keys: BTreeSet<(Kind, String)>,
}

impl Interest {
    /// Principals to read, counting ids and keys.
    pub fn len(&self) -> usize {
        self.ids.len() + self.keys.len()
    }

    /// Nothing to read.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.keys.is_empty()
    }

    /// What a plan's operations need seen live: the principals they update, deprovision, adopt
    /// or forget (by id), and the keys they create, adopt or rename to. Member and policy changes
    /// need no read: they are written as differences, and adding a member already there or
    /// removing one already gone changes nothing in any target. Except with `groups`: then the
    /// groups whose members change are read with their members (when membership is yielded to
    /// the target, the picture does not know the members the target kept).
    pub fn of(plan: &Plan, groups: bool) -> Interest {
        let mut i = Interest::default();
        for op in &plan.ops {
            match op {
                Op::Forget { target } | Op::Deactivate { target } | Op::Delete { target, .. } => {
                    i.id(target);
                }
                // Claimed by its key: every holder of that key must be seen.
                Op::Adopt { target, .. } => {
                    i.id(target);
                    i.keys.insert((target.kind, target.key.to_string()));
                }
                Op::Update {
                    target, changes, ..
                } => {
                    i.id(target);
                    // A rename takes a key: whatever holds it must be seen too.
                    for c in changes {
                        if let (Attr::Key, AttrValue::Text(Some(k))) = (c.attr, &c.to) {
                            i.keys.insert((target.kind, k.clone()));
                        }
                    }
                }
                Op::Create { principal, .. } => {
                    i.keys.insert((principal.kind, principal.key.clone()));
                }
                Op::RemoveMembers { group, .. } | Op::AddMembers { group, .. } if groups => {
                    i.id(group);
                    if let Some(g) = &group.id {
                        i.members.insert(g.clone());
                    }
                }
                Op::AttachPolicies { .. }
                | Op::DetachPolicies { .. }
                | Op::RemoveMembers { .. }
                | Op::AddMembers { .. } => {}
            }
        }
        i
    }

    fn id(&mut self, r: &idsync_model::PRef) {
        if let Some(t) = &r.id {
            self.ids.insert((r.kind, t.clone()));
            self.hints.insert(t.clone(), r.key.to_string());
        }
    }

    /// What this asks that `seen` did not.
    pub fn without(&self, seen: &Interest) -> Interest {
        let ids: BTreeSet<(Kind, String)> = self.ids.difference(&seen.ids).cloned().collect();
        let fresh: BTreeSet<&str> = ids.iter().map(|(_, i)| i.as_str()).collect();
        Interest {
            hints: self
                .hints
                .iter()
                .filter(|(id, _)| fresh.contains(id.as_str()))
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            members: self
                .members
                .iter()
                .filter(|g| ids.contains(&(Kind::Group, (*g).clone())))
                .cloned()
                .collect(),
            ids,
            keys: self.keys.difference(&seen.keys).cloned().collect(),
        }
    }

    fn extend(&mut self, other: Interest) {
        self.ids.extend(other.ids);
        self.hints.extend(other.hints);
        self.members.extend(other.members);
        self.keys.extend(other.keys);
    }
}

/// What a target answered to an [`Interest`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partial {
    /// Every principal found, by id or by key (a target may return more: whatever it found).
    pub principals: Vec<ObservedPrincipal>,
    /// The members of the groups asked with members and of the groups found by key, as target
    /// ids (their kinds are resolved by the engine). A group read without its members keeps the
    /// picture's.
    pub members: BTreeMap<String, Vec<String>>,
}

/// Which version of [`fingerprint`]'s description this build writes. Raise it when the
/// description changes meaning: every stored trust then lapses once, and the next run of each
/// agreement observes its target in full.
pub const FINGERPRINT_FORMAT: u32 = 1;

/// A digest of what shapes the picture: the target (its kind and address), the mapping, the
/// target's capabilities and the policy (without the per-run approvals), hashed from their
/// serialised form under [`FINGERPRINT_FORMAT`], never from display text. A picture made under
/// another digest is not trusted.
pub fn fingerprint(
    target: &crate::target::TargetIdentity,
    mapping: &Mapping,
    caps: &Capabilities,
    policy: &Policy,
) -> String {
    #[derive(serde::Serialize)]
    struct Described<'a> {
        format: u32,
        target: &'a crate::target::TargetIdentity,
        mapping: &'a Mapping,
        capabilities: &'a Capabilities,
        policy: &'a Policy,
    }
    let policy = Policy {
        approved_deletions: 0,
        allow_empty_source: false,
        ..policy.clone()
    };
    let described = Described {
        format: FINGERPRINT_FORMAT,
        target,
        mapping,
        capabilities: caps,
        policy: &policy,
    };
    // These types serialise to plain maps, lists and strings; should one ever fail, the empty
    // digest matches no stored trust, so the run observes in full: safe, only slower.
    let bytes = serde_json::to_vec(&described).unwrap_or_default();
    let mut h = Fnv::default();
    h.write(&bytes);
    format!("{:016x}", h.finish())
}

/// What the target holds after a clean, complete apply of `prev` (the last applied snapshot,
/// mapped): every linked principal with its desired attributes and memberships, and every owned
/// principal that left the source as the deprovision policy left it.
pub fn picture(
    prev: &Desired,
    state: &AgreementState,
    caps: &Capabilities,
    policy: &Policy,
) -> Observed {
    picture_within(prev, state, caps, policy, None)
}

/// [`picture`] of part of the target: `prev` holds only what a change touches, and of the
/// principals idsync owns that left the source only those in `tids` are pictured.
pub fn picture_within(
    prev: &Desired,
    state: &AgreementState,
    caps: &Capabilities,
    policy: &Policy,
    tids: Option<&PerKind<BTreeSet<String>>>,
) -> Observed {
    let mut o = Observed::default();
    let mut ids = HashMap::with_capacity(prev.principals.len());
    for (key, dp) in &prev.principals {
        let Some(tid) = state.link(key.kind, &dp.source.id) else {
            continue;
        };
        ids.insert(key, tid);
        let mut principal = dp.principal.clone();
        // The key as the target holds it: a case-insensitive target keeps the case it was
        // created with when only the case changes in the source.
        if let Some(owned) = state.owned.get(key.kind).get(tid) {
            principal.key.clone_from(&owned.key);
        }
        o.insert(ObservedPrincipal {
            id: tid.to_owned(),
            principal,
            policies: dp.policies.clone(),
        });
    }
    let deactivated = policy.deprovision == Deprovision::Deactivate && caps.deactivate;
    for kind in Kind::ALL {
        for (tid, owned) in crate::plan::owned_within(state, kind, tids) {
            if o.get(kind, tid).is_none() {
                let mut p = Principal::new(kind, owned.key.clone());
                p.active = !(deactivated && kind != Kind::Group);
                o.insert(ObservedPrincipal {
                    id: tid.clone(),
                    principal: p,
                    policies: BTreeSet::new(),
                });
            }
        }
    }
    let flattened;
    let members = if caps.nested_groups {
        &prev.members
    } else {
        flattened = flatten::flatten(&prev.members);
        &flattened
    };
    for (g, ms) in members {
        let Some(gid) = ids.get(g) else {
            continue;
        };
        let set: MemberIds = ms
            .iter()
            .filter(|m| caps.member_allowed(m.kind) && *m != g)
            .filter_map(|m| ids.get(m).map(|t| (m.kind, (*t).to_owned())))
            .collect();
        o.members.insert((*gid).to_owned(), set);
    }
    o
}

/// Lays what was read live over the picture: what was asked by id and not found is gone, what was
/// found replaces the picture's entry, and a group read with its members gets them (and its
/// policies); one read without keeps the picture's. Returns whether the picture changed in what
/// the plan compares (when it did not, a plan made from it stands), or `None` when a group read
/// has a member the picture does not know: a bulk observation would know its kind and might
/// remove it, so only a bulk observation plans that group right.
pub fn overlay(
    pic: &mut Observed,
    asked: &Interest,
    live: Partial,
    caps: &Capabilities,
) -> Option<bool> {
    let mut changed = false;
    let found: BTreeSet<(Kind, &str)> = live
        .principals
        .iter()
        .map(|p| (p.principal.kind, p.id.as_str()))
        .collect();
    let gone: Vec<(Kind, String)> = asked
        .ids
        .iter()
        .filter(|(k, id)| !found.contains(&(*k, id.as_str())))
        .cloned()
        .collect();
    for (kind, id) in &gone {
        changed |= pic.principals.get_mut(*kind).remove(id).is_some();
        if *kind == Kind::Group {
            pic.members.remove(id);
        }
    }
    if !gone.is_empty() {
        for set in pic.members.values_mut() {
            for (kind, id) in &gone {
                set.remove(*kind, id);
            }
        }
    }
    for mut p in live.principals {
        // A group read without its members keeps the picture's members and policies.
        if p.principal.kind == Kind::Group
            && !live.members.contains_key(&p.id)
            && let Some(before) = pic.get(Kind::Group, &p.id)
        {
            p.policies.clone_from(&before.policies);
        }
        changed |= !pic
            .get(p.principal.kind, &p.id)
            .is_some_and(|before| as_pictured(before, &p, caps));
        pic.insert(p);
    }
    for (gid, members) in live.members {
        let mut set = MemberIds::default();
        for m in members {
            let kind = Kind::ALL.into_iter().find(|k| pic.get(*k, &m).is_some())?;
            set.insert(kind, m);
        }
        changed |= pic.members.get(&gid) != Some(&set);
        pic.members.insert(gid, set);
    }
    Some(changed)
}

/// Whether a principal read live is what the picture holds, in everything a plan compares: the
/// key, the managed attributes and the policies (targets do not return what they do not manage).
fn as_pictured(before: &ObservedPrincipal, now: &ObservedPrincipal, caps: &Capabilities) -> bool {
    before.principal.key == now.principal.key
        && before.principal.active == now.principal.active
        && before.policies == now.policies
        && caps
            .attributes
            .iter()
            .all(|a| before.principal.same(&now.principal, *a))
}

/// Whether a clean, complete apply of `plan` leaves the target exactly as `desired` pictures it:
/// no conflict, no guard, nothing held back, and a complete source read.
pub fn leaves_a_faithful_picture(plan: &Plan, desired: &Desired) -> bool {
    plan.conflicts.is_empty()
        && plan.halt.is_none()
        && desired.held_back.is_empty()
        && desired.incomplete_groups.is_empty()
}

/// Plans against the picture, reading live whatever the plan touches, until the plan touches
/// nothing unread. `Ok(None)` means observe in bulk instead: the target cannot read by id, or
/// more than `limit` principals would be read (a bulk read is then cheaper), or the plan did not
/// settle in a few rounds, or it has conflicts, or a group read has members idsync does not know.
#[allow(clippy::too_many_arguments)]
pub async fn plan_incrementally(
    target: &dyn Target,
    desired: &Desired,
    prev: &Desired,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
    since: u64,
    limit: usize,
) -> Result<Option<Plan>, TargetError> {
    plan_incrementally_within(
        target, desired, prev, state, policy, caps, mode, since, limit, None,
    )
    .await
}

/// [`plan_incrementally`] within a [`Window`]: `desired` and `prev` hold only what a change
/// touches ([`crate::delta`]).
#[allow(clippy::too_many_arguments)]
pub async fn plan_incrementally_within(
    target: &dyn Target,
    desired: &Desired,
    prev: &Desired,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
    mode: ReadMode,
    since: u64,
    limit: usize,
    window: Option<&Window>,
) -> Result<Option<Plan>, TargetError> {
    let mut pic = picture_within(prev, state, caps, policy, window.map(|w| &w.tids));
    // Within a window, a principal idsync owns outside it that a live read finds (a key taken
    // by hand in the target) is one the window's plan cannot judge: only the whole plan knows
    // whose it is.
    let foreign = |live: &Partial| {
        window.is_some_and(|w| {
            live.principals.iter().any(|p| {
                let kind = p.principal.kind;
                state.owns(kind, &p.id) && !w.tids.get(kind).contains(&p.id)
            })
        })
    };
    let mut asked = Interest::default();
    // A principal that left the source and is back is linked to an owned principal whose
    // attributes the picture does not know (the deprovision policy kept it as it was): read it.
    let mut first = Interest::default();
    let linked_by_prev: BTreeSet<(Kind, &str)> = prev
        .principals
        .values()
        .filter_map(|dp| {
            let tid = state.link(dp.source.kind, &dp.source.id)?;
            Some((dp.source.kind, tid))
        })
        .collect();
    if linked_by_prev.len() < state.owned_count() {
        for dp in desired.principals.values() {
            let kind = dp.source.kind;
            if let Some(tid) = state.link(kind, &dp.source.id)
                && let Some(owned) = state.owned.get(kind).get(tid)
                && !linked_by_prev.contains(&(kind, tid))
            {
                first.ids.insert((kind, tid.to_owned()));
                first.hints.insert(tid.to_owned(), owned.key.clone());
                if kind == Kind::Group {
                    first.members.insert(tid.to_owned());
                }
            }
        }
    }
    if !first.is_empty() {
        if first.len() > limit {
            return Ok(None);
        }
        let Some(live) = target.observe_some(&first).await? else {
            return Ok(None);
        };
        if foreign(&live) || overlay(&mut pic, &first, live, caps).is_none() {
            return Ok(None);
        }
        asked.extend(first);
    }
    let mut stands: Option<Plan> = None;
    for _ in 0..4 {
        let mut p = match stands.take() {
            Some(p) => p,
            None => plan_within(desired, &pic, state, policy, caps, mode, window),
        };
        // A conflict is explained from the whole target (which principal holds a key, owned or
        // not), and is rare: it is worth a bulk observation.
        if !p.conflicts.is_empty() {
            return Ok(None);
        }
        let want = Interest::of(&p, policy.yield_members).without(&asked);
        if want.is_empty() {
            p.observation = idsync_model::Observation::Incremental {
                read: asked.len(),
                since,
                touched: window.map(|_| desired.principals.len()),
            };
            return Ok(Some(p));
        }
        if asked.len() + want.len() > limit {
            return Ok(None);
        }
        let Some(live) = target.observe_some(&want).await? else {
            return Ok(None);
        };
        if foreign(&live) {
            return Ok(None);
        }
        match overlay(&mut pic, &want, live, caps) {
            None => return Ok(None),
            // The target is as pictured where the plan touches it: the plan stands.
            Some(false) => stands = Some(p),
            Some(true) => {}
        }
        asked.extend(want);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{self, ApplyReport, Failure};
    use idsync_model::{PlanFile, Trust};

    fn group(id: &str, key: &str) -> ObservedPrincipal {
        ObservedPrincipal {
            id: id.into(),
            principal: Principal::new(Kind::Group, key),
            policies: BTreeSet::new(),
        }
    }

    #[test]
    fn a_group_read_with_a_member_the_picture_does_not_know_needs_a_bulk_observation() {
        let caps = Capabilities::full();
        let mut pic = Observed::default();
        pic.insert(group("g1", "eng"));
        pic.members.insert("g1".into(), MemberIds::default());
        let asked = Interest {
            ids: [(Kind::Group, "g1".to_owned())].into(),
            members: ["g1".to_owned()].into(),
            ..Interest::default()
        };
        let live = |members: Vec<&str>| Partial {
            principals: vec![group("g1", "eng")],
            members: [(
                "g1".to_owned(),
                members.into_iter().map(String::from).collect(),
            )]
            .into(),
        };
        // As pictured: nothing changed, the plan stands.
        assert_eq!(
            overlay(&mut pic.clone(), &asked, live(vec![]), &caps),
            Some(false)
        );
        // A member outside the picture (someone added a user by hand): only a bulk observation
        // knows whether to remove it.
        assert_eq!(
            overlay(&mut pic, &asked, live(vec!["u-by-hand"]), &caps),
            None
        );
    }

    #[test]
    fn trust_is_cleared_when_an_apply_starts_and_restored_only_when_it_ends_clean() {
        let caps = Capabilities::full();
        let trust = Trust {
            observed_at: 7,
            fingerprint: "f".into(),
            totals: None,
        };
        let mut plan = crate::plan(
            &Desired::default(),
            &Observed::default(),
            &AgreementState::new("a"),
            &Policy::default(),
            &caps,
            ReadMode::Full,
        );
        plan.trust = Some(trust.clone());
        plan.ops.push(Op::Create {
            principal: Principal::new(Kind::User, "u@x"),
            source: idsync_model::SourceRef {
                kind: Kind::User,
                id: "u1".into(),
            },
        });
        let file = PlanFile {
            plan: plan.clone(),
            snapshot: Default::default(),
            cursors: Default::default(),
            checksum: None,
        };
        let mut st = AgreementState::new("a");
        st.trust = Some(trust.clone());
        apply::begin(&plan, &caps, &mut st);
        assert_eq!(st.trust, None, "a crash from here on is not trusted");
        let failed = ApplyReport {
            failed: vec![Failure {
                op: plan.ops[0].clone(),
                error: "refused".into(),
                kind: Some(crate::TargetErrorKind::Invalid),
            }],
            ..ApplyReport::default()
        };
        apply::finish(&file, &failed, &caps, &mut st, true);
        assert_eq!(st.trust, None, "a failed apply leaves no trust");
        apply::finish(&file, &ApplyReport::default(), &caps, &mut st, false);
        assert_eq!(
            st.trust, None,
            "a partial apply (one dry-run level) leaves no trust"
        );
        apply::finish(&file, &ApplyReport::default(), &caps, &mut st, true);
        assert_eq!(
            st.trust,
            Some(trust),
            "a clean, complete apply leaves the plan's trust"
        );
    }

    #[test]
    fn the_fingerprint_changes_with_mapping_capabilities_and_policy_not_with_approvals() {
        let m = Mapping::defaults();
        let caps = Capabilities::full();
        let p = Policy::default();
        let t = crate::target::TargetIdentity::new("scim", "https://t.example");
        let base = fingerprint(&t, &m, &caps, &p);
        let approved = Policy {
            approved_deletions: 7,
            allow_empty_source: true,
            ..p.clone()
        };
        assert_eq!(fingerprint(&t, &m, &caps, &approved), base);
        let mut other = m.clone();
        other.group_policies.insert("FSReadAll".into());
        assert_ne!(fingerprint(&t, &other, &caps, &p), base);
        let flat = Capabilities {
            nested_groups: false,
            ..caps.clone()
        };
        assert_ne!(fingerprint(&t, &m, &flat, &p), base);
        let deactivate = Policy {
            deprovision: Deprovision::Deactivate,
            ..p.clone()
        };
        assert_ne!(fingerprint(&t, &m, &caps, &deactivate), base);
        let elsewhere = crate::target::TargetIdentity::new("scim", "https://u.example");
        assert_ne!(fingerprint(&elsewhere, &m, &caps, &p), base);
        let other_kind = crate::target::TargetIdentity::new("databricks", "https://t.example");
        assert_ne!(fingerprint(&other_kind, &m, &caps, &p), base);
        assert_eq!(
            fingerprint(&t, &m.clone(), &caps.clone(), &p.clone()),
            base,
            "the digest is a function of the values alone"
        );
    }
}
