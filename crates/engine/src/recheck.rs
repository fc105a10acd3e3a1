//! A saved plan is a file a person can edit. Before it is applied, its operations are checked
//! again against the policy and the state as they are now, and its summary and safety guards are
//! computed from the operations themselves, never read from the file: a plan edited to delete
//! more than it said, or to drop its halt, is refused or halted exactly as a fresh plan would be.

use crate::plan::{Deprovision, OnConflict, Policy};
use idsync_model::{
    AgreementState, Capabilities, Halt, HaltReason, Kind, Op, PKey, PRef, Plan, Summary,
};
use std::collections::BTreeSet;

/// What a recheck found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recheck {
    /// The plan may be applied; its summary, computed from its operations.
    Ok(Summary),
    /// A safety guard stops it before any write (exit 3, as a fresh plan).
    Halt(Halt),
    /// The plan is not one this configuration and state could have made: every reason found.
    Refused(Vec<String>),
}

/// Checks `plan` against `state` and `policy` (the configuration's, with the approvals recorded in
/// the plan when it was made) for a target with `caps`.
pub fn recheck(
    plan: &Plan,
    state: &AgreementState,
    policy: &Policy,
    caps: &Capabilities,
) -> Recheck {
    let mut summary = Summary {
        owned: state.owned_count(),
        kept: plan.summary.kept,
        ..Summary::default()
    };
    crate::plan::tally(&plan.ops, &mut summary);
    let mut refused = Vec::new();
    if (
        &summary.ops,
        summary.members_added,
        summary.members_removed,
        summary.destructive,
    ) != (
        &plan.summary.ops,
        plan.summary.members_added,
        plan.summary.members_removed,
        plan.summary.destructive,
    ) {
        refused.push(format!(
            "its summary ({} operation(s), {} destructive) does not match its operations ({}, {} destructive)",
            plan.summary.ops.values().sum::<usize>(),
            plan.summary.destructive,
            summary.ops.values().sum::<usize>(),
            summary.destructive
        ));
    }
    // What this plan creates or adopts may be written to in it, by key (ids are resolved at apply).
    let fold = |r: &PRef| PKey::new(r.kind, caps.fold(&r.key));
    let mut made: BTreeSet<PKey> = BTreeSet::new();
    let mut adopted: BTreeSet<(Kind, String)> = BTreeSet::new();
    let journaled: BTreeSet<&PKey> = state
        .journal
        .iter()
        .flat_map(|j| j.pending_creates.iter())
        .collect();
    for op in &plan.ops {
        match op {
            Op::Create { principal, .. } => {
                made.insert(caps.pkey(principal));
            }
            Op::Adopt { target, .. } => {
                let key = fold(target);
                let id = target.id.as_deref().unwrap_or_default();
                // adopt_keys are kept as written; the planner folds them as the target does.
                let listed = policy
                    .adopt_keys
                    .iter()
                    .any(|k| k.kind == key.kind && caps.fold(&k.key) == key.key);
                let allowed = state.owns(target.kind, id)
                    || policy.adopt
                    || listed
                    || journaled.contains(&key);
                if !allowed {
                    refused.push(format!(
                        "it adopts {target}, which the policy does not allow (set adopt = true or list it in adopt_keys)"
                    ));
                }
                adopted.insert((target.kind, id.to_owned()));
            }
            _ => {}
        }
    }
    let ours = |r: &PRef| match &r.id {
        Some(id) => state.owns(r.kind, id) || adopted.contains(&(r.kind, id.clone())),
        None => made.contains(&fold(r)),
    };
    for op in &plan.ops {
        let written: Vec<&PRef> = match op {
            Op::Update { target, .. }
            | Op::Deactivate { target }
            | Op::Delete { target, .. }
            | Op::Forget { target } => vec![target],
            Op::DetachPolicies { group, .. } => {
                refused.push(format!(
                    "it detaches policies from {group}: plans never do (only a rollback does)"
                ));
                vec![group]
            }
            Op::AttachPolicies { group, .. }
            | Op::AddMembers { group, .. }
            | Op::RemoveMembers { group, .. } => vec![group],
            Op::Create { .. } | Op::Adopt { .. } => vec![],
        };
        for r in written {
            if !ours(r) {
                refused.push(format!(
                    "it writes to {r}, which idsync neither owns nor creates or adopts in this plan"
                ));
            }
        }
        match op {
            Op::Delete { target, .. } if policy.deprovision != Deprovision::Delete => {
                refused.push(format!(
                    "it deletes {target}, but deprovision = {:?}",
                    policy.deprovision
                ));
            }
            Op::Deactivate { target } if policy.deprovision != Deprovision::Deactivate => {
                refused.push(format!(
                    "it deactivates {target}, but deprovision = {:?}",
                    policy.deprovision
                ));
            }
            _ => {}
        }
    }
    if !refused.is_empty() {
        return Recheck::Refused(refused);
    }
    if !plan.conflicts.is_empty() && policy.on_conflict == OnConflict::Halt {
        return Recheck::Halt(Halt {
            reason: HaltReason::Conflicts,
            message: format!(
                "{} conflict(s): the target was left as it was. Resolve each one as its line says, or set on_conflict = \"skip\" to sync everything else",
                plan.conflicts.len()
            ),
        });
    }
    match crate::plan::guards(policy, &summary) {
        Some(h) => Recheck::Halt(h),
        None => Recheck::Ok(summary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Owned, Ownership, Principal, ReadMode, SourceRef};

    fn r(kind: Kind, key: &str, id: Option<&str>) -> PRef {
        PRef {
            kind,
            key: key.into(),
            id: id.map(str::to_owned),
        }
    }

    /// A state owning users u1..u5 (target ids t1..t5).
    fn state() -> AgreementState {
        let mut st = AgreementState::new("a");
        for i in 1..=5 {
            st.owned.get_mut(Kind::User).insert(
                format!("t{i}"),
                Owned {
                    key: format!("u{i}@x"),
                    how: Ownership::Created,
                    source: Some(format!("s{i}")),
                },
            );
        }
        st
    }

    /// A plan of `ops` whose summary says what they do, as `plan()` writes it.
    fn plan_of(ops: Vec<Op>, st: &AgreementState) -> Plan {
        let mut p = crate::plan(
            &Default::default(),
            &Default::default(),
            st,
            &Policy {
                allow_empty_source: true,
                ..Policy::default()
            },
            &Capabilities::full(),
            ReadMode::Full,
        );
        p.ops = ops;
        p.summary = Summary {
            owned: st.owned_count(),
            ..Summary::default()
        };
        crate::plan::tally(&p.ops, &mut p.summary);
        p.halt = None;
        p
    }

    fn delete(i: u32) -> Op {
        Op::Delete {
            target: r(Kind::User, &format!("u{i}@x"), Some(&format!("t{i}"))),
            frees_key: false,
        }
    }

    #[test]
    fn deletions_the_policy_does_not_allow_are_refused() {
        let st = state();
        let p = plan_of(vec![delete(1), delete(2)], &st);
        let caps = Capabilities::full();
        match recheck(&p, &st, &Policy::default(), &caps) {
            Recheck::Refused(why) => {
                assert_eq!(why.len(), 2, "{why:?}");
                assert!(why[0].contains("deprovision = None"), "{why:?}");
            }
            other => panic!("{other:?}"),
        }
        let deleting = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        assert!(matches!(
            recheck(&p, &st, &deleting, &caps),
            Recheck::Ok(s) if s.destructive == 2
        ));
    }

    #[test]
    fn a_summary_that_hides_deletions_is_refused() {
        let st = state();
        let mut p = plan_of(vec![delete(1)], &st);
        p.summary = Summary::default();
        let deleting = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        match recheck(&p, &st, &deleting, &Capabilities::full()) {
            Recheck::Refused(why) => assert!(why[0].contains("summary"), "{why:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dropped_halt_is_found_again_and_approvals_count() {
        let st = state();
        let p = plan_of((1..=5).map(delete).collect(), &st);
        let policy = Policy {
            deprovision: Deprovision::Delete,
            max_deletions: Some(1),
            ..Policy::default()
        };
        let caps = Capabilities::full();
        match recheck(&p, &st, &policy, &caps) {
            Recheck::Halt(h) => assert_eq!(h.reason, HaltReason::Threshold),
            other => panic!("{other:?}"),
        }
        let approved = Policy {
            approved_deletions: 5,
            ..policy
        };
        assert!(matches!(recheck(&p, &st, &approved, &caps), Recheck::Ok(_)));
    }

    #[test]
    fn writes_to_principals_idsync_does_not_own_are_refused_unless_made_or_adopted_here() {
        let st = state();
        let caps = Capabilities::full();
        let stranger = r(Kind::User, "ceo@x", Some("t99"));
        let update = |target: PRef| Op::Update {
            target,
            source: SourceRef {
                kind: Kind::User,
                id: "s9".into(),
            },
            changes: vec![],
        };
        let p = plan_of(vec![update(stranger.clone())], &st);
        assert!(matches!(
            recheck(&p, &st, &Policy::default(), &caps),
            Recheck::Refused(_)
        ));
        // Adopted in the same plan: allowed only when the policy adopts.
        let adopt = Op::Adopt {
            target: stranger.clone(),
            source: SourceRef {
                kind: Kind::User,
                id: "s9".into(),
            },
        };
        let p = plan_of(vec![adopt, update(stranger)], &st);
        assert!(matches!(
            recheck(&p, &st, &Policy::default(), &caps),
            Recheck::Refused(why) if why.len() == 1 && why[0].contains("adopt")
        ));
        let adopting = Policy {
            adopt: true,
            ..Policy::default()
        };
        assert!(matches!(recheck(&p, &st, &adopting, &caps), Recheck::Ok(_)));
        // Listed in adopt_keys as written, in another case, where the target folds case.
        let folding = Capabilities {
            case_insensitive_keys: true,
            ..caps.clone()
        };
        let listed = Policy {
            adopt_keys: [PKey::new(Kind::User, "CEO@x")].into(),
            ..Policy::default()
        };
        assert!(matches!(
            recheck(&p, &st, &listed, &folding),
            Recheck::Ok(_)
        ));
        // A group created in this plan gets its members in it (its id is not known yet).
        let g = Principal::new(Kind::Group, "G");
        let p = plan_of(
            vec![
                Op::Create {
                    principal: g,
                    source: SourceRef {
                        kind: Kind::Group,
                        id: "sg".into(),
                    },
                },
                Op::AddMembers {
                    group: r(Kind::Group, "G", None),
                    members: vec![r(Kind::User, "u1@x", Some("t1"))],
                },
            ],
            &st,
        );
        assert!(matches!(
            recheck(&p, &st, &Policy::default(), &caps),
            Recheck::Ok(_)
        ));
    }
}
