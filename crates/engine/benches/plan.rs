//! Times the pure engine on a large tenant: mapping a snapshot and planning against a target that
//! already holds everything (the no-change diff of every principal and membership), and against an
//! empty target (the first sync). Run: `cargo bench -p idsync-engine --bench plan -- [USERS]`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_engine::{Mapping, Policy, map_snapshot, plan};
use idsync_model::{
    AgreementState, Capabilities, Group, Kind, Member, Observed, ObservedPrincipal, Owned,
    Ownership, ReadMode, Snapshot, User, UserType,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

fn tenant(users: usize, groups: usize, per_group: usize) -> Snapshot {
    let mut s = Snapshot::default();
    for i in 0..users {
        let id = format!("u{i:07}");
        s.users.insert(
            id.clone(),
            std::sync::Arc::new(User {
                id,
                user_name: format!("user{i}@corp.example"),
                display_name: format!("User {i}"),
                emails: vec![format!("user{i}@corp.example")],
                active: true,
                user_type: UserType::Member,
                external_id: None,
                attributes: BTreeMap::new(),
            }),
        );
    }
    // Deterministic pseudo-random membership (an LCG), nesting every tenth group in the next.
    let mut x: u64 = 42;
    for g in 0..groups {
        let mut members = BTreeSet::new();
        while members.len() < per_group {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            members.insert(Member::user(format!("u{:07}", (x >> 33) as usize % users)));
        }
        if g % 10 == 0 && g + 1 < groups {
            members.insert(Member::group(format!("g{:06}", g + 1)));
        }
        let id = format!("g{g:06}");
        s.groups.insert(
            id.clone(),
            Group {
                id,
                display_name: format!("group-{g}"),
                description: None,
                security_enabled: true,
                mail_enabled: false,
                members: members.into(),
            },
        );
    }
    s
}

fn main() {
    let users: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(100_000);
    let groups = users / 10;
    let caps = Capabilities::full();
    let mapping = Mapping::defaults();
    let t = Instant::now();
    let snap = tenant(users, groups, 100);
    println!(
        "generated {users} users, {groups} groups, {} memberships in {:?}",
        snap.membership_count(),
        t.elapsed()
    );

    let t = Instant::now();
    let desired = map_snapshot(&snap, &mapping, &caps);
    println!("map_snapshot: {:?}", t.elapsed());

    // A target that holds exactly the desired state, all owned: the no-change diff.
    let mut observed = Observed::default();
    let mut state = AgreementState::new("bench");
    let mut ids = BTreeMap::new();
    for (i, (key, dp)) in desired.principals.iter().enumerate() {
        let id = format!("{i}");
        ids.insert(key.clone(), id.clone());
        observed.insert(ObservedPrincipal {
            id: id.clone(),
            principal: dp.principal.clone(),
            policies: BTreeSet::new(),
        });
        state
            .links
            .get_mut(key.kind)
            .insert(dp.source.id.clone(), id.clone());
        state.owned.get_mut(key.kind).insert(
            id,
            Owned {
                key: dp.principal.key.clone(),
                how: Ownership::Created,
                source: Some(dp.source.id.clone()),
            },
        );
    }
    for (g, ms) in &desired.members {
        observed.members.insert(
            ids[g].clone(),
            ms.iter().map(|m| (m.kind, ids[m].clone())).collect(),
        );
    }
    let t = Instant::now();
    let p = plan(
        &desired,
        &observed,
        &state,
        &Policy::default(),
        &caps,
        ReadMode::Full,
    );
    println!(
        "plan, no change ({} memberships diffed): {:?}, {} ops",
        snap.membership_count(),
        t.elapsed(),
        p.ops.len()
    );
    assert!(p.ops.is_empty());

    let t = Instant::now();
    let p = plan(
        &desired,
        &Observed::default(),
        &AgreementState::new("bench"),
        &Policy::default(),
        &caps,
        ReadMode::Full,
    );
    println!(
        "plan, first sync: {:?}, {} ops, {} members to add",
        t.elapsed(),
        p.ops.len(),
        p.summary.members_added
    );

    let flat = Capabilities {
        nested_groups: false,
        ..caps
    };
    let t = Instant::now();
    let p = plan(
        &desired,
        &Observed::default(),
        &AgreementState::new("bench"),
        &Policy::default(),
        &flat,
        ReadMode::Full,
    );
    println!(
        "plan, first sync, flattened: {:?}, {} members to add",
        t.elapsed(),
        p.summary.members_added
    );
    let _ = Kind::User;
}
