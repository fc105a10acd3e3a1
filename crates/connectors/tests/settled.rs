//! A run whose source reports no change (issue #17): after a run that found nothing to do, the
//! next one takes the plan from the state's record instead of mapping and planning the tenant,
//! and commits nothing until the cursors it is handed are due. These tests hold it to the plan
//! the slow way makes, to the request and the note, through `run_agreement` with the memory
//! source's change feed, for a target that nests groups and one that flattens them, under each
//! deprovision policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use async_trait::async_trait;
use idsync_connectors::sources::memory::MemorySource;
use idsync_engine::memory::MemoryTarget;
use idsync_engine::plan::Deprovision;
use idsync_engine::{Changes, Mapping, Policy, Read, Scope, Source, SourceError, TargetIdentity};
use idsync_model::state::CURSOR_REFRESH_SECS;
use idsync_model::{
    AgreementState, Capabilities, Change, Group, Member, Plan, ReadMode, Snapshot, User, UserType,
};
use idsync_runner::{Agreement, Mode, ReadCache, RunOptions, Silent, run_agreement};
use idsync_state::{MemoryStore, StateStore};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const NAME: &str = "settled";
const T0: u64 = 1_800_000_000;

fn user(id: &str, name: &str) -> User {
    User {
        id: id.into(),
        user_name: format!("{name}@corp.example"),
        display_name: name.into(),
        emails: vec![format!("{name}@corp.example")],
        active: true,
        user_type: UserType::Member,
        external_id: None,
        attributes: BTreeMap::new(),
    }
}

fn group(id: &str, name: &str, members: &[Member]) -> Group {
    Group {
        id: id.into(),
        display_name: name.into(),
        description: None,
        security_enabled: true,
        mail_enabled: false,
        members: members.iter().cloned().collect(),
    }
}

/// Nested groups, a member the source does not have and a group beyond the search depth, so
/// that the plans carry notes and counts worth comparing.
fn directory() -> Snapshot {
    let mut s = Snapshot::default();
    for (id, name) in [("u1", "ana"), ("u2", "bo"), ("u3", "cy"), ("u4", "di")] {
        s.users
            .insert(id.into(), std::sync::Arc::new(user(id, name)));
    }
    let groups = [
        group(
            "g1",
            "TEAM_A",
            &[Member::user("u1"), Member::user("u2"), Member::group("g2")],
        ),
        group(
            "g2",
            "TEAM_B",
            &[
                Member::user("u3"),
                Member::user("ghost"),
                Member::group("g3"),
            ],
        ),
        group("g3", "TEAM_C", &[Member::user("u4"), Member::group("g4")]),
        group("g4", "TEAM_D", &[Member::user("u1")]),
    ];
    for g in groups {
        s.groups.insert(g.id.clone(), g);
    }
    s
}

fn scope() -> Scope {
    Scope {
        group_names: ["TEAM_A".to_owned()].into(),
        search_depth: 3,
        ..Scope::default()
    }
}

/// The memory source, handing a new cursor on every read as Microsoft Graph hands a new delta
/// token (`calls`), which it does not need to read from.
struct Feed {
    inner: MemorySource,
    calls: AtomicU64,
}

impl Feed {
    fn stamp(&self, mut r: Read) -> Read {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        r.cursors.insert("calls".into(), n.to_string());
        r
    }
}

#[async_trait]
impl Source for Feed {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        Ok(self.stamp(self.inner.read_full(scope).await?))
    }

    async fn read_changes(
        &self,
        scope: &Scope,
        base: &Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        let mut mine = cursors.clone();
        mine.remove("calls");
        Ok(match self.inner.read_changes(scope, base, &mine).await? {
            Changes::Read(r) => Changes::Read(self.stamp(r)),
            other => other,
        })
    }
}

struct World {
    source: Feed,
    target: MemoryTarget,
    store: MemoryStore,
    mapping: Mapping,
    policy: Policy,
    scope: std::sync::Mutex<Scope>,
}

impl World {
    fn new(caps: Capabilities, deprovision: Deprovision) -> World {
        World {
            source: Feed {
                inner: MemorySource::new(directory()),
                calls: AtomicU64::new(0),
            },
            target: MemoryTarget::new(caps),
            store: MemoryStore::in_memory(),
            mapping: Mapping::defaults(),
            policy: Policy {
                deprovision,
                max_deletions_percent: Some(100),
                ..Policy::default()
            },
            scope: std::sync::Mutex::new(scope()),
        }
    }

    async fn run_on(&self, store: &dyn StateStore, mode: Mode, now: u64) -> (u8, Plan) {
        let a = Agreement {
            name: NAME,
            target: &self.target,
            identity: TargetIdentity::new("memory", "settled"),
            describe: "the memory target".into(),
            mapping: &self.mapping,
            policy: &self.policy,
        };
        let opts = RunOptions {
            mode,
            now: Some(now),
            ..RunOptions::default()
        };
        let scope = self.scope.lock().unwrap().clone();
        let out = run_agreement(
            &a,
            store,
            &self.source,
            &scope,
            &mut ReadCache::default(),
            &opts,
            &mut Silent,
        )
        .await
        .unwrap();
        (out.code, out.file.unwrap().plan)
    }

    async fn run(&self, mode: Mode, now: u64) -> (u8, Plan) {
        self.run_on(&self.store, mode, now).await
    }

    async fn state(&self) -> AgreementState {
        self.store.load(NAME).await.unwrap().unwrap()
    }

    /// The plan the slow way makes from the same state: a copy of it at the same version
    /// without the record of the last quiet run.
    async fn slow_plan(&self, now: u64) -> Plan {
        self.plan_from(now, |_| {}).await
    }

    /// The plan made from a copy of the state at the same version, without the record of the
    /// last quiet run and as `edit` leaves it.
    async fn plan_from(&self, now: u64, edit: impl FnOnce(&mut AgreementState)) -> Plan {
        let mut st = self.state().await;
        let version = st.version;
        st.settled = None;
        edit(&mut st);
        let copy = MemoryStore::in_memory();
        for v in 0..version {
            st.version = v;
            copy.commit(&st).await.unwrap();
        }
        self.run_on(&copy, Mode::Plan, now).await.1
    }
}

async fn settles(caps: Capabilities, deprovision: Deprovision) {
    let w = World::new(caps, deprovision);
    let (code, first) = w.run(Mode::Sync, T0).await;
    assert_eq!(code, 0, "{first:?}");
    assert!(!first.ops.is_empty());
    assert!(
        w.state().await.settled.is_none(),
        "a run that wrote is not quiet"
    );

    // The first run without a change plans the slow way and records what it found.
    let (code, quiet) = w.run(Mode::Sync, T0 + 60).await;
    assert_eq!(code, 0, "{quiet:?}");
    assert!(quiet.ops.is_empty(), "{quiet:?}");
    let st = w.state().await;
    let recorded = st.settled.clone().expect("a quiet run records itself");
    assert_eq!(recorded.version, st.version);
    assert!(
        quiet
            .notes
            .iter()
            .any(|n| n.contains("users or service principals the source does not have")),
        "the plans carry notes worth comparing: {:?}",
        quiet.notes
    );

    // The next one takes it: the same plan as the slow way, no request to the target, no commit.
    let writes = w.target.writes();
    let reads = w.target.reads();
    let version = st.version;
    let (code, fast) = w.run(Mode::Sync, T0 + 120).await;
    assert_eq!(code, 0);
    assert_eq!(fast, w.slow_plan(T0 + 120).await);
    assert_eq!(w.target.writes(), writes);
    assert_eq!(w.target.reads(), reads);
    assert_eq!(w.state().await.version, version, "nothing to commit");
    let (code, planned) = w.run(Mode::Plan, T0 + 130).await;
    assert_eq!(code, 0);
    assert_eq!(planned, w.slow_plan(T0 + 130).await);

    // Once the committed cursors are due, the newer ones are committed, and the record with them.
    let due = T0 + 60 + CURSOR_REFRESH_SECS;
    let before = w.state().await;
    w.run(Mode::Sync, due).await;
    let after = w.state().await;
    assert_eq!(after.version, before.version + 1);
    assert_ne!(after.cursors, before.cursors);
    assert_eq!(after.cursors_at, Some(due));
    assert_eq!(after.last_applied, before.last_applied);
    assert_eq!(
        after.settled.as_ref().map(|s| s.version),
        Some(after.version)
    );
    w.run(Mode::Sync, due + 60).await;
    assert_eq!(w.state().await.version, after.version, "not due again");

    // A change in the source plans the slow way and applies it; the record is gone until a run
    // finds nothing to do again.
    w.source.inner.edit(Change::UpsertUser(user("u2", "bob")));
    let (code, changed) = w.run(Mode::Sync, due + 120).await;
    assert_eq!(code, 0, "{changed:?}");
    assert!(!changed.ops.is_empty(), "{changed:?}");
    assert!(w.state().await.settled.is_none());
    let v = w.state().await.version;
    w.run(Mode::Sync, due + 180).await;
    assert_eq!(w.state().await.version, v + 1, "the slow way commits");
    let (_, fast) = w.run(Mode::Sync, due + 240).await;
    assert_eq!(w.state().await.version, v + 1, "the quick way does not");
    assert_eq!(fast, w.slow_plan(due + 240).await);

    // Any other commit (here one that changes nothing) makes the record stale.
    let st = w.state().await;
    w.store.commit(&st).await.unwrap();
    let v = w.state().await.version;
    w.run(Mode::Sync, due + 300).await;
    assert_eq!(
        w.state().await.version,
        v + 1,
        "a stale record plans the slow way"
    );

    // Past the reconcile interval the target is observed in full again, the slow way.
    let reads = w.target.reads();
    w.run(Mode::Sync, due + 2 * 24 * 3600).await;
    assert!(w.target.reads().0 > reads.0, "observed in full");
}

#[tokio::test]
async fn a_target_that_nests_settles() {
    settles(Capabilities::full(), Deprovision::Delete).await;
}

#[tokio::test]
async fn a_target_that_flattens_settles_and_keeps_what_left() {
    let caps = Capabilities {
        nested_groups: false,
        service_principals: false,
        service_principal_members: false,
        ..Capabilities::full()
    };
    settles(caps, Deprovision::None).await;
}

/// A principal that left while `deprovision = "none"` keeps being counted as kept: the count
/// comes back from the record as the slow way computes it.
#[tokio::test]
async fn what_was_kept_is_still_counted() {
    let w = World::new(Capabilities::full(), Deprovision::None);
    w.run(Mode::Sync, T0).await;
    w.source.inner.edit(Change::Remove(Member::user("u2")));
    w.run(Mode::Sync, T0 + 60).await;
    w.run(Mode::Sync, T0 + 120).await;
    let (_, fast) = w.run(Mode::Plan, T0 + 180).await;
    assert!(fast.summary.kept > 0, "{:?}", fast.summary);
    assert_eq!(fast, w.slow_plan(T0 + 180).await);
}

/// The change feed's cursors say what changed within the scope they were read under: a scope
/// changed in the configuration (here the search depth) is read in full on the next run, even
/// when the feed reports no change and the last run was quiet, in both directions.
#[tokio::test]
async fn a_changed_scope_is_read_in_full() {
    let w = World::new(Capabilities::full(), Deprovision::Delete);
    w.run(Mode::Sync, T0).await;
    w.run(Mode::Sync, T0 + 60).await;
    assert!(w.state().await.settled.is_some(), "quiet");
    let groups = |st: &AgreementState| -> Vec<String> {
        let snap = st.last_applied.as_ref().unwrap();
        snap.groups
            .values()
            .map(|g| g.display_name.clone())
            .collect()
    };
    assert_eq!(groups(&w.state().await), ["TEAM_A", "TEAM_B", "TEAM_C"]);

    w.scope.lock().unwrap().search_depth = 1;
    let (code, narrowed) = w.run(Mode::Sync, T0 + 120).await;
    assert_eq!(code, 0, "{narrowed:?}");
    assert_eq!(narrowed.mode, ReadMode::Full, "{narrowed:?}");
    assert!(
        narrowed
            .ops
            .iter()
            .any(|o| format!("{o:?}").contains("TEAM_B")),
        "the groups beyond the new depth are deprovisioned: {narrowed:?}"
    );
    assert_eq!(groups(&w.state().await), ["TEAM_A"]);
    let (_, again) = w.run(Mode::Sync, T0 + 180).await;
    assert!(again.ops.is_empty(), "{again:?}");
    assert_eq!(
        again.mode,
        ReadMode::Incremental,
        "read incrementally again"
    );

    w.scope.lock().unwrap().search_depth = 3;
    let (_, widened) = w.run(Mode::Sync, T0 + 240).await;
    assert_eq!(widened.mode, ReadMode::Full);
    assert!(!widened.ops.is_empty(), "{widened:?}");
    assert_eq!(groups(&w.state().await), ["TEAM_A", "TEAM_B", "TEAM_C"]);

    // Cursors that do not say their scope (an earlier build stored them) are read past once.
    let (_, quiet) = w.run(Mode::Sync, T0 + 300).await;
    assert_eq!(quiet.mode, ReadMode::Incremental);
    let mut st = w.state().await;
    assert!(st.cursors.remove("idsync.scope").is_some());
    w.store.commit(&st).await.unwrap();
    let (_, once) = w.run(Mode::Sync, T0 + 360).await;
    assert_eq!(once.mode, ReadMode::Full);
    assert!(once.ops.is_empty(), "{once:?}");
    let (_, after) = w.run(Mode::Sync, T0 + 420).await;
    assert_eq!(after.mode, ReadMode::Incremental);
}

/// A record made by another build, or a run asked to stop, plans the slow way.
#[tokio::test]
async fn another_build_or_a_stop_plans_the_slow_way() {
    let w = World::new(Capabilities::full(), Deprovision::Delete);
    w.run(Mode::Sync, T0).await;
    w.run(Mode::Sync, T0 + 60).await;
    let v = w.state().await.version;
    w.run(Mode::Sync, T0 + 120).await;
    assert_eq!(w.state().await.version, v, "the quick way, no commit");

    let mut st = w.state().await;
    let s = st.settled.as_mut().unwrap();
    s.build = "idsync 0.0.0".into();
    s.version = st.version + 1;
    w.store.commit(&st).await.unwrap();
    w.run(Mode::Sync, T0 + 180).await;
    assert_eq!(w.state().await.version, v + 2, "the slow way commits");
    let settled = w.state().await.settled.unwrap();
    assert_ne!(
        settled.build, "idsync 0.0.0",
        "recorded again by this build"
    );

    let v = w.state().await.version;
    let a = Agreement {
        name: NAME,
        target: &w.target,
        identity: TargetIdentity::new("memory", "settled"),
        describe: "the memory target".into(),
        mapping: &w.mapping,
        policy: &w.policy,
    };
    let opts = RunOptions {
        mode: Mode::Sync,
        now: Some(T0 + 60 + CURSOR_REFRESH_SECS),
        stop: Some(Arc::new(std::sync::atomic::AtomicBool::new(true))),
        ..RunOptions::default()
    };
    let out = run_agreement(
        &a,
        &w.store,
        &w.source,
        &scope(),
        &mut ReadCache::default(),
        &opts,
        &mut Silent,
    )
    .await;
    assert!(
        out.as_ref().map_or(true, |o| o.code != 0),
        "a run asked to stop does not end as if it synced"
    );
    assert_eq!(
        w.state().await.version,
        v,
        "and commits nothing, due cursors or not"
    );
}

/// What the plan says of how it was made: planned on what changed alone, with how many
/// principals, or on the whole tenant.
fn touched(plan: &Plan) -> Option<usize> {
    match plan.observation {
        idsync_model::Observation::Incremental { touched, .. } => touched,
        idsync_model::Observation::Full => None,
    }
}

impl World {
    /// The plan made from the same state on the whole tenant: a copy of it whose trust carries
    /// no totals (as a state from an earlier build), with the record of the last quiet run gone.
    async fn whole_plan(&self, now: u64) -> Plan {
        self.plan_from(now, |st| {
            if let Some(t) = &mut st.trust {
                t.totals = None;
            }
        })
        .await
    }
}

/// The plan without how it was made, to compare a plan on the change with the plan on the whole.
fn made(mut plan: Plan) -> Plan {
    if let idsync_model::Observation::Incremental { touched, .. } = &mut plan.observation {
        *touched = None;
    }
    if let Some(t) = &mut plan.trust {
        t.totals = None;
    }
    plan
}

/// After a clean apply, a change is planned on what it touches alone (issue #17): the same plan
/// as the whole tenant's, field by field, and the totals the apply records are those the whole
/// plan would record.
async fn plans_on_the_change(caps: Capabilities, deprovision: Deprovision) {
    let w = World::new(caps, deprovision);
    let (code, first) = w.run(Mode::Sync, T0).await;
    assert_eq!(code, 0, "{first:?}");
    assert_eq!(touched(&first), None, "the first run observes in full");
    let totals = w.state().await.trust.and_then(|t| t.totals);
    assert!(totals.is_some_and(|t| t.principals == 7), "{totals:?}");

    // A rename, a member leaving and a user leaving the source: each planned on the change.
    let changes = [
        Change::UpsertUser(user("u2", "bob")),
        Change::RemoveMember {
            group: "g3".into(),
            member: Member::user("u4"),
        },
        Change::Remove(Member::user("u3")),
    ];
    for (i, change) in changes.into_iter().enumerate() {
        let now = T0 + 60 * (i as u64 + 1);
        w.source.inner.edit(change.clone());
        let (code, planned) = w.run(Mode::Plan, now).await;
        assert_eq!(
            code,
            idsync_runner::exit::PENDING,
            "{change:?} pends: {planned:?}"
        );
        let n = touched(&planned).expect("planned on the change");
        // Flattened, this directory's groups are one chain: a change anywhere reaches all.
        assert!(
            n < 7 || !idsync_engine::Target::capabilities(&w.target).nested_groups,
            "{change:?} touched {n} principals"
        );
        let whole = w.whole_plan(now).await;
        assert_eq!(touched(&whole), None);
        assert_eq!(made(planned.clone()), made(whole.clone()), "{change:?}");
        let (code, applied) = w.run(Mode::Sync, now).await;
        assert_eq!(code, 0, "{applied:?}");
        assert_eq!(made(applied), made(planned));
        // What the apply recorded is what the whole plan of the tenant now counts.
        let recorded = w.state().await.trust.and_then(|t| t.totals);
        let counted = w.whole_plan(now + 1).await.trust.and_then(|t| t.totals);
        assert_eq!(recorded, counted, "after {change:?}");
    }
    // Nothing left to do, said on the change as the whole plan says it.
    let (code, quiet) = w.run(Mode::Plan, T0 + 600).await;
    assert_eq!(code, 0, "{quiet:?}");
    assert_eq!(touched(&quiet), Some(0));
    assert!(quiet.ops.is_empty());
    assert_eq!(made(quiet), made(w.whole_plan(T0 + 600).await));
    assert_eq!(w.run(Mode::Sync, T0 + 660).await.0, 0);
}

#[tokio::test]
async fn a_target_that_nests_plans_on_the_change() {
    plans_on_the_change(Capabilities::full(), Deprovision::Delete).await;
}

#[tokio::test]
async fn a_target_that_flattens_plans_on_the_change_and_keeps_what_left() {
    let caps = Capabilities {
        nested_groups: false,
        service_principals: false,
        service_principal_members: false,
        ..Capabilities::full()
    };
    plans_on_the_change(caps, Deprovision::None).await;
}

/// A state from an earlier build records no totals: the next change is planned on the whole
/// tenant, and the apply records them, so the change after it is planned on the change.
#[tokio::test]
async fn a_state_without_totals_plans_the_whole_tenant_once() {
    let w = World::new(Capabilities::full(), Deprovision::Delete);
    w.run(Mode::Sync, T0).await;
    let mut st = w.state().await;
    st.trust.as_mut().unwrap().totals = None;
    w.store.commit(&st).await.unwrap();
    w.source.inner.edit(Change::UpsertUser(user("u2", "bob")));
    let (code, whole) = w.run(Mode::Sync, T0 + 60).await;
    assert_eq!(code, 0, "{whole:?}");
    assert_eq!(touched(&whole), None);
    assert!(!whole.ops.is_empty());
    assert!(w.state().await.trust.and_then(|t| t.totals).is_some());
    w.source.inner.edit(Change::UpsertUser(user("u2", "bobby")));
    let (code, delta) = w.run(Mode::Sync, T0 + 120).await;
    assert_eq!(code, 0, "{delta:?}");
    assert!(touched(&delta).is_some_and(|n| n > 0), "{delta:?}");
}
