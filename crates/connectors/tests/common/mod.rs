//! Shared by the target tests: the demo directory, and one sync cycle through the real engine.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod conformance;

use idsync_engine::apply::{self, ApplyOptions, ApplyReport};
use idsync_engine::{Mapping, Policy, Target, map_snapshot, plan};
use idsync_model::{AgreementState, Directory, Plan, PlanFile, ReadMode, Snapshot};

/// The demo's directory, without the group outside the scope and the users it alone reaches.
pub fn directory() -> Snapshot {
    let d: Directory =
        serde_json::from_str(include_str!("../../../cli/src/demo/directory.json")).unwrap();
    let mut s: Snapshot = d.try_into().unwrap();
    s.groups.retain(|_, g| g.display_name != "OTHER_TEAM");
    s.users
        .retain(|_, u| u.user_name != "olga@company.com" && u.user_name != "frank@company.com");
    s
}

/// Plans and applies `s` to `t` as `idsync sync` does, and records the state.
pub async fn sync(
    t: &dyn Target,
    s: &Snapshot,
    mapping: &Mapping,
    st: &mut AgreementState,
) -> (Plan, ApplyReport) {
    let caps = t.capabilities();
    let desired = map_snapshot(s, mapping, &caps);
    let observed = t.observe().await.unwrap();
    let p = plan(
        &desired,
        &observed,
        st,
        &Policy::default(),
        &caps,
        ReadMode::Full,
    );
    assert!(p.halt.is_none(), "{:?}", p.halt);
    apply::begin(&p, &caps, st);
    let r = idsync_engine::apply(
        &p,
        t,
        st,
        &ApplyOptions {
            workers: 4,
            ..ApplyOptions::default()
        },
    )
    .await;
    let file = PlanFile {
        plan: p.clone(),
        snapshot: s.clone().into(),
        cursors: Default::default(),
    };
    apply::finish(&file, &r, &caps, st, true);
    st.version += 1;
    (p, r)
}
