//! Applying a plan: in batches of the plan's phases (adoptions, renames in waves, updates; then
//! creates, policies and member changes together, each as soon as what it names exists
//! (`schedule.rs`); then deactivations and deletions), with bounded concurrency, recording in
//! the agreement state what each successful operation changed. Partial failure is
//! data: the report lists what succeeded, what failed and why, and what was skipped because
//! something it depended on failed.

use crate::schedule::{Task, Unit};
pub use crate::target::{Outcome, Target, TargetError, TargetErrorKind};
use futures::StreamExt;
use idsync_model::{
    AgreementState, Attr, AttrValue, Capabilities, Journal, Kind, Op, Owned, Ownership, PKey, PRef,
    PerKind, Plan, PlanFile, Principal, Stage,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How to apply.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Operations in flight at once.
    pub workers: usize,
    /// The stages to execute; the others are left pending (the dry-run levels).
    pub stages: BTreeSet<Stage>,
    /// Once set (Ctrl-C, SIGTERM), no further operation starts: those in flight finish and are
    /// recorded, the rest are left pending.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The apply may be rolled back (`on_apply_error = "rollback"`): after the first failure no
    /// further write starts, and the report lists which operations ran ([`ApplyReport::ran`]).
    pub rollback: bool,
}

impl ApplyOptions {
    /// Whether the apply was asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            workers: 10,
            stages: [Stage::Principals, Stage::Members, Stage::Deprovision].into(),
            stop: None,
            rollback: false,
        }
    }
}

/// One operation that did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The operation.
    pub op: Op,
    /// Why.
    pub error: String,
    /// The target's error category (none for operations skipped for a failed dependency).
    pub kind: Option<TargetErrorKind>,
}

impl Failure {
    /// Whether the operation may have happened although it failed (a timeout, a reset connection,
    /// an unreadable answer). Only such creates stay in the journal.
    pub fn outcome_unknown(&self) -> bool {
        self.kind.is_some_and(Failure::unknown)
    }

    /// Whether an error of this kind leaves the operation's outcome unknown.
    pub fn unknown(kind: TargetErrorKind) -> bool {
        matches!(
            kind,
            TargetErrorKind::Unavailable | TargetErrorKind::Throttled | TargetErrorKind::Protocol
        )
    }
}

/// What an apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Operations that succeeded (including state-only ones).
    pub applied: usize,
    /// Operations that wrote to the target (an operation may take several requests, or none).
    pub writes: usize,
    /// HTTP requests sent to the target during the apply (every attempt, retries included), for
    /// targets that count them.
    pub requests: Option<crate::Requests>,
    /// Operations that failed.
    pub failed: Vec<Failure>,
    /// Operations not attempted because an operation they depend on failed.
    pub skipped: Vec<Failure>,
    /// Operations left for a later run (stages not executed, or not started after a stop).
    pub pending: usize,
    /// Of those, the writes not started because the apply was asked to stop.
    pub stopped: usize,
    /// Of those, the writes not started because an earlier one failed and the apply is to be
    /// rolled back.
    pub halted: usize,
    /// The plan's operations (by position) that succeeded or may have (their outcome is
    /// unknown), in the order they ran: what a rollback undoes, and what frees a principal from
    /// quarantine.
    #[serde(skip)]
    pub ran: Vec<usize>,
    /// Principals quarantined or freed by this run, and whether it halted the agreement.
    #[serde(skip_serializing_if = "crate::quarantine::Recorded::is_empty")]
    pub quarantine: crate::quarantine::Recorded,
    /// The rollback that followed, if the apply was rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback: Option<crate::rollback::RollbackReport>,
    /// Principals idsync owns once the apply is committed: users, service principals, groups
    /// (set by the runner, for metrics).
    #[serde(skip)]
    pub owned_after: [usize; 3],
    /// Whether the committed state trusts its picture of the target (set by the runner).
    #[serde(skip)]
    pub trusted_after: bool,
}

impl ApplyReport {
    /// True when everything attempted succeeded and nothing was skipped.
    pub fn is_success(&self) -> bool {
        self.failed.is_empty() && self.skipped.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} operations applied ({} of them wrote), {} failed, {} skipped, {} pending",
            self.applied,
            self.writes,
            self.failed.len(),
            self.skipped.len(),
            self.pending
        )?;
        if let Some(r) = &self.requests {
            write!(
                f,
                "; {} requests sent ({} writes, {} reads)",
                r.reads + r.writes,
                r.writes,
                r.reads
            )?;
        }
        if let Some(r) = &self.rollback {
            write!(
                f,
                "; rolled back: {} undone, {} could not be undone",
                r.undone,
                r.failed.len()
            )?;
        }
        Ok(())
    }
}

/// A stable identifier of a plan's content, for the journal.
pub fn plan_id(plan: &Plan) -> String {
    use std::hash::Hasher;
    // FNV-1a over the canonical JSON: stable across runs and platforms, no extra dependency. The
    // JSON is hashed as it is written, never held: a first sync's plan at 100k users is 80 MB of it.
    struct Hashing(idsync_model::fnv::Fnv);
    impl std::io::Write for Hashing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hashing(Default::default());
    if serde_json::to_writer(&mut h, plan).is_err() {
        // A plan always serialises; were it not to, the hash of no bytes, as before.
        h = Hashing(Default::default());
    }
    format!("{:016x}", h.0.finish())
}

/// Records, before the first write, which creates the apply is about to make, so a crash between
/// a create and the state commit cannot turn idsync's own principal into a conflict.
pub fn begin(plan: &Plan, caps: &Capabilities, state: &mut AgreementState) {
    let mut pending: BTreeSet<PKey> = state
        .journal
        .take()
        .map(|j| j.pending_creates)
        .unwrap_or_default();
    for op in &plan.ops {
        if let Op::Create { principal, .. } = op {
            pending.insert(caps.pkey(principal));
        }
    }
    state.journal = Some(Journal {
        plan_id: plan_id(plan),
        pending_creates: pending,
        ..Journal::default()
    });
    // Until the apply ends cleanly, the last applied snapshot no longer pictures the target.
    state.trust = None;
}

/// Records the end of an apply. When every stage ran and nothing failed, the snapshot becomes the
/// last applied one and the source cursors advance; otherwise they stay, so the next run reads the
/// same changes again. Creates whose outcome is unknown stay in the journal: they may have happened.
pub fn finish(
    file: &PlanFile,
    report: &ApplyReport,
    caps: &Capabilities,
    state: &mut AgreementState,
    all_stages: bool,
) {
    // A create the target refused (it exists, it is invalid, not allowed) did not happen: it must
    // not be remembered as idsync's, or idsync would later adopt whatever holds that key.
    let mut keep: BTreeSet<PKey> = BTreeSet::new();
    for f in report.failed.iter().filter(|f| f.outcome_unknown()) {
        if let Op::Create { principal, .. } = &f.op {
            keep.insert(caps.pkey(principal));
        }
    }
    state.journal = if keep.is_empty() {
        None
    } else {
        Some(Journal {
            plan_id: plan_id(&file.plan),
            pending_creates: keep,
            ..Journal::default()
        })
    };
    if all_stages && report.is_success() {
        state.last_applied = Some(file.snapshot.clone());
        state.cursors = file.cursors.clone();
        state.trust = file.plan.trust.clone();
    } else {
        state.trust = None;
    }
}

/// Applies the plan's operations of the chosen stages to the target, updating `state` with every
/// success. Never stops at the first error: independent operations still run.
pub async fn apply(
    plan: &Plan,
    target: &dyn Target,
    state: &mut AgreementState,
    opts: &ApplyOptions,
) -> ApplyReport {
    let mut report = ApplyReport::default();
    let caps = target.capabilities();
    // Sized once for the creates planned: grown by doubling alongside the writes' buffers, the
    // map left its old tables as holes the process kept.
    let mut created = Created::default();
    let mut creates = PerKind::<usize>::default();
    for op in &plan.ops {
        if let Op::Create { principal, .. } = op {
            *creates.get_mut(principal.kind) += 1;
        }
    }
    for kind in Kind::ALL {
        created.get_mut(kind).reserve(*creates.get(kind));
    }
    let mut links = Links::default();
    let workers = opts.workers.max(1);

    let mut phases: BTreeMap<u8, Vec<Unit<'_>>> = BTreeMap::new();
    for (i, op) in plan.ops.iter().enumerate() {
        if opts.stages.contains(&op.stage()) {
            phases.entry(op.phase()).or_default().push(Unit {
                first: (i, op),
                then: None,
            });
        } else {
            report.pending += 1;
        }
    }
    if target.combines_member_changes() {
        pair_member_changes(&mut phases);
    }
    // Set by the first failure of an apply that is to be rolled back: no further write starts.
    let halted = std::sync::atomic::AtomicBool::new(false);
    let ctx = Ctx {
        target,
        opts,
        halted: &halted,
        caps: &caps,
    };

    // Key changes run in waves: one that takes a key another frees waits for it (the plan orders
    // them so); the others run together. Creates, policies and member changes run as one batch,
    // each as soon as what it names exists (`schedule`).
    let mut batches: Vec<Vec<Unit<'_>>> = Vec::new();
    let mut together = Vec::new();
    for (phase, units) in phases {
        if (idsync_model::plan::CREATE_PHASE..=idsync_model::plan::ADD_MEMBERS_PHASE)
            .contains(&phase)
        {
            together.extend(units);
            continue;
        }
        if phase > idsync_model::plan::ADD_MEMBERS_PHASE && !together.is_empty() {
            batches.push(std::mem::take(&mut together));
        }
        if phase == idsync_model::plan::RENAME_PHASE {
            batches.extend(waves(units, &caps));
        } else {
            batches.push(units);
        }
    }
    if !together.is_empty() {
        batches.push(together);
    }
    let split = target
        .parallel_member_writes()
        .then_some(caps.max_members_per_write.max(1));

    let last = batches.len().saturating_sub(1);
    for (b, units) in batches.into_iter().enumerate() {
        let width = workers;
        // After a stop no write starts; state-only operations (adopting what an interrupted
        // apply created, forgetting what is gone) still run, so the journal is never lost.
        if (opts.stopped() || ctx.halt()) && units.iter().all(|u| u.first.1.writes()) {
            let n: usize = units.iter().map(Unit::len).sum();
            report.pending += n;
            if opts.stopped() {
                report.stopped += n;
            } else {
                report.halted += n;
            }
            continue;
        }
        // Each operation is resolved just before it starts, with the ids of the creates that
        // finished by then (its own dependencies among them), and a member or policy operation
        // that succeeded is not kept: at 1M memberships a resolved copy of every one is 100+ MB.
        let mut schedule = crate::schedule::Schedule::new(units, split);
        let ctx = &ctx;
        let mut running = futures::stream::FuturesUnordered::new();
        // A result per task (two for a removal sent with its group's additions).
        let mut results: Vec<Ran> = Vec::with_capacity(schedule.tasks());
        loop {
            while running.len() < width {
                let Some((t, task)) = schedule.next() else {
                    break;
                };
                let job = ctx.prepare(&task, &created);
                running.push(async move { (t, task, ctx.go(job).await) });
            }
            let Some((t, task, ran)) = running.next().await else {
                // Nothing runs and nothing is ready. Every wait is for a create or a removal,
                // which wait for creates only, so this is the end; were a task left waiting,
                // it runs rather than going unreported.
                if schedule.release_waiting() {
                    tracing::error!("the apply's schedule left operations waiting; running them");
                    continue;
                }
                break;
            };
            for r in &ran {
                // A create that succeeded keeps no copy of itself: the plan holds it.
                let op = r.op.as_deref().or_else(|| plan.ops.get(r.key));
                if let (Some(Op::Create { principal, .. }), Some(Ok((Outcome::Created(id), _)))) =
                    (op, &r.result)
                {
                    created
                        .get_mut(principal.kind)
                        .insert(principal.key.clone(), id.clone());
                }
            }
            let done = schedule.finished(t, &task.unit, task.part.is_some());
            crate::progress::add(crate::progress::Phase::Apply, done);
            for mut r in ran {
                r.seq = results.len();
                results.push(r);
            }
        }
        // The schedule's tasks and dependencies (21 MB at a first sync of 100k users) are not
        // needed to record the results.
        drop(running);
        drop(schedule);
        // Nor are the ids of what was created, once no batch is left to resolve against them
        // (10 MB at a first sync of 100k users).
        if b == last {
            drop(std::mem::take(&mut created));
        }
        // Recorded in plan order, whatever order they finished in; the parts of a split addition
        // as one operation.
        results.sort_unstable_by_key(|r| (r.key, r.seq));
        merge_parts(&mut results);
        for ran in results {
            if ran.stopped {
                report.pending += 1;
                if opts.stopped() {
                    report.stopped += 1;
                } else {
                    report.halted += 1;
                }
                // Parts of a split addition may have run before the stop.
                if ran.may_have_run() {
                    report.ran.push(ran.key);
                }
                report.skipped.extend(ran.skipped);
                if let (Some(Err(e)), Some(op)) = (ran.result, ran.op) {
                    report.failed.push(Failure {
                        op: *op,
                        error: e.message,
                        kind: Some(e.kind),
                    });
                }
                continue;
            }
            // A split addition whose parts partly ran is in both lists: what a rollback undoes,
            // and what failed.
            if ran.may_have_run() {
                report.ran.push(ran.key);
            }
            report.skipped.extend(ran.skipped);
            match (ran.result, ran.op) {
                (None, _) => {}
                (Some(Ok((outcome, wrote))), op) => {
                    report.applied += 1;
                    if wrote {
                        report.writes += 1;
                    }
                    let planned = || {
                        plan.ops
                            .get(ran.key)
                            .filter(|o| matches!(o, Op::Create { .. }))
                    };
                    if let Some(op) = op.as_deref().or_else(planned) {
                        record(op, &outcome, state, &mut links, &caps);
                    }
                }
                (Some(Err(e)), Some(op)) => {
                    tracing::warn!(op = ?op.subject(), error = %e, "operation failed");
                    report.failed.push(Failure {
                        op: *op,
                        error: e.message,
                        kind: Some(e.kind),
                    });
                }
                (Some(Err(_)), None) => {}
            }
        }
    }
    report
}

/// Splits the key changes (in plan order, which runs them safely one at a time) into waves that
/// may each run concurrently: an operation that takes a key goes in the wave after the one that
/// frees it (a rename away from it, or the deletion of its holder), every other in the first.
fn waves<'a>(units: Vec<Unit<'a>>, caps: &Capabilities) -> Vec<Vec<Unit<'a>>> {
    let mut freed: BTreeMap<(Kind, String), usize> = BTreeMap::new();
    let mut out: Vec<Vec<Unit<'a>>> = Vec::new();
    for unit in units {
        let op = unit.first.1;
        let (frees, takes) = match op {
            Op::Update {
                target, changes, ..
            } => (
                Some(&target.key),
                changes.iter().find_map(|c| match (c.attr, &c.to) {
                    (Attr::Key, AttrValue::Text(Some(k))) => Some(k),
                    _ => None,
                }),
            ),
            Op::Delete { target, .. } => (Some(&target.key), None),
            _ => (None, None),
        };
        let kind = op.subject().0;
        let wave = takes
            .and_then(|k| freed.get(&(kind, caps.fold(k))))
            .map_or(0, |w| w + 1);
        if let Some(k) = frees {
            let k = (kind, caps.fold(k));
            let w = freed.get(&k).copied().unwrap_or(0).max(wave);
            freed.insert(k, w);
        }
        if out.len() <= wave {
            out.resize_with(wave + 1, Vec::new);
        }
        out[wave].push(unit);
    }
    out
}

/// Folds the results of a split addition's parts (adjacent, sorted by key, in the order they
/// finished) into one, in place: failed if a part failed (with the members of every failed part),
/// stopped if a part did not start.
fn merge_parts(results: &mut Vec<Ran>) {
    results.dedup_by(|part, first| {
        if part.key != first.key {
            return false;
        }
        first.absorb(Ran::taken(part));
        true
    });
}

/// Moves each group's member additions into the task of its member removals, where the target
/// sends both together: one write per group (and member chunk) instead of two. Additions that
/// nest a group stay in their own phase, after every removal, since removals are what break a
/// cycle of nested groups before an addition would close one.
fn pair_member_changes(phases: &mut BTreeMap<u8, Vec<Unit<'_>>>) {
    use idsync_model::plan::{ADD_MEMBERS_PHASE, REMOVE_MEMBERS_PHASE};
    let Some(adds) = phases.remove(&ADD_MEMBERS_PHASE) else {
        return;
    };
    let mut by_group: BTreeMap<(Kind, &str), (usize, &Op)> = BTreeMap::new();
    let mut rest = Vec::with_capacity(adds.len());
    for unit in adds {
        match unit.first.1 {
            Op::AddMembers { group, members }
                if members.iter().all(|m| m.kind != Kind::Group)
                    && !by_group.contains_key(&(group.kind, group.key.as_str())) =>
            {
                by_group.insert((group.kind, group.key.as_str()), unit.first);
            }
            _ => rest.push(unit),
        }
    }
    if let Some(removes) = phases.get_mut(&REMOVE_MEMBERS_PHASE) {
        for unit in removes.iter_mut() {
            if let Op::RemoveMembers { group, .. } = unit.first.1 {
                unit.then = by_group.remove(&(group.kind, group.key.as_str()));
            }
        }
    }
    // Additions without removals keep their phase, in plan order.
    rest.extend(
        by_group
            .into_values()
            .map(|first| Unit { first, then: None }),
    );
    rest.sort_by_key(|u| u.first.0);
    if !rest.is_empty() {
        phases.insert(ADD_MEMBERS_PHASE, rest);
    }
}

/// What every task of an apply shares.
struct Ctx<'a> {
    target: &'a dyn Target,
    opts: &'a ApplyOptions,
    halted: &'a std::sync::atomic::AtomicBool,
    caps: &'a Capabilities,
}

impl Ctx<'_> {
    /// Whether an earlier failure halted the apply (it is to be rolled back).
    fn halt(&self) -> bool {
        self.halted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether no further write may start.
    fn stop_writes(&self, op: &Op) -> bool {
        (self.opts.stopped() || self.halt()) && op.writes()
    }

    /// What a task will do, resolved against the creates finished so far.
    fn prepare(&self, task: &Task<'_>, created: &Created) -> Job {
        let unit = &task.unit;
        let Some((j, add)) = unit.then else {
            return match &task.part {
                Some(positions) => {
                    let (i, op) = unit.first;
                    let key = i;
                    if self.stop_writes(op) {
                        return Job::Done(vec![Ran::stopped(key)]);
                    }
                    self.prepare_op(key, &crate::schedule::part_op(op, positions), created)
                }
                None => self.prepare_one(unit.first, created),
            };
        };
        let (i, remove) = unit.first;
        let keys = (i, j);
        if self.stop_writes(remove) {
            return Job::Done(vec![Ran::stopped(keys.0), Ran::stopped(keys.1)]);
        }
        // A group's removals and additions as one write. When either cannot run (its group or
        // every member it adds was not created), each runs on its own, removals first.
        match (self.resolve(remove, created), self.resolve(add, created)) {
            (Ok((r, skipped_r)), Ok((a, skipped_a)))
                if matches!((&r, &a), (Op::RemoveMembers { .. }, Op::AddMembers { .. })) =>
            {
                Job::Pair(Box::new(Paired {
                    keys,
                    remove: r,
                    add: a,
                    skipped: (skipped_r, skipped_a),
                }))
            }
            _ => Job::Each(vec![
                self.prepare_one((i, remove), created),
                self.prepare_one((j, add), created),
            ]),
        }
    }

    fn prepare_one(&self, (i, op): (usize, &Op), created: &Created) -> Job {
        let key = i;
        if self.stop_writes(op) {
            return Job::Done(vec![Ran::stopped(key)]);
        }
        self.prepare_op(key, op, created)
    }

    fn prepare_op(&self, key: RanKey, op: &Op, created: &Created) -> Job {
        match self.resolve(op, created) {
            Ok((resolved, skipped)) => Job::One {
                key,
                op: resolved,
                skipped,
            },
            Err(skipped) => Job::Done(vec![Ran::skipped(key, skipped)]),
        }
    }

    /// Runs what [`Ctx::prepare`] resolved.
    async fn go(&self, job: Job) -> Vec<Ran> {
        match job {
            Job::Done(ran) => ran,
            Job::One { key, op, skipped } => vec![self.run(key, op, skipped).await],
            Job::Pair(pair) => {
                let Paired {
                    keys,
                    remove,
                    add,
                    skipped,
                } = *pair;
                let (
                    Op::RemoveMembers {
                        group,
                        members: gone,
                    },
                    Op::AddMembers { members: new, .. },
                ) = (&remove, &add)
                else {
                    unreachable!("prepare pairs a removal with an addition")
                };
                let result = self
                    .target
                    .execute_members(group, gone, new)
                    .await
                    .map(|o| (o, true));
                vec![
                    self.finish(keys.0, remove, result.clone(), skipped.0),
                    self.finish(keys.1, add, result, skipped.1),
                ]
            }
            Job::Each(jobs) => {
                let mut out = Vec::with_capacity(jobs.len());
                for job in jobs {
                    out.push(match job {
                        Job::One { key, op, .. } if self.stop_writes(&op) => Ran::stopped(key),
                        Job::One { key, op, skipped } => self.run(key, op, skipped).await,
                        Job::Done(ran) => {
                            out.extend(ran);
                            continue;
                        }
                        Job::Pair(_) | Job::Each(_) => {
                            unreachable!("a pair falls back to single operations")
                        }
                    });
                }
                out
            }
        }
    }

    /// Runs one resolved operation.
    async fn run(&self, key: RanKey, op: Op, skipped: Vec<Failure>) -> Ran {
        let r = if op.writes() {
            execute(self.target, &op, self.caps)
                .await
                .map(|o| (o, true))
        } else {
            Ok((Outcome::Done, false))
        };
        self.finish(key, op, r, skipped)
    }

    /// Fills in the ids of principals created earlier in the apply: the operation, and what of
    /// it is skipped (members not created); or, when it cannot run at all, why.
    fn resolve(&self, op: &Op, created: &Created) -> Result<(Op, Vec<Failure>), Vec<Failure>> {
        match resolve(op, created) {
            Ok((resolved, dropped)) => {
                let skipped = dropped
                    .into_iter()
                    .map(|d| Failure {
                        op: op.clone(),
                        error: format!("member {d} was not created, so it is not added"),
                        kind: None,
                    })
                    .collect();
                Ok((resolved, skipped))
            }
            Err(unresolved) => {
                if self.opts.rollback {
                    self.set_halt();
                }
                Err(match unresolved {
                    Unresolved::Subject(dep) => vec![Failure {
                        op: op.clone(),
                        error: format!("{dep} was not created, so this was not attempted"),
                        kind: None,
                    }],
                    // Every member of it, each named (a part of a split addition may hold only
                    // members whose creates failed).
                    Unresolved::Members(dropped) => dropped
                        .into_iter()
                        .map(|d| Failure {
                            op: op.clone(),
                            error: format!("member {d} was not created, so it is not added"),
                            kind: None,
                        })
                        .collect(),
                })
            }
        }
    }

    /// The record of an operation that ran.
    fn finish(
        &self,
        key: RanKey,
        resolved: Op,
        r: Result<(Outcome, bool), TargetError>,
        skipped: Vec<Failure>,
    ) -> Ran {
        if self.opts.rollback && (r.is_err() || !skipped.is_empty()) {
            self.set_halt();
        }
        // A create that succeeded is recorded from the plan's own operation (resolving changes
        // nothing in a create): a copy of each of a first sync's 112,000 creates, with its
        // attributes, would wait here for the end of the apply.
        let keep = r.is_err() || (records(&resolved) && !matches!(resolved, Op::Create { .. }));
        Ran {
            key,
            seq: 0,
            op: keep.then(|| Box::new(resolved)),
            result: Some(r),
            skipped,
            stopped: false,
            partly_ran: false,
        }
    }
}

/// Where a result is recorded: the operation's sort key, then its place in the plan.
/// An operation's place in the plan: the order results are recorded in.
type RanKey = usize;

/// A group's removals and additions, resolved, to send as one write.
struct Paired {
    keys: (RanKey, RanKey),
    remove: Op,
    add: Op,
    skipped: (Vec<Failure>, Vec<Failure>),
}

/// What a task does once it starts.
enum Job {
    /// Nothing: it could not start (stopped, or what it names was not created).
    Done(Vec<Ran>),
    /// One operation, its ids filled in.
    One {
        key: RanKey,
        op: Op,
        skipped: Vec<Failure>,
    },
    /// A group's removals and additions in one write.
    Pair(Box<Paired>),
    /// Operations one after another (a pair that cannot run as one).
    Each(Vec<Job>),
}

impl Ran {
    /// Whether it changed the target, or may have.
    fn may_have_run(&self) -> bool {
        self.partly_ran
            || match &self.result {
                Some(Ok(_)) => true,
                Some(Err(e)) => Failure::unknown(e.kind),
                None => false,
            }
    }

    /// Takes in the result of another part of the same addition.
    fn absorb(&mut self, other: Ran) {
        self.partly_ran = self.may_have_run() || other.may_have_run();
        self.stopped |= other.stopped;
        // One entry per reason: the parts of an addition to a group that was not created all
        // say so, and are one operation.
        for f in other.skipped {
            match self.skipped.iter_mut().find(|s| s.error == f.error) {
                Some(s) => {
                    if let (Op::AddMembers { members, .. }, Op::AddMembers { members: more, .. }) =
                        (&mut s.op, f.op)
                    {
                        members.extend(more);
                    }
                }
                None => self.skipped.push(f),
            }
        }
        // The error reported: one that says something about the operation (refused, not
        // found) before one of the service or the network, whichever part finished first.
        self.result = match (self.result.take(), other.result) {
            (Some(Err(a)), Some(Err(b))) => Some(Err(
                if Failure::unknown(a.kind) && !Failure::unknown(b.kind) {
                    b
                } else {
                    a
                },
            )),
            (Some(Err(e)), _) | (_, Some(Err(e))) => Some(Err(e)),
            (Some(Ok((o, a))), Some(Ok((_, b)))) => Some(Ok((o, a || b))),
            (a, b) => a.or(b),
        };
        self.op = match (self.op.take(), other.op) {
            (Some(mut mine), Some(theirs)) => {
                if let (Op::AddMembers { members, .. }, Op::AddMembers { members: more, .. }) =
                    (&mut *mine, *theirs)
                {
                    members.extend(more);
                }
                Some(mine)
            }
            (a, b) => a.or(b),
        };
    }

    /// Takes what `r` holds, leaving it empty (its key stays: the place it is sorted by).
    fn taken(r: &mut Ran) -> Ran {
        Ran {
            key: r.key,
            seq: r.seq,
            op: r.op.take(),
            result: r.result.take(),
            stopped: r.stopped,
            skipped: std::mem::take(&mut r.skipped),
            partly_ran: r.partly_ran,
        }
    }

    fn stopped(key: RanKey) -> Ran {
        Ran {
            key,
            seq: 0,
            op: None,
            result: None,
            skipped: Vec::new(),
            stopped: true,
            partly_ran: false,
        }
    }

    fn skipped(key: RanKey, skipped: Vec<Failure>) -> Ran {
        Ran {
            key,
            seq: 0,
            op: None,
            result: None,
            skipped,
            stopped: false,
            partly_ran: false,
        }
    }
}

/// How many times a create whose outcome is unknown is tried again within a run, after looking
/// for what it may have made.
const CREATE_RETRIES: u32 = 4;

/// Executes `op`. A create that fails without a known outcome (a 5xx, a dropped connection, an
/// answer cut short: the service may have made the principal) is not repeated blindly: the target
/// is asked for the key first ([`Target::observe_some`]); what it holds under the key is what this
/// create made, and is recorded as created; when nothing holds it, the create runs again, up to
/// [`CREATE_RETRIES`] times. A storm then slows a run instead of failing it, and nothing is made
/// twice. A target that cannot look up by key leaves the create to the next run, which does.
async fn execute(
    target: &dyn Target,
    op: &Op,
    caps: &Capabilities,
) -> Result<Outcome, TargetError> {
    let Op::Create { principal, .. } = op else {
        return target.execute(op).await;
    };
    let folded = caps.fold(&principal.key);
    let mut tries = 0;
    loop {
        let e = match target.execute(op).await {
            Ok(o) => return Ok(o),
            Err(e) if Failure::unknown(e.kind) && tries < CREATE_RETRIES => e,
            Err(e) => return Err(e),
        };
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100 << tries.min(4))).await;
        let want = crate::observe::Interest {
            keys: BTreeSet::from([(principal.kind, principal.key.clone())]),
            ..Default::default()
        };
        match target.observe_some(&want).await {
            Ok(Some(found)) => {
                if let Some(p) = found.principals.iter().find(|p| {
                    p.principal.kind == principal.kind && caps.folds_to(&p.principal.key, &folded)
                }) {
                    // Someone else's, made in between (its external id names another source
                    // principal): not this create's; the next run reports the conflict.
                    if p.principal.external_id.is_some()
                        && p.principal.external_id != principal.external_id
                    {
                        return Err(e);
                    }
                    tracing::info!(op = ?op.subject(), "the create failed ({e}), but the target holds it: recorded as created");
                    return Ok(Outcome::Created(p.id.clone()));
                }
            }
            // The look-up failed too, or the target cannot look up by key: the next run finds
            // the principal if it was made.
            Ok(None) | Err(_) => return Err(e),
        }
    }
}

/// One operation's run: its place in the plan, the operation (kept when it failed or changes the
/// state), its result (none when it could not run), and what was skipped of it.
struct Ran {
    /// The operation's place in the plan: the order results are recorded in, whatever order they
    /// finished in.
    key: RanKey,
    /// When it finished, in its batch: the parts of a split addition are merged in that order.
    seq: usize,
    /// The operation as it ran, kept only when it failed or changes the state beyond a create:
    /// boxed, so that the result of each of a million member writes is small while it waits.
    op: Option<Box<Op>>,
    result: Option<Result<(Outcome, bool), TargetError>>,
    /// Not started: the apply was asked to stop.
    stopped: bool,
    skipped: Vec<Failure>,
    /// For a split addition: a part succeeded, or failed with its outcome unknown (so the
    /// operation may have changed the target, whatever the error reported).
    partly_ran: bool,
}

/// Whether a successful operation changes the state (links, ownership), so must be recorded.
fn records(op: &Op) -> bool {
    !matches!(
        op,
        Op::AddMembers { .. }
            | Op::RemoveMembers { .. }
            | Op::AttachPolicies { .. }
            | Op::DetachPolicies { .. }
    )
}

/// Why an operation cannot run at all.
enum Unresolved {
    /// Its subject (or group) was not created.
    Subject(PRef),
    /// None of its members was created.
    Members(Vec<PRef>),
}

/// The target ids of the principals this apply created, by kind and key: looked up by `&str`
/// for each member of each addition (a million at a first sync of 100k users).
type Created = PerKind<crate::fnv::FnvMap<String, String>>;

/// Fills in target ids of principals created earlier in this apply. Members whose create failed
/// are dropped (and returned); a subject whose create failed makes the whole operation unrunnable.
fn resolve(op: &Op, created: &Created) -> Result<(Op, Vec<PRef>), Unresolved> {
    let missing = |r: &PRef| Unresolved::Subject(r.clone());
    let fill = |r: &PRef| -> Option<PRef> {
        if r.id.is_some() {
            return Some(r.clone());
        }
        created.get(r.kind).get(r.key.as_str()).map(|id| PRef {
            id: Some(id.clone()),
            ..r.clone()
        })
    };
    // A member change is built from its parts: a copy of the whole operation first would copy
    // every member twice.
    if let Op::AddMembers { group, members } | Op::RemoveMembers { group, members } = op {
        let group = fill(group).ok_or_else(|| missing(group))?;
        let mut kept = Vec::with_capacity(members.len());
        let mut dropped = Vec::new();
        for m in members {
            match fill(m) {
                Some(m) => kept.push(m),
                None => dropped.push(m.clone()),
            }
        }
        if kept.is_empty() {
            return Err(Unresolved::Members(dropped));
        }
        let members = kept;
        let resolved = match op {
            Op::AddMembers { .. } => Op::AddMembers { group, members },
            _ => Op::RemoveMembers { group, members },
        };
        return Ok((resolved, dropped));
    }
    let mut op = op.clone();
    match &mut op {
        Op::Create { .. } => {}
        Op::Adopt { target, .. }
        | Op::Forget { target }
        | Op::Update { target, .. }
        | Op::Deactivate { target }
        | Op::Delete { target, .. } => *target = fill(target).ok_or_else(|| missing(target))?,
        Op::AttachPolicies { group, .. } | Op::DetachPolicies { group, .. } => {
            *group = fill(group).ok_or_else(|| missing(group))?
        }
        Op::AddMembers { .. } | Op::RemoveMembers { .. } => {
            unreachable!("member changes are resolved above")
        }
    }
    Ok((op, Vec::new()))
}

/// The state's links (source id → target id) with their reverse, so that keeping them one to one
/// costs a lookup per write instead of a scan of every link (quadratic at 100k creates). The
/// reverse is built on the first write that changes a link. It holds each target id once, with
/// the one source that links to it (more only in a state written before links were kept one to
/// one): a first sync links 112,000 principals, and a set per target id was 50 MB of its peak.
///
/// Until a link needs the reverse, a hash of each target id linked stands in for it: a link to a
/// target id no link holds (the new id of a create) changes no other link, so a first sync links
/// its 112,000 principals against 2 MB of hashes instead of 27 MB of reverse. A hash that is
/// there (a target id linked before, or one that shares its hash) builds the reverse, and the
/// link is made with it.
#[derive(Default)]
struct Links {
    reverse: Option<Reverse>,
    /// Per kind, the hash of every target id linked (and of some no longer linked: a source's
    /// link that moved leaves its old target id's hash, which at worst builds the reverse).
    linked: Option<PerKind<crate::fnv::FnvSet<u64>>>,
}

/// A target id's hash, as [`Links`] keeps it until it builds the reverse.
fn tid_hash(tid: &str) -> u64 {
    use std::hash::BuildHasher;
    std::hash::BuildHasherDefault::<crate::fnv::Fnv>::default().hash_one(tid)
}

/// The sources linked to one target id: almost always one.
#[derive(Clone, Debug, PartialEq)]
enum Sources {
    One(Box<str>),
    Many(Vec<Box<str>>),
}

impl Sources {
    fn add(&mut self, source: &str) {
        match self {
            Sources::One(s) if &**s == source => {}
            Sources::One(s) => {
                let first = std::mem::take(s);
                *self = Sources::Many(vec![first, source.into()]);
            }
            Sources::Many(v) => {
                if !v.iter().any(|s| &**s == source) {
                    v.push(source.into());
                }
            }
        }
    }

    /// Drops `source`; true when none is left.
    fn remove(&mut self, source: &str) -> bool {
        match self {
            Sources::One(s) => &**s == source,
            Sources::Many(v) => {
                v.retain(|s| &**s != source);
                v.is_empty()
            }
        }
    }

    fn into_vec(self) -> Vec<Box<str>> {
        match self {
            Sources::One(s) => vec![s],
            Sources::Many(v) => v,
        }
    }
}

/// Target id → the sources linked to it, per kind.
type Reverse = PerKind<crate::fnv::FnvMap<Box<str>, Sources>>;

impl Links {
    fn reverse(&mut self, state: &AgreementState) -> &mut Reverse {
        // From here on the reverse says which target ids are linked.
        self.linked = None;
        self.reverse.get_or_insert_with(|| {
            let mut reverse = Reverse::default();
            for kind in Kind::ALL {
                for (source, tid) in state.links.get(kind) {
                    Links::add(&mut reverse, kind, tid, source);
                }
            }
            reverse
        })
    }

    fn add(reverse: &mut Reverse, kind: Kind, tid: &str, source: &str) {
        let by_tid = reverse.get_mut(kind);
        match by_tid.get_mut(tid) {
            Some(sources) => sources.add(source),
            None => {
                by_tid.insert(tid.into(), Sources::One(source.into()));
            }
        }
    }

    /// Drops every link to `tid`.
    fn unlink_target(&mut self, state: &mut AgreementState, kind: Kind, tid: &str) {
        let sources = self.reverse(state).get_mut(kind).remove(tid);
        for source in sources.map(Sources::into_vec).unwrap_or_default() {
            state.links.get_mut(kind).remove(&*source);
        }
    }

    /// Links one source principal to one target principal, and back.
    fn link(&mut self, state: &mut AgreementState, kind: Kind, source: &str, tid: &str) {
        // Already so (an update of a linked principal): the links are one to one, so nothing
        // else points at `tid`, and the reverse (100 ms to build at 100k links) is not needed.
        if state.links.get(kind).get(source).is_some_and(|t| t == tid) {
            return;
        }
        if self.reverse.is_none() {
            let linked = self.linked.get_or_insert_with(|| {
                let mut linked = PerKind::<crate::fnv::FnvSet<u64>>::default();
                for kind in Kind::ALL {
                    let hashes = linked.get_mut(kind);
                    hashes.extend(state.links.get(kind).values().map(|t| tid_hash(t)));
                }
                linked
            });
            // No link holds `tid`: this link is the only one to change.
            if linked.get_mut(kind).insert(tid_hash(tid)) {
                state
                    .links
                    .get_mut(kind)
                    .insert(source.to_owned(), tid.to_owned());
                return;
            }
        }
        self.unlink_target(state, kind, tid);
        let before = state
            .links
            .get_mut(kind)
            .insert(source.to_owned(), tid.to_owned());
        let reverse = self.reverse(state);
        if let Some(old) = before {
            let by_tid = reverse.get_mut(kind);
            if by_tid.get_mut(&*old).is_some_and(|s| s.remove(source)) {
                by_tid.remove(&*old);
            }
        }
        Links::add(reverse, kind, tid, source);
    }
}

fn record(
    op: &Op,
    outcome: &Outcome,
    state: &mut AgreementState,
    links: &mut Links,
    caps: &Capabilities,
) {
    match (op, outcome) {
        // Its id is in the apply's map of what it created since it finished.
        (Op::Create { principal, source }, Outcome::Created(id)) => {
            links.link(state, principal.kind, &source.id, id);
            state.owned.get_mut(principal.kind).insert(
                id.clone(),
                Owned {
                    key: principal.key.clone(),
                    how: Ownership::Created,
                    source: Some(source.id.clone()),
                },
            );
        }
        (Op::Adopt { target, source }, _) => {
            let Some(id) = &target.id else { return };
            links.link(state, target.kind, &source.id, id);
            // A create of an interrupted apply, recognised by its journaled key, was idsync's own.
            let key = PKey::new(target.kind, caps.fold(&target.key));
            let how = if state
                .journal
                .as_ref()
                .is_some_and(|j| j.pending_creates.contains(&key))
            {
                Ownership::Created
            } else {
                Ownership::Adopted
            };
            let owned = state
                .owned
                .get_mut(target.kind)
                .entry(id.clone())
                .or_insert(Owned {
                    key: target.key.to_string(),
                    how,
                    source: None,
                });
            owned.source = Some(source.id.clone());
        }
        (
            Op::Update {
                target,
                source,
                changes,
            },
            _,
        ) => {
            let Some(id) = &target.id else { return };
            links.link(state, target.kind, &source.id, id);
            if let Some(AttrValue::Text(Some(k))) =
                changes.iter().find(|c| c.attr == Attr::Key).map(|c| &c.to)
                && let Some(o) = state.owned.get_mut(target.kind).get_mut(id)
            {
                o.key = k.clone();
            }
        }
        (Op::Delete { target, .. } | Op::Forget { target }, _) => {
            let Some(id) = &target.id else { return };
            state.owned.get_mut(target.kind).remove(id);
            links.unlink_target(state, target.kind, id);
        }
        _ => {}
    }
}

/// Applies an operation to a principal's attributes, as a target would.
pub fn apply_changes(p: &mut Principal, op: &Op) {
    if let Op::Update { changes, .. } = op {
        for c in changes {
            p.set(c.attr, &c.to);
        }
    }
}

/// Refuses a plan a safety guard halted. Call before [`begin`]: a halted plan writes nothing.
pub fn check(plan: &Plan) -> Result<(), idsync_model::Halt> {
    match &plan.halt {
        Some(h) => Err(h.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hasher;

    /// A kind's links, as (source, target) pairs in source order.
    fn link_pairs(state: &AgreementState, k: Kind) -> Vec<(String, String)> {
        state
            .links
            .get(k)
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn links_stay_one_to_one_and_their_reverse_follows_them() {
        let mut state = AgreementState::new("a");
        // A state written before links were kept one to one: two sources on one target id.
        let users = state.links.get_mut(Kind::User);
        users.insert("s1".into(), "t1".into());
        users.insert("s2".into(), "t1".into());
        users.insert("s3".into(), "t3".into());
        let mut links = Links::default();
        // s4 takes t1: both of its sources lose their link.
        links.link(&mut state, Kind::User, "s4", "t1");
        // s3 moves to t5: nothing links to t3 any more, and s6 takes it.
        links.link(&mut state, Kind::User, "s3", "t5");
        links.link(&mut state, Kind::User, "s6", "t3");
        // Another kind is another map: the same ids there touch nothing here.
        links.link(&mut state, Kind::Group, "s4", "t5");
        // Already so: nothing changes.
        links.link(&mut state, Kind::User, "s4", "t1");
        assert_eq!(
            link_pairs(&state, Kind::User),
            pairs(&[("s3", "t5"), ("s4", "t1"), ("s6", "t3")])
        );
        assert_eq!(link_pairs(&state, Kind::Group), pairs(&[("s4", "t5")]));
        // The reverse kept along is the one the links make afresh.
        let kept = links.reverse.take().unwrap();
        let fresh = Links::default().reverse(&state).clone();
        assert_eq!(kept, fresh);
        assert_eq!(
            fresh.users.get("t1"),
            Some(&Sources::One("s4".into())),
            "{fresh:?}"
        );
        // A state's many-to-one links are held as they are until a link changes them.
        let mut legacy = AgreementState::new("b");
        legacy
            .links
            .get_mut(Kind::User)
            .insert("x".into(), "t".into());
        legacy
            .links
            .get_mut(Kind::User)
            .insert("y".into(), "t".into());
        let mut links = Links::default();
        assert_eq!(
            links.reverse(&legacy).users.get("t"),
            Some(&Sources::Many(vec!["x".into(), "y".into()]))
        );
        links.link(&mut legacy, Kind::User, "x", "u");
        assert_eq!(
            links.reverse(&legacy).users.get("t"),
            Some(&Sources::Many(vec!["y".into()]))
        );
        links.link(&mut legacy, Kind::User, "y", "v");
        assert_eq!(links.reverse(&legacy).users.get("t"), None);
    }

    #[test]
    fn links_to_new_target_ids_need_no_reverse_and_a_taken_id_builds_it() {
        let mut state = AgreementState::new("a");
        state
            .links
            .get_mut(Kind::User)
            .insert("s1".into(), "t1".into());
        let mut links = Links::default();
        // New target ids (a create's): linked against the hashes alone.
        links.link(&mut state, Kind::User, "s2", "t2");
        links.link(&mut state, Kind::Group, "s1", "t1");
        // s2 moves to t3: t2's hash stays, though nothing links to it now.
        links.link(&mut state, Kind::User, "s2", "t3");
        assert!(links.reverse.is_none(), "no reverse for new ids");
        // t2 again: its hash is there, so the reverse is built, and finds no link to undo.
        links.link(&mut state, Kind::User, "s4", "t2");
        assert!(links.reverse.is_some() && links.linked.is_none());
        // t1, linked before the apply: s1 loses it to s5.
        links.link(&mut state, Kind::User, "s5", "t1");
        assert_eq!(
            link_pairs(&state, Kind::User),
            pairs(&[("s2", "t3"), ("s4", "t2"), ("s5", "t1")])
        );
        assert_eq!(link_pairs(&state, Kind::Group), pairs(&[("s1", "t1")]));
        let kept = links.reverse.take().unwrap();
        assert_eq!(kept, Links::default().reverse(&state).clone());
        // Without the reverse, a target id linked before the apply is found by its hash: the
        // source that held it loses it.
        let mut links = Links::default();
        links.link(&mut state, Kind::User, "s6", "t3");
        assert_eq!(
            link_pairs(&state, Kind::User),
            pairs(&[("s4", "t2"), ("s5", "t1"), ("s6", "t3")])
        );
    }

    #[test]
    fn a_plan_id_is_the_hash_of_the_plan_as_json_however_it_is_written() {
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "format": 1, "agreement": "a", "stateVersion": 3, "mode": "full",
            "ops": [], "conflicts": [], "notes": ["Zoë's \"group\""],
            "summary": idsync_model::plan::Summary::default(),
        }))
        .unwrap();
        // As journals written before it was streamed named their plans: the FNV-1a of the
        // whole JSON held at once.
        let mut whole = idsync_model::fnv::Fnv::default();
        whole.write(&serde_json::to_vec(&plan).unwrap());
        assert_eq!(plan_id(&plan), format!("{:016x}", whole.finish()));
        let mut other = plan.clone();
        other.state_version = 4;
        assert_ne!(plan_id(&plan), plan_id(&other));
    }
}
