//! Quarantine and escrow, and the failed-share halt, through the runner as `idsync sync` runs
//! them: one poison principal never blocks the others, is held back at growing intervals, and is
//! freed by a success; a run in which most operations fail halts the agreement until resumed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
use common::*;
use idsync_engine::{Mapping, MemoryTarget, Policy, Target, TargetError, TargetErrorKind};
use idsync_model::{AgreementState, Capabilities, Member, Op};
use idsync_runner::testing::{FailWhen, run_seeded};
use idsync_runner::{Mode, Outcome, RunOptions, exit};

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

const T0: u64 = 1_800_000_000;

fn directory() -> idsync_model::Snapshot {
    snap(
        vec![
            user("u1", "alice@x"),
            user("u2", "bob@x"),
            user("u3", "kevin@x"),
        ],
        vec![],
        vec![
            group(
                "g1",
                "TEAM_ALPHA",
                &[Member::user("u1"), Member::user("u2")],
            ),
            group("g2", "TEAM_ETA", &[Member::user("u3")]),
        ],
    )
}

async fn run_at(
    target: &dyn Target,
    dir: &idsync_model::Snapshot,
    state: &mut AgreementState,
    policy: &Policy,
    now: u64,
) -> Outcome {
    let opts = RunOptions {
        mode: Mode::Sync,
        reconcile: None,
        now: Some(now),
        ..RunOptions::default()
    };
    run_seeded(target, dir, &Mapping::defaults(), policy, state, &opts)
        .await
        .unwrap()
}

fn creates_bob(op: &Op) -> Option<TargetError> {
    matches!(op, Op::Create { principal, .. } if principal.key == "bob@x")
        .then(|| TargetError::new(TargetErrorKind::Invalid, "bob's address is refused"))
}

#[test]
fn a_poison_principal_is_quarantined_held_back_with_growing_intervals_and_freed_by_a_success() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let poisoned = FailWhen::new(&t, creates_bob);
        let mut st = AgreementState::new("q");
        let policy = Policy::default();
        let dir = directory();

        // Three runs in a row fail on bob; everyone else is there after the first.
        for (i, now) in [T0, T0 + 60, T0 + 120].into_iter().enumerate() {
            let out = run_at(&poisoned, &dir, &mut st, &policy, now).await;
            assert_eq!(out.code, exit::ERROR, "run {i}");
            let strikes = &st.failing["user:bob@x"];
            assert_eq!(strikes.runs as usize, i + 1);
            assert!(strikes.error.contains("refused"), "{strikes:?}");
            let report = out.report.unwrap();
            if i < 2 {
                assert_eq!(strikes.until, 0, "not quarantined before the third failure");
                assert!(report.quarantine.quarantined.is_empty());
            } else {
                assert_eq!(strikes.until, now + 3600, "quarantined for an hour");
                assert_eq!(report.quarantine.quarantined, ["user:bob@x"]);
            }
        }
        let o = t.observe().await.unwrap();
        let keys: Vec<_> = o
            .principals
            .get(idsync_model::Kind::User)
            .values()
            .map(|p| p.principal.key.clone())
            .collect();
        assert_eq!(keys.len(), 2, "alice and kevin, not bob: {keys:?}");

        // While quarantined, bob is held back, and so is his membership: the run is clean.
        let out = run_at(&poisoned, &dir, &mut st, &policy, T0 + 180).await;
        let plan = out.file.unwrap().plan;
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
        assert_eq!(plan.held_back, 2, "bob's create and his membership");
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("quarantined, held back: user:bob@x")
                    && n.contains("idsync agreement release user:bob@x")),
            "{:?}",
            plan.notes
        );
        assert_eq!(out.code, exit::OK);
        assert!(
            st.cursors.is_empty() && st.trust.is_none(),
            "a plan that held something back is not complete"
        );

        // Once the hour is up it is tried again; another failure doubles the wait.
        let later = T0 + 120 + 3600 + 1;
        let out = run_at(&poisoned, &dir, &mut st, &policy, later).await;
        assert_eq!(out.code, exit::ERROR);
        assert_eq!(st.failing["user:bob@x"].runs, 4);
        assert_eq!(st.failing["user:bob@x"].until, later + 7200);

        // The target accepts him now: the next try succeeds and frees him.
        let out = run_at(&t, &dir, &mut st, &policy, later + 7201).await;
        assert_eq!(out.code, exit::OK, "{:?}", out.report);
        assert_eq!(out.report.unwrap().quarantine.released, ["user:bob@x"]);
        assert!(st.failing.is_empty());
        let out = run_at(&t, &dir, &mut st, &policy, later + 7300).await;
        assert!(out.file.unwrap().plan.ops.is_empty(), "converged");
    })
}

#[test]
fn a_run_in_which_most_operations_fail_halts_the_agreement_until_it_is_resumed() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let refusing = FailWhen::new(&t, |op: &Op| {
            matches!(op, Op::Create { .. })
                .then(|| TargetError::new(TargetErrorKind::Forbidden, "the token may not create"))
        });
        let mut st = AgreementState::new("h");
        let policy = Policy::default();
        let mut dir = directory();
        for i in 0..5 {
            let u = user(&format!("x{i}"), &format!("extra{i}@x"));
            dir.users.insert(u.id.clone(), std::sync::Arc::new(u));
        }
        let out = run_at(&refusing, &dir, &mut st, &policy, T0).await;
        assert_eq!(out.code, exit::HALTED);
        let why = out.report.unwrap().quarantine.halted.unwrap();
        assert!(
            why.contains("max_failed_percent = 50") && why.contains("may not create"),
            "{why}"
        );
        assert_eq!(st.halted.as_deref(), Some(why.as_str()));

        // Later runs write nothing, even against a target that would accept everything.
        let out = run_at(&t, &dir, &mut st, &policy, T0 + 60).await;
        assert_eq!(out.code, exit::HALTED);
        assert!(out.report.is_none());
        assert!(
            t.observe()
                .await
                .unwrap()
                .principals
                .get(idsync_model::Kind::User)
                .is_empty()
        );

        // A plan still shows what would happen.
        let plan_opts = RunOptions {
            mode: Mode::Plan,
            reconcile: None,
            now: Some(T0 + 90),
            ..RunOptions::default()
        };
        let out = run_seeded(&t, &dir, &Mapping::defaults(), &policy, &mut st, &plan_opts)
            .await
            .unwrap();
        assert_eq!(out.code, exit::PENDING);
        assert!(
            out.file
                .unwrap()
                .plan
                .notes
                .iter()
                .any(|n| n.contains("is halted"))
        );

        // Resumed (what `idsync agreement resume` does), it runs again.
        st.halted = None;
        let out = run_at(&t, &dir, &mut st, &policy, T0 + 120).await;
        assert_eq!(out.code, exit::OK, "{:?}", out.report);
    })
}

#[test]
fn a_few_failures_in_a_small_run_do_not_halt_and_100_percent_never_halts() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let poisoned = FailWhen::new(&t, creates_bob);
        let mut st = AgreementState::new("f");
        // One failure of five operations: 20 %, and under the floor of five failures anyway.
        let out = run_at(&poisoned, &directory(), &mut st, &Policy::default(), T0).await;
        assert_eq!(out.code, exit::ERROR);
        assert!(st.halted.is_none());

        let refusing = FailWhen::new(&t, |op: &Op| {
            op.writes()
                .then(|| TargetError::new(TargetErrorKind::Forbidden, "read-only token"))
        });
        let mut dir = directory();
        for i in 0..8 {
            let u = user(&format!("x{i}"), &format!("extra{i}@x"));
            dir.users.insert(u.id.clone(), std::sync::Arc::new(u));
        }
        let never = Policy {
            max_failed_percent: Some(100),
            ..Policy::default()
        };
        let out = run_at(&refusing, &dir, &mut st, &never, T0 + 60).await;
        assert_eq!(out.code, exit::ERROR);
        assert!(st.halted.is_none(), "100 % never halts");
    })
}
