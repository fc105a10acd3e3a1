//! Shared helpers for the engine's tests: build snapshots tersely and run one full sync cycle.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_engine::{ApplyReport, Mapping, Policy};
use idsync_model::{
    AgreementState, Capabilities, Group, Member, Plan, ServicePrincipal, Snapshot, User, UserType,
};
use idsync_runner::testing::run_seeded;
use idsync_runner::{Mode, RunOptions};
use std::collections::BTreeMap;

pub fn user(id: &str, name: &str) -> User {
    User {
        id: id.into(),
        user_name: name.into(),
        display_name: format!("User {name}"),
        emails: vec![name.into()],
        active: true,
        user_type: UserType::Member,
        external_id: None,
        attributes: BTreeMap::new(),
    }
}

pub fn sp(id: &str, app: &str) -> ServicePrincipal {
    ServicePrincipal {
        id: id.into(),
        app_id: app.into(),
        display_name: format!("SP {app}"),
        active: true,
    }
}

pub fn group(id: &str, name: &str, members: &[Member]) -> Group {
    Group {
        id: id.into(),
        display_name: name.into(),
        description: None,
        security_enabled: true,
        mail_enabled: false,
        members: members.iter().cloned().collect(),
    }
}

pub fn snap(users: Vec<User>, sps: Vec<ServicePrincipal>, groups: Vec<Group>) -> Snapshot {
    let mut s = Snapshot::default();
    for u in users {
        s.users.insert(u.id.clone(), std::sync::Arc::new(u));
    }
    for p in sps {
        s.service_principals.insert(p.id.clone(), p);
    }
    for g in groups {
        s.groups.insert(g.id.clone(), g);
    }
    s
}

/// A lakeFS-like target: no nesting, no service principals, no rename, no deactivation.
pub fn flat_caps() -> Capabilities {
    Capabilities {
        nested_groups: false,
        service_principals: false,
        service_principal_members: false,
        renamable: Default::default(),
        deactivate: false,
        ..Capabilities::full()
    }
}

pub struct Run {
    pub plan: Plan,
    pub report: Option<ApplyReport>,
}

/// One run through [`idsync_runner::run_agreement`], as `idsync plan` (`Mode::Plan`) or
/// `idsync sync` (`Mode::Sync`) makes it, the target observed in full.
pub async fn run_with(
    s: &Snapshot,
    t: &dyn idsync_engine::Target,
    state: &mut AgreementState,
    policy: &Policy,
    mapping: &Mapping,
    mode: Mode,
) -> Run {
    let opts = RunOptions {
        mode,
        reconcile: None,
        // One clock for every run, so that two plans of one input are equal to the letter.
        now: Some(1_700_000_000),
        ..RunOptions::default()
    };
    let out = run_seeded(t, s, mapping, policy, state, &opts)
        .await
        .unwrap();
    Run {
        plan: out.file.unwrap().plan,
        report: out.report,
    }
}

/// The plan `idsync plan` shows: nothing is written, not even to the state.
pub async fn plan_only(
    s: &Snapshot,
    t: &dyn idsync_engine::Target,
    state: &AgreementState,
    policy: &Policy,
    mapping: &Mapping,
) -> Plan {
    let mut st = state.clone();
    run_with(s, t, &mut st, policy, mapping, Mode::Plan)
        .await
        .plan
}

/// Plans and, unless a guard halts it, applies everything, as `idsync sync` does.
pub async fn sync_with(
    s: &Snapshot,
    t: &dyn idsync_engine::Target,
    state: &mut AgreementState,
    policy: &Policy,
    mapping: &Mapping,
) -> Run {
    run_with(s, t, state, policy, mapping, Mode::Sync).await
}

pub async fn sync(
    s: &Snapshot,
    t: &dyn idsync_engine::Target,
    state: &mut AgreementState,
    policy: &Policy,
) -> Run {
    sync_with(s, t, state, policy, &Mapping::defaults()).await
}

/// Operation names with their subject, for compact assertions: `["create user \"a@x\"", ...]`.
pub fn ops(p: &Plan) -> Vec<String> {
    p.ops
        .iter()
        .map(|o| {
            let (k, key) = o.subject();
            let name = serde_json::to_value(o).unwrap()["op"]
                .as_str()
                .unwrap()
                .to_owned();
            match o {
                idsync_model::Op::AddMembers { members, .. }
                | idsync_model::Op::RemoveMembers { members, .. } => {
                    let ms: Vec<&str> = members.iter().map(|m| m.key.as_str()).collect();
                    format!("{name} {k} {key:?} {ms:?}")
                }
                _ => format!("{name} {k} {key:?}"),
            }
        })
        .collect()
}
