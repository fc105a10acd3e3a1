//! The observation policy: when the state's picture of a target (the last applied snapshot, mapped,
//! under the ids the state links) may stand in for a full observation, and the plan made either way.
//!
//! The picture is trusted only when the state holds a [`Trust`] left by a clean, complete apply
//! ([`idsync_engine::apply::finish`] sets it, [`idsync_engine::apply::begin`] clears it), under the
//! same fingerprint (target, mapping, capabilities, policy), no journal is open, `--full-sync` was
//! not asked, and the last full observation is younger than the reconcile interval.

use crate::{Agreement, RunError, RunOptions, unix_now};
use idsync_engine::{Policy, map_snapshot, observe};
use idsync_model::{AgreementState, Capabilities, Desired, Plan, Snapshot, Trust};

/// When the picture may be trusted: since when (the last full observation) and the last applied
/// snapshot it is made from; `None` when the target must be observed in full.
pub fn trusted<'s>(
    state: &'s AgreementState,
    fingerprint: &str,
    opts: &RunOptions,
    now: u64,
) -> Option<(u64, &'s Snapshot)> {
    let fresh = |t: &Trust| {
        opts.reconcile
            .is_some_and(|r| now < t.observed_at.saturating_add(r.as_secs()))
    };
    match (&state.trust, &state.last_applied) {
        (Some(t), Some(prev))
            if !opts.full_sync
                && state.journal.is_none()
                && t.fingerprint == fingerprint
                && fresh(t) =>
        {
            Some((t.observed_at, prev))
        }
        _ => None,
    }
}

/// Beyond this many live reads, one bulk observation is cheaper.
pub fn read_limit(state: &AgreementState) -> usize {
    1000.max(state.owned_count() / 10)
}

/// Observes the target (incrementally when the state's picture may be trusted, else in full) and
/// plans what the read's snapshot maps to: on what changed alone when the trust carries the
/// totals of the whole tenant ([`idsync_engine::delta`]), else on the whole tenant. The plan
/// records the trust a clean apply of it leaves.
pub(crate) async fn observe_and_plan(
    a: &Agreement<'_>,
    caps: &Capabilities,
    read: &idsync_engine::Read,
    state: &AgreementState,
    policy: &Policy,
    opts: &RunOptions,
) -> Result<Plan, RunError> {
    let mode = read.mode;
    let fingerprint = observe::fingerprint(&a.identity, a.mapping, caps, policy);
    let now = opts.now.unwrap_or_else(unix_now);
    let failed = |error| a.observe_error(error);
    // The step covers the planning too (at 100k users it takes seconds of its own).
    let _step = idsync_engine::progress::begin(
        idsync_engine::progress::Phase::Observe,
        &format!("observing {}", a.describe),
        None,
    );
    if a.target.readable()
        && let Some((since, prev)) = trusted(state, &fingerprint, opts, now)
        && let Some(totals) = state.trust.as_ref().and_then(|t| t.totals)
        && let Some((mut plan, totals)) = idsync_engine::delta::plan_on_delta(
            a.target,
            prev,
            &read.snapshot,
            a.mapping,
            state,
            policy,
            caps,
            mode,
            since,
            read_limit(state),
            &totals,
        )
        .await
        .map_err(failed)?
    {
        // Faithful as `leaves_a_faithful_picture` has it: a plan on the change holds nothing
        // back and comes from a complete read, or it would not have been made.
        let faithful = plan.conflicts.is_empty() && plan.halt.is_none();
        plan.trust = faithful.then_some(Trust {
            observed_at: since,
            fingerprint,
            totals: Some(totals),
        });
        return Ok(plan);
    }
    // Planned whole, the desired state's member sets are freed as the plan is made: what follows
    // the plan reads the desired state's principals and counts, not its members.
    let mut desired = map_snapshot(&read.snapshot, a.mapping, caps);
    if !a.target.readable() {
        let (pictured, since) = sight(a, caps, state, policy, opts).await?;
        let mut plan =
            idsync_engine::plan_taking_members(&mut desired, &pictured, state, policy, caps, mode);
        if let Some(since) = since {
            plan.observation = idsync_model::Observation::Incremental {
                read: 0,
                since,
                touched: None,
            };
        }
        plan.trust = observe::leaves_a_faithful_picture(&plan, &desired).then_some(Trust {
            observed_at: since.unwrap_or(now),
            fingerprint,
            totals: None,
        });
        return Ok(plan);
    }
    let mut incremental = None;
    if let Some((since, prev)) = trusted(state, &fingerprint, opts, now) {
        // A change feed that reported nothing hands back the last applied snapshot itself: what
        // it maps to is `desired` already (the mapping is a function of the snapshot, the
        // mapping and the capabilities, all the same), so the tenant is not mapped twice.
        let mapped;
        let prev = if std::ptr::eq(prev, &*read.snapshot) {
            &desired
        } else {
            mapped = map_snapshot(prev, a.mapping, caps);
            &mapped
        };
        incremental = observe::plan_incrementally(
            a.target,
            &desired,
            prev,
            state,
            policy,
            caps,
            mode,
            since,
            read_limit(state),
        )
        .await
        .map_err(failed)?
        .map(|plan| (plan, since));
    }
    let (mut plan, observed_at) = match incremental {
        Some(done) => done,
        None => {
            let observed = a.target.observe().await.map_err(failed)?;
            let plan = idsync_engine::plan_taking_members(
                &mut desired,
                &observed,
                state,
                policy,
                caps,
                mode,
            );
            (plan, now)
        }
    };
    plan.trust = observe::leaves_a_faithful_picture(&plan, &desired).then_some(Trust {
        observed_at,
        fingerprint,
        totals: Some(idsync_engine::delta::totals(&desired, &plan)),
    });
    Ok(plan)
}

/// For a target that cannot be read (Kanidm): asks it where it stands against the cursor the state
/// recorded, and seeds it with what to plan against. That is the state's picture when it holds (a
/// clean, complete apply under the same fingerprint, no journal open, no `--full-sync`, and the
/// target still at the recorded cursor; such a target's synced attributes cannot drift, so the
/// reconcile interval does not apply), with since when it is trusted; otherwise only what idsync
/// owns there, by key, so that every principal idsync wants is written in full.
pub(crate) async fn sight(
    a: &Agreement<'_>,
    caps: &Capabilities,
    state: &AgreementState,
    policy: &Policy,
    opts: &RunOptions,
) -> Result<(idsync_model::Observed, Option<u64>), RunError> {
    let fingerprint = observe::fingerprint(&a.identity, a.mapping, caps, policy);
    let at = a
        .target
        .resume(state.target_cursor.as_deref())
        .await
        .map_err(|e| a.observe_error(e))?;
    let trusted = match (&state.trust, &state.last_applied) {
        (Some(t), Some(prev))
            if at == idsync_engine::Sight::Same
                && !opts.full_sync
                && state.journal.is_none()
                && t.fingerprint == fingerprint =>
        {
            Some((t.observed_at, prev))
        }
        _ => None,
    };
    let (pictured, since) = match trusted {
        Some((since, prev)) => {
            let prev = map_snapshot(prev, a.mapping, caps);
            (observe::picture(&prev, state, caps, policy), Some(since))
        }
        None => (
            observe::picture(&Desired::default(), state, caps, policy),
            None,
        ),
    };
    a.target.seed(
        &pictured,
        &idsync_engine::Seeding {
            yielded: policy.yield_attributes.clone(),
            whole: since.is_none(),
            prune: policy.deprovision == idsync_engine::Deprovision::Delete,
        },
    );
    Ok((pictured, since))
}
