//! For connector authors and idsync's own tests (feature `testing`): a run against an in-memory
//! state store, and the conformance suite every target runs, all through [`run_agreement`] — the
//! function the command line calls — so a test exercises what users run.

use crate::{
    Agreement, Mode, Outcome, ReadCache, RunError, RunOptions, Silent, SnapshotSource,
    run_agreement,
};
use async_trait::async_trait;
use idsync_engine::apply::ApplyReport;
use idsync_engine::plan::Deprovision;
use idsync_engine::{
    Mapping, Outcome as OpOutcome, Policy, Scope, Target, TargetError, TargetErrorKind,
    TargetIdentity,
};
use idsync_model::{
    AgreementState, Capabilities, Kind, Member, Observation, Observed, Op, Plan, Snapshot,
};
use idsync_state::{Lease, MemoryStore, StateError, StateStore};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// One run of `snapshot` into `target` with `state` as the agreement's state: the state is
/// committed to a fresh in-memory store, the run made with `opts` (its approvals taken from
/// `policy`, as the command line's flags would give them), and the state read back into `state`.
pub async fn run_seeded(
    target: &dyn Target,
    snapshot: &Snapshot,
    mapping: &Mapping,
    policy: &Policy,
    state: &mut AgreementState,
    opts: &RunOptions,
) -> Result<Outcome, RunError> {
    let store = MemoryStore::in_memory();
    let mut seeded = state.clone();
    seeded.version = 0;
    store.commit(&seeded).await?;
    let agreement = Agreement {
        name: &state.agreement,
        target,
        identity: TargetIdentity::new("test", "seeded"),
        describe: "the target under test".into(),
        mapping,
        policy,
    };
    let opts = RunOptions {
        approve_deletions: policy.approved_deletions,
        allow_empty_source: policy.allow_empty_source,
        ..opts.clone()
    };
    let source = SnapshotSource::new(snapshot.clone());
    let out = run_agreement(
        &agreement,
        &store,
        &source,
        &Scope::default(),
        &mut ReadCache::default(),
        &opts,
        &mut Silent,
    )
    .await;
    if let Some(st) = store.load(&state.agreement).await? {
        *state = st;
    }
    out
}

/// A target that "dies" (fails every operation as unreachable) once it has executed `budget`
/// operations: the process killed in the middle of an apply.
pub struct CrashAfter<'a> {
    inner: &'a dyn Target,
    budget: AtomicUsize,
}

impl<'a> CrashAfter<'a> {
    /// `inner`, dying after `budget` operations.
    pub fn new(inner: &'a dyn Target, budget: usize) -> Self {
        CrashAfter {
            inner,
            budget: AtomicUsize::new(budget),
        }
    }
}

#[async_trait]
impl Target for CrashAfter<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self) -> Result<Observed, TargetError> {
        self.inner.observe().await
    }
    async fn execute(&self, op: &Op) -> Result<OpOutcome, TargetError> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0
            || self
                .budget
                .compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Err(TargetError::new(
                TargetErrorKind::Unavailable,
                "the process died here",
            ));
        }
        self.inner.execute(op).await
    }
    async fn flush(&self) -> Result<(), TargetError> {
        self.inner.flush().await
    }
}

/// Decides whether a write fails, and with what.
type Verdict<'a> = Box<dyn Fn(&Op) -> Option<TargetError> + Send + Sync + 'a>;

/// A target whose writes fail when `fail` says so (with the error it gives): a conflict in the
/// middle of an apply, a target that refuses to undo.
pub struct FailWhen<'a> {
    inner: &'a dyn Target,
    fail: Verdict<'a>,
}

impl<'a> FailWhen<'a> {
    /// `inner`, failing the operations `fail` gives an error for.
    pub fn new(
        inner: &'a dyn Target,
        fail: impl Fn(&Op) -> Option<TargetError> + Send + Sync + 'a,
    ) -> Self {
        FailWhen {
            inner,
            fail: Box::new(fail),
        }
    }
}

#[async_trait]
impl Target for FailWhen<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self) -> Result<Observed, TargetError> {
        self.inner.observe().await
    }
    async fn execute(&self, op: &Op) -> Result<OpOutcome, TargetError> {
        match (self.fail)(op) {
            Some(e) => Err(e),
            None => self.inner.execute(op).await,
        }
    }
    async fn flush(&self) -> Result<(), TargetError> {
        self.inner.flush().await
    }
}

/// A state store that refuses every commit after the first `commits`: with [`CrashAfter`], a
/// process that died after it journaled its creates and before it recorded what it applied.
pub struct CommitsThenDies<'a> {
    inner: &'a dyn StateStore,
    commits: AtomicUsize,
}

impl<'a> CommitsThenDies<'a> {
    /// `inner`, refusing commits after `commits` of them.
    pub fn new(inner: &'a dyn StateStore, commits: usize) -> Self {
        CommitsThenDies {
            inner,
            commits: AtomicUsize::new(commits),
        }
    }
}

#[async_trait]
impl StateStore for CommitsThenDies<'_> {
    async fn load(&self, agreement: &str) -> Result<Option<AgreementState>, StateError> {
        self.inner.load(agreement).await
    }
    async fn commit(&self, state: &AgreementState) -> Result<u64, StateError> {
        let left = self.commits.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StateError::Io {
                action: "writing",
                path: "the state (the process died)".into(),
                source: std::io::Error::other("the process died here"),
            });
        }
        self.commits.store(left - 1, Ordering::SeqCst);
        self.inner.commit(state).await
    }
    async fn acquire(
        &self,
        agreement: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StateError> {
        self.inner.acquire(agreement, holder, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StateError> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StateError> {
        self.inner.release(lease).await
    }
    async fn delete(&self, agreement: &str) -> Result<(), StateError> {
        self.inner.delete(agreement).await
    }
    async fn list(&self) -> Result<Vec<String>, StateError> {
        self.inner.list().await
    }
    async fn unlock(&self, agreement: &str) -> Result<Option<Lease>, StateError> {
        self.inner.unlock(agreement).await
    }
    async fn append_changes(
        &self,
        agreement: &str,
        day: &str,
        name: &str,
        lines: Vec<u8>,
    ) -> Result<(), StateError> {
        self.inner.append_changes(agreement, day, name, lines).await
    }
    async fn changes(
        &self,
        agreement: Option<&str>,
        since_day: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        self.inner.changes(agreement, since_day).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The target under test.
pub struct Subject<'a> {
    /// The target.
    pub target: &'a dyn Target,
    /// Its mapping.
    pub mapping: Mapping,
    /// Turns a 429 storm on (`true`) or off, where the server can be told to.
    pub storm: Option<Box<dyn Fn(bool) + Send + Sync + 'a>>,
}

fn check(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.into()) }
}

/// Every key observed once per kind (case-insensitively where the target folds case).
fn no_duplicates(o: &Observed, caps: &Capabilities) -> Result<(), String> {
    for k in Kind::ALL {
        let mut seen = std::collections::BTreeSet::new();
        for p in o.principals.get(k).values() {
            let key = if caps.case_insensitive_keys {
                p.principal.key.to_lowercase()
            } else {
                p.principal.key.clone()
            };
            check(
                seen.insert(key),
                format!("{k} {} is there twice", p.principal.key),
            )?;
        }
    }
    Ok(())
}

/// A user new to `dir`: a copy of one of its users under another id, name and mail.
fn new_user(
    dir: &Snapshot,
    id: &str,
    user_name: &str,
    display_name: &str,
) -> Result<idsync_model::User, String> {
    let mut u = dir
        .users
        .values()
        .next()
        .map(|u| idsync_model::User::clone(u))
        .ok_or("the directory has no user to copy")?;
    u.id = id.into();
    u.user_name = user_name.into();
    u.display_name = display_name.into();
    u.emails = vec![user_name.into()];
    Ok(u)
}

fn id_by_name(dir: &Snapshot, user: &str) -> String {
    dir.users
        .values()
        .find(|u| u.user_name == user)
        .map(|u| u.id.clone())
        .unwrap_or_default()
}

/// The suite's runs: one agreement, its state in one in-memory store across the steps.
struct Suite<'s, 'a> {
    s: &'s Subject<'a>,
    store: MemoryStore,
}

const AGREEMENT: &str = "conformance";

impl Suite<'_, '_> {
    async fn run(
        &self,
        target: &dyn Target,
        store: &dyn StateStore,
        dir: &Snapshot,
        policy: &Policy,
        opts: RunOptions,
    ) -> Result<Outcome, String> {
        let a = Agreement {
            name: AGREEMENT,
            target,
            identity: TargetIdentity::new("conformance", "subject"),
            describe: "the target under test".into(),
            mapping: &self.s.mapping,
            policy,
        };
        let source = SnapshotSource::new(dir.clone());
        run_agreement(
            &a,
            store,
            &source,
            &Scope::default(),
            &mut ReadCache::default(),
            &opts,
            &mut Silent,
        )
        .await
        .map_err(|e| format!("{e:#}"))
    }

    /// `idsync sync`, observing the target in full.
    async fn sync(&self, dir: &Snapshot, policy: &Policy) -> Result<(Plan, ApplyReport), String> {
        let opts = RunOptions {
            workers: 4,
            reconcile: None,
            ..RunOptions::default()
        };
        let out = self
            .run(self.s.target, &self.store, dir, policy, opts)
            .await?;
        let plan = out.file.map(|f| f.plan).ok_or("a plan")?;
        match out.report {
            Some(r) => Ok((plan, r)),
            None => Err(format!("the plan halted: {:?}", plan.halt)),
        }
    }

    /// `idsync plan`: observing in full, or as the state's picture allows.
    async fn plan(&self, dir: &Snapshot, policy: &Policy, full: bool) -> Result<Plan, String> {
        let opts = RunOptions {
            mode: Mode::Plan,
            full_sync: full,
            reconcile: (!full).then_some(Duration::from_secs(3600)),
            ..RunOptions::default()
        };
        let out = self
            .run(self.s.target, &self.store, dir, policy, opts)
            .await?;
        out.file.map(|f| f.plan).ok_or_else(|| "a plan".into())
    }
}

/// Runs the suite on `s`, starting from the directory `dir` (the demo's: groups TEAM_ALPHA,
/// TEAM_ZETA with TEAM_ETA nested in it, users alice, bob and erin among others) and an empty
/// target: a crash half-way through the first apply, then a re-run that converges with nothing
/// duplicated; a second run with no write; nested groups kept or flattened as the target
/// declares; a group renamed, a user deleted and a member removed; a user deactivated where the
/// target can; a 429 storm that converges; and incremental observation, which reads only what the
/// changes touch and plans exactly what a full observation plans.
pub async fn conformance(s: Subject<'_>, mut dir: Snapshot) -> Result<(), String> {
    let caps = s.target.capabilities();
    let mut policy = Policy {
        deprovision: Deprovision::Delete,
        max_deletions: Some(100),
        max_deletions_percent: Some(100),
        ..Policy::default()
    };
    let suite = Suite {
        s: &s,
        store: MemoryStore::in_memory(),
    };

    // 1. The first apply dies half-way, after the journal was committed and before what was
    //    applied was recorded (the worst case). The re-run recognises what the dead run created.
    let first = suite.plan(&dir, &policy, true).await?;
    let half = first.ops.len() / 2;
    check(
        half > 2,
        format!("a first plan worth cutting ({} ops)", first.ops.len()),
    )?;
    let crashing = CrashAfter::new(s.target, half);
    let dying = CommitsThenDies::new(&suite.store, 1);
    let opts = RunOptions {
        reconcile: None,
        ..RunOptions::default()
    };
    let died = suite.run(&crashing, &dying, &dir, &policy, opts).await;
    check(
        died.as_ref().is_err_and(|e| e.contains("saving the state")),
        format!("the crash is reported: {:?}", died.map(|o| o.report)),
    )?;
    let journaled = suite
        .store
        .load(AGREEMENT)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the journal was committed")?;
    check(
        journaled.journal.is_some() && journaled.links.get(Kind::User).is_empty(),
        "the store holds the journal and nothing the dead run applied",
    )?;
    let (_, r) = suite.sync(&dir, &policy).await?;
    check(r.is_success(), format!("the re-run converges: {r:?}"))?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    no_duplicates(&o, &caps)?;

    // 2. A second run writes nothing.
    let p = suite.plan(&dir, &policy, true).await?;
    check(
        p.ops.is_empty(),
        format!("a second run writes nothing: {:?}", p.summary.ops),
    )?;

    // 3. Nested groups kept where the target nests them, flattened where it does not.
    let zeta = o
        .principals
        .get(Kind::Group)
        .values()
        .find(|g| g.principal.key == "TEAM_ZETA")
        .ok_or("TEAM_ZETA was created")?;
    let members = o.members.get(&zeta.id).cloned().unwrap_or_default();
    if caps.nested_groups {
        check(
            members.get(Kind::Group).len() == 1,
            "TEAM_ETA is nested in TEAM_ZETA",
        )?;
    } else {
        check(
            members.get(Kind::Group).is_empty() && members.get(Kind::User).len() >= 3,
            "TEAM_ZETA holds TEAM_ETA's users, flattened",
        )?;
    }

    // 4. A group renamed, a user deleted, a member removed.
    if let Some(g) = dir
        .groups
        .values_mut()
        .find(|g| g.display_name == "TEAM_ETA")
    {
        g.display_name = "TEAM_ETA_PLATFORM".into();
    }
    let erin = id_by_name(&dir, "erin@company.com");
    dir.users.remove(&erin);
    let alice = id_by_name(&dir, "alice@company.com");
    for g in dir.groups.values_mut() {
        g.members.remove(&Member::user(erin.clone()));
        if g.display_name == "TEAM_ALPHA" {
            g.members.remove(&Member::user(alice.clone()));
        }
    }
    let (_, r) = suite.sync(&dir, &policy).await?;
    check(
        r.is_success(),
        format!("rename, delete, member removal: {r:?}"),
    )?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    check(
        o.principals
            .get(Kind::Group)
            .values()
            .any(|g| g.principal.key == "TEAM_ETA_PLATFORM"),
        "the group is renamed",
    )?;
    check(
        suite.plan(&dir, &policy, true).await?.ops.is_empty(),
        "converged after the changes",
    )?;

    // 5. A user deactivated, where the target can.
    if caps.deactivate {
        policy.deprovision = Deprovision::Deactivate;
        let bob = id_by_name(&dir, "bob@company.com");
        dir.users.remove(&bob);
        for g in dir.groups.values_mut() {
            g.members.remove(&Member::user(bob.clone()));
        }
        let (_, r) = suite.sync(&dir, &policy).await?;
        check(r.is_success(), format!("deactivation: {r:?}"))?;
        let o = s.target.observe().await.map_err(|e| e.message)?;
        check(
            o.principals
                .get(Kind::User)
                .values()
                .any(|u| u.principal.key.contains("bob") && !u.principal.active),
            "bob is deactivated, not deleted",
        )?;
    }

    // 6. Members that come and go in one group: where the target sends a group's removals and
    //    additions together, one write does both.
    let carol = id_by_name(&dir, "carol@company.com");
    let kevin = id_by_name(&dir, "kevin@company.com");
    let epsilon = dir
        .groups
        .values_mut()
        .find(|g| g.display_name == "TEAM_EPSILON")
        .ok_or("TEAM_EPSILON")?;
    epsilon.members.remove(&Member::user(carol));
    epsilon.members.insert(Member::user(kevin));
    let (p, r) = suite.sync(&dir, &policy).await?;
    let shape: Vec<(&str, usize)> = p
        .ops
        .iter()
        .map(|o| match o {
            Op::RemoveMembers { group, members } if group.key == "TEAM_EPSILON" => {
                ("remove", members.len())
            }
            Op::AddMembers { group, members } if group.key == "TEAM_EPSILON" => {
                ("add", members.len())
            }
            _ => ("other", 0),
        })
        .collect();
    check(
        shape == [("remove", 1), ("add", 1)],
        format!("one member out, one in: {:?}", p.summary.ops),
    )?;
    check(r.is_success(), format!("members swapped: {r:?}"))?;
    let want = if s.target.combines_member_changes() {
        1
    } else {
        2
    };
    check(
        r.requests.is_none_or(|q| q.writes == want),
        format!(
            "{want} write(s) for a removal and an addition in one group: {:?}",
            r.requests
        ),
    )?;
    check(
        suite.plan(&dir, &policy, true).await?.ops.is_empty(),
        "converged after the swap",
    )?;

    // 7. A 429 storm: the next changes still converge.
    if let Some(storm) = &s.storm {
        if let Some(g) = dir
            .groups
            .values_mut()
            .find(|g| g.display_name == "TEAM_ZETA")
        {
            g.display_name = "TEAM_ZETA_2".into();
        }
        storm(true);
        let out = suite.sync(&dir, &policy).await;
        storm(false);
        let (_, r) = out?;
        check(r.is_success(), format!("a 429 storm converges: {r:?}"))?;
        let o = s.target.observe().await.map_err(|e| e.message)?;
        no_duplicates(&o, &caps)?;
        check(
            suite.plan(&dir, &policy, true).await?.ops.is_empty(),
            "converged after the storm",
        )?;
    }

    // 8. Incremental observation: after a clean apply, nothing changed reads nothing; changes read
    //    only what they touch, and plan exactly what a full observation plans.
    let incremental = |plan: Plan| match plan.observation {
        Observation::Incremental { read, .. } => Ok((plan, read)),
        Observation::Full => Err("the state's picture was trusted and the target read by id"),
    };
    let (same, read) = incremental(suite.plan(&dir, &policy, false).await?)?;
    check(
        read == 0 && same.ops.is_empty(),
        format!("nothing changed, yet {read} read: {:?}", same.ops),
    )?;
    let zed = new_user(
        &dir,
        "zed-source-id",
        "zed@company.com",
        "Zed \"the new one\" Ünal",
    )?;
    dir.users
        .insert(zed.id.clone(), std::sync::Arc::new(zed.clone()));
    for g in dir.groups.values_mut() {
        if g.display_name == "TEAM_ALPHA" {
            g.members.insert(Member::user(zed.id.clone()));
            g.members.insert(Member::user(alice.clone()));
        }
    }
    let mut fresh = dir.groups.values().next().cloned().ok_or("a group")?;
    fresh.id = "new-group-source-id".into();
    fresh.display_name = "TEAM_NEW".into();
    fresh.members = [Member::user(zed.id.clone())].into();
    dir.groups.insert(fresh.id.clone(), fresh);
    let (inc, read) = incremental(suite.plan(&dir, &policy, false).await?)?;
    let bulk = suite.plan(&dir, &policy, true).await?;
    check(
        inc.ops == bulk.ops,
        format!(
            "incremental plan {:?} differs from the bulk plan {:?}",
            inc.ops, bulk.ops
        ),
    )?;
    check(
        read > 0 && read <= 4,
        format!("{read} principals read for 2 new ones and one group"),
    )?;
    let opts = RunOptions {
        reconcile: Some(Duration::from_secs(3600)),
        ..RunOptions::default()
    };
    let out = suite
        .run(s.target, &suite.store, &dir, &policy, opts)
        .await?;
    let applied = out.file.map(|f| f.plan).ok_or("a plan")?;
    check(
        matches!(applied.observation, Observation::Incremental { .. }),
        "the sync observed incrementally too",
    )?;
    let r = out.report.ok_or("the incremental plan was applied")?;
    check(
        r.is_success(),
        format!("the incremental plan applies: {r:?}"),
    )?;
    check(
        suite.plan(&dir, &policy, true).await?.ops.is_empty(),
        "converged after the incremental plan",
    )?;

    rollback(&suite, &mut dir, &policy).await
}

/// The conformance suite's rollback steps (`on_apply_error = "rollback"`): a conflict in the
/// middle of an apply leaves the target and the state as they were before the run; an undo the
/// target refuses stays in the journal and the next run finishes it; a crash in the middle of an
/// apply is rolled back by the next run, which then converges.
async fn rollback(
    suite: &Suite<'_, '_>,
    dir: &mut Snapshot,
    policy: &Policy,
) -> Result<(), String> {
    let s = suite.s;
    let caps = s.target.capabilities();
    let policy = Policy {
        on_apply_error: idsync_engine::OnApplyError::Rollback,
        ..policy.clone()
    };
    // Changes of every kind: a user and a group created, members added and removed, a group
    // renamed where the target renames, a display name changed where the target keeps it.
    let rollie = new_user(dir, "rollie-source-id", "rollie@company.com", "Rollie Back")?;
    dir.users
        .insert(rollie.id.clone(), std::sync::Arc::new(rollie.clone()));
    let alice = id_by_name(dir, "alice@company.com");
    let zed = id_by_name(dir, "zed@company.com");
    for g in dir.groups.values_mut() {
        if g.display_name == "TEAM_ALPHA" {
            g.members.insert(Member::user(rollie.id.clone()));
            g.members.remove(&Member::user(alice.clone()));
        }
        if g.display_name == "TEAM_NEW" {
            g.display_name = "TEAM_NEW_RENAMED".into();
            g.members.insert(Member::user(alice.clone()));
            g.members.remove(&Member::user(zed.clone()));
        }
    }
    let mut fresh = dir.groups.values().next().cloned().ok_or("a group")?;
    fresh.id = "rollback-group-source-id".into();
    fresh.display_name = "TEAM_ROLLBACK".into();
    fresh.members = [Member::user(rollie.id.clone()), Member::user(alice.clone())].into();
    dir.groups.insert(fresh.id.clone(), fresh);
    if let Some(u) = dir.user_mut(&alice) {
        u.display_name = "Alice Renamed".into();
    }

    let before = s.target.observe().await.map_err(|e| e.message)?;
    let state_before = suite
        .store
        .load(AGREEMENT)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("a state")?;
    let plan = suite.plan(dir, &policy, true).await?;
    check(
        plan.ops.iter().any(|o| matches!(o, Op::Create { .. }))
            && plan.ops.iter().any(|o| matches!(o, Op::AddMembers { .. })),
        format!("a plan that creates and adds: {:?}", plan.summary.ops),
    )?;
    // The last member addition fails with a conflict: every other kind of write ran before it.
    let last_add = plan
        .ops
        .iter()
        .rev()
        .find(|o| matches!(o, Op::AddMembers { .. }))
        .map(|o| o.subject().1.to_owned())
        .ok_or("an addition")?;
    let conflict = |op: &Op| {
        (matches!(op, Op::AddMembers { .. }) && op.subject().1 == last_add)
            .then(|| TargetError::new(TargetErrorKind::AlreadyExists, "injected conflict"))
    };
    let failing = FailWhen::new(s.target, conflict);
    let opts = RunOptions {
        workers: 1,
        reconcile: None,
        ..RunOptions::default()
    };
    let out = suite
        .run(&failing, &suite.store, dir, &policy, opts.clone())
        .await?;
    let report = out.report.ok_or("the apply ran")?;
    let rb = report
        .rollback
        .clone()
        .ok_or(format!("a rollback: {report:?}"))?;
    check(
        out.code == crate::exit::HALTED && rb.complete() && rb.undone > 2,
        format!("a complete rollback exits 3: code {}, {rb:?}", out.code),
    )?;
    check(
        report.writes > 2,
        format!("writes ran before the conflict: {report:?}"),
    )?;
    let after = s.target.observe().await.map_err(|e| e.message)?;
    same_target(&before, &after)?;
    let state_after = suite
        .store
        .load(AGREEMENT)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("a state")?;
    check(
        state_after.links == state_before.links
            && state_after.owned == state_before.owned
            && state_after.journal.is_none()
            && state_after.cursors == state_before.cursors
            && state_after.last_applied == state_before.last_applied,
        format!(
            "the state is as it was before the run: links {:?} / {:?}, owned {:?} / {:?}, journal {:?}",
            state_after.links,
            state_before.links,
            state_after.owned,
            state_before.owned,
            state_after.journal
        ),
    )?;

    // An undo the target refuses: the rollback is incomplete (exit 1), the journal keeps it, and
    // the next run finishes it before it plans, then applies.
    let refuse = |op: &Op| {
        conflict(op).or_else(|| {
            matches!(op, Op::Delete { target, .. } if target.kind == Kind::User && target.key.contains("rollie")).then(
                || TargetError::new(TargetErrorKind::Unavailable, "injected outage"),
            )
        })
    };
    let refusing = FailWhen::new(s.target, refuse);
    let out = suite
        .run(&refusing, &suite.store, dir, &policy, opts.clone())
        .await?;
    let rb = out.report.and_then(|r| r.rollback).ok_or("a rollback")?;
    check(
        out.code == crate::exit::ERROR && rb.failed.len() == 1,
        format!("an incomplete rollback exits 1: code {}, {rb:?}", out.code),
    )?;
    let left = suite
        .store
        .load(AGREEMENT)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|st| st.journal)
        .ok_or("the journal keeps what is left")?;
    check(
        left.rolling_back && left.undo.len() == 1,
        format!("one undo left: {:?}", left.undo),
    )?;
    let (_, r) = suite.sync(dir, &policy).await?;
    check(
        r.is_success() && r.rollback.is_none(),
        format!("the next run finishes and applies: {r:?}"),
    )?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    no_duplicates(&o, &caps)?;
    check(
        suite.plan(dir, &policy, true).await?.ops.is_empty(),
        "converged after the finished rollback",
    )?;

    // The process dies in the middle of a rollback, after two undo writes: the journal holds the
    // rollback in progress, and the next run, fault-free, finishes it, then plans and applies.
    let mut later = dir.clone();
    let mut extra = rollie.clone();
    extra.id = "midway-source-id".into();
    extra.user_name = "midway@company.com".into();
    extra.emails = vec!["midway@company.com".into()];
    let mut second = extra.clone();
    second.id = "midway-2-source-id".into();
    second.user_name = "midway2@company.com".into();
    second.emails = vec!["midway2@company.com".into()];
    for u in [&extra, &second] {
        later
            .users
            .insert(u.id.clone(), std::sync::Arc::new(u.clone()));
        for g in later.groups.values_mut() {
            if g.display_name == "TEAM_ALPHA" || g.display_name == "TEAM_ROLLBACK" {
                g.members.insert(Member::user(u.id.clone()));
            }
        }
    }
    let plan = suite.plan(&later, &policy, true).await?;
    let last_add = plan
        .ops
        .iter()
        .rev()
        .find(|o| matches!(o, Op::AddMembers { .. }))
        .map(|o| o.subject().1.to_owned())
        .ok_or("an addition")?;
    let conflicted = std::sync::atomic::AtomicBool::new(false);
    let undo_writes = AtomicUsize::new(0);
    let dies_in_rollback = |op: &Op| {
        if conflicted.load(Ordering::SeqCst) {
            return (undo_writes.fetch_add(1, Ordering::SeqCst) >= 2)
                .then(|| TargetError::new(TargetErrorKind::Unavailable, "the process died here"));
        }
        (matches!(op, Op::AddMembers { .. }) && op.subject().1 == last_add).then(|| {
            conflicted.store(true, Ordering::SeqCst);
            TargetError::new(TargetErrorKind::AlreadyExists, "injected conflict")
        })
    };
    let failing = FailWhen::new(s.target, dies_in_rollback);
    let dying = CommitsThenDies::new(&suite.store, 2);
    let died = suite
        .run(&failing, &dying, &later, &policy, opts.clone())
        .await;
    check(
        died.is_err(),
        format!("the crash in the rollback is reported: {died:?}"),
    )?;
    let mid = suite
        .store
        .load(AGREEMENT)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|st| st.journal)
        .ok_or("the journal of the rollback in progress")?;
    check(
        mid.rolling_back && mid.undo.len() >= 2 && undo_writes.load(Ordering::SeqCst) > 2,
        format!("a rollback in progress was journaled: {mid:?}"),
    )?;
    let (_, r) = suite.sync(&later, &policy).await?;
    check(
        r.is_success() && r.rollback.is_none(),
        format!("the run after the crash finishes the rollback and applies: {r:?}"),
    )?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    no_duplicates(&o, &caps)?;
    check(
        suite.plan(&later, &policy, true).await?.ops.is_empty(),
        "converged after the crash in the rollback",
    )?;
    *dir = later;

    // A crash in the middle of an apply that is to be rolled back: the next run rolls it back
    // (the target as it was), then plans and applies.
    let mut later = dir.clone();
    for g in later.groups.values_mut() {
        if g.display_name == "TEAM_ROLLBACK" {
            g.members.remove(&Member::user(alice.clone()));
        }
    }
    let mut extra = rollie.clone();
    extra.id = "crash-source-id".into();
    extra.user_name = "crash@company.com".into();
    extra.emails = vec!["crash@company.com".into()];
    later
        .users
        .insert(extra.id.clone(), std::sync::Arc::new(extra.clone()));
    for g in later.groups.values_mut() {
        if g.display_name == "TEAM_ALPHA" {
            g.members.insert(Member::user(extra.id.clone()));
        }
    }
    let crashing = CrashAfter::new(s.target, 1);
    let dying = CommitsThenDies::new(&suite.store, 1);
    let died = suite.run(&crashing, &dying, &later, &policy, opts).await;
    check(died.is_err(), "the crash is reported")?;
    let (_, r) = suite.sync(&later, &policy).await?;
    check(
        r.is_success(),
        format!("the run after the crash converges: {r:?}"),
    )?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    no_duplicates(&o, &caps)?;
    check(
        suite.plan(&later, &policy, true).await?.ops.is_empty(),
        "converged after the crash",
    )?;
    *dir = later;
    Ok(())
}

/// The same principals (ids, attributes, policies) and memberships.
fn same_target(before: &Observed, after: &Observed) -> Result<(), String> {
    for k in Kind::ALL {
        let (b, a) = (before.principals.get(k), after.principals.get(k));
        let gone: Vec<_> = b.keys().filter(|id| !a.contains_key(*id)).collect();
        let new: Vec<_> = a
            .iter()
            .filter(|(id, _)| !b.contains_key(*id))
            .map(|(_, p)| &p.principal.key)
            .collect();
        let changed: Vec<_> = a
            .iter()
            .filter(|(id, p)| b.get(*id).is_some_and(|q| q != *p))
            .map(|(_, p)| &p.principal.key)
            .collect();
        check(
            gone.is_empty() && new.is_empty() && changed.is_empty(),
            format!("{k}s after the rollback: gone {gone:?}, new {new:?}, changed {changed:?}"),
        )?;
    }
    let members = |o: &Observed| -> Vec<(String, Vec<String>)> {
        o.members
            .iter()
            .filter(|(_, m)| Kind::ALL.iter().any(|k| !m.get(*k).is_empty()))
            .map(|(g, m)| {
                (
                    g.clone(),
                    Kind::ALL
                        .iter()
                        .flat_map(|k| m.get(*k).iter().cloned())
                        .collect(),
                )
            })
            .collect()
    };
    check(
        members(before) == members(after),
        format!(
            "memberships after the rollback: {:?}, before: {:?}",
            members(after),
            members(before)
        ),
    )
}

/// The source conformance check: folding a source's changes into the snapshot of a full read
/// equals a full read of the directory now. Reads `source` in full under `scope`, lets `change`
/// edit the directory, reads the changes since the first read's cursors, reads in full again, and
/// compares the two snapshots (and the depth each group was found at).
pub async fn source_conformance<F, Fut>(
    source: &dyn idsync_engine::Source,
    scope: &Scope,
    change: F,
) -> Result<(), String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let first = source
        .read_full(scope)
        .await
        .map_err(|e| format!("the first full read: {e}"))?;
    change().await;
    let inc = match source
        .read_changes(scope, &first.snapshot, &first.cursors)
        .await
        .map_err(|e| format!("reading the changes: {e}"))?
    {
        idsync_engine::Changes::Read(r) => r,
        other => return Err(format!("the source read no changes: {other:?}")),
    };
    let full = source
        .read_full(scope)
        .await
        .map_err(|e| format!("the second full read: {e}"))?;
    check(
        inc.mode == idsync_model::ReadMode::Incremental,
        "the change read says it is incremental",
    )?;
    let (a, b) = (&inc.snapshot, &full.snapshot);
    let differ = |what: &str, x: Vec<String>, y: Vec<String>| {
        check(
            x == y,
            format!("{what} differ: folded {x:?}, full read {y:?}"),
        )
    };
    let fmt = |m: &dyn std::fmt::Debug| format!("{m:?}");
    differ(
        "users",
        a.users.values().map(|u| fmt(u)).collect(),
        b.users.values().map(|u| fmt(u)).collect(),
    )?;
    differ(
        "service principals",
        a.service_principals.values().map(|s| fmt(s)).collect(),
        b.service_principals.values().map(|s| fmt(s)).collect(),
    )?;
    differ(
        "groups",
        a.groups.values().map(|g| fmt(g)).collect(),
        b.groups.values().map(|g| fmt(g)).collect(),
    )?;
    differ(
        "groups beyond the search depth",
        a.edge_groups.values().map(|g| fmt(g)).collect(),
        b.edge_groups.values().map(|g| fmt(g)).collect(),
    )?;
    check(a == b, "the snapshots differ (incomplete groups)")?;
    check(
        inc.depth == full.depth,
        format!(
            "group depths differ: folded {:?}, full read {:?}",
            inc.depth, full.depth
        ),
    )
}
