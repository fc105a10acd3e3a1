//! The conformance suite every target runs (issue #5), through the real engine: a crash after half
//! of the first apply then a re-run that converges with nothing duplicated; a second run with zero
//! writes; nested groups kept or flattened as the target declares; a group renamed, a user deleted
//! and a member removed; a user deactivated where the target can; a 429 storm that converges.

use idsync_emulators::infra::{Infra, ThrottleConfig};
use idsync_engine::apply::{self, ApplyOptions, ApplyReport};
use idsync_engine::observe::plan_incrementally;
use idsync_engine::plan::Deprovision;
use idsync_engine::{
    Mapping, Outcome, Policy, Target, TargetError, TargetErrorKind, map_snapshot, plan,
};
use idsync_model::{
    AgreementState, Capabilities, Kind, Member, Observation, Observed, Op, Plan, PlanFile,
    ReadMode, Snapshot,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A target that "crashes" (fails every operation) once it has executed `budget` operations.
struct CrashAfter<'a> {
    inner: &'a dyn Target,
    budget: AtomicUsize,
}

#[async_trait::async_trait]
impl Target for CrashAfter<'_> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self) -> Result<Observed, TargetError> {
        self.inner.observe().await
    }
    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
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

/// A 429 storm an emulator can be told to start and stop: a bucket of 3 requests, refilled at
/// 200 a second.
pub fn storm(infra: &Infra) -> Box<dyn Fn(bool) + Send + Sync + '_> {
    Box::new(move |on: bool| {
        infra.set_throttle(on.then_some(ThrottleConfig {
            capacity: 3.0,
            per_second: 200.0,
        }))
    })
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

fn plan_now(
    s: &Subject<'_>,
    dir: &Snapshot,
    st: &AgreementState,
    policy: &Policy,
    observed: &Observed,
) -> Plan {
    let caps = s.target.capabilities();
    let desired = map_snapshot(dir, &s.mapping, &caps);
    plan(&desired, observed, st, policy, &caps, ReadMode::Full)
}

async fn sync_with(
    target: &dyn Target,
    s: &Subject<'_>,
    dir: &Snapshot,
    st: &mut AgreementState,
    policy: &Policy,
) -> Result<(Plan, ApplyReport), String> {
    let observed = target.observe().await.map_err(|e| e.message)?;
    let p = plan_now(s, dir, st, policy, &observed);
    if let Some(h) = &p.halt {
        return Err(format!("the plan halted: {h:?}"));
    }
    let caps = target.capabilities();
    apply::begin(&p, &caps, st);
    let r = apply::apply(&p, target, st, &ApplyOptions::default()).await;
    let file = PlanFile {
        plan: p.clone(),
        snapshot: dir.clone().into(),
        cursors: Default::default(),
    };
    apply::finish(&file, &r, &caps, st, true);
    st.version += 1;
    Ok((p, r))
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

fn id_by_name(dir: &Snapshot, user: &str) -> String {
    dir.users
        .values()
        .find(|u| u.user_name == user)
        .map(|u| u.id.clone())
        .unwrap_or_default()
}

/// Runs the suite on `s`, starting from the demo directory `dir` and an empty target.
pub async fn run(s: Subject<'_>, mut dir: Snapshot) -> Result<(), String> {
    let caps = s.target.capabilities();
    let mut policy = Policy {
        deprovision: Deprovision::Delete,
        max_deletions: Some(100),
        max_deletions_percent: Some(100),
        ..Policy::default()
    };

    // 1. The first apply dies half-way; the state holds only the journal written before the first
    //    write (the worst case). The re-run recognises what the dead run created.
    let observed = s.target.observe().await.map_err(|e| e.message)?;
    let first = plan_now(&s, &dir, &AgreementState::new("c"), &policy, &observed);
    let half = first.ops.len() / 2;
    check(
        half > 2,
        format!("a first plan worth cutting ({} ops)", first.ops.len()),
    )?;
    let crashing = CrashAfter {
        inner: s.target,
        budget: AtomicUsize::new(half),
    };
    let mut st = AgreementState::new("c");
    let (p, r) = sync_with(&crashing, &s, &dir, &mut st, &policy).await?;
    check(!r.is_success(), "the crash is reported")?;
    let mut st = AgreementState::new("c");
    apply::begin(&p, &caps, &mut st);
    let (_, r) = sync_with(s.target, &s, &dir, &mut st, &policy).await?;
    check(r.is_success(), format!("the re-run converges: {r:?}"))?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    no_duplicates(&o, &caps)?;

    // 2. A second run writes nothing.
    let p = plan_now(&s, &dir, &st, &policy, &o);
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
    let (_, r) = sync_with(s.target, &s, &dir, &mut st, &policy).await?;
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
        plan_now(&s, &dir, &st, &policy, &o).ops.is_empty(),
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
        let (_, r) = sync_with(s.target, &s, &dir, &mut st, &policy).await?;
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

    // 6. A 429 storm: the next changes still converge.
    if let Some(storm) = &s.storm {
        if let Some(g) = dir
            .groups
            .values_mut()
            .find(|g| g.display_name == "TEAM_ZETA")
        {
            g.display_name = "TEAM_ZETA_2".into();
        }
        storm(true);
        let out = sync_with(s.target, &s, &dir, &mut st, &policy).await;
        storm(false);
        let (_, r) = out?;
        check(r.is_success(), format!("a 429 storm converges: {r:?}"))?;
        let o = s.target.observe().await.map_err(|e| e.message)?;
        no_duplicates(&o, &caps)?;
        check(
            plan_now(&s, &dir, &st, &policy, &o).ops.is_empty(),
            "converged after the storm",
        )?;
    }

    // 7. Incremental observation: after a clean apply, nothing changed reads nothing; changes read
    //    only what they touch, and plan exactly what a bulk observation plans.
    let prev = dir.clone();
    let prev_desired = map_snapshot(&prev, &s.mapping, &caps);
    let incremental = |dir: Snapshot, st: AgreementState, policy: Policy| {
        let prev_desired = &prev_desired;
        let s = &s;
        let caps = &caps;
        async move {
            let desired = map_snapshot(&dir, &s.mapping, caps);
            let mode = ReadMode::Incremental;
            plan_incrementally(
                s.target,
                &desired,
                prev_desired,
                &st,
                &policy,
                caps,
                mode,
                0,
                usize::MAX,
            )
            .await
            .map_err(|e| e.message)?
            .and_then(|plan| match plan.observation {
                Observation::Incremental { read, .. } => Some((plan, read)),
                Observation::Full => None,
            })
            .ok_or_else(|| "the target reads by id".to_owned())
        }
    };
    let (same, read) = incremental(dir.clone(), st.clone(), policy.clone()).await?;
    check(
        read == 0 && same.ops.is_empty(),
        format!("nothing changed, yet {read} read: {:?}", same.ops),
    )?;
    let zed = {
        let mut u = dir.users.values().next().cloned().ok_or("a user")?;
        u.id = "zed-source-id".into();
        u.user_name = "zed@company.com".into();
        u.display_name = "Zed \"the new one\" Ünal".into();
        u.emails = vec!["zed@company.com".into()];
        u
    };
    dir.users.insert(zed.id.clone(), zed.clone());
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
    let (inc, read) = incremental(dir.clone(), st.clone(), policy.clone()).await?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    let bulk = plan_now(&s, &dir, &st, &policy, &o);
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
    let r = apply::apply(&inc, s.target, &mut st, &ApplyOptions::default()).await;
    check(
        r.is_success(),
        format!("the incremental plan applies: {r:?}"),
    )?;
    let o = s.target.observe().await.map_err(|e| e.message)?;
    check(
        plan_now(&s, &dir, &st, &policy, &o).ops.is_empty(),
        "converged after the incremental plan",
    )?;
    Ok(())
}
