//! `on_apply_error = "rollback"` in a run: the undo log journaled before the first write, the
//! decision to roll back after an apply, and finishing a rollback an earlier run left (it crashed
//! or could not reach the target). The undoing itself is [`idsync_engine::rollback`].

use crate::{Agreement, RunError};
use idsync_engine::apply::{ApplyReport, Failure};
use idsync_engine::rollback::{Ids, RollbackReport, roll_back, undo_log};
use idsync_model::{AgreementState, Capabilities, Journal, Op, PKey, Plan, Stage};
use idsync_state::StateStore;
use std::collections::BTreeSet;

/// Why the apply must be rolled back, if it must: an operation before the deprovision stage failed,
/// was skipped, or did not start. Deletions are not undone (see [`idsync_engine::rollback`]), so
/// a failure among them rolls nothing back.
pub(crate) fn needed(plan: &Plan, report: &ApplyReport, stages: &[Stage]) -> Option<String> {
    let before_deprovision = |op: &Op| op.stage() != Stage::Deprovision;
    if let Some(f) = report
        .failed
        .iter()
        .chain(&report.skipped)
        .find(|f| before_deprovision(&f.op))
    {
        let (kind, key) = f.op.subject();
        return Some(format!("{kind} {key:?} failed: {}", f.error));
    }
    let ran: BTreeSet<usize> = report.ran.iter().copied().collect();
    let not_started = plan
        .ops
        .iter()
        .enumerate()
        .filter(|(i, op)| {
            stages.contains(&op.stage()) && before_deprovision(op) && !ran.contains(i)
        })
        .count();
    (not_started > 0)
        .then(|| format!("the run was stopped with {not_started} operation(s) not started"))
}

/// The journal of an apply that may be rolled back: `begin`'s, with what undoes every operation
/// of the stages about to run.
pub(crate) fn journal_undo(
    plan: &Plan,
    stages: &[Stage],
    caps: &Capabilities,
    state: &mut AgreementState,
) {
    let undo = undo_log(
        plan.ops.iter().filter(|o| stages.contains(&o.stage())),
        state,
        caps,
    );
    if let Some(j) = &mut state.journal {
        j.undo = undo;
    }
}

/// After a failed apply: the undo log of what ran (succeeded, or may have), with the journal's
/// creates narrowed to those whose outcome is unknown (the others are owned now, or did not
/// happen).
pub(crate) fn after_failure(
    plan: &Plan,
    report: &ApplyReport,
    caps: &Capabilities,
    state: &mut AgreementState,
) {
    let ran = report.ran.iter().map(|&i| &plan.ops[i]);
    let undo = undo_log(ran, state, caps);
    let unknown: BTreeSet<PKey> = report
        .failed
        .iter()
        .filter(|f| f.outcome_unknown())
        .filter_map(|f| match &f.op {
            Op::Create { principal, .. } => Some(caps.pkey(principal)),
            _ => None,
        })
        .collect();
    state.journal = Some(Journal {
        plan_id: state
            .journal
            .as_ref()
            .map(|j| j.plan_id.clone())
            .unwrap_or_default(),
        pending_creates: unknown,
        undo,
        rolling_back: true,
    });
}

/// The links and ownership of `base`, but for the principals whose undo failed: those stay as
/// the apply recorded them (a creation not deleted is still idsync's, a rename not undone still
/// has its new key).
fn settle(state: &mut AgreementState, base: &AgreementState, failed: &[Failure]) {
    let applied_links = std::mem::replace(&mut state.links, base.links.clone());
    let applied_owned = std::mem::replace(&mut state.owned, base.owned.clone());
    for f in failed {
        let (Op::Delete { target, .. } | Op::Update { target, .. } | Op::Forget { target }) = &f.op
        else {
            continue;
        };
        let (kind, Some(id)) = (target.kind, &target.id) else {
            continue;
        };
        if let Some(o) = applied_owned.get(kind).get(id) {
            state.owned.get_mut(kind).insert(id.clone(), o.clone());
        }
        for (source, tid) in applied_links.get(kind) {
            if tid == id {
                state
                    .links
                    .get_mut(kind)
                    .insert(source.clone(), tid.clone());
            }
        }
    }
}

/// Runs the journal's undo log: finds the target ids it lacks (what idsync owns; for creates
/// whose outcome is unknown, an observation of the target), journals the resolved log as a
/// rollback in progress, undoes, and leaves in the journal only what could not be undone. The
/// caller commits the state. Until the next clean apply, the state's picture of the target is not
/// trusted.
///
/// `base` is the state before the apply, when the apply ran in this process: the links and
/// ownership go back to it, but for what could not be undone (still as the apply left it).
pub(crate) async fn finish(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    state: &mut AgreementState,
    base: Option<&AgreementState>,
    workers: usize,
    reason: String,
) -> Result<RollbackReport, RunError> {
    let caps = a.target.capabilities();
    let Some(journal) = state.journal.clone() else {
        return Ok(RollbackReport {
            reason,
            ..RollbackReport::default()
        });
    };
    let mut ids = Ids::owned(state, &caps);
    if !journal.pending_creates.is_empty()
        && journal.undo.iter().any(|op| !ids.finds_all(op, &caps))
    {
        let observed = a.observe().await?;
        ids.add_observed(&observed, &journal.pending_creates, &caps);
    }
    let undo: Vec<Op> = journal
        .undo
        .iter()
        .filter_map(|op| ids.resolve(op, &caps))
        .collect();
    state.trust = None;
    state.journal = Some(Journal {
        plan_id: journal.plan_id.clone(),
        pending_creates: BTreeSet::new(),
        undo: undo.clone(),
        rolling_back: true,
    });
    state.version = store.commit(state).await.map_err(RunError::Journal)?;
    let (undone, failed): (usize, Vec<Failure>) = roll_back(&undo, a.target, state, workers).await;
    if let Some(base) = base {
        settle(state, base, &failed);
    }
    state.journal = (!failed.is_empty()).then(|| Journal {
        plan_id: journal.plan_id,
        pending_creates: BTreeSet::new(),
        undo: failed.iter().map(|f| f.op.clone()).collect(),
        rolling_back: true,
    });
    Ok(RollbackReport {
        reason,
        undone,
        failed,
    })
}
