//! The lakeFS target against the lakeFS emulator, driven by the real engine: a first sync, a second
//! run that writes nothing, a 429 storm, a failed half then a re-run, and the 401 / 501 messages.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use idsync_connectors::http::HttpConfig;
use idsync_connectors::targets::lakefs::{LakefsConfig, LakefsTarget};
use idsync_emulators::Lakefs;
use idsync_emulators::infra::{Faults, ThrottleConfig};
use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use idsync_engine::{Mapping, Target, TargetErrorKind};
use idsync_model::{AgreementState, Secret};
use std::time::Duration;

fn config(l: &Lakefs, secret: &str) -> LakefsConfig {
    LakefsConfig {
        endpoint: l.server.base_url.clone(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key: Secret::new(secret),
        http: HttpConfig {
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_secs(2),
            ..HttpConfig::new("lakeFS")
        },
        default_user_group: None,
    }
}

fn target(l: &Lakefs, secret: &str) -> LakefsTarget {
    LakefsTarget::new(config(l, secret)).unwrap()
}

fn mapping() -> Mapping {
    let mut m = Mapping::defaults();
    m.user_name = Mapping::user_template("waad|{id}").unwrap();
    m.guest_user_name = None;
    m.group_policies = [
        "AuthManageOwnCredentials".to_string(),
        "FSReadAll".to_string(),
    ]
    .into();
    m
}

fn writes(l: &Lakefs) -> u64 {
    l.state
        .infra
        .accounting
        .snapshot()
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn syncs_flattens_attaches_policies_and_then_writes_nothing() {
    let l = Lakefs::start_on(0).await.unwrap();
    let t = target(&l, SECRET_ACCESS_KEY);
    let mut st = AgreementState::new("lakefs");
    let (p, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert_eq!(p.summary.ops["create user"], 7);
    assert_eq!(p.summary.ops["create group"], 4);
    let zeta = l.state.group_by_name("TEAM_ZETA").unwrap();
    // TEAM_ETA (alice, kevin) is nested in TEAM_ZETA (erin): flattened.
    let mut members: Vec<&str> = zeta.members.iter().map(String::as_str).collect();
    members.sort();
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|m| m.starts_with("waad|")));
    assert_eq!(zeta.policies.len(), 2);
    // Operations and requests are told apart: lakeFS takes one request per member added, and
    // the emulator saw exactly the requests the target counted.
    let sent = r.requests.expect("the lakeFS target counts its requests");
    assert!(
        sent.writes > r.writes as u64,
        "{sent:?} for {} operations",
        r.writes
    );
    assert_eq!(sent.writes, writes(&l));
    let before = writes(&l);
    let (p, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!(r.writes, 0);
    assert_eq!(writes(&l), before, "a second run writes nothing");
}

#[tokio::test]
async fn a_429_storm_and_a_failed_half_converge_without_duplicates() {
    let l = Lakefs::start_on(0).await.unwrap();
    let t = target(&l, SECRET_ACCESS_KEY);
    let mut st = AgreementState::new("lakefs");
    // Every membership write fails: users and groups are made, memberships are not.
    l.state.infra.set_faults(Faults {
        error_rate: 1.0,
        path_contains: "/members/".into(),
        ..Faults::default()
    });
    let (_, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(!r.is_success());
    assert!(!r.failed.is_empty());
    l.state.infra.set_faults(Faults::default());
    // A throttled re-run finishes the job and duplicates nothing.
    l.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 3.0,
        per_second: 200.0,
    }));
    let (p, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    assert!(
        !p.summary.ops.keys().any(|k| k.starts_with("create")),
        "{:?}",
        p.summary.ops
    );
    l.state.infra.set_throttle(None);
    {
        let d = l.state.data();
        assert_eq!(d.users.len(), 8, "admin + 7, no duplicate");
        assert_eq!(d.groups.len(), 4);
    }
    let (p, _) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(p.ops.is_empty());
}

#[tokio::test]
async fn wrong_keys_and_open_source_lakefs_say_what_to_do() {
    let l = Lakefs::start_on(0).await.unwrap();
    let e = target(&l, "wrong").observe().await.unwrap_err();
    assert_eq!(e.kind, TargetErrorKind::Unauthorized);
    assert!(
        e.message.contains("LAKEFS_SECRET_ACCESS_KEY"),
        "{}",
        e.message
    );
    assert!(!e.message.contains("wrong"), "{}", e.message);
    l.state.set_rbac(false);
    let e = target(&l, SECRET_ACCESS_KEY).observe().await.unwrap_err();
    assert_eq!(e.kind, TargetErrorKind::NotImplemented);
    assert!(e.message.contains("no RBAC"), "{}", e.message);
}

#[tokio::test]
async fn the_target_conformance_suite() {
    let l = Lakefs::start_on(0).await.unwrap();
    let t = target(&l, SECRET_ACCESS_KEY);
    let subject = idsync_runner::testing::Subject {
        target: &t,
        mapping: mapping(),
        storm: Some(common::storm(&l.state.infra)),
    };
    idsync_runner::testing::conformance(subject, common::directory())
        .await
        .unwrap();
}

/// `default_user_group`: every user idsync creates joins it, as lakeFS adds the users it creates
/// at an LDAP login; a group that does not exist stops each create before the user is made, with
/// a message saying what to do; the group itself is never idsync's (not written to again, not
/// deleted).
#[tokio::test]
async fn created_users_join_the_default_user_group_which_must_exist() {
    let l = Lakefs::start_on(0).await.unwrap();
    let t = LakefsTarget::new(LakefsConfig {
        default_user_group: Some("Viewers".into()),
        ..config(&l, SECRET_ACCESS_KEY)
    })
    .unwrap();
    let mut st = AgreementState::new("lakefs");
    let (_, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(!r.is_success());
    let why = format!("{:?}", r.failed);
    assert!(
        why.contains("default_user_group \\\"Viewers\\\" is not a lakeFS group"),
        "{why}"
    );
    // The emulator starts with its administrator only.
    let users = || -> Vec<String> {
        l.state
            .data()
            .users
            .keys()
            .filter(|u| *u != "admin")
            .cloned()
            .collect()
    };
    assert!(users().is_empty(), "no user was made outside the group");

    // The administrator makes the group (as for lakeFS's own setting); the next run (the groups
    // the first one made are in the state) puts every user it creates in it.
    let t = LakefsTarget::new(LakefsConfig {
        default_user_group: Some("Viewers".into()),
        ..config(&l, SECRET_ACCESS_KEY)
    })
    .unwrap();
    l.state.add_group("g-viewers", "Viewers");
    // Joining it fails (every try): each user made is removed again, none is left outside.
    l.state.infra.set_faults(Faults {
        error_rate: 1.0,
        path_contains: "/groups/g-viewers/members/".into(),
        ..Faults::default()
    });
    let (_, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(!r.is_success());
    assert!(users().is_empty(), "undone: {:?}", users());
    l.state.infra.set_faults(Faults::default());
    let (p, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(r.is_success(), "{r:?}");
    let viewers = l.state.group_by_name("Viewers").unwrap();
    assert_eq!(viewers.members.len(), p.summary.ops["create user"]);
    assert_eq!(
        viewers.members.iter().cloned().collect::<Vec<_>>(),
        users(),
        "every user idsync made, and only those"
    );
    let before = writes(&l);
    let (p, r) = common::sync(&t, &common::directory(), &mapping(), &mut st).await;
    assert!(p.ops.is_empty(), "{:?}", p.ops);
    assert_eq!(r.writes, 0);
    assert_eq!(writes(&l), before);
    assert!(l.state.group_by_name("Viewers").is_some());
}
