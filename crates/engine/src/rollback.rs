//! Undoing an apply, for `on_apply_error = "rollback"`: the promise Kanidm keeps with one
//! transaction ("halt and roll back to the last good state"), kept for targets without
//! transactions by undoing each write.
//!
//! Before the first write, the journal records what undoes every operation of the plan
//! ([`undo_log`]): a create is undone by deleting what it created, an update by writing back the
//! values observed before it, a member added by removing it and a member removed by adding it
//! back, a policy attached by detaching it, a deactivation by activating again, an adoption by
//! forgetting it. When a write fails or the run is stopped, no further write starts and
//! [`roll_back`] runs the inverses of what ran, in reverse order (renames one at a time, in the
//! reverse of the order they ran). A crash during the apply or the rollback leaves the undo log
//! in the journal, and the next run finishes it before it plans.
//!
//! What cannot be undone: a deletion. A principal deleted from a target loses its target id and,
//! in lakeFS, its credentials; recreating it would not make the target "as it was". Deletions
//! and deactivations run last, after every other operation of the run succeeded (the
//! deprovision stage), so a failure before them rolls back a run that deleted nothing; a failure
//! among them leaves the deletions made and retries the others on the next run. A deletion that
//! frees a key for a rename runs with the renames and is not undone either.

use crate::apply::Failure;
use crate::target::{Target, TargetErrorKind};
use idsync_model::{
    AgreementState, Attr, AttrChange, AttrValue, Capabilities, Kind, Observed, Op, PKey, PRef,
    SourceRef,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What undoes `op`, if anything does. `recovered` holds the keys of creates an earlier,
/// interrupted apply journaled: adopting one of those is recognising idsync's own principal, not
/// taking a new one, and is kept.
pub fn inverse(
    op: &Op,
    state: &AgreementState,
    recovered: &BTreeSet<PKey>,
    caps: &Capabilities,
) -> Option<Op> {
    match op {
        Op::Adopt { target, .. } => {
            let key = PKey::new(target.kind, caps.fold(&target.key));
            (!recovered.contains(&key)).then(|| Op::Forget {
                target: target.clone(),
            })
        }
        Op::Forget { .. } | Op::Delete { .. } => None,
        Op::Update {
            target,
            source,
            changes,
        } => {
            let renamed = changes.iter().find_map(|c| match (&c.attr, &c.to) {
                (Attr::Key, AttrValue::Text(Some(k))) => Some(k.clone()),
                _ => None,
            });
            Some(Op::Update {
                target: PRef {
                    key: renamed.map_or_else(|| target.key.clone(), Into::into),
                    ..target.clone()
                },
                source: source.clone(),
                changes: changes
                    .iter()
                    .map(|c| AttrChange {
                        attr: c.attr,
                        from: c.to.clone(),
                        to: c.from.clone(),
                    })
                    .collect(),
            })
        }
        Op::Create { principal, .. } => Some(Op::Delete {
            target: PRef {
                kind: principal.kind,
                key: principal.key.as_str().into(),
                id: None,
            },
            frees_key: false,
        }),
        Op::AttachPolicies { group, policies } => Some(Op::DetachPolicies {
            group: group.clone(),
            policies: policies.clone(),
        }),
        Op::DetachPolicies { group, policies } => Some(Op::AttachPolicies {
            group: group.clone(),
            policies: policies.clone(),
        }),
        Op::AddMembers { group, members } => Some(Op::RemoveMembers {
            group: group.clone(),
            members: members.clone(),
        }),
        Op::RemoveMembers { group, members } => Some(Op::AddMembers {
            group: group.clone(),
            members: members.clone(),
        }),
        Op::Deactivate { target } => {
            let source = target
                .id
                .as_ref()
                .and_then(|id| state.owned.get(target.kind).get(id))
                .and_then(|o| o.source.clone())
                .unwrap_or_default();
            Some(Op::Update {
                target: target.clone(),
                source: SourceRef {
                    kind: target.kind,
                    id: source,
                },
                changes: vec![AttrChange {
                    attr: Attr::Active,
                    from: AttrValue::Bool(false),
                    to: AttrValue::Bool(true),
                }],
            })
        }
    }
}

/// What undoes `ops` (a plan's operations, in the plan's order), in the order it must run: the
/// reverse of the order the apply runs them in. `state` is the agreement's state before the apply
/// began (its journal names the creates of an earlier interrupted apply).
pub fn undo_log<'a>(
    ops: impl IntoIterator<Item = &'a Op>,
    state: &AgreementState,
    caps: &Capabilities,
) -> Vec<Op> {
    let recovered = state
        .journal
        .as_ref()
        .map(|j| j.pending_creates.clone())
        .unwrap_or_default();
    let mut undo: Vec<(u8, usize, Op)> = ops
        .into_iter()
        .enumerate()
        .filter_map(|(i, op)| Some((op.phase(), i, inverse(op, state, &recovered, caps)?)))
        .collect();
    undo.sort_by_key(|u| std::cmp::Reverse((u.0, u.1)));
    undo.into_iter().map(|(_, _, op)| op).collect()
}

fn refs(op: &Op) -> Vec<&PRef> {
    match op {
        Op::Create { .. } => Vec::new(),
        Op::Adopt { target, .. }
        | Op::Forget { target }
        | Op::Update { target, .. }
        | Op::Deactivate { target }
        | Op::Delete { target, .. } => vec![target],
        Op::AttachPolicies { group, .. } | Op::DetachPolicies { group, .. } => vec![group],
        Op::AddMembers { group, members } | Op::RemoveMembers { group, members } => {
            std::iter::once(group).chain(members.iter()).collect()
        }
    }
}

/// Target ids of principals by folded key: what idsync owns, and what an observation found of
/// the creates an interrupted apply journaled.
#[derive(Clone, Debug, Default)]
pub struct Ids(BTreeMap<PKey, String>);

impl Ids {
    /// The principals idsync owns.
    pub fn owned(state: &AgreementState, caps: &Capabilities) -> Self {
        let mut ids = BTreeMap::new();
        for kind in Kind::ALL {
            for (id, o) in state.owned.get(kind) {
                ids.insert(PKey::new(kind, caps.fold(&o.key)), id.clone());
            }
        }
        Ids(ids)
    }

    /// Adds the observed principals whose keys are among `keys` (the journaled creates) and not
    /// known yet.
    pub fn add_observed(
        &mut self,
        observed: &Observed,
        keys: &BTreeSet<PKey>,
        caps: &Capabilities,
    ) {
        for kind in Kind::ALL {
            for (id, p) in observed.principals.get(kind) {
                let key = caps.pkey(&p.principal);
                if keys.contains(&key) {
                    self.0.entry(key).or_insert_with(|| id.clone());
                }
            }
        }
    }

    /// Whether every principal `op` names has its target id, or one is known here.
    pub fn finds_all(&self, op: &Op, caps: &Capabilities) -> bool {
        refs(op)
            .iter()
            .all(|r| r.id.is_some() || self.0.contains_key(&PKey::new(r.kind, caps.fold(&r.key))))
    }

    /// Fills in the missing target ids of `op`. A member not found is dropped (it was never
    /// created, so there is nothing to undo for it); `None` when the subject is not found, or no
    /// member is left.
    pub fn resolve(&self, op: &Op, caps: &Capabilities) -> Option<Op> {
        let fill = |r: &PRef| -> Option<PRef> {
            if r.id.is_some() {
                return Some(r.clone());
            }
            self.0
                .get(&PKey::new(r.kind, caps.fold(&r.key)))
                .map(|id| PRef {
                    id: Some(id.clone()),
                    ..r.clone()
                })
        };
        let mut op = op.clone();
        match &mut op {
            Op::Create { .. } => {}
            Op::Adopt { target, .. }
            | Op::Forget { target }
            | Op::Update { target, .. }
            | Op::Deactivate { target }
            | Op::Delete { target, .. } => *target = fill(target)?,
            Op::AttachPolicies { group, .. } | Op::DetachPolicies { group, .. } => {
                *group = fill(group)?
            }
            Op::AddMembers { group, members } | Op::RemoveMembers { group, members } => {
                *group = fill(group)?;
                *members = members.iter().filter_map(fill).collect();
                if members.is_empty() {
                    return None;
                }
            }
        }
        Some(op)
    }
}

/// What a rollback did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RollbackReport {
    /// Why the apply was rolled back.
    pub reason: String,
    /// Operations undone.
    pub undone: usize,
    /// Undo operations that failed: they stay in the journal and the next run tries them again.
    pub failed: Vec<Failure>,
}

impl RollbackReport {
    /// True when the target is back where it was.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Runs the undo operations (resolved: every principal they name carries its target id) in
/// order, a group of consecutive operations of one phase at a time (`workers` at once; renames
/// one at a time), recording in `state` what each changed: a deleted creation is no longer
/// owned, an undone adoption forgotten, an undone rename takes back its old key. An undo
/// operation that fails does not stop the others; it is returned to be tried again. A principal
/// or member already gone ("not found") has nothing left to undo.
pub async fn roll_back(
    undo: &[Op],
    target: &dyn Target,
    state: &mut AgreementState,
    workers: usize,
) -> (usize, Vec<Failure>) {
    use futures::StreamExt;
    let mut undone = 0;
    let mut failed = Vec::new();
    let mut gone: BTreeSet<(Kind, String)> = BTreeSet::new();
    let mut start = 0;
    while start < undo.len() {
        let phase = undo[start].phase();
        let end = undo[start..]
            .iter()
            .position(|o| o.phase() != phase)
            .map_or(undo.len(), |n| start + n);
        let width = if phase == idsync_model::plan::RENAME_PHASE {
            1
        } else {
            workers.max(1)
        };
        let results: Vec<(usize, Result<(), crate::target::TargetError>)> =
            futures::stream::iter(start..end)
                .map(|i| async move {
                    let op = &undo[i];
                    let r = if op.writes() {
                        match target.execute(op).await {
                            Err(e) if e.kind == TargetErrorKind::NotFound => Ok(()),
                            other => other.map(|_| ()),
                        }
                    } else {
                        Ok(())
                    };
                    (i, r)
                })
                .buffered(width)
                .collect()
                .await;
        for (i, r) in results {
            match r {
                Ok(()) => {
                    undone += 1;
                    record(&undo[i], state, &mut gone);
                }
                Err(e) => failed.push(Failure {
                    op: undo[i].clone(),
                    error: e.message,
                    kind: Some(e.kind),
                }),
            }
        }
        start = end;
    }
    if !gone.is_empty() {
        for kind in Kind::ALL {
            state
                .links
                .get_mut(kind)
                .retain(|_, t| !gone.contains(&(kind, t.clone())));
        }
    }
    (undone, failed)
}

/// What an undo operation changes in the state.
fn record(op: &Op, state: &mut AgreementState, gone: &mut BTreeSet<(Kind, String)>) {
    match op {
        Op::Delete { target, .. } | Op::Forget { target } => {
            let Some(id) = &target.id else { return };
            state.owned.get_mut(target.kind).remove(id);
            gone.insert((target.kind, id.clone()));
        }
        Op::Update {
            target, changes, ..
        } => {
            if let (Some(id), Some(AttrValue::Text(Some(k)))) = (
                &target.id,
                changes.iter().find(|c| c.attr == Attr::Key).map(|c| &c.to),
            ) && let Some(o) = state.owned.get_mut(target.kind).get_mut(id)
            {
                o.key = k.clone();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Journal, Principal};

    fn pref(kind: Kind, key: &str, id: Option<&str>) -> PRef {
        PRef {
            kind,
            key: key.into(),
            id: id.map(str::to_owned),
        }
    }

    fn rename(id: &str, from: &str, to: &str) -> Op {
        Op::Update {
            target: pref(Kind::Group, from, Some(id)),
            source: SourceRef {
                kind: Kind::Group,
                id: format!("src-{id}"),
            },
            changes: vec![AttrChange {
                attr: Attr::Key,
                from: AttrValue::Text(Some(from.into())),
                to: AttrValue::Text(Some(to.into())),
            }],
        }
    }

    #[test]
    fn the_undo_log_runs_backwards_and_undoes_renames_in_reverse() {
        let caps = Capabilities::full();
        let mut state = AgreementState::new("a");
        let recovered = PKey::new(Kind::User, caps.fold("back@x"));
        state.journal = Some(Journal {
            pending_creates: [recovered].into(),
            ..Journal::default()
        });
        let user = Principal::new(Kind::User, "new@x");
        let ops = vec![
            Op::Adopt {
                target: pref(Kind::User, "back@x", Some("u1")),
                source: SourceRef {
                    kind: Kind::User,
                    id: "s1".into(),
                },
            },
            Op::Adopt {
                target: pref(Kind::User, "taken@x", Some("u2")),
                source: SourceRef {
                    kind: Kind::User,
                    id: "s2".into(),
                },
            },
            // b frees its key for a, so b is renamed first.
            rename("g2", "b", "c"),
            rename("g1", "a", "b"),
            Op::Create {
                principal: user.clone(),
                source: SourceRef {
                    kind: Kind::User,
                    id: "s3".into(),
                },
            },
            Op::AddMembers {
                group: pref(Kind::Group, "b", Some("g1")),
                members: vec![pref(Kind::User, "new@x", None)],
            },
            Op::Delete {
                target: pref(Kind::User, "gone@x", Some("u9")),
                frees_key: false,
            },
        ];
        let undo = undo_log(&ops, &state, &caps);
        let shape: Vec<String> = undo
            .iter()
            .map(|op| match op {
                Op::Update {
                    target, changes, ..
                } => {
                    format!("rename {} -> {:?}", target.key, changes[0].to)
                }
                other => format!(
                    "{} {}",
                    serde_json::to_value(other).unwrap()["op"],
                    other.subject().1
                ),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                "\"removeMembers\" b".to_owned(),
                "\"delete\" new@x".to_owned(),
                "rename b -> Text(Some(\"a\"))".to_owned(),
                "rename c -> Text(Some(\"b\"))".to_owned(),
                "\"forget\" taken@x".to_owned(),
            ],
            "a deletion and the adoption of a journaled create are not undone"
        );
    }

    #[test]
    fn ids_fill_what_was_created_and_drop_what_was_not() {
        let caps = Capabilities::full();
        let mut ids = Ids::default();
        let mut observed = Observed::default();
        observed.insert(idsync_model::ObservedPrincipal {
            id: "t-7".into(),
            principal: Principal::new(Kind::User, "made@x"),
            policies: Default::default(),
        });
        observed.insert(idsync_model::ObservedPrincipal {
            id: "t-8".into(),
            principal: Principal::new(Kind::User, "someone-else@x"),
            policies: Default::default(),
        });
        let journaled: BTreeSet<PKey> = [PKey::new(Kind::User, caps.fold("made@x"))].into();
        ids.add_observed(&observed, &journaled, &caps);
        let remove = Op::RemoveMembers {
            group: pref(Kind::Group, "g", Some("g1")),
            members: vec![
                pref(Kind::User, "made@x", None),
                pref(Kind::User, "someone-else@x", None),
            ],
        };
        assert!(!ids.finds_all(&remove, &caps));
        match ids.resolve(&remove, &caps) {
            Some(Op::RemoveMembers { members, .. }) => {
                assert_eq!(members, vec![pref(Kind::User, "made@x", Some("t-7"))])
            }
            other => panic!("{other:?}"),
        }
        let delete = Op::Delete {
            target: pref(Kind::User, "someone-else@x", None),
            frees_key: false,
        };
        assert_eq!(
            ids.resolve(&delete, &caps),
            None,
            "not a journaled create: never deleted"
        );
    }
}
