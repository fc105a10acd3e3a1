//! Property tests of the plan engine, on random directories, targets and policies:
//! - applying a plan to the in-memory target and planning again gives an empty plan;
//! - plans are deterministic;
//! - a principal idsync does not own (and did not adopt) is never modified;
//! - the deletion threshold halts before the first write.
//!
//! Each property runs 1,000 cases by default (`PROPTEST_CASES` overrides it).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use idsync_engine::observe::{leaves_a_faithful_picture, plan_incrementally};
use idsync_engine::{Deprovision, Mapping, MemoryTarget, OnConflict, Policy, Target, map_snapshot};
use idsync_model::{
    AgreementState, Capabilities, Kind, Member, Op, PKey, Principal, Snapshot, UserType,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

const USER_NAMES: [&str; 7] = ["a@x", "A@x", "b@x", "c@x", "d@x", "e@x", "f@x"];
const APP_IDS: [&str; 3] = ["app-1", "app-2", "APP-1"];
const GROUP_NAMES: [&str; 6] = ["G1", "g1", "G2", "G3", "G4", "G5"];

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// A random directory over a fixed id space (u0..u5, s0..s2, g0..g4), so two draws share ids and
/// differ like a directory that changed: renames, removals, new members, disabled accounts.
fn directory() -> impl Strategy<Value = Snapshot> {
    let users = prop::collection::vec(
        (
            any::<bool>(),
            0..USER_NAMES.len(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        6,
    );
    let sps = prop::collection::vec((any::<bool>(), 0..APP_IDS.len(), any::<bool>()), 3);
    let groups = prop::collection::vec(
        (
            any::<bool>(),
            0..GROUP_NAMES.len(),
            prop::collection::vec(0usize..14, 0..6),
        ),
        5,
    );
    (users, sps, groups).prop_map(|(users, sps, groups)| {
        let mut s = Snapshot::default();
        for (i, (present, name, active, guest, mail)) in users.into_iter().enumerate() {
            if !present {
                continue;
            }
            let mut u = user(&format!("u{i}"), USER_NAMES[name]);
            u.active = active;
            if guest {
                u.user_type = UserType::Guest;
                u.emails = if mail {
                    vec![format!("guest{i}@partner")]
                } else {
                    vec![]
                };
            }
            s.users.insert(u.id.clone(), std::sync::Arc::new(u));
        }
        for (i, (present, app, active)) in sps.into_iter().enumerate() {
            if present {
                let mut p = sp(&format!("s{i}"), APP_IDS[app]);
                p.active = active;
                s.service_principals.insert(p.id.clone(), p);
            }
        }
        for (i, (present, name, members)) in groups.into_iter().enumerate() {
            if !present {
                continue;
            }
            let ms: Vec<Member> = members
                .into_iter()
                .map(|m| match m {
                    0..=5 => Member::user(format!("u{m}")),
                    6..=8 => Member::service_principal(format!("s{}", m - 6)),
                    _ => Member::group(format!("g{}", m - 9)), // may be itself, or a cycle
                })
                .collect();
            s.groups.insert(
                format!("g{i}"),
                group(&format!("g{i}"), GROUP_NAMES[name], &ms),
            );
        }
        s
    })
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        1..4usize,
    )
        .prop_map(
            |(nested, sps, sp_members, ci, rename_users, deactivate, rename_groups, chunk)| {
                let mut renamable: BTreeSet<Kind> = [Kind::ServicePrincipal].into();
                if rename_users {
                    renamable.insert(Kind::User);
                }
                // Groups too, mostly: lakeFS cannot rename one (a new key is a new group).
                if rename_groups || nested {
                    renamable.insert(Kind::Group);
                }
                Capabilities {
                    nested_groups: nested,
                    service_principals: sps,
                    service_principal_members: sp_members,
                    case_insensitive_keys: ci,
                    renamable,
                    deactivate,
                    // Small, so that additions are split where the target writes in parallel.
                    max_members_per_write: chunk,
                    ..Capabilities::full()
                }
            },
        )
}

/// Principals someone created in the target by hand.
fn outsiders() -> impl Strategy<Value = Vec<(Kind, usize)>> {
    prop::collection::vec(
        prop_oneof![
            (0..USER_NAMES.len()).prop_map(|i| (Kind::User, i)),
            (0..APP_IDS.len()).prop_map(|i| (Kind::ServicePrincipal, i)),
            (0..GROUP_NAMES.len()).prop_map(|i| (Kind::Group, i)),
        ],
        0..3,
    )
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        any::<bool>(),
        any::<bool>(),
        0..3u8,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(adopt, skip, dep, yield_members, yield_name)| Policy {
            adopt,
            on_conflict: if skip {
                OnConflict::Skip
            } else {
                OnConflict::Halt
            },
            deprovision: [
                Deprovision::None,
                Deprovision::Deactivate,
                Deprovision::Delete,
            ][dep as usize],
            yield_members,
            yield_attributes: if yield_name {
                [idsync_model::Attr::DisplayName].into()
            } else {
                BTreeSet::new()
            },
            ..Policy::default()
        })
}

fn insert_outsiders(t: &MemoryTarget, o: &[(Kind, usize)]) -> Vec<(Kind, String, Principal)> {
    o.iter()
        .map(|(k, i)| {
            let key = match k {
                Kind::User => USER_NAMES[*i],
                Kind::ServicePrincipal => APP_IDS[*i],
                Kind::Group => GROUP_NAMES[*i],
            };
            let mut p = Principal::new(*k, key);
            p.display_name = Some("by hand".into());
            let id = t.insert(p.clone());
            (*k, id, p)
        })
        .collect()
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    // The runner keeps a lease alive with tokio's timers.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    // No failure files in the tree: a failure prints its minimal input, which a test can pin.
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Two syncs in a row (the directory changes in between); after each applied plan, planning
    /// again yields no operation, and principals idsync does not own are untouched.
    #[test]
    fn apply_then_plan_again_is_empty_and_outsiders_are_untouched(
        s1 in directory(),
        s2 in directory(),
        caps in capabilities(),
        outside in outsiders(),
        policy in policy(),
        combine in any::<bool>(),
        parallel in any::<bool>(),
    ) {
        block(async {
            // Either way a target takes member changes: one operation each, or a group's
            // removals and additions together; a group's member writes one at a time, or in
            // parallel (additions split).
            let t = if combine {
                MemoryTarget::new(caps.clone()).combining_member_changes()
            } else {
                MemoryTarget::new(caps.clone())
            };
            let t = if parallel { t.writing_members_in_parallel() } else { t };
            let before = insert_outsiders(&t, &outside);
            let mut st = AgreementState::new("prop");
            let mapping = Mapping::defaults();
            let mut adopted: BTreeSet<(Kind, String)> = BTreeSet::new();
            for s in [&s1, &s2] {
                let a = plan_only(s, &t, &st, &policy, &mapping).await;
                let b = plan_only(s, &t, &st, &policy, &mapping).await;
                prop_assert_eq!(&a, &b, "plans are deterministic");
                let r = sync_with(s, &t, &mut st, &policy, &mapping).await;
                let Some(rep) = r.report else {
                    // Halted by a guard: nothing may have been written.
                    prop_assert!(r.plan.halt.is_some());
                    continue;
                };
                prop_assert!(rep.is_success(), "apply failed: {:?}\nplan: {:?}", rep, ops(&r.plan));
                let again = plan_only(s, &t, &st, &policy, &mapping).await;
                prop_assert!(again.ops.is_empty(), "not converged: {:?}\nfirst: {:?}", ops(&again), ops(&r.plan));
                for (kind, id, _) in &before {
                    if st.owns(*kind, id) {
                        adopted.insert((*kind, id.clone()));
                    }
                }
            }
            let now = t.observe().await.unwrap();
            for (kind, id, p) in &before {
                if adopted.contains(&(*kind, id.clone())) {
                    prop_assert!(policy.adopt, "{} {} was adopted without adopt = true", kind, id);
                    continue; // adopted on purpose: idsync may manage it from then on
                }
                let o = now.get(*kind, id);
                prop_assert!(o.is_some(), "unowned {kind} {id} was deleted");
                prop_assert_eq!(&o.unwrap().principal, p, "unowned {} {} was modified", kind, id);
                if *kind == Kind::Group {
                    prop_assert!(now.members.get(id).is_none_or(|m| m.is_empty()), "unowned group's members changed");
                }
            }
            Ok(())
        })?;
    }

    /// With a deletion threshold, a second run that would delete or deactivate more than allowed
    /// halts before its first write; one within the limit is not halted by the threshold.
    #[test]
    fn the_threshold_halts_before_the_first_write(
        s1 in directory(),
        s2 in directory(),
        caps in capabilities(),
        max in 0usize..4,
        dep in prop_oneof![Just(Deprovision::Deactivate), Just(Deprovision::Delete)],
    ) {
        block(async {
            let t = MemoryTarget::new(caps);
            let mut st = AgreementState::new("prop");
            let open = Policy { on_conflict: OnConflict::Skip, deprovision: dep, ..Policy::default() };
            sync(&s1, &t, &mut st, &open).await;
            let writes = t.writes();
            let guarded = Policy { max_deletions: Some(max), allow_empty_source: true, ..open };
            let r = sync(&s2, &t, &mut st, &guarded).await;
            if r.plan.summary.destructive > max {
                prop_assert_eq!(r.plan.halt.as_ref().map(|h| h.reason.clone()), Some(idsync_model::HaltReason::Threshold));
                prop_assert_eq!(t.writes(), writes, "a halted plan wrote");
            } else {
                prop_assert!(r.plan.halt.is_none());
            }
            Ok(())
        })?;
    }
}

/// The plan from an incremental observation (the last applied snapshot as the picture, live reads
/// of whatever the plan touches), when the engine makes one; `None` when it observes in bulk.
async fn incremental_plan(
    s: &Snapshot,
    prev: &Snapshot,
    t: &MemoryTarget,
    st: &AgreementState,
    policy: &Policy,
) -> Option<idsync_model::Plan> {
    let caps = t.capabilities();
    let mapping = Mapping::defaults();
    let desired = map_snapshot(s, &mapping, &caps);
    let prev = map_snapshot(prev, &mapping, &caps);
    let mode = idsync_model::ReadMode::Incremental;
    plan_incrementally(t, &desired, &prev, st, policy, &caps, mode, 0, usize::MAX)
        .await
        .unwrap()
}

/// The plan made on what changed between `prev` and `s` alone ([`idsync_engine::delta`]), with
/// the totals the state's trust recorded; `None` when the engine plans the whole tenant instead.
async fn delta_plan(
    s: &Snapshot,
    prev: &Snapshot,
    t: &MemoryTarget,
    st: &AgreementState,
    policy: &Policy,
) -> Option<(idsync_model::Plan, idsync_model::Totals)> {
    let caps = t.capabilities();
    let totals = st.trust.as_ref()?.totals?;
    let mode = idsync_model::ReadMode::Incremental;
    idsync_engine::delta::plan_on_delta(
        t,
        prev,
        s,
        &Mapping::defaults(),
        st,
        policy,
        &caps,
        mode,
        0,
        usize::MAX,
        &totals,
    )
    .await
    .unwrap()
}

/// The directory without what the mapping holds back (duplicate keys), so that most runs are
/// clean and leave a picture the next run may trust.
fn without_held_back(s: &Snapshot, caps: &Capabilities) -> Snapshot {
    let desired = map_snapshot(s, &Mapping::defaults(), caps);
    let mut s = s.clone();
    for src in desired.held_back.keys() {
        let gone = match src.kind {
            Kind::User => s.users.remove(&src.id).is_some(),
            Kind::ServicePrincipal => s.service_principals.remove(&src.id).is_some(),
            Kind::Group => s.groups.remove(&src.id).is_some(),
        };
        assert!(gone, "held back {src} is in the directory");
    }
    s
}

/// Syncs three directories in turn and, in each round that may trust the last apply's picture,
/// compares the plan made on an incremental observation, and the plan made on the change alone,
/// with the plan made on a bulk observation. Returns how many incremental plans were compared,
/// and how many of them were also made on the change.
async fn compare_rounds(
    rounds: [Snapshot; 3],
    caps: &Capabilities,
    outside: &[(Kind, usize)],
    policy: &Policy,
) -> Result<(usize, usize), TestCaseError> {
    let t = MemoryTarget::new(caps.clone());
    let mut st = AgreementState::new("prop");
    let mapping = Mapping::defaults();
    let mut trusted = false;
    let mut prev = Snapshot::default();
    let mut compared = 0;
    let mut on_delta = 0;
    for (round, s) in rounds.iter().enumerate() {
        if round == 1 {
            insert_outsiders(&t, outside);
        }
        let full = plan_only(s, &t, &st, policy, &mapping).await;
        // Planned taking the desired state's member sets (freed group by group), the same plan
        // as planned by reference, nested and flattened.
        let observed = t.observe().await.unwrap();
        let mut desired = map_snapshot(s, &mapping, caps);
        let mode = idsync_model::ReadMode::Full;
        let by_ref = idsync_engine::plan(&desired, &observed, &st, policy, caps, mode);
        let taking =
            idsync_engine::plan_taking_members(&mut desired, &observed, &st, policy, caps, mode);
        prop_assert_eq!(&taking, &by_ref);
        prop_assert!(desired.members.is_empty(), "the members were taken");
        if trusted {
            let bulk = t.reads().0;
            let inc = incremental_plan(s, &prev, &t, &st, policy).await;
            prop_assert_eq!(t.reads().0, bulk, "an incremental plan observed in bulk");
            // Only a conflict sends the engine to a bulk observation here.
            prop_assert!(
                inc.is_some() || !full.conflicts.is_empty(),
                "no incremental plan without a conflict"
            );
            if let Some(inc) = inc {
                prop_assert_eq!(
                    ops(&inc),
                    ops(&full),
                    "conflicts {:?} vs {:?}; notes {:?} vs {:?}",
                    inc.conflicts,
                    full.conflicts,
                    inc.notes,
                    full.notes
                );
                prop_assert_eq!(&inc.ops, &full.ops);
                prop_assert_eq!(&inc.conflicts, &full.conflicts);
                prop_assert_eq!(&inc.halt, &full.halt);
                prop_assert_eq!(&inc.summary, &full.summary);
                compared += 1;
                // The same plan again, made on what changed alone: every field alike.
                let before = t.reads();
                if let Some((delta, totals)) = delta_plan(s, &prev, &t, &st, policy).await {
                    prop_assert_eq!(
                        ops(&delta),
                        ops(&inc),
                        "notes {:?} vs {:?}",
                        delta.notes,
                        inc.notes
                    );
                    prop_assert_eq!(&delta.ops, &inc.ops);
                    prop_assert_eq!(&delta.conflicts, &inc.conflicts);
                    prop_assert_eq!(&delta.halt, &inc.halt);
                    prop_assert_eq!(&delta.summary, &inc.summary);
                    prop_assert_eq!(&delta.notes, &inc.notes);
                    let read = |o: &idsync_model::Observation| match o {
                        idsync_model::Observation::Incremental { read, touched, .. } => {
                            (*read, touched.is_some())
                        }
                        idsync_model::Observation::Full => (usize::MAX, false),
                    };
                    prop_assert_eq!(read(&delta.observation).0, read(&inc.observation).0);
                    prop_assert!(read(&delta.observation).1, "a plan on the change says so");
                    prop_assert!(!read(&inc.observation).1, "a plan on the whole says it was");
                    prop_assert_eq!(
                        t.reads().0,
                        before.0,
                        "a plan on the change observed in bulk"
                    );
                    let desired = map_snapshot(s, &mapping, caps);
                    prop_assert_eq!(
                        totals,
                        idsync_engine::delta::totals(&desired, &full),
                        "totals carried forward"
                    );
                    on_delta += 1;
                }
            }
        }
        let r = sync_with(s, &t, &mut st, policy, &mapping).await;
        let desired = map_snapshot(s, &mapping, caps);
        trusted = r.report.as_ref().is_some_and(|rep| rep.is_success())
            && st.journal.is_none()
            && leaves_a_faithful_picture(&r.plan, &desired);
        prev = s.clone();
        if trusted {
            // The same directory again: nothing to do, and nothing read from the target.
            let before = t.reads();
            let again = incremental_plan(s, &prev, &t, &st, policy).await;
            prop_assert_eq!(t.reads(), before, "an unchanged directory read the target");
            let again = again.unwrap();
            prop_assert!(again.ops.is_empty(), "an unchanged directory planned work");
            // On the change alone: nothing to cut, and the same counts and notes.
            let (delta, _) = delta_plan(s, &prev, &t, &st, policy)
                .await
                .expect("no change is planned on the change");
            prop_assert_eq!(t.reads(), before, "an unchanged directory read the target");
            prop_assert_eq!(&delta.summary, &again.summary);
            prop_assert_eq!(&delta.notes, &again.notes);
            prop_assert_eq!(&delta.halt, &again.halt);
        }
    }
    Ok((compared, on_delta))
}

/// A small change to a directory, as a change feed brings one: `(what, a, b)` renames, adds or
/// removes a user, disables one, adds or removes a member, removes or renames a group, adds or
/// removes a service principal.
fn edits() -> impl Strategy<Value = Vec<(u8, usize, usize)>> {
    prop::collection::vec((0u8..8, 0usize..14, 0usize..7), 1..4)
}

/// The member `m` of the draws of [`directory`].
fn member(m: usize) -> Member {
    match m {
        0..=5 => Member::user(format!("u{m}")),
        6..=8 => Member::service_principal(format!("s{}", m - 6)),
        _ => Member::group(format!("g{}", m - 9)),
    }
}

fn edited(s: &Snapshot, edits: &[(u8, usize, usize)]) -> Snapshot {
    let mut s = s.clone();
    for &(what, a, b) in edits {
        let uid = format!("u{}", a % 6);
        let gid = format!("g{}", a % 5);
        let other = format!("g{}", b % 5);
        match what {
            0 => {
                let name = USER_NAMES[b % USER_NAMES.len()];
                match s.user_mut(&uid) {
                    Some(u) => {
                        u.user_name = name.into();
                        u.emails = vec![name.into()];
                    }
                    None => {
                        s.users
                            .insert(uid.clone(), std::sync::Arc::new(user(&uid, name)));
                    }
                }
            }
            1 => {
                s.users.remove(&uid);
            }
            2 => {
                if let Some(u) = s.user_mut(&uid) {
                    u.active = !u.active;
                }
            }
            3 => {
                if let Some(g) = s.groups.get_mut(&other) {
                    g.members.insert(member(a));
                }
            }
            4 => {
                if let Some(g) = s.groups.get_mut(&other) {
                    g.members.remove(&member(a));
                }
            }
            5 => {
                s.groups.remove(&gid);
            }
            6 => {
                let name = GROUP_NAMES[b % GROUP_NAMES.len()];
                match s.groups.get_mut(&gid) {
                    Some(g) => g.display_name = name.into(),
                    None => {
                        s.groups.insert(gid.clone(), group(&gid, name, &[]));
                    }
                }
            }
            _ => {
                let sid = format!("s{}", a % 3);
                if s.service_principals.remove(&sid).is_none() {
                    s.service_principals
                        .insert(sid.clone(), sp(&sid, APP_IDS[b % APP_IDS.len()]));
                }
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// After a clean, complete apply, an incremental run that reads only what the changes touch
    /// plans exactly what a bulk observation plans: the same operations, conflicts, guard and
    /// counts, over three directory changes and with principals created by hand in between
    /// (which hold keys the source may create or rename to). So does a plan made on the change
    /// alone.
    #[test]
    fn incremental_observation_plans_what_a_bulk_observation_plans(
        s1 in directory(),
        s2 in directory(),
        s3 in directory(),
        caps in capabilities(),
        outside in outsiders(),
        policy in policy(),
    ) {
        let rounds = [&s1, &s2, &s3].map(|s| without_held_back(s, &caps));
        let (compared, _) = block(compare_rounds(rounds, &caps, &outside, &policy))?;
        // Not vacuous: across the run, most cases reach a trusted round and compare plans.
        let cases_run = CASES_RUN.fetch_add(1, Ordering::SeqCst) + 1;
        let all = COMPARED.fetch_add(compared, Ordering::SeqCst) + compared;
        if cases_run == cases() as usize {
            prop_assert!(all >= cases_run / 2, "only {all} comparisons in {cases_run} cases");
        }
    }

    /// Small changes, as a change feed brings them (most of the directory stays as it was): the
    /// plan made on the change alone is the plan made on the whole directory, field by field,
    /// nested and flattened.
    #[test]
    fn a_plan_on_the_change_is_the_plan_on_the_whole_directory(
        s1 in directory(),
        e1 in edits(),
        e2 in edits(),
        caps in capabilities(),
        outside in outsiders(),
        policy in policy(),
    ) {
        let r1 = without_held_back(&s1, &caps);
        let r2 = without_held_back(&edited(&r1, &e1), &caps);
        let r3 = without_held_back(&edited(&r2, &e2), &caps);
        let (compared, on_delta) = block(compare_rounds([r1, r2, r3], &caps, &outside, &policy))?;
        let cases_run = SMALL_RUN.fetch_add(1, Ordering::SeqCst) + 1;
        let all = SMALL_COMPARED.fetch_add(compared, Ordering::SeqCst) + compared;
        let deltas = ON_DELTA.fetch_add(on_delta, Ordering::SeqCst) + on_delta;
        if cases_run == cases() as usize {
            prop_assert!(all >= cases_run / 2, "only {all} comparisons in {cases_run} cases");
            prop_assert!(deltas * 4 >= all * 3, "only {deltas} of {all} plans made on the change");
        }
    }
}

static CASES_RUN: AtomicUsize = AtomicUsize::new(0);
static COMPARED: AtomicUsize = AtomicUsize::new(0);
static SMALL_RUN: AtomicUsize = AtomicUsize::new(0);
static SMALL_COMPARED: AtomicUsize = AtomicUsize::new(0);
static ON_DELTA: AtomicUsize = AtomicUsize::new(0);

#[test]
fn rename_chains_run_in_order_and_swaps_are_conflicts() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let s = snap(vec![user("u1", "a@x"), user("u2", "b@x")], vec![], vec![]);
        sync(&s, &t, &mut st, &Policy::default()).await;
        // Chain: a → b while b → c.
        let chain = snap(vec![user("u1", "b@x"), user("u2", "c@x")], vec![], vec![]);
        let r = sync(&chain, &t, &mut st, &Policy::default()).await;
        let order: Vec<&str> = r
            .plan
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Update { target, .. } => Some(target.key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(order, ["b@x", "a@x"], "b must move out of the way first");
        assert!(r.report.unwrap().is_success());
        // Swap: b ↔ c is a cycle: a conflict, nothing renamed.
        let swap = snap(vec![user("u1", "c@x"), user("u2", "b@x")], vec![], vec![]);
        let p = Policy {
            on_conflict: OnConflict::Skip,
            ..Policy::default()
        };
        let r = sync(&swap, &t, &mut st, &p).await;
        assert_eq!(r.plan.conflicts.len(), 2, "{:?}", r.plan.conflicts);
        assert!(r.plan.conflicts[0].reason.contains("cycle"));
        // Renaming onto a principal idsync does not own is a conflict too.
        let held = t.insert(Principal::new(Kind::User, "z@x"));
        let onto = snap(vec![user("u1", "z@x"), user("u2", "c@x")], vec![], vec![]);
        let r = sync(&onto, &t, &mut st, &p).await;
        assert!(
            r.plan.conflicts.iter().any(|c| c.reason.contains(&held)),
            "{:?}",
            r.plan.conflicts
        );
        assert!(r.report.unwrap().is_success());
        assert_eq!(PKey::new(Kind::User, "b@x").key, "b@x");
    })
}

/// Found by the property above: for a target that flattens, a nested group added to a group
/// brings every member below it, though none of those memberships changed in the source.
#[test]
fn a_nested_group_added_brings_its_members_to_a_plan_on_the_change() {
    let s1 = snap(
        vec![user("u1", "a@x")],
        vec![],
        vec![
            group("g1", "G1", &[]),
            group("g3", "G3", &[Member::user("u1")]),
        ],
    );
    let s2 = edited(&s1, &[(3, 12, 1)]);
    assert!(s2.groups["g1"].members.contains(&Member::group("g3")));
    let s3 = edited(&s2, &[(4, 12, 1)]);
    let caps = flat_caps();
    let (compared, on_delta) =
        block(compare_rounds([s1, s2, s3], &caps, &[], &Policy::default())).unwrap();
    assert_eq!((compared, on_delta), (2, 2));
}

/// A group the target cannot rename, renamed in the source, is a new group in the whole plan,
/// with every member; the plan on the change holds only the memberships that changed, so it
/// leaves that change to the whole plan (and takes the run after it again).
#[test]
fn a_group_planned_onto_another_target_group_is_planned_in_whole() {
    let s1 = snap(
        vec![user("u1", "a@x"), user("u2", "b@x")],
        vec![],
        vec![group("g1", "G1", &[Member::user("u1"), Member::user("u2")])],
    );
    let mut s2 = s1.clone();
    s2.groups.get_mut("g1").unwrap().display_name = "G2".into();
    let caps = flat_caps();
    assert!(!caps.renamable.contains(&Kind::Group));
    let (compared, on_delta) = block(compare_rounds(
        [s1, s2.clone(), s2],
        &caps,
        &[],
        &Policy::default(),
    ))
    .unwrap();
    assert_eq!((compared, on_delta), (2, 1));
}

/// A key the change takes that a principal idsync owns outside the change holds, renamed by hand
/// in the target (so the state does not know it under that key): only the whole plan can say
/// whose it is, so the plan on the change leaves it to the whole plan.
#[test]
fn an_owned_principal_found_outside_the_change_is_left_to_the_whole_plan() {
    block(async {
        let caps = Capabilities {
            renamable: [Kind::Group].into(),
            ..Capabilities::full()
        };
        let t = MemoryTarget::new(caps.clone());
        let mut st = AgreementState::new("prop");
        let s1 = snap(vec![user("u1", "alice@x")], vec![], vec![]);
        let policy = Policy::default();
        sync(&s1, &t, &mut st, &policy).await;
        assert!(st.trust.as_ref().and_then(|t| t.totals).is_some());
        // By hand: alice's account is renamed to bob's name.
        let mut data = t.data();
        let p = data
            .principals
            .iter_mut()
            .find(|p| p.principal.key == "alice@x")
            .unwrap();
        p.principal.key = "bob@x".into();
        let t = MemoryTarget::from_data(caps, data);
        let mut s2 = s1.clone();
        s2.users
            .insert("u2".into(), std::sync::Arc::new(user("u2", "bob@x")));
        assert!(delta_plan(&s2, &s1, &t, &st, &policy).await.is_none());
        // Without the hand rename, the same change is planned on the change.
        let t = MemoryTarget::new(Capabilities {
            renamable: [Kind::Group].into(),
            ..Capabilities::full()
        });
        let mut st = AgreementState::new("prop");
        sync(&s1, &t, &mut st, &policy).await;
        assert!(delta_plan(&s2, &s1, &t, &st, &policy).await.is_some());
    });
}
