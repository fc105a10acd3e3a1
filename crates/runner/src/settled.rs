//! A run whose source reports no change (issue #17): when the last run found nothing to do and
//! nothing has moved since, the plan is known without mapping and planning the tenant again, and
//! there is nothing to commit but newer cursors, which wait until the committed ones grow old.
//!
//! What makes this exact: the plan is a function of the source snapshot, the state, the
//! fingerprint (target, mapping, capabilities, policy) and, for principals idsync did not touch,
//! the trusted picture. A run that planned nothing records its notes and counts in the state
//! ([`Settled`]), valid only in the state version its own commit wrote: any later commit (an
//! apply, `idsync agreement ...`, a rollback, an import) makes it stale. The next run takes it
//! only when its source read was a change read that found no change at all (the snapshot is the
//! last applied one, the same `Arc`), under the same fingerprint, with the picture still trusted
//! (a clean, complete apply, the last full observation inside the reconcile interval), no journal,
//! no quarantine, no halt, the whole plan asked for, the same build, and no stop asked for. Anything
//! else plans the slow way.

use crate::{Agreement, Mode, RunOptions, observation, unix_now};
use idsync_engine::{Policy, Read, observe};
use idsync_model::state::{CURSOR_REFRESH_SECS, Settled};
use idsync_model::{AgreementState, Capabilities, Observation, Plan, ReadMode, Trust};

/// The build that records and takes [`Settled`] plans.
const BUILD: &str = concat!("idsync ", env!("CARGO_PKG_VERSION"));

/// The plan a run whose source reported no change would make, when the state's record of the
/// last run that found nothing to do still holds (see the module's documentation).
pub(crate) fn plan(
    a: &Agreement<'_>,
    caps: &Capabilities,
    read: &Read,
    state: &AgreementState,
    policy: &Policy,
    opts: &RunOptions,
) -> Option<Plan> {
    let s = state.settled.as_ref()?;
    // The same `Arc` when this agreement made the read; agreements at the same cursors share a
    // read (`ReadCache`) made from another agreement's copy of the snapshot, compared in full.
    let unchanged = read.unchanged
        && read.mode == ReadMode::Incremental
        && state.last_applied.as_ref().is_some_and(|base| {
            std::sync::Arc::ptr_eq(base, &read.snapshot) || **base == *read.snapshot
        });
    if !unchanged
        || opts.stopped()
        || s.build != BUILD
        || s.version != state.version
        || s.allow_empty_source != policy.allow_empty_source
        || opts.mode == Mode::PrincipalsOnly
        || !opts.only.is_empty()
        || state.halted.is_some()
        || state.journal.is_some()
        || !state.failing.is_empty()
        || !a.target.readable()
    {
        return None;
    }
    let fingerprint = observe::fingerprint(&a.identity, a.mapping, caps, policy);
    if s.fingerprint != fingerprint {
        return None;
    }
    let now = opts.now.unwrap_or_else(unix_now);
    let (since, _) = observation::trusted(state, &fingerprint, opts, now)?;
    let mut notes = read.notes.clone();
    notes.extend(s.notes.iter().cloned());
    let mut plan = Plan {
        format: idsync_model::plan::PLAN_FORMAT,
        agreement: state.agreement.clone(),
        state_version: state.version,
        mode: read.mode,
        ops: Vec::new(),
        conflicts: Vec::new(),
        notes,
        halt: None,
        summary: s.summary.clone(),
        observation: Observation::Incremental {
            read: 0,
            since,
            touched: Some(0),
        },
        trust: Some(Trust {
            observed_at: since,
            fingerprint,
            totals: state.trust.as_ref().and_then(|t| t.totals),
        }),
        approved_deletions: policy.approved_deletions,
        held_back: 0,
    };
    idsync_engine::quarantine::hold(&mut plan, state, now, caps);
    Some(plan)
}

/// What a freshly made plan lets the state record, if applying it in full changes nothing: its
/// own notes (`own_notes`: before the read's were put in front) and its counts. The version is
/// filled in by the commit that records it.
pub(crate) fn record(
    a: &Agreement<'_>,
    plan: &Plan,
    own_notes: Vec<String>,
    policy: &Policy,
    opts: &RunOptions,
) -> Option<Settled> {
    let quiet = plan.ops.is_empty()
        && plan.conflicts.is_empty()
        && plan.halt.is_none()
        && plan.held_back == 0
        && opts.only.is_empty()
        && opts.mode == Mode::Sync
        && a.target.readable();
    let trust = plan.trust.as_ref().filter(|_| quiet)?;
    Some(Settled {
        version: 0,
        fingerprint: trust.fingerprint.clone(),
        allow_empty_source: policy.allow_empty_source,
        notes: own_notes,
        summary: plan.summary.clone(),
        build: BUILD.to_owned(),
    })
}

/// Whether the cursors a run that found no change was handed are worth a commit: the committed
/// ones are [`CURSOR_REFRESH_SECS`] old (or of a build that did not say when).
pub(crate) fn cursors_due(state: &AgreementState, read: &Read, now: u64) -> bool {
    state.cursors != read.cursors
        && state
            .cursors_at
            .is_none_or(|at| now.saturating_sub(at) >= CURSOR_REFRESH_SECS)
}
