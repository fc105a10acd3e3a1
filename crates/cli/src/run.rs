//! One run of one agreement: lease, state, source read, plan, apply, commit. `idsync plan`, `sync`,
//! `apply` and `demo` all go through here.

use crate::output::Printer;
use anyhow::{Context, Result, anyhow};
use idsync_engine::apply::{self, ApplyOptions, ApplyReport};
use idsync_engine::{Changes, Mapping, Policy, Read, Scope, Source, Target, map_snapshot, observe};
use idsync_model::{AgreementState, AgreementStatus, PlanFile, Stage, Trust};
use idsync_state::{Lease, StateError, StateStore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Exit codes.
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
    /// Ignore the change-feed cursors and read the whole scope.
    pub full_sync: bool,
    /// How far to go.
    pub mode: Mode,
    /// Deletions approved for this run.
    pub approve_deletions: usize,
    /// Allow an empty source.
    pub allow_empty_source: bool,
    /// Concurrency.
    pub workers: usize,
    /// Lease length.
    pub lease: Duration,
    /// How long the last applied snapshot may stand in for a full observation of a target
    /// (`None`: observe every target in full on every run).
    pub reconcile: Option<Duration>,
}

/// A saved set of plans (`idsync plan --out plan.json`), one per agreement.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanBundle {
    /// Format version.
    pub format: u32,
    /// One per agreement.
    pub plans: Vec<PlanFile>,
}

/// What one agreement's run came to.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code this agreement asks for.
    pub code: u8,
    /// The plan, for `--out`.
    pub file: Option<PlanFile>,
}

/// Reads the source once per distinct starting point: agreements at the same cursor share a read.
#[derive(Default)]
pub struct ReadCache {
    reads: BTreeMap<String, Read>,
}

impl ReadCache {
    /// A full or incremental read for this state.
    pub async fn read(
        &mut self,
        source: &dyn Source,
        scope: &Scope,
        state: &AgreementState,
        full: bool,
        printer: &mut Printer,
    ) -> Result<Read> {
        let incremental = !full && !state.cursors.is_empty() && state.last_applied.is_some();
        let key = if incremental {
            serde_json::to_string(&state.cursors).unwrap_or_default()
        } else {
            "full".to_owned()
        };
        if let Some(r) = self.reads.get(&key) {
            return Ok(r.clone());
        }
        let read = match (incremental, &state.last_applied) {
            (true, Some(base)) => match source.read_changes(scope, base, &state.cursors).await? {
                Changes::Read(r) => r,
                Changes::Unsupported => source.read_full(scope).await?,
                Changes::Expired(why) => {
                    printer.note(&format!("{why}; reading the whole scope instead"));
                    source.read_full(scope).await?
                }
            },
            _ => source.read_full(scope).await?,
        };
        self.reads.insert(key, read.clone());
        Ok(read)
    }
}

async fn load_state(store: &dyn StateStore, name: &str) -> Result<AgreementState> {
    let st = store
        .load(name)
        .await?
        .unwrap_or_else(|| AgreementState::new(name));
    match st.status {
        AgreementStatus::Active => Ok(st),
        other => Err(anyhow!(
            "agreement {name:?} is {other:?}: idsync no longer syncs it; `idsync state reset {name}` starts a new agreement"
        )),
    }
}

/// Runs `f` under the agreement's lease (state import and reset must not race a sync).
pub async fn with_lease<T>(
    store: &dyn StateStore,
    agreement: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let lease = store
        .acquire(agreement, &holder(), Duration::from_secs(300))
        .await?;
    let out = f.await;
    give_back(store, &lease).await;
    out
}

fn holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("idsync pid {} on {host}", std::process::id())
}

/// Maps a state error to an exit code when it has its own.
pub fn code_of(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<StateError>() {
        Some(StateError::LeaseHeld { .. } | StateError::LeaseLost { .. }) => exit::BUSY,
        _ => exit::ERROR,
    }
}

/// Everything one agreement's run needs.
pub struct Agreement<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its target.
    pub target: &'a dyn Target,
    /// How to map.
    pub mapping: &'a Mapping,
    /// Its policy from the config.
    pub policy: &'a Policy,
    /// Where the target is, for messages.
    pub describe: String,
}

/// Plans one agreement and, per `opts.mode`, applies it.
pub async fn run_agreement(
    a: &Agreement<'_>,
    store: &dyn StateStore,
    source: &dyn Source,
    scope: &Scope,
    cache: &mut ReadCache,
    opts: &RunOptions,
    printer: &mut Printer,
) -> Result<Outcome> {
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
        printer,
    )
    .await;
    if let Some(l) = lease {
        give_back(store, &l).await;
    }
    result
}

/// Releases a lease; a failure only means it expires on its own, so it is logged, not fatal.
async fn give_back(store: &dyn StateStore, lease: &Lease) {
    if let Err(e) = store.release(lease).await {
        tracing::warn!(error = %e, "could not release the lease; it expires on its own");
    }
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
    printer: &mut Printer,
) -> Result<Outcome> {
    let state = load_state(store, a.name).await?;
    let read = cache
        .read(source, scope, &state, opts.full_sync, printer)
        .await
        .context("reading the source")?;
    let caps = a.target.capabilities();
    let desired = map_snapshot(&read.snapshot, a.mapping, &caps);
    let policy = Policy {
        approved_deletions: opts.approve_deletions,
        allow_empty_source: opts.allow_empty_source || a.policy.allow_empty_source,
        ..a.policy.clone()
    };
    let mut plan = observe_and_plan(a, &caps, &desired, &state, &policy, read.mode, opts).await?;
    plan.notes.splice(0..0, read.notes.iter().cloned());
    let file = PlanFile {
        plan,
        snapshot: read.snapshot.clone(),
        cursors: read.cursors.clone(),
    };
    printer.plan(&file.plan, &a.describe, opts.mode);

    if let Some(h) = &file.plan.halt {
        printer.halt(h);
        return Ok(Outcome {
            code: exit::HALTED,
            file: Some(file),
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
        });
    }
    let stages: Vec<Stage> = match opts.mode {
        Mode::PrincipalsOnly => vec![Stage::Principals],
        _ => vec![Stage::Principals, Stage::Members, Stage::Deprovision],
    };
    let lease = lease.map(|l| (l, opts.lease));
    let report = apply_file(&file, a, store, state, &stages, opts.workers, lease).await?;
    printer.report(&report);
    let code = if !report.is_success() {
        exit::ERROR
    } else if report.pending > 0 {
        exit::PENDING
    } else {
        exit::OK
    };
    Ok(Outcome {
        code,
        file: Some(file),
    })
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Observes the target (incrementally when the state's picture may be trusted, else in full) and
/// plans. The plan records how the target was observed and the trust a clean apply leaves.
async fn observe_and_plan(
    a: &Agreement<'_>,
    caps: &idsync_model::Capabilities,
    desired: &idsync_model::Desired,
    state: &AgreementState,
    policy: &Policy,
    mode: idsync_model::ReadMode,
    opts: &RunOptions,
) -> Result<idsync_model::Plan> {
    let fingerprint = observe::fingerprint(&a.describe, a.mapping, caps, policy);
    let now = unix_now();
    let fresh = |t: &Trust| {
        opts.reconcile
            .is_some_and(|r| now < t.observed_at.saturating_add(r.as_secs()))
    };
    let trusted = match (&state.trust, &state.last_applied) {
        (Some(t), Some(prev))
            if !opts.full_sync
                && state.journal.is_none()
                && t.fingerprint == fingerprint
                && fresh(t) =>
        {
            Some((t.observed_at, prev))
        }
        _ => None,
    };
    let mut incremental = None;
    if let Some((since, prev)) = trusted {
        let prev = map_snapshot(prev, a.mapping, caps);
        // Beyond this many live reads, one bulk observation is cheaper.
        let limit = 1000.max(state.owned_count() / 10);
        incremental = observe::plan_incrementally(
            a.target, desired, &prev, state, policy, caps, mode, since, limit,
        )
        .await
        .map_err(|e| anyhow!("reading target {} ({}): {e}", a.name, a.describe))?
        .map(|plan| (plan, since));
    }
    let (mut plan, observed_at) = match incremental {
        Some(done) => done,
        None => {
            let observed = a
                .target
                .observe()
                .await
                .map_err(|e| anyhow!("observing target {} ({}): {e}", a.name, a.describe))?;
            let plan = idsync_engine::plan(desired, &observed, state, policy, caps, mode);
            (plan, now)
        }
    };
    plan.trust = observe::leaves_a_faithful_picture(&plan, desired).then_some(Trust {
        observed_at,
        fingerprint,
    });
    Ok(plan)
}

/// Applies a plan (fresh or saved) whose precondition the caller checked: journal, apply (renewing
/// the lease meanwhile), flush, record, commit. A lost lease stops the apply and saves nothing: the
/// run that took over owns the agreement now, and the journal already committed covers what this
/// run may have created.
pub async fn apply_file(
    file: &PlanFile,
    a: &Agreement<'_>,
    store: &dyn StateStore,
    mut state: AgreementState,
    stages: &[Stage],
    workers: usize,
    lease: Option<(&Lease, Duration)>,
) -> Result<ApplyReport> {
    let caps = a.target.capabilities();
    let all = [Stage::Principals, Stage::Members, Stage::Deprovision]
        .iter()
        .all(|s| stages.contains(s));
    let writes = file.plan.ops.iter().any(|o| stages.contains(&o.stage()));
    if writes {
        apply::begin(&file.plan, &caps, &mut state);
        state.version = store
            .commit(&state)
            .await
            .context("recording the apply journal")?;
    }
    // If the target cannot make the writes durable (flush fails), none of them counts: the state
    // goes back to what it was before the apply, with every create in the journal.
    let at_begin = state.clone();
    let opts = ApplyOptions {
        workers,
        stages: stages.iter().copied().collect(),
    };
    let report = {
        let work = apply::apply(&file.plan, a.target, &mut state, &opts);
        match lease {
            None => work.await,
            Some((l, ttl)) => {
                let every = (ttl / 3).max(Duration::from_secs(1));
                // A lease taken over stops the apply; a renewal that failed on the way (a 5xx, the
                // network) is tried again at the next tick, while the lease still runs.
                let keep_alive = async {
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
                };
                tokio::select! {
                    r = work => r,
                    lost = keep_alive => return Err(lost.into()),
                }
            }
        }
    };
    let flushed = a.target.flush().await;
    if flushed.is_ok() {
        apply::finish(file, &report, &caps, &mut state, all);
    } else {
        state = at_begin;
    }
    if let Some((l, ttl)) = lease {
        store.renew(l, ttl).await?;
    }
    store
        .commit(&state)
        .await
        .context("saving the state after the apply")?;
    flushed.map_err(|e| anyhow!("finishing the writes to target {}: {e}", a.name))?;
    Ok(report)
}

/// Applies a saved plan after checking it is still current.
pub async fn apply_saved(
    file: &PlanFile,
    a: &Agreement<'_>,
    store: &dyn StateStore,
    opts: &RunOptions,
    printer: &mut Printer,
) -> Result<u8> {
    let lease = store.acquire(a.name, &holder(), opts.lease).await?;
    let result = async {
        let state = load_state(store, a.name).await?;
        if state.version != file.plan.state_version {
            return Err(anyhow!(
                "the saved plan for {:?} was computed from state version {}, but the state is now at version {}: something ran since. Nothing was applied; run `idsync plan` again",
                a.name,
                file.plan.state_version,
                state.version
            ));
        }
        if let Some(h) = &file.plan.halt {
            printer.halt(h);
            printer.note("this plan was saved halted, and a saved plan is applied as it is: make a new one with the approval (for example `idsync plan --approve-deletions N --out plan.json`) and apply that");
            return Ok(exit::HALTED);
        }
        printer.plan(&file.plan, &a.describe, Mode::Sync);
        let stages = [Stage::Principals, Stage::Members, Stage::Deprovision];
        let report = apply_file(file, a, store, state, &stages, opts.workers, Some((&lease, opts.lease))).await?;
        printer.report(&report);
        Ok(if report.is_success() { exit::OK } else { exit::ERROR })
    }
    .await;
    give_back(store, &lease).await;
    result
}
