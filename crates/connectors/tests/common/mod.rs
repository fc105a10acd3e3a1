//! Shared by the target tests: the demo directory, and one sync cycle through the real engine.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_emulators::infra::{Infra, ThrottleConfig};
use idsync_engine::apply::ApplyReport;
use idsync_engine::{Mapping, Policy, Target};
use idsync_model::{AgreementState, Directory, Plan, Snapshot};
use idsync_runner::RunOptions;
use idsync_runner::testing::run_seeded;

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

/// The demo's directory, without the group outside the scope and the users it alone reaches.
pub fn directory() -> Snapshot {
    let d: Directory =
        serde_json::from_str(include_str!("../../../demo/src/directory.json")).unwrap();
    let mut s: Snapshot = d.try_into().unwrap();
    s.groups.retain(|_, g| g.display_name != "OTHER_TEAM");
    s.users
        .retain(|_, u| u.user_name != "olga@company.com" && u.user_name != "frank@company.com");
    s
}

/// Plans and applies `s` to `t` as `idsync sync` does (through the runner, observing in full),
/// and records the state.
pub async fn sync(
    t: &dyn Target,
    s: &Snapshot,
    mapping: &Mapping,
    st: &mut AgreementState,
) -> (Plan, ApplyReport) {
    sync_policy(t, s, mapping, &Policy::default(), st).await
}

/// [`sync`] under `policy`.
pub async fn sync_policy(
    t: &dyn Target,
    s: &Snapshot,
    mapping: &Mapping,
    policy: &Policy,
    st: &mut AgreementState,
) -> (Plan, ApplyReport) {
    let opts = RunOptions {
        workers: 4,
        reconcile: None,
        ..RunOptions::default()
    };
    let out = run_seeded(t, s, mapping, policy, st, &opts).await.unwrap();
    let plan = out.file.unwrap().plan;
    assert!(plan.halt.is_none(), "{:?}", plan.halt);
    (plan, out.report.unwrap())
}
