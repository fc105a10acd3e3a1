//! Ending an agreement, as Kanidm's sync agreements end:
//!
//! - **finalise**: idsync gives its authority up and the principals stay in the target, now the
//!   target's own. The state forgets what it owned (idsync writes no ownership marker into a
//!   target, so nothing there changes) and the agreement is `Finalised`: later runs stop.
//! - **terminate**: the principals the agreement created are deleted (the deprovision stage:
//!   groups, users, service principals; a target drops a deleted principal's memberships with it),
//!   and the agreement is `Terminated`. Members idsync added to a group it only adopted stay when
//!   they are principals it adopted too: the plan has no member removals of its own. A principal it only adopted is left as it is
//!   and forgotten, unless `include_adopted`. Terminate is a plan first, like every change: it is
//!   applied only when the caller confirms the exact number of deletions the plan shows, which
//!   also stands in for the deletion threshold's approval.

use crate::{
    Agreement, Mode, Outcome, Reporter, RunError, RunOptions, apply_file, exit, give_back, holder,
    load_state, recover,
};
use idsync_engine::{Deprovision, Policy, map_snapshot};
use idsync_model::{
    AgreementState, AgreementStatus, Kind, Ownership, PlanFile, ReadMode, Snapshot, Stage,
};
use idsync_state::StateStore;

/// What an agreement's state holds, for `agreement status` and the two endings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Principals idsync created, by kind (users, service principals, groups).
    pub created: [usize; 3],
    /// Principals it adopted, by kind.
    pub adopted: [usize; 3],
}

impl Holdings {
    /// Counts what `state` owns.
    pub fn of(state: &AgreementState) -> Holdings {
        let mut h = Holdings::default();
        for (i, k) in Kind::ALL.iter().enumerate() {
            for o in state.owned.get(*k).values() {
                match o.how {
                    Ownership::Created => h.created[i] += 1,
                    Ownership::Adopted => h.adopted[i] += 1,
                }
            }
        }
        h
    }

    /// All created.
    pub fn created_total(&self) -> usize {
        self.created.iter().sum()
    }

    /// All adopted.
    pub fn adopted_total(&self) -> usize {
        self.adopted.iter().sum()
    }
}

/// The state's agreement, active, or why it cannot be ended now.
fn endable(state: &AgreementState, name: &str) -> Result<(), RunError> {
    if state.journal.is_some() {
        return Err(RunError::Lifecycle(format!(
            "{name}: an apply was interrupted and its journal is open; finish it first (`idsync sync --target {name}`), then end the agreement"
        )));
    }
    Ok(())
}

/// Finalises `name`: the target takes over what idsync held, where it keeps agreements of its own
/// (`target`: Kanidm's finalise), then the state forgets what it owned and the agreement is
/// `Finalised`. Returns what it held.
pub async fn finalise(
    store: &dyn StateStore,
    name: &str,
    lease: std::time::Duration,
    target: Option<&dyn idsync_engine::Target>,
) -> Result<Holdings, RunError> {
    let l = store.acquire(name, &holder(), lease).await?;
    let result = async {
        let Some(mut state) = store.load(name).await? else {
            return Err(RunError::Lifecycle(format!(
                "{name:?} has no state in {}: it never ran, so there is nothing to finalise",
                store.describe()
            )));
        };
        if state.status != AgreementStatus::Active {
            return Err(RunError::Inactive {
                agreement: name.to_owned(),
                status: format!("{:?}", state.status),
            });
        }
        endable(&state, name)?;
        let held = Holdings::of(&state);
        match target {
            Some(t) => {
                t.end(idsync_engine::Ending::Finalise)
                    .await
                    .map_err(|e| RunError::Lifecycle(format!("finalising {name}: {e}")))?;
            }
            // A target that cannot be read keeps the agreement itself (its cursor says so):
            // forgetting it here alone would leave the principals under an authority nobody uses.
            None if state.target_cursor.is_some() => {
                return Err(RunError::Lifecycle(format!(
                    "{name}'s target keeps the agreement on its side (Kanidm's sync account): finalise it with the configuration that names it, so that idsync can reach the target"
                )));
            }
            None => {}
        }
        forget(&mut state);
        state.status = AgreementStatus::Finalised;
        store.commit(&state).await.map_err(RunError::Commit)?;
        Ok(held)
    }
    .await;
    give_back(store, &l).await;
    result
}

/// Drops everything that gives idsync authority over principals or plans its next run.
fn forget(state: &mut AgreementState) {
    for k in Kind::ALL {
        state.owned.get_mut(k).clear();
        state.links.get_mut(k).clear();
    }
    state.failing.clear();
    state.halted = None;
    state.trust = None;
    state.cursors.clear();
    state.target_cursor = None;
}

/// How a terminate is to go.
#[derive(Clone, Copy, Debug, Default)]
pub struct Terminate {
    /// Delete the principals idsync only adopted too.
    pub include_adopted: bool,
    /// The number of deletions the caller confirms (`--yes-delete N`); `None` plans only.
    pub confirm: Option<usize>,
}

/// Terminates `a`: plans the removal of what it created (and adopted, if asked), and applies it
/// when `how.confirm` is exactly the plan's number of deletions; then the agreement is
/// `Terminated`. Without a confirmation the plan is shown and the outcome is
/// [`exit::PENDING`].
pub async fn terminate(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    opts: &RunOptions,
    how: Terminate,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    let lease = match how.confirm {
        Some(_) => Some(store.acquire(a.name, &holder(), opts.lease).await?),
        None => None,
    };
    let result = terminate_under_lease(a, store, opts, how, lease.as_ref(), reporter).await;
    if let Some(l) = lease {
        give_back(store, &l).await;
    }
    result
}

async fn terminate_under_lease(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    opts: &RunOptions,
    how: Terminate,
    lease: Option<&idsync_state::Lease>,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    let mut state = load_state(store, a.name).await?;
    let plan_only = RunOptions {
        mode: Mode::Plan,
        ..opts.clone()
    };
    recover(
        a,
        store,
        &mut state,
        if how.confirm.is_some() {
            opts
        } else {
            &plan_only
        },
        reporter,
    )
    .await?;
    endable(&state, a.name)?;
    let held = Holdings::of(&state);
    // What the plan may delete: what idsync created, and what it adopted when asked.
    let mut planning = state.clone();
    if !how.include_adopted {
        for k in Kind::ALL {
            planning
                .owned
                .get_mut(k)
                .retain(|_, o| o.how == Ownership::Created);
        }
    }
    let caps = a.target.capabilities();
    let observed = if a.target.readable() {
        a.observe().await?
    } else {
        crate::observation::sight(a, &caps, &state, a.policy, opts)
            .await?
            .0
    };
    let desired = map_snapshot(&Snapshot::default(), a.mapping, &caps);
    let policy = Policy {
        deprovision: Deprovision::Delete,
        allow_empty_source: true,
        // The confirmation below is the approval.
        max_deletions: None,
        max_deletions_percent: None,
        approved_deletions: usize::MAX,
        ..a.policy.clone()
    };
    let mut plan = idsync_engine::plan(
        &desired,
        &observed,
        &planning,
        &policy,
        &caps,
        ReadMode::Full,
    );
    plan.trust = None;
    plan.notes.insert(
        0,
        format!(
            "terminating {}: removing the {} principal(s) it created{}",
            a.name,
            held.created_total(),
            match (how.include_adopted, held.adopted_total()) {
                (_, 0) => String::new(),
                (true, n) => format!(" and the {n} it adopted"),
                (false, n) => format!(
                    "; the {n} it adopted stay as they are and are forgotten (--include-adopted deletes them too)"
                ),
            }
        ),
    );
    let deletions = plan.summary.destructive;
    let file = PlanFile {
        plan,
        snapshot: std::sync::Arc::new(Snapshot::default()),
        cursors: Default::default(),
        checksum: None,
    };
    let confirmed = how.confirm == Some(deletions);
    reporter.plan(
        &file.plan,
        &a.describe,
        if confirmed { Mode::Sync } else { Mode::Plan },
    );
    match how.confirm {
        None => {
            reporter.note(&format!(
                "nothing was deleted; to terminate {} and delete these {deletions} principal(s): idsync agreement terminate {} --yes-delete {deletions}",
                a.name, a.name
            ));
            return Ok(Outcome {
                code: exit::PENDING,
                file: Some(file),
                report: None,
            });
        }
        Some(n) if n != deletions => {
            return Err(RunError::Lifecycle(format!(
                "{}: --yes-delete {n}, but the plan deletes {deletions}: nothing was deleted. Read the plan again (`idsync agreement terminate {}`) and confirm the number it shows",
                a.name, a.name
            )));
        }
        Some(_) => {}
    }
    if let Some(h) = &file.plan.halt {
        reporter.halt(h);
        return Ok(Outcome {
            code: exit::HALTED,
            file: Some(file),
            report: None,
        });
    }
    // A target that keeps agreements of its own terminates this one itself (Kanidm: the sync
    // account and every entry it imported go in one transaction).
    if !a.target.readable()
        && a.target
            .end(idsync_engine::Ending::Terminate)
            .await
            .map_err(|e| RunError::Lifecycle(format!("terminating {}: {e}", a.name)))?
    {
        let mut state = load_state(store, a.name).await?;
        forget(&mut state);
        state.status = AgreementStatus::Terminated;
        if let Some(l) = lease {
            store.renew(l, opts.lease).await?;
        }
        store.commit(&state).await.map_err(RunError::Commit)?;
        reporter.note(&format!(
            "{} terminated on the target's side: the {deletions} principal(s) it created and the agreement there are deleted; later runs of it stop",
            a.name
        ));
        return Ok(Outcome {
            code: exit::OK,
            file: Some(file),
            report: None,
        });
    }
    let stages = [Stage::Principals, Stage::Members, Stage::Deprovision];
    let lease = lease.map(|l| (l, opts.lease));
    // Until every deletion succeeded, ordinary runs must not put back what was deleted: the
    // agreement is halted in the same commit as the journal, before the first delete.
    state.halted = Some(format!(
        "a terminate of {} was started and has not finished; run `idsync agreement terminate {} --yes-delete N` again to finish it",
        a.name, a.name
    ));
    let report = apply_file(&file, a, store, state, &stages, opts, lease, None).await?;
    reporter.report(&report);
    if !report.is_success() || report.pending > 0 {
        return Ok(Outcome {
            code: exit::ERROR,
            file: Some(file),
            report: Some(report),
        });
    }
    // Everything planned is gone: the agreement ends, and what is left (adopted principals
    // spared) is forgotten.
    let mut state = load_state(store, a.name).await?;
    forget(&mut state);
    state.status = AgreementStatus::Terminated;
    if let Some((l, ttl)) = lease {
        store.renew(l, ttl).await?;
    }
    store.commit(&state).await.map_err(RunError::Commit)?;
    reporter.note(&format!("{} is terminated: later runs of it stop", a.name));
    Ok(Outcome {
        code: exit::OK,
        file: Some(file),
        report: Some(report),
    })
}
