//! Provision on demand (`idsync sync --only user:KEY --only group:KEY`), as Entra's "provision on
//! demand": a plan restricted to the chosen principals and their memberships.
//!
//! Kept: every operation on a chosen principal (create, update, adopt, policies, deprovision),
//! all member changes of a chosen group, and a chosen principal's own additions to and removals
//! from other groups. A group those member changes need that the same plan creates is created too
//! (with its policies); members that do not exist yet and are not created by the restricted plan
//! are left out, for the next full run. Nothing else is applied, so the run must not advance the
//! change feed's cursors nor trust its picture: the caller records it as incomplete.

use crate::plan::tally;
use idsync_model::{Kind, Op, PRef, Plan, Summary};
use std::collections::BTreeSet;

/// A chosen principal: its kind and its key in the target (`alice@corp.example`, as mapped), its
/// source id, or its target id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Only {
    /// Kind.
    pub kind: Kind,
    /// Key, source id or target id.
    pub key: String,
}

impl Only {
    /// Parses `user:KEY`, `servicePrincipal:KEY` (or `sp:KEY`) and `group:KEY`.
    pub fn parse(text: &str) -> Result<Only, String> {
        let (kind, key) = text.split_once(':').ok_or_else(|| {
            format!("{text:?}: write KIND:KEY, e.g. user:alice@corp.example or group:Platform")
        })?;
        let kind = Kind::parse(kind).ok_or_else(|| {
            format!("{text:?}: {kind:?} is not a kind (user, servicePrincipal, group)")
        })?;
        if key.trim().is_empty() {
            return Err(format!("{text:?}: the key is empty"));
        }
        Ok(Only {
            kind,
            key: key.trim().to_owned(),
        })
    }

    fn matches(&self, kind: Kind, key: &str, ids: &[Option<&str>]) -> bool {
        self.kind == kind
            && (key.eq_ignore_ascii_case(&self.key)
                || ids.iter().flatten().any(|id| *id == self.key))
    }

    fn matches_ref(&self, r: &PRef) -> bool {
        self.matches(r.kind, &r.key, &[r.id.as_deref()])
    }
}

/// Whether an operation is about a chosen principal itself.
fn about(op: &Op, only: &[Only]) -> bool {
    only.iter().any(|o| match op {
        Op::Create { principal, source } => {
            o.matches(principal.kind, &principal.key, &[Some(source.id.as_str())])
        }
        Op::Adopt { target, source } | Op::Update { target, source, .. } => o.matches(
            target.kind,
            &target.key,
            &[target.id.as_deref(), Some(source.id.as_str())],
        ),
        Op::Forget { target } | Op::Deactivate { target } | Op::Delete { target, .. } => {
            o.matches_ref(target)
        }
        Op::AttachPolicies { group, .. }
        | Op::DetachPolicies { group, .. }
        | Op::RemoveMembers { group, .. }
        | Op::AddMembers { group, .. } => o.matches_ref(group),
    })
}

/// Restricts `plan` to the chosen principals; returns how many operations were left out. A
/// selector that matches nothing is reported in the plan's notes.
pub fn restrict(plan: &mut Plan, only: &[Only]) -> usize {
    let before = plan.ops.len();
    let all = std::mem::take(&mut plan.ops);
    let mut kept: Vec<(usize, Op)> = Vec::new();
    for (i, op) in all.iter().enumerate() {
        if about(op, only) {
            kept.push((i, op.clone()));
            continue;
        }
        if let Op::AddMembers { group, members } | Op::RemoveMembers { group, members } = op {
            let chosen: Vec<PRef> = members
                .iter()
                .filter(|m| only.iter().any(|o| o.matches_ref(m)))
                .cloned()
                .collect();
            if !chosen.is_empty() {
                let group = group.clone();
                let op = match op {
                    Op::AddMembers { .. } => Op::AddMembers {
                        group,
                        members: chosen,
                    },
                    _ => Op::RemoveMembers {
                        group,
                        members: chosen,
                    },
                };
                kept.push((i, op));
            }
        }
    }
    // Groups the kept member changes need that this plan creates: created too, with policies.
    let creates = |kind: Kind, key: &str| {
        all.iter().enumerate().find(|(_, op)| {
            matches!(op, Op::Create { principal, .. } if principal.kind == kind && principal.key == key)
        })
    };
    let mut needed: BTreeSet<usize> = BTreeSet::new();
    for (_, op) in &kept {
        if let Op::AddMembers { group, .. } | Op::RemoveMembers { group, .. } = op
            && group.id.is_none()
            && let Some((i, _)) = creates(group.kind, &group.key)
        {
            needed.insert(i);
            for (j, other) in all.iter().enumerate() {
                if let Op::AttachPolicies { group: g, .. } = other
                    && g.kind == group.kind
                    && g.key == group.key
                {
                    needed.insert(j);
                }
            }
        }
    }
    for i in needed {
        if !kept.iter().any(|(k, _)| *k == i) {
            kept.push((i, all[i].clone()));
        }
    }
    kept.sort_by_key(|(i, _)| *i);
    // Members that do not exist and are not created now would fail: left for the next run.
    let created: BTreeSet<(Kind, String)> = kept
        .iter()
        .filter_map(|(_, op)| match op {
            Op::Create { principal, .. } => Some((principal.kind, principal.key.clone())),
            _ => None,
        })
        .collect();
    plan.ops = kept
        .into_iter()
        .filter_map(|(_, mut op)| {
            if let Op::AddMembers { members, .. } = &mut op {
                members
                    .retain(|m| m.id.is_some() || created.contains(&(m.kind, m.key.to_string())));
                if members.is_empty() {
                    return None;
                }
            }
            Some(op)
        })
        .collect();
    for o in only {
        if !plan.ops.iter().any(|op| {
            about(op, std::slice::from_ref(o))
                || matches!(op, Op::AddMembers { members, .. } | Op::RemoveMembers { members, .. }
                    if members.iter().any(|m| o.matches_ref(m)))
        }) {
            plan.notes.push(format!(
                "--only {}:{}: nothing to do for it (in sync, or not in the source's scope)",
                o.kind, o.key
            ));
        }
    }
    let mut summary = Summary {
        owned: plan.summary.owned,
        kept: plan.summary.kept,
        ..Summary::default()
    };
    tally(&plan.ops, &mut summary);
    plan.summary = summary;
    // An on-demand apply never completes the picture; what it leaves out counts as held back, so
    // that applying it (now, or saved with `plan --out`) does not advance the change feed.
    plan.trust = None;
    let left = before - plan.ops.len();
    plan.held_back += left;
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Principal, SourceRef};

    fn empty() -> Plan {
        Plan {
            format: idsync_model::plan::PLAN_FORMAT,
            agreement: "a".into(),
            state_version: 0,
            mode: idsync_model::ReadMode::Full,
            ops: Vec::new(),
            conflicts: Vec::new(),
            notes: Vec::new(),
            halt: None,
            summary: Summary::default(),
            observation: Default::default(),
            trust: None,
            approved_deletions: 0,
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

    fn create(kind: Kind, key: &str, source: &str) -> Op {
        Op::Create {
            principal: Principal::new(kind, key),
            source: SourceRef {
                kind,
                id: source.into(),
            },
        }
    }

    #[test]
    fn a_user_brings_its_memberships_and_the_groups_they_need() {
        let mut plan = empty();
        plan.ops = vec![
            create(Kind::User, "alice@corp", "u1"),
            create(Kind::User, "bob@corp", "u2"),
            create(Kind::Group, "New", "g9"),
            Op::AddMembers {
                group: pref(Kind::Group, "Old", Some("G1")),
                members: vec![
                    pref(Kind::User, "alice@corp", None),
                    pref(Kind::User, "bob@corp", None),
                ],
            },
            Op::AddMembers {
                group: pref(Kind::Group, "New", None),
                members: vec![pref(Kind::User, "alice@corp", None)],
            },
            Op::AddMembers {
                group: pref(Kind::Group, "Other", Some("G2")),
                members: vec![pref(Kind::User, "bob@corp", None)],
            },
        ];
        let left = restrict(&mut plan, &[Only::parse("user:Alice@corp").unwrap()]);
        assert_eq!(left, 2, "{:?}", plan.ops);
        assert_eq!(plan.ops.len(), 4);
        assert!(
            matches!(&plan.ops[0], Op::Create { principal, .. } if principal.key == "alice@corp")
        );
        assert!(matches!(&plan.ops[1], Op::Create { principal, .. } if principal.key == "New"));
        match &plan.ops[2] {
            Op::AddMembers { group, members } => {
                assert_eq!(group.key, "Old");
                assert_eq!(members.len(), 1, "bob is not chosen");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plan.summary.members_added, 2);
        assert!(plan.trust.is_none());

        // A chosen group: its own changes; members that do not exist yet wait.
        let mut plan = empty();
        plan.ops = vec![
            create(Kind::User, "carol@corp", "u3"),
            Op::AddMembers {
                group: pref(Kind::Group, "Old", Some("G1")),
                members: vec![
                    pref(Kind::User, "carol@corp", None),
                    pref(Kind::User, "dan@corp", Some("U4")),
                ],
            },
        ];
        restrict(&mut plan, &[Only::parse("group:G1").unwrap()]);
        match plan.ops.as_slice() {
            [Op::AddMembers { members, .. }] => {
                assert_eq!(members.len(), 1);
                assert_eq!(members[0].key, "dan@corp");
            }
            other => panic!("{other:?}"),
        }

        // Nothing for a principal: said.
        let mut plan = empty();
        restrict(&mut plan, &[Only::parse("user:nobody@corp").unwrap()]);
        assert!(
            plan.notes.iter().any(|n| n.contains("nothing to do")),
            "{:?}",
            plan.notes
        );
        assert!(Only::parse("alice").is_err());
        assert!(Only::parse("robot:x").is_err());
        assert!(Only::parse("user: ").is_err());
    }
}
