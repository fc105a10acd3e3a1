//! The Databricks account SCIM target against the Databricks emulator, driven by the real engine:
//! nested groups with users and service principals, a second run that writes nothing, a group
//! rename and a deactivation, a 429 storm, OAuth M2M.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use idsync_connectors::entra_auth::EntraCredential;
use idsync_connectors::http::HttpConfig;
use idsync_connectors::targets::databricks::{DatabricksAuth, DatabricksConfig, DatabricksTarget};
use idsync_emulators::Databricks;
use idsync_emulators::databricks::{ACCOUNT_ID, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, TOKEN, Type};
use idsync_emulators::infra::ThrottleConfig;
use idsync_engine::{Mapping, Target, TargetErrorKind};
use idsync_model::{AgreementState, Secret};
use serde_json::Value;
use std::time::Duration;

fn target(d: &Databricks, auth: DatabricksAuth) -> DatabricksTarget {
    DatabricksTarget::new(DatabricksConfig {
        host: d.server.base_url.clone(),
        account_id: ACCOUNT_ID.into(),
        auth,
        http: HttpConfig {
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_secs(2),
            ..HttpConfig::new("Databricks")
        },
        member_chunk: 2,
    })
    .unwrap()
}

fn group(d: &Databricks, name: &str) -> Value {
    d.state.data()[&Type::Groups]
        .values()
        .find(|g| g["displayName"] == name)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn nested_groups_service_principals_renames_and_deactivation() {
    let d = Databricks::start_on(0, None).await.unwrap();
    let t = target(&d, DatabricksAuth::Token(Secret::new(TOKEN)));
    let mut st = AgreementState::new("databricks");
    let (p, r) = common::sync(&t, &common::directory(), &Mapping::defaults(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(p.summary.ops["create servicePrincipal"], 1);
    // TEAM_ALPHA: alice, bob and the service principal; TEAM_ZETA: erin and the nested TEAM_ETA.
    assert_eq!(
        group(&d, "TEAM_ALPHA")["members"].as_array().unwrap().len(),
        3
    );
    let eta_id = group(&d, "TEAM_ETA")["id"].clone();
    assert!(
        group(&d, "TEAM_ZETA")["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["value"] == eta_id)
    );
    let writes = r.writes;
    assert!(writes > 10);

    let (p, r) = common::sync(&t, &common::directory(), &Mapping::defaults(), &mut st).await;
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!(r.writes, 0);

    // A group renamed, a user disabled, a member leaving.
    let mut s = common::directory();
    let eta = s
        .groups
        .values_mut()
        .find(|g| g.display_name == "TEAM_ETA")
        .unwrap();
    eta.display_name = "TEAM_ETA_PLATFORM".into();
    let bob = s
        .users
        .values_mut()
        .find(|u| u.user_name == "bob@company.com")
        .map(std::sync::Arc::make_mut)
        .unwrap();
    bob.active = false;
    let bob_id = bob.id.clone();
    s.groups
        .values_mut()
        .find(|g| g.display_name == "TEAM_ALPHA")
        .unwrap()
        .members
        .remove(&idsync_model::Member::user(bob_id));
    let (p, r) = common::sync(&t, &s, &Mapping::defaults(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(p.ops.len(), 3, "{:?}", p.ops);
    assert_eq!(
        group(&d, "TEAM_ETA_PLATFORM")["id"],
        eta_id,
        "renamed in place"
    );
    assert_eq!(
        group(&d, "TEAM_ALPHA")["members"].as_array().unwrap().len(),
        2
    );
    let bob = d.state.data()[&Type::Users]
        .values()
        .find(|u| u["userName"] == "bob@company.com")
        .cloned()
        .unwrap();
    assert_eq!(bob["active"], false);
    let (p, _) = common::sync(&t, &s, &Mapping::defaults(), &mut st).await;
    assert!(p.ops.is_empty(), "{:?}", p.ops);
}

#[tokio::test]
async fn oauth_m2m_and_a_429_storm() {
    let d = Databricks::start_on(0, None).await.unwrap();
    d.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 4.0,
        per_second: 200.0,
    }));
    let t = target(
        &d,
        DatabricksAuth::OAuth {
            client_id: OAUTH_CLIENT_ID.into(),
            client_secret: Secret::new(OAUTH_CLIENT_SECRET),
        },
    );
    let mut st = AgreementState::new("databricks");
    let (_, r) = common::sync(&t, &common::directory(), &Mapping::defaults(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    let token_requests = d
        .state
        .infra
        .accounting
        .snapshot()
        .get("POST /oidc/accounts/{acct}/v1/token")
        .copied()
        .unwrap_or(0);
    assert!(
        (1..=3).contains(&token_requests),
        "the OAuth token is reused: {token_requests}"
    );
    d.state.infra.set_throttle(None);
    let (p, _) = common::sync(&t, &common::directory(), &Mapping::defaults(), &mut st).await;
    assert!(p.ops.is_empty());

    let bad = target(
        &d,
        DatabricksAuth::OAuth {
            client_id: OAUTH_CLIENT_ID.into(),
            client_secret: Secret::new("wrong-secret"),
        },
    );
    let e = bad.observe().await.unwrap_err();
    assert_eq!(e.kind, TargetErrorKind::Unauthorized);
    assert!(!e.message.contains("wrong-secret"), "{}", e.message);
    assert!(e.message.contains("DATABRICKS"), "{}", e.message);
}

#[tokio::test]
async fn entra_tokens_for_the_azure_databricks_resource() {
    use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
    let g = idsync_emulators::Graph::start(Tenant::new(Default::default()))
        .await
        .unwrap();
    let d = Databricks::start_on(0, Some(g.state.clone()))
        .await
        .unwrap();
    let tenant = g.state.tenant().tenant_id.clone();
    let entra = |secret: &str| DatabricksAuth::Entra {
        authority: g.server.base_url.clone(),
        tenant_id: tenant.clone(),
        credential: EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new(secret),
        },
    };
    let t = target(&d, entra(DEFAULT_CLIENT_SECRET));
    let mut st = AgreementState::new("databricks");
    let (_, r) = common::sync(&t, &common::directory(), &Mapping::defaults(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    let tokens = g
        .state
        .infra
        .accounting
        .snapshot()
        .get("POST /{tenant}/oauth2/v2.0/token")
        .copied()
        .unwrap_or(0);
    assert_eq!(tokens, 1, "one Entra token for the whole run");
    let e = target(&d, entra("not-the-secret"))
        .observe()
        .await
        .unwrap_err();
    assert_eq!(e.kind, TargetErrorKind::Unauthorized);
    assert!(
        e.message.contains("7000215") || e.message.contains("invalid_client"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("not-the-secret"), "{}", e.message);
}

#[tokio::test]
async fn the_target_conformance_suite() {
    let d = Databricks::start_on(0, None).await.unwrap();
    let t = target(&d, DatabricksAuth::Token(Secret::new(TOKEN)));
    let subject = idsync_runner::testing::Subject {
        target: &t,
        mapping: Mapping::defaults(),
        storm: Some(common::storm(&d.state.infra)),
    };
    idsync_runner::testing::conformance(subject, common::directory())
        .await
        .unwrap();
}

/// Found by a hostile run: against a 50 % 5xx storm the full observation never completed, each
/// run stopping at the one page that exhausted its retries. A page that keeps failing is read again
/// after a pause, the pages already read are kept, and the storm only slows the observation.
#[tokio::test]
async fn a_5xx_storm_slows_the_full_observation_but_does_not_fail_it() {
    use idsync_emulators::infra::Faults;
    use idsync_engine::Target;
    let d = Databricks::start_on(0, None).await.unwrap();
    let calm = target(&d, DatabricksAuth::Token(Secret::new(TOKEN)));
    let mut st = AgreementState::new("storm");
    let (_, r) = common::sync(
        &calm,
        &common::directory(),
        &idsync_engine::Mapping::defaults(),
        &mut st,
    )
    .await;
    assert!(r.is_success(), "{r:?}");
    let expected = calm.observe().await.unwrap();
    // Two attempts a request: without rounds, nearly every observation would fail somewhere.
    let stormy = DatabricksTarget::new(DatabricksConfig {
        host: d.server.base_url.clone(),
        account_id: ACCOUNT_ID.into(),
        auth: DatabricksAuth::Token(Secret::new(TOKEN)),
        http: HttpConfig {
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            max_attempts: 2,
            read_rounds: 12,
            ..HttpConfig::new("Databricks")
        },
        member_chunk: 2,
    })
    .unwrap();
    d.state.infra.set_faults(Faults {
        error_rate: 0.5,
        ..Faults::default()
    });
    for _ in 0..5 {
        let o = stormy.observe().await.unwrap();
        assert_eq!(o, expected);
    }
    d.state.infra.set_faults(Faults::default());
}

/// externalId is the source id on users, service principals and groups (as the Databricks
/// script and Entra's own provisioning write it), is read back and kept: a value changed by
/// hand is put back. A group the script made, renamed in Entra since, carries the Entra id as
/// its externalId: it is adopted and renamed instead of duplicated.
#[tokio::test]
async fn external_ids_are_written_kept_and_match_a_renamed_group_on_adoption() {
    let d = Databricks::start_on(0, None).await.unwrap();
    let t = target(&d, DatabricksAuth::Token(Secret::new(TOKEN)));
    let s = common::directory();
    let alpha = s
        .groups
        .values()
        .find(|g| g.display_name == "TEAM_ALPHA")
        .unwrap()
        .id
        .clone();
    let old = d.state.insert(
        Type::Groups,
        serde_json::json!({"displayName": "TEAM_ALPHA_OLD", "externalId": alpha}),
    );
    let policy = idsync_engine::Policy {
        adopt_keys: [idsync_model::PKey::new(
            idsync_model::Kind::Group,
            "TEAM_ALPHA_OLD",
        )]
        .into(),
        ..Default::default()
    };
    let mut st = AgreementState::new("databricks");
    let (p, r) = common::sync_policy(&t, &s, &Mapping::defaults(), &policy, &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(
        p.summary.ops["create group"],
        s.groups.len() - 1,
        "every group but the adopted one is created"
    );
    assert_eq!(
        group(&d, "TEAM_ALPHA")["id"],
        old,
        "adopted and renamed, not duplicated"
    );
    {
        let data = d.state.data();
        for (t, kind) in [
            (Type::Users, "user"),
            (Type::ServicePrincipals, "service principal"),
            (Type::Groups, "group"),
        ] {
            for v in data[&t].values() {
                let x = v["externalId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{kind} without externalId: {v}"));
                let known = s.users.contains_key(x)
                    || s.service_principals.contains_key(x)
                    || s.groups.contains_key(x);
                assert!(known, "{kind} {v}: externalId is a source id");
            }
        }
    }
    // Changed by hand: the next full observation puts it back.
    let bob = d.state.data()[&Type::Users]
        .iter()
        .find(|(_, u)| u["userName"] == "bob@company.com")
        .map(|(id, _)| id.clone())
        .unwrap();
    d.state
        .data_mut()
        .get_mut(&Type::Users)
        .unwrap()
        .get_mut(&bob)
        .unwrap()["externalId"] = serde_json::json!("edited-by-hand");
    let (p, r) = common::sync_policy(&t, &s, &Mapping::defaults(), &policy, &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
    let bob_source = s
        .users
        .values()
        .find(|u| u.user_name == "bob@company.com")
        .unwrap();
    assert_eq!(
        d.state.data()[&Type::Users][&bob]["externalId"],
        bob_source.id.as_str()
    );
    let (p, _) = common::sync_policy(&t, &s, &Mapping::defaults(), &policy, &mut st).await;
    assert!(p.ops.is_empty(), "{:?}", p.ops);
}
