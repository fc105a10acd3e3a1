//! The generic SCIM 2.0 target runs the target conformance suite (`idsync_runner::testing::conformance`) against a
//! real SCIM server (`scim2-server` from PyPI, started by `scripts/servers.sh`; `#[ignore]`d for a
//! bare `cargo test`), with nested groups, and against our Databricks emulator's SCIM API (no
//! `/ServiceProviderConfig`: the cautious defaults), flattened and through a 429 storm. On
//! scim2-server, an ETag conflict is refused rather than overwritten.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use idsync_connectors::http::HttpConfig;
use idsync_connectors::targets::scim::{ScimConfig, ScimTarget};
use idsync_emulators::Databricks;
use idsync_emulators::databricks::{ACCOUNT_ID, TOKEN, Type};
use idsync_engine::apply::{self, ApplyOptions};
use idsync_engine::{Mapping, Policy, Target, map_snapshot, plan};
use idsync_model::{AgreementState, Kind, ReadMode, Secret, Snapshot};
use std::time::Duration;

fn target(url: &str, token: &str, nested: bool) -> ScimTarget {
    ScimTarget::new(ScimConfig {
        url: url.to_owned(),
        token: Some(Secret::new(token)),
        http: HttpConfig {
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_secs(2),
            ..HttpConfig::new("SCIM")
        },
        member_chunk: 2,
        nested_groups: nested,
    })
    .unwrap()
}

/// One run with `policy`: plan, apply, record; the report.
async fn run(
    t: &ScimTarget,
    s: &Snapshot,
    st: &mut AgreementState,
    policy: &Policy,
) -> idsync_engine::apply::ApplyReport {
    let caps = t.capabilities();
    let desired = map_snapshot(s, &Mapping::defaults(), &caps);
    let observed = t.observe().await.unwrap();
    let p = plan(&desired, &observed, st, policy, &caps, ReadMode::Full);
    assert!(p.halt.is_none(), "{:?}", p.halt);
    apply::begin(&p, &caps, st);
    let r = idsync_engine::apply(&p, t, st, &ApplyOptions::default()).await;
    let file = idsync_model::PlanFile {
        plan: p,
        snapshot: s.clone().into(),
        cursors: Default::default(),
        checksum: None,
    };
    apply::finish(&file, &r, &caps, st, true);
    st.version += 1;
    r
}

#[tokio::test]
async fn the_databricks_emulator_as_a_generic_scim_provider_passes_the_suite() {
    let d = Databricks::start_on(0, None).await.unwrap();
    let url = format!(
        "{}/api/2.0/accounts/{ACCOUNT_ID}/scim/v2",
        d.server.base_url
    );
    // No /ServiceProviderConfig there: the cautious defaults. Groups flattened.
    let t = target(&url, TOKEN, false);
    let subject = idsync_runner::testing::Subject {
        target: &t,
        mapping: Mapping::defaults(),
        storm: Some(common::storm(&d.state.infra)),
    };
    idsync_runner::testing::conformance(subject, common::directory())
        .await
        .unwrap();
    assert!(d.state.data()[&Type::ServicePrincipals].is_empty());
}

/// `IDSYNC_TEST_SCIM`: a scim2-server base URL; `IDSYNC_TEST_SCIM_TOKEN`: its bearer token.
#[tokio::test]
#[ignore = "needs scim2-server: run scripts/test.sh"]
async fn scim2_server_passes_the_suite_with_nested_groups_and_refuses_stale_writes() {
    let url = std::env::var("IDSYNC_TEST_SCIM").expect("IDSYNC_TEST_SCIM");
    let token = std::env::var("IDSYNC_TEST_SCIM_TOKEN").expect("IDSYNC_TEST_SCIM_TOKEN");
    let t = target(&url, &token, true);
    let subject = idsync_runner::testing::Subject {
        target: &t,
        mapping: Mapping::defaults(),
        storm: None,
    };
    idsync_runner::testing::conformance(subject, common::directory())
        .await
        .unwrap();

    // ETags: a group changed by someone else after idsync observed it is not overwritten.
    let t = target(&url, &token, true);
    let mut st = AgreementState::new("etag");
    let policy = Policy {
        adopt: true,
        ..Policy::default()
    };
    let mut dir = common::directory();
    run(&t, &dir, &mut st, &policy).await;
    let caps = t.capabilities();
    let observed = t.observe().await.unwrap();
    dir.groups
        .values_mut()
        .find(|g| g.display_name == "TEAM_ALPHA")
        .unwrap()
        .display_name = "TEAM_ALPHA_RENAMED".into();
    let desired = map_snapshot(&dir, &Mapping::defaults(), &caps);
    let p = plan(&desired, &observed, &st, &policy, &caps, ReadMode::Full);
    assert!(!p.ops.is_empty());
    // Someone renames it in the provider meanwhile (a write idsync did not make).
    let alpha = observed
        .principals
        .get(Kind::Group)
        .values()
        .find(|p| p.principal.key.starts_with("TEAM_ALPHA"))
        .unwrap()
        .id
        .clone();
    let other = reqwest::Client::new();
    let r = other
        .patch(format!("{url}/Groups/{alpha}"))
        .bearer_auth(&token)
        .header("content-type", "application/scim+json")
        .body(r#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"externalId","value":"changed-elsewhere"}]}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let rep = idsync_engine::apply(&p, &t, &mut st, &ApplyOptions::default()).await;
    assert!(!rep.is_success(), "a stale write is refused: {rep:?}");
    let text = format!("{rep:?}");
    assert!(text.contains("412") || text.contains("changed"), "{text}");
}
