//! One run of one agreement, written once: the CLI, the demo, the engine's tests and the connector
//! conformance suite all call [`run_agreement`] (or [`apply_saved`] for a saved plan), so every
//! test exercises what users run.
//!
//! A run holds the agreement's lease (renewed while it applies), reads the source (once per
//! starting point, through a [`ReadCache`] shared by the agreements of one invocation), decides
//! whether the state's picture of the target may stand in for a full observation (see
//! [`observation`]), plans, and then, as far as the [`Mode`] allows: journals the creates, applies,
//! flushes, records and commits. What it shows goes to a [`Reporter`].

pub mod changes;
mod error;
pub mod lifecycle;
pub mod observation;
mod read;
mod rollback;
pub mod saved;
mod settled;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::RunError;
pub use read::ReadCache;

use idsync_engine::apply::{self, ApplyOptions, ApplyReport};
use idsync_engine::recheck::{Recheck, recheck};
use idsync_engine::{Mapping, OnApplyError, Policy, Scope, Source, Target, TargetIdentity};
use idsync_model::{AgreementState, AgreementStatus, Halt, Kind, Plan, PlanFile, Stage};
use idsync_state::{Lease, StateError, StateStore};
use std::time::Duration;

/// Exit codes, as the CLI documents them.
pub mod exit {
    /// In sync, or applied.
    pub const OK: u8 = 0;
    /// An error.
    pub const ERROR: u8 = 1;
    /// Changes pending (plan, dry runs).
    pub const PENDING: u8 = 2;
    /// A safety guard halted the run before any write.
    pub const HALTED: u8 = 3;
    /// Another run holds the agreement's lease.
    pub const BUSY: u8 = 4;
}

/// How far a run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plan and show; write nothing (also `--dry-run-security-principals` and `DRY_RUN`).
    Plan,
    /// Apply principals; show membership changes (`--dry-run-members`).
    PrincipalsOnly,
    /// Plan and apply everything.
    Sync,
}

/// Per-run options.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Ignore the change-feed cursors and read the whole scope; observe every target in full.
    pub full_sync: bool,
    /// How far to go.
    pub mode: Mode,
    /// Deletions approved for this run.
    pub approve_deletions: usize,
    /// Allow an empty source.
    pub allow_empty_source: bool,
    /// Concurrent operations per target.
    pub workers: usize,
    /// Lease length.
    pub lease: Duration,
    /// How long the last applied snapshot may stand in for a full observation of a target
    /// (`None`: observe every target in full on every run).
    pub reconcile: Option<Duration>,
    /// The run's time in seconds since the Unix epoch, as the trust it leaves records it (`None`:
    /// the system clock). Tests set it so that two plans of one input are equal.
    pub now: Option<u64>,
    /// Once set (the CLI sets it on Ctrl-C or SIGTERM), no further write starts: those in flight
    /// finish, what was applied is committed, and the lease is released.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Provision on demand: only these principals and their memberships; the change feed's
    /// cursors stay where they were.
    pub only: Vec<idsync_engine::ondemand::Only>,
}

impl RunOptions {
    /// Whether the run was asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Default for RunOptions {
    /// A full sync with the CLI's defaults: 10 workers, an hour's lease, a day's reconcile.
    fn default() -> Self {
        RunOptions {
            full_sync: false,
            mode: Mode::Sync,
            approve_deletions: 0,
            allow_empty_source: false,
            workers: 10,
            lease: Duration::from_secs(3600),
            reconcile: Some(Duration::from_secs(24 * 3600)),
            now: None,
            stop: None,
            only: Vec::new(),
        }
    }
}

/// Everything one agreement's run needs besides the source and the state store.
pub struct Agreement<'a> {
    /// Its name, also the name of its state.
    pub name: &'a str,
    /// Its target.
    pub target: &'a dyn Target,
    /// Which target that is, as data (part of the fingerprint of the state's picture).
    pub identity: TargetIdentity,
    /// Where the target is, for people: plan headers and messages.
    pub describe: String,
    /// How source principals map to it.
    pub mapping: &'a Mapping,
    /// Its policy from the configuration (per-run approvals come from [`RunOptions`]).
    pub policy: &'a Policy,
}

impl Agreement<'_> {
    /// The error of a failed observation of this agreement's target.
    pub fn observe_error(&self, error: idsync_engine::TargetError) -> RunError {
        RunError::Observe {
            agreement: self.name.to_owned(),
            target: self.describe.clone(),
            error,
        }
    }

    /// Observes the target in full.
    pub async fn observe(&self) -> Result<idsync_model::Observed, RunError> {
        self.target
            .observe()
            .await
            .map_err(|e| self.observe_error(e))
    }
}

/// What a run shows a person. The CLI prints; tests collect or ignore.
pub trait Reporter {
    /// A remark (a fallback taken, a file saved).
    fn note(&mut self, note: &str);
    /// A heading over what follows (the demo's steps).
    fn heading(&mut self, heading: &str) {
        self.note(heading);
    }
    /// The plan, before anything is applied.
    fn plan(&mut self, plan: &Plan, target: &str, mode: Mode);
    /// A safety guard halted the plan.
    fn halt(&mut self, halt: &Halt);
    /// What the apply did.
    fn report(&mut self, report: &ApplyReport);
}

/// A [`Reporter`] that shows nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Reporter for Silent {
    fn note(&mut self, _: &str) {}
    fn plan(&mut self, _: &Plan, _: &str, _: Mode) {}
    fn halt(&mut self, _: &Halt) {}
    fn report(&mut self, _: &ApplyReport) {}
}

/// What one agreement's run came to.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code this agreement asks for ([`exit`]).
    pub code: u8,
    /// The plan, with the snapshot and cursors it was computed from (for `--out`).
    pub file: Option<PlanFile>,
    /// What the apply did, when it ran.
    pub report: Option<ApplyReport>,
}

/// Who holds a lease this process takes: pid and host, for the message another run shows.
pub fn holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("idsync pid {} on {host}", std::process::id())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Releases a lease; a failure only means it expires on its own, so it is logged, not fatal.
async fn give_back(store: &dyn StateStore, lease: &Lease) {
    if let Err(e) = store.release(lease).await {
        tracing::warn!(error = %e, "could not release the lease; it expires on its own");
    }
}

/// Runs `f` under the agreement's lease (state import and reset must not race a sync).
pub async fn with_lease<T, E: From<StateError>>(
    store: &dyn StateStore,
    agreement: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let lease = store
        .acquire(agreement, &holder(), Duration::from_secs(300))
        .await?;
    let out = f.await;
    give_back(store, &lease).await;
    out
}

/// The agreement's state, or a new one; an agreement no longer active is an error.
async fn load_state(store: &dyn StateStore, name: &str) -> Result<AgreementState, RunError> {
    let st = store
        .load(name)
        .await?
        .unwrap_or_else(|| AgreementState::new(name));
    match st.status {
        AgreementStatus::Active => Ok(st),
        other => Err(RunError::Inactive {
            agreement: name.to_owned(),
            status: format!("{other:?}").to_lowercase(),
        }),
    }
}

/// Plans one agreement and, as far as `opts.mode` allows, applies it. Only a plan takes no lease.
pub async fn run_agreement(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    source: &dyn Source,
    scope: &Scope,
    cache: &mut ReadCache,
    opts: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    let lease = if opts.mode == Mode::Plan {
        None
    } else {
        Some(store.acquire(a.name, &holder(), opts.lease).await?)
    };
    let result = plan_and_apply(
        a,
        store,
        source,
        scope,
        cache,
        opts,
        lease.as_ref(),
        reporter,
    )
    .await;
    if let Some(l) = lease {
        give_back(store, &l).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn plan_and_apply(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    source: &dyn Source,
    scope: &Scope,
    cache: &mut ReadCache,
    opts: &RunOptions,
    lease: Option<&Lease>,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    let mut state = load_state(store, a.name).await?;
    recover(a, store, &mut state, opts, reporter).await?;
    let halted = state
        .halted
        .as_ref()
        .map(|why| halted_agreement(a.name, why));
    if let Some(halt) = &halted
        && opts.mode != Mode::Plan
    {
        reporter.halt(halt);
        return Ok(Outcome {
            code: exit::HALTED,
            file: None,
            report: None,
        });
    }
    let read = cache
        .read(source, scope, &state, opts.full_sync, reporter)
        .await
        .map_err(RunError::Source)?;
    let caps = a.target.capabilities();
    let policy = Policy {
        approved_deletions: opts.approve_deletions,
        allow_empty_source: opts.allow_empty_source || a.policy.allow_empty_source,
        ..a.policy.clone()
    };
    if let Some(plan) = settled::plan(a, &caps, &read, &state, &policy, opts) {
        let out = settle(a, store, state, &read, plan, opts, lease, reporter).await;
        drop_aside(read);
        return out;
    }
    let mut plan = observation::observe_and_plan(a, &caps, &read, &state, &policy, opts).await?;
    let own_notes = plan.notes.clone();
    plan.notes.splice(0..0, read.notes.iter().cloned());
    if let Some(halt) = halted {
        plan.notes.insert(0, halt.message);
    }
    let now = opts.now.unwrap_or_else(unix_now);
    idsync_engine::quarantine::hold(&mut plan, &state, now, &caps);
    let quiet = settled::record(a, &plan, own_notes, &policy, opts);
    if !opts.only.is_empty() {
        let left = idsync_engine::ondemand::restrict(&mut plan, &opts.only);
        reporter.note(&format!(
            "on demand: {} operation(s) for the principals asked for; {left} other(s) left for the next run (the change feed's cursors do not move)",
            plan.ops.len()
        ));
    }
    let file = show(plan, &read, a, opts, reporter);

    if let Some(h) = &file.plan.halt {
        reporter.halt(h);
        return Ok(Outcome {
            code: exit::HALTED,
            file: Some(file),
            report: None,
        });
    }
    if opts.mode == Mode::Plan {
        let code = if file.plan.is_empty() {
            exit::OK
        } else {
            exit::PENDING
        };
        return Ok(Outcome {
            code,
            file: Some(file),
            report: None,
        });
    }
    if opts.stopped() {
        reporter.note("interrupted before any write: nothing was applied");
        return Ok(Outcome {
            code: exit::ERROR,
            file: Some(file),
            report: None,
        });
    }
    let stages: Vec<Stage> = match opts.mode {
        Mode::PrincipalsOnly => vec![Stage::Principals],
        _ => vec![Stage::Principals, Stage::Members, Stage::Deprovision],
    };
    let lease = lease.map(|l| (l, opts.lease));
    let report = apply_file(&file, a, store, state, &stages, opts, lease, quiet).await?;
    reporter.report(&report);
    let code = if let Some(r) = &report.rollback {
        if r.complete() {
            exit::HALTED
        } else {
            exit::ERROR
        }
    } else if report.quarantine.halted.is_some() {
        exit::HALTED
    } else if !report.is_success() || interrupted(&report, reporter) {
        exit::ERROR
    } else if report.pending > 0 {
        exit::PENDING
    } else {
        exit::OK
    };
    drop_aside(read);
    Ok(Outcome {
        code,
        file: Some(file),
        report: Some(report),
    })
}

/// Shows a fresh plan and files it with the read it was made from (what a saved plan holds).
fn show(
    plan: Plan,
    read: &idsync_engine::Read,
    a: &Agreement<'_>,
    opts: &RunOptions,
    reporter: &mut dyn Reporter,
) -> PlanFile {
    let file = PlanFile {
        plan,
        snapshot: read.snapshot.clone(),
        cursors: read.cursors.clone(),
        checksum: None,
    };
    reporter.plan(&file.plan, &a.describe, opts.mode);
    file
}

/// A run whose source reported no change since a run that found nothing to do
/// ([`settled::plan`]): shows the plan, and commits only when the cursors it was handed are due
/// ([`settled::cursors_due`]), so that runs every few minutes do not each write a new version of
/// the state.
#[allow(clippy::too_many_arguments)]
async fn settle(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    mut state: AgreementState,
    read: &idsync_engine::Read,
    plan: Plan,
    opts: &RunOptions,
    lease: Option<&Lease>,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    let file = show(plan, read, a, opts, reporter);
    if opts.mode == Mode::Plan {
        return Ok(Outcome {
            code: exit::OK,
            file: Some(file),
            report: None,
        });
    }
    let sent_before = a.target.requests();
    let now = opts.now.unwrap_or_else(unix_now);
    if settled::cursors_due(&state, read, now) {
        state.cursors = read.cursors.clone();
        state.cursors_at = Some(now);
        let next = state.version + 1;
        if let Some(s) = &mut state.settled {
            s.version = next;
        }
        if let Some(l) = lease {
            store.renew(l, opts.lease).await?;
        }
        state.version = store.commit(&state).await.map_err(RunError::Commit)?;
    }
    let mut report = ApplyReport {
        owned_after: Kind::ALL.map(|k| state.owned.get(k).len()),
        trusted_after: state.trust.is_some(),
        ..ApplyReport::default()
    };
    if let (Some(before), Some(after)) = (sent_before, a.target.requests()) {
        report.requests = Some(after - before);
    }
    reporter.report(&report);
    drop_aside(state);
    Ok(Outcome {
        code: exit::OK,
        file: Some(file),
        report: Some(report),
    })
}

/// Applies a plan (fresh or saved) whose precondition the caller checked: journal, apply (renewing
/// the lease meanwhile), flush, record, commit. A lost lease stops the apply and saves nothing: the
/// run that took over owns the agreement now, and the journal already committed covers what this
/// run may have created.
#[allow(clippy::too_many_arguments)]
async fn apply_file(
    file: &PlanFile,
    a: &Agreement<'_>,
    store: &dyn StateStore,
    mut state: AgreementState,
    stages: &[Stage],
    run: &RunOptions,
    lease: Option<(&Lease, Duration)>,
    quiet: Option<idsync_model::state::Settled>,
) -> Result<ApplyReport, RunError> {
    // Whatever this apply does, what the last quiet run recorded no longer holds.
    state.settled = None;
    let caps = a.target.capabilities();
    let sent_before = a.target.requests();
    let all = [Stage::Principals, Stage::Members, Stage::Deprovision]
        .iter()
        .all(|s| stages.contains(s));
    let writes = file.plan.ops.iter().any(|o| stages.contains(&o.stage()));
    if !a.target.readable() && !a.target.seeded() {
        // A saved plan: the target's picture is made again from the same state (the plan's
        // precondition). A plan made against the trusted picture needs the target still where
        // idsync left it; one made against what idsync owns does not.
        let (_, since) = observation::sight(a, &caps, &state, a.policy, run).await?;
        if since.is_none()
            && matches!(
                file.plan.observation,
                idsync_model::Observation::Incremental { .. }
            )
        {
            return Err(RunError::StaleTarget {
                agreement: a.name.to_owned(),
                target: a.describe.clone(),
            });
        }
    }
    // A target that cannot be read applies everything at its flush, all or nothing (Kanidm's
    // sync request is one transaction): there is nothing to undo one operation at a time.
    let undoable = a.policy.on_apply_error == OnApplyError::Rollback && a.target.readable();
    if writes {
        apply::begin(&file.plan, &caps, &mut state);
        if undoable {
            rollback::journal_undo(&file.plan, stages, &caps, &mut state);
        }
        state.version = store.commit(&state).await.map_err(RunError::Journal)?;
    }
    // If the target cannot make the writes durable (flush fails), none of them counts: the state
    // goes back to what it was before the apply, with every create in the journal.
    let at_begin = state.clone();
    let opts = ApplyOptions {
        workers: run.workers,
        stages: stages.iter().copied().collect(),
        stop: run.stop.clone(),
        rollback: undoable,
    };
    let _step = idsync_engine::progress::begin(
        idsync_engine::progress::Phase::Apply,
        &format!("applying to {}", a.describe),
        Some(
            file.plan
                .ops
                .iter()
                .filter(|o| stages.contains(&o.stage()))
                .count() as u64,
        ),
    );
    let mut report = {
        let work = apply::apply(&file.plan, a.target, &mut state, &opts);
        match lease {
            None => work.await,
            Some((l, ttl)) => {
                tokio::select! {
                    r = work => r,
                    lost = keep_alive(store, l, ttl) => return Err(lost.into()),
                }
            }
        }
    };
    let flushed = a.target.flush().await;
    let failed = undoable
        .then(|| rollback::needed(&file.plan, &report, stages))
        .flatten();
    if let (Ok(()), Some(reason)) = (&flushed, failed) {
        // Halt and roll back: what ran is undone in reverse order, and the state keeps only
        // what could not be undone yet (in the journal, for the next run).
        if let Some((l, ttl)) = lease {
            store.renew(l, ttl).await?;
        }
        rollback::after_failure(&file.plan, &report, &caps, &mut state);
        match rollback::finish(a, store, &mut state, Some(&at_begin), run.workers, reason).await {
            Ok(r) => report.rollback = Some(r),
            Err(e) => {
                // The journal must survive: the next run finishes the rollback from it.
                if let Err(c) = store.commit(&state).await {
                    tracing::warn!(error = %c, "could not save the rollback journal");
                }
                return Err(e);
            }
        }
    } else if flushed.is_ok() {
        if let Some(c) = a.target.cursor() {
            state.target_cursor = Some(c);
        }
        // An apply that left operations pending (interrupted) is not complete: the cursors and the
        // picture stay where they were, and the next run plans what is left.
        apply::finish(
            file,
            &report,
            &caps,
            &mut state,
            all && report.pending == 0 && file.plan.held_back == 0 && run.only.is_empty(),
        );
        if state.cursors != at_begin.cursors {
            state.cursors_at = Some(run.now.unwrap_or_else(unix_now));
        }
    } else {
        state = at_begin;
    }
    if flushed.is_ok() {
        let now = run.now.unwrap_or_else(unix_now);
        report.quarantine = idsync_engine::quarantine::record(
            &file.plan, &report, &mut state, a.policy, now, &caps,
        );
    }
    if let Some((l, ttl)) = lease {
        store.renew(l, ttl).await?;
    }
    // A plan with nothing to do, applied cleanly and in full: the next run whose source reports
    // no change may say the same without planning (valid in the version this commit writes).
    let clean = flushed.is_ok()
        && report.rollback.is_none()
        && report.is_success()
        && report.pending == 0
        && state.trust.is_some()
        && state.journal.is_none()
        && state.failing.is_empty()
        && state.halted.is_none();
    state.settled = quiet.filter(|_| clean).map(|mut s| {
        s.version = state.version + 1;
        s
    });
    store.commit(&state).await.map_err(RunError::Commit)?;
    report.owned_after = Kind::ALL.map(|k| state.owned.get(k).len());
    report.trusted_after = state.trust.is_some();
    if flushed.is_ok() {
        // The change log, after the commit: it never records what the state does not hold.
        let now = run.now.unwrap_or_else(unix_now);
        let run_id = changes::run_id(unix_now());
        let applied = changes::Applied {
            agreement: a.name,
            run: &run_id,
            now,
            plan: &file.plan,
            report: &report,
            state: &state,
        };
        match applied.log_object() {
            Ok(None) => {}
            Ok(Some(object)) => {
                let (day, hms, _) = changes::day_time(now);
                let name = format!("{hms}-{run_id}");
                if let Err(e) = store.append_changes(a.name, &day, &name, object).await {
                    tracing::warn!(error = %e, "{CHANGE_LOG_LOST}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "{CHANGE_LOG_LOST}"),
        }
    }
    drop_aside(state);
    flushed.map_err(|error| RunError::Flush {
        agreement: a.name.to_owned(),
        error,
    })?;
    if let (Some(before), Some(after)) = (sent_before, a.target.requests()) {
        report.requests = Some(after - before);
    }
    Ok(report)
}

/// What a run says when its change log cannot be written: the apply itself is saved.
const CHANGE_LOG_LOST: &str = "the change log of this run could not be written; the apply and its state are saved, only `idsync log` will not show this run's operations";

/// Frees a large value (a run's state, a source read) on a thread of its own. A state at 100k
/// users holds millions of small allocations: freeing them took 0.1–0.2 s of an incremental run
/// of 2 s, after its last commit, which the caller waited for and a one-shot run spends only to
/// exit. A daemon's thread frees it meanwhile. Where no thread can be started, it is freed here.
pub fn drop_aside<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("idsync-free".into())
        .spawn(move || drop(value));
}

/// The halt of an agreement a run halted (too many of its operations failed).
fn halted_agreement(name: &str, why: &str) -> Halt {
    Halt {
        reason: idsync_model::HaltReason::Failures,
        message: format!(
            "agreement {name:?} is halted: {why}. Nothing is written until a person looks: fix the cause, then `idsync agreement resume {name}`"
        ),
    }
}

/// Before a run plans: finishes a rollback an earlier run left in the journal (it crashed in the
/// middle of an apply that was to be rolled back, or could not undo everything). A plan only says
/// so. When the agreement no longer rolls back, an apply interrupted before its rollback began is
/// resumed instead, as any interrupted apply is.
async fn recover(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    state: &mut AgreementState,
    opts: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<(), RunError> {
    let Some(j) = &mut state.journal else {
        return Ok(());
    };
    if j.undo.is_empty() {
        return Ok(());
    }
    if opts.mode == Mode::Plan {
        reporter.note("an earlier apply was interrupted before its rollback finished: the next `idsync sync` finishes the rollback before it writes anything else; this plan pictures the target as it is now");
        return Ok(());
    }
    if !j.rolling_back && a.policy.on_apply_error != OnApplyError::Rollback {
        j.undo.clear();
        return Ok(());
    }
    reporter.note(&format!(
        "an earlier apply on {} was interrupted: rolling it back first",
        a.describe
    ));
    let reason = "an earlier apply was interrupted".to_owned();
    let r = match rollback::finish(a, store, state, None, opts.workers, reason).await {
        Ok(r) => r,
        Err(e) => {
            if let Err(c) = store.commit(state).await {
                tracing::warn!(error = %c, "could not save the rollback journal");
            }
            return Err(e);
        }
    };
    state.version = store.commit(state).await.map_err(RunError::Commit)?;
    if let Some(first) = r.failed.first() {
        return Err(RunError::RollbackIncomplete {
            agreement: a.name.to_owned(),
            left: r.failed.len(),
            first: first.error.clone(),
        });
    }
    reporter.note(&format!(
        "rolled back the interrupted apply: {} operation(s) undone",
        r.undone
    ));
    Ok(())
}

/// Whether the run was stopped with operations left, saying so.
fn interrupted(report: &ApplyReport, reporter: &mut dyn Reporter) -> bool {
    if report.stopped > 0 {
        reporter.note(&format!(
            "interrupted: {} operation(s) were not started; what was applied is saved, and the next run does the rest",
            report.stopped
        ));
        return true;
    }
    false
}

/// Renews the lease every third of its length until it is lost. A lease taken over ends it; a
/// renewal that failed on the way (a 5xx, the network) is tried again at the next tick, while the
/// lease still runs.
async fn keep_alive(store: &dyn StateStore, l: &Lease, ttl: Duration) -> StateError {
    let every = (ttl / 3).max(Duration::from_secs(1));
    let mut until = l.until;
    loop {
        tokio::time::sleep(every).await;
        match store.renew(l, ttl).await {
            Ok(renewed) => until = renewed.until,
            Err(e @ StateError::LeaseLost { .. }) => return e,
            Err(e) => {
                if unix_now() + every.as_secs() >= until {
                    return e;
                }
                tracing::warn!(error = %e, "renewing the lease failed; trying again");
            }
        }
    }
}

/// Applies a saved plan after checking it: its digest (refused if its content was edited or cut
/// off), the state version it was made from (refused if the state moved), and its operations
/// against the policy and state as they are now ([`idsync_engine::recheck`]): a plan that deletes
/// against the deprovision policy or writes to principals idsync does not own is refused; one over
/// a threshold or with conflicts halts, whatever its file says. Its summary is computed again.
pub async fn apply_saved(
    file: &PlanFile,
    a: &Agreement<'_>,
    store: &dyn StateStore,
    opts: &RunOptions,
    reporter: &mut dyn Reporter,
) -> Result<Outcome, RunError> {
    if !saved::intact(file) {
        return Err(RunError::PlanEdited {
            agreement: a.name.to_owned(),
        });
    }
    if file.plan.agreement != a.name {
        return Err(RunError::PlanRefused {
            agreement: a.name.to_owned(),
            reasons: vec![format!(
                "it was made for agreement {:?}",
                file.plan.agreement
            )],
        });
    }
    let lease = store.acquire(a.name, &holder(), opts.lease).await?;
    let result = async {
        let state = load_state(store, a.name).await?;
        if let Some(why) = &state.halted {
            reporter.halt(&halted_agreement(a.name, why));
            return Ok(Outcome { code: exit::HALTED, file: None, report: None });
        }
        if state
            .journal
            .as_ref()
            .is_some_and(|j| !j.undo.is_empty() && (j.rolling_back || a.policy.on_apply_error == OnApplyError::Rollback))
        {
            return Err(RunError::PlanRefused {
                agreement: a.name.to_owned(),
                reasons: vec!["an interrupted apply is still to be rolled back: run `idsync sync` to finish the rollback first".into()],
            });
        }
        if state.version != file.plan.state_version {
            return Err(RunError::StalePlan {
                agreement: a.name.to_owned(),
                planned: file.plan.state_version,
                now: state.version,
            });
        }
        if let Some(h) = &file.plan.halt {
            reporter.halt(h);
            reporter.note("this plan was saved halted, and a saved plan is applied as it is: make a new one with the approval (for example `idsync plan --approve-deletions N --out plan.json`) and apply that");
            return Ok(Outcome { code: exit::HALTED, file: None, report: None });
        }
        let caps = a.target.capabilities();
        let policy = Policy {
            approved_deletions: file.plan.approved_deletions,
            ..a.policy.clone()
        };
        let summary = match recheck(&file.plan, &state, &policy, &caps) {
            Recheck::Ok(summary) => summary,
            Recheck::Halt(h) => {
                reporter.halt(&h);
                return Ok(Outcome { code: exit::HALTED, file: None, report: None });
            }
            Recheck::Refused(reasons) => {
                return Err(RunError::PlanRefused {
                    agreement: a.name.to_owned(),
                    reasons,
                });
            }
        };
        if opts.stopped() {
            reporter.note("interrupted before any write: nothing was applied");
            return Ok(Outcome { code: exit::ERROR, file: None, report: None });
        }
        let shown = Plan { summary, ..file.plan.clone() };
        reporter.plan(&shown, &a.describe, Mode::Sync);
        let stages = [Stage::Principals, Stage::Members, Stage::Deprovision];
        let report = apply_file(file, a, store, state, &stages, opts, Some((&lease, opts.lease)), None).await?;
        reporter.report(&report);
        let code = match &report.rollback {
            Some(r) if r.complete() => exit::HALTED,
            Some(_) => exit::ERROR,
            None if report.quarantine.halted.is_some() => exit::HALTED,
            None if report.is_success() && !interrupted(&report, reporter) => exit::OK,
            None => exit::ERROR,
        };
        Ok(Outcome { code, file: None, report: Some(report) })
    }
    .await;
    give_back(store, &lease).await;
    result
}

/// A source that reads the same snapshot every time, with no change feed: for tests, and for
/// embedding idsync where the directory is already in hand.
#[derive(Clone, Debug, Default)]
pub struct SnapshotSource {
    snapshot: std::sync::Arc<idsync_model::Snapshot>,
}

impl SnapshotSource {
    /// A source that reads `snapshot` (as it is: the scope was applied by whoever made it).
    pub fn new(snapshot: impl Into<std::sync::Arc<idsync_model::Snapshot>>) -> Self {
        SnapshotSource {
            snapshot: snapshot.into(),
        }
    }
}

#[async_trait::async_trait]
impl Source for SnapshotSource {
    async fn read_full(
        &self,
        _: &Scope,
    ) -> Result<idsync_engine::Read, idsync_engine::SourceError> {
        Ok(idsync_engine::Read {
            snapshot: self.snapshot.clone(),
            ..Default::default()
        })
    }

    async fn read_changes(
        &self,
        _: &Scope,
        _: &std::sync::Arc<idsync_model::Snapshot>,
        _: &std::collections::BTreeMap<String, String>,
    ) -> Result<idsync_engine::Changes, idsync_engine::SourceError> {
        Ok(idsync_engine::Changes::Unsupported)
    }
}
