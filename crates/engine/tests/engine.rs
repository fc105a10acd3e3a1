//! Table-driven tests of the plan engine: every operation and every policy, on small snapshots,
//! applied to the in-memory reference target.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use idsync_engine::{Deprovision, Mapping, MemoryTarget, OnConflict, Policy, Target};
use idsync_model::{
    AgreementState, Capabilities, HaltReason, Kind, Member, Op, PKey, Principal, UserType,
};

fn block<F: std::future::Future>(f: F) -> F::Output {
    // The runner keeps a lease alive with tokio's timers.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn base() -> idsync_model::Snapshot {
    snap(
        vec![
            user("u1", "alice@x"),
            user("u2", "bob@x"),
            user("u3", "kevin@x"),
        ],
        vec![sp("s1", "app-1")],
        vec![
            group(
                "g1",
                "TEAM_ALPHA",
                &[
                    Member::user("u1"),
                    Member::service_principal("s1"),
                    Member::group("g2"),
                ],
            ),
            group("g2", "TEAM_ETA", &[Member::user("u3")]),
            group("g3", "TEAM_ZETA", &[Member::user("u2")]),
        ],
    )
}

#[test]
fn first_run_creates_everything_then_second_run_is_empty() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            [
                "create user \"alice@x\"",
                "create user \"bob@x\"",
                "create user \"kevin@x\"",
                "create servicePrincipal \"app-1\"",
                "create group \"TEAM_ALPHA\"",
                "create group \"TEAM_ETA\"",
                "create group \"TEAM_ZETA\"",
                "addMembers group \"TEAM_ALPHA\" [\"alice@x\", \"app-1\", \"TEAM_ETA\"]",
                "addMembers group \"TEAM_ETA\" [\"kevin@x\"]",
                "addMembers group \"TEAM_ZETA\" [\"bob@x\"]",
            ]
        );
        let rep = r.report.unwrap();
        assert!(rep.is_success(), "{rep:?}");
        assert_eq!(rep.writes, 10);
        assert_eq!(st.owned_count(), 7);
        assert!(st.journal.is_none());
        let again = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));
        assert_eq!(again.report.unwrap().writes, 0);
    })
}

#[test]
fn plans_are_deterministic() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let st = AgreementState::new("t");
        let a = plan_only(&base(), &t, &st, &Policy::default(), &Mapping::defaults()).await;
        let b = plan_only(&base(), &t, &st, &Policy::default(), &Mapping::defaults()).await;
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    })
}

#[test]
fn attribute_changes_renames_and_reactivation() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let mut s = base();
        s.user_mut("u1").unwrap().display_name = "Alice Liddell".into();
        s.user_mut("u2").unwrap().user_name = "robert@x".into();
        s.groups.get_mut("g3").unwrap().display_name = "TEAM_ZETA_2".into();
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            // Renames first (they free keys), then other attribute changes.
            [
                "update user \"bob@x\"",
                "update group \"TEAM_ZETA\"",
                "update user \"alice@x\""
            ]
        );
        let Op::Update { changes, .. } = &r.plan.ops[0] else {
            panic!()
        };
        assert_eq!(
            changes.iter().map(|c| c.attr.as_str()).collect::<Vec<_>>(),
            ["key"]
        );
        assert!(
            sync(&s, &t, &mut st, &Policy::default())
                .await
                .plan
                .ops
                .is_empty()
        );
    })
}

#[test]
fn a_rename_on_a_target_that_cannot_rename_is_create_plus_deprovision() {
    block(async {
        let t = MemoryTarget::new(Capabilities {
            renamable: [Kind::Group].into(),
            ..Capabilities::full()
        });
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let mut s = base();
        s.user_mut("u2").unwrap().user_name = "robert@x".into();
        let policy = Policy {
            deprovision: Deprovision::Deactivate,
            ..Policy::default()
        };
        let r = sync(&s, &t, &mut st, &policy).await;
        assert_eq!(
            ops(&r.plan),
            [
                "create user \"robert@x\"",
                "removeMembers group \"TEAM_ZETA\" [\"bob@x\"]",
                "addMembers group \"TEAM_ZETA\" [\"robert@x\"]",
                "deactivate user \"bob@x\"",
            ]
        );
        assert!(
            r.plan.notes.iter().any(|n| n.contains("cannot rename")),
            "{:?}",
            r.plan.notes
        );
    })
}

#[test]
fn deprovision_policies() {
    for (policy, want, kept) in [
        // bob, kevin and TEAM_ETA leave the source.
        (
            Deprovision::None,
            vec!["removeMembers group \"TEAM_ZETA\" [\"bob@x\"]"],
            3,
        ),
        (
            Deprovision::Deactivate,
            vec![
                "removeMembers group \"TEAM_ZETA\" [\"bob@x\"]",
                "deactivate user \"bob@x\"",
            ],
            1, // the users are deactivated; the group cannot be: kept
        ),
        (
            Deprovision::Delete,
            vec![
                "removeMembers group \"TEAM_ZETA\" [\"bob@x\"]",
                "delete group \"TEAM_ETA\"",
                "delete user \"bob@x\"",
            ],
            0,
        ),
    ] {
        block(async {
            let t = MemoryTarget::new(Capabilities::full());
            let mut st = AgreementState::new("t");
            sync(&base(), &t, &mut st, &Policy::default()).await;
            // bob leaves every group; TEAM_ETA leaves the source.
            let mut s = base();
            s.users.remove("u2");
            s.groups.get_mut("g3").unwrap().members.clear();
            s.groups
                .get_mut("g1")
                .unwrap()
                .members
                .remove(&Member::group("g2"));
            s.groups.remove("g2");
            s.users.remove("u3");
            let p = Policy {
                deprovision: policy,
                ..Policy::default()
            };
            let r = plan_only(&s, &t, &st, &p, &Mapping::defaults()).await;
            let mut got = ops(&r);
            got.retain(|o| !o.contains("TEAM_ALPHA") && !o.contains("kevin"));
            assert_eq!(got, want, "{policy:?}");
            let r = sync(&s, &t, &mut st, &p).await;
            assert!(r.report.unwrap().is_success());
            assert_eq!(r.plan.summary.kept, kept, "{policy:?}");
            // Everything converges.
            assert!(
                sync(&s, &t, &mut st, &p).await.plan.ops.is_empty(),
                "{policy:?}"
            );
        });
    }
}

#[test]
fn a_user_disabled_in_the_source_is_deactivated_and_counts_as_destructive() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let mut s = base();
        s.user_mut("u1").unwrap().active = false;
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert_eq!(ops(&r.plan), ["update user \"alice@x\""]);
        assert_eq!(r.plan.summary.destructive, 1);
    })
}

fn outsider_target() -> (MemoryTarget, String) {
    let t = MemoryTarget::new(Capabilities::full());
    let mut p = Principal::new(Kind::User, "alice@x");
    p.display_name = Some("made by hand".into());
    let id = t.insert(p);
    (t, id)
}

#[test]
fn an_unowned_principal_with_the_same_key_is_a_conflict_that_halts() {
    block(async {
        let (t, id) = outsider_target();
        let mut st = AgreementState::new("t");
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert_eq!(r.plan.conflicts.len(), 1);
        assert_eq!(r.plan.conflicts[0].target_id.as_deref(), Some(id.as_str()));
        assert!(r.plan.conflicts[0].reason.contains("adopt"));
        assert_eq!(r.plan.halt.as_ref().unwrap().reason, HaltReason::Conflicts);
        assert!(r.report.is_none());
        assert_eq!(t.writes(), 0, "a halted plan writes nothing");
    })
}

#[test]
fn on_conflict_skip_leaves_the_unowned_principal_alone_and_syncs_the_rest() {
    block(async {
        let (t, id) = outsider_target();
        let mut st = AgreementState::new("t");
        let policy = Policy {
            on_conflict: OnConflict::Skip,
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        let r = sync(&base(), &t, &mut st, &policy).await;
        assert!(r.plan.halt.is_none());
        assert!(
            !ops(&r.plan)
                .iter()
                .any(|o| o.starts_with("create user \"alice@x\"") || o.starts_with("update"))
        );
        assert!(r.report.unwrap().is_success());
        let o = t.observe().await.unwrap();
        let alice = o.get(Kind::User, &id).unwrap();
        assert_eq!(
            alice.principal.display_name.as_deref(),
            Some("made by hand")
        );
        assert!(!st.owns(Kind::User, &id));
        // Membership is the group's attribute: our group may hold the unowned user.
        let again = sync(&base(), &t, &mut st, &policy).await;
        assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));
    })
}

#[test]
fn adopt_globally_or_per_entry() {
    for policy in [
        Policy {
            adopt: true,
            ..Policy::default()
        },
        Policy {
            adopt_keys: [PKey::new(Kind::User, "alice@x")].into(),
            ..Policy::default()
        },
    ] {
        block(async {
            let (t, id) = outsider_target();
            let mut st = AgreementState::new("t");
            let r = sync(&base(), &t, &mut st, &policy).await;
            assert!(r.plan.conflicts.is_empty());
            let o = ops(&r.plan);
            assert_eq!(o[0], "adopt user \"alice@x\"");
            assert_eq!(o[1], "update user \"alice@x\"");
            assert!(st.owns(Kind::User, &id));
            assert_eq!(st.owned.users[&id].how, idsync_model::Ownership::Adopted);
        });
    }
}

#[test]
fn unowned_principals_are_never_deprovisioned() {
    block(async {
        let (t, id) = outsider_target();
        let mut st = AgreementState::new("t");
        let mut s = base();
        s.users.remove("u1");
        for g in s.groups.values_mut() {
            g.members.remove(&Member::user("u1"));
        }
        let policy = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        let r = sync(&s, &t, &mut st, &policy).await;
        assert!(r.report.unwrap().is_success());
        assert!(t.observe().await.unwrap().get(Kind::User, &id).is_some());
    })
}

fn ten_users() -> idsync_model::Snapshot {
    let users: Vec<_> = (0..10)
        .map(|i| user(&format!("u{i}"), &format!("user{i}@x")))
        .collect();
    let members: Vec<Member> = (0..10).map(|i| Member::user(format!("u{i}"))).collect();
    snap(users, vec![], vec![group("g", "ALL", &members)])
}

#[test]
fn the_threshold_halts_before_any_write_and_approval_lets_it_through() {
    // 11 owned principals; 4 users leave.
    let cases = [
        (Some(3), None, 0, true),
        (Some(4), None, 0, false),
        (None, Some(30), 0, true), // 4 / 11 = 36 % > 30 %
        (None, Some(40), 0, false),
        (Some(3), Some(30), 4, false), // approved
        (Some(3), None, 3, true),      // approved fewer than needed
    ];
    for (max, pct, approved, halts) in cases {
        block(async {
            let t = MemoryTarget::new(Capabilities::full());
            let mut st = AgreementState::new("t");
            sync(&ten_users(), &t, &mut st, &Policy::default()).await;
            let writes = t.writes();
            let mut s = ten_users();
            for i in 0..4 {
                s.users.remove(&format!("u{i}"));
            }
            s.groups
                .get_mut("g")
                .unwrap()
                .members
                .retain(|m| s.users.contains_key(&*m.id));
            let policy = Policy {
                deprovision: Deprovision::Delete,
                max_deletions: max,
                max_deletions_percent: pct,
                approved_deletions: approved,
                ..Policy::default()
            };
            let r = sync(&s, &t, &mut st, &policy).await;
            let case = format!("{max:?} {pct:?} {approved}");
            assert_eq!(r.plan.summary.destructive, 4, "{case}");
            if halts {
                let h = r.plan.halt.as_ref().expect(&case);
                assert_eq!(h.reason, HaltReason::Threshold);
                assert!(h.message.contains("--approve-deletions 4"), "{}", h.message);
                assert_eq!(t.writes(), writes, "{case}: halted plans write nothing");
            } else {
                assert!(r.plan.halt.is_none(), "{case}");
                assert!(r.report.unwrap().is_success());
            }
        });
    }
}

#[test]
fn an_empty_source_is_never_taken_to_mean_everyone_left() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let policy = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        // First run on an empty source with nothing managed yet: fine, nothing to do.
        let r = sync(&snap(vec![], vec![], vec![]), &t, &mut st, &policy).await;
        assert!(r.plan.halt.is_none());
        sync(&base(), &t, &mut st, &policy).await;
        let r = sync(&snap(vec![], vec![], vec![]), &t, &mut st, &policy).await;
        assert_eq!(r.plan.halt.unwrap().reason, HaltReason::EmptySource);
        assert_eq!(t.observe().await.unwrap().len(), 7);
        let allow = Policy {
            allow_empty_source: true,
            ..policy
        };
        let r = plan_only(
            &snap(vec![], vec![], vec![]),
            &t,
            &st,
            &allow,
            &Mapping::defaults(),
        )
        .await;
        assert!(r.halt.is_none());
        assert_eq!(r.summary.destructive, 7);
    })
}

#[test]
fn an_incomplete_group_read_removes_nobody() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let policy = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        sync(&base(), &t, &mut st, &policy).await;
        let mut s = base();
        s.groups.get_mut("g3").unwrap().members.clear();
        s.users.remove("u2");
        s.incomplete_groups.insert("g3".into());
        let r = sync(&s, &t, &mut st, &policy).await;
        assert!(r.plan.ops.is_empty(), "{:?}", ops(&r.plan));
        assert!(r.plan.notes.iter().any(|n| n.contains("incomplete")));
    })
}

#[test]
fn flattening_for_targets_that_do_not_nest_is_safe_through_cycles() {
    block(async {
        let t = MemoryTarget::new(flat_caps());
        let mut st = AgreementState::new("t");
        let mut s = base();
        // Cycle: TEAM_ETA contains TEAM_ALPHA, which contains TEAM_ETA.
        s.groups
            .get_mut("g2")
            .unwrap()
            .members
            .insert(Member::group("g1"));
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            [
                "create user \"alice@x\"",
                "create user \"bob@x\"",
                "create user \"kevin@x\"",
                "create group \"TEAM_ALPHA\"",
                "create group \"TEAM_ETA\"",
                "create group \"TEAM_ZETA\"",
                // The service principal is not a member here: lakeFS-like groups hold only users.
                "addMembers group \"TEAM_ALPHA\" [\"alice@x\", \"kevin@x\"]",
                "addMembers group \"TEAM_ETA\" [\"alice@x\", \"kevin@x\"]",
                "addMembers group \"TEAM_ZETA\" [\"bob@x\"]",
            ]
        );
        assert!(r.report.unwrap().is_success());
        // Moving kevin out of the nested group removes him from both flattened groups.
        s.groups
            .get_mut("g2")
            .unwrap()
            .members
            .remove(&Member::user("u3"));
        s.groups
            .get_mut("g3")
            .unwrap()
            .members
            .insert(Member::user("u3"));
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            [
                "removeMembers group \"TEAM_ALPHA\" [\"kevin@x\"]",
                "removeMembers group \"TEAM_ETA\" [\"kevin@x\"]",
                "addMembers group \"TEAM_ZETA\" [\"kevin@x\"]",
            ]
        );
    })
}

#[test]
fn duplicate_keys_are_conflicts_for_every_claimant() {
    block(async {
        let t = MemoryTarget::new(Capabilities {
            case_insensitive_keys: true,
            ..Capabilities::full()
        });
        let mut st = AgreementState::new("t");
        let mut s = base();
        s.groups.insert("g4".into(), group("g4", "team_alpha", &[]));
        let p = Policy {
            on_conflict: OnConflict::Skip,
            ..Policy::default()
        };
        let r = sync(&s, &t, &mut st, &p).await;
        assert_eq!(r.plan.conflicts.len(), 1);
        assert_eq!(r.plan.conflicts[0].sources.len(), 2);
        assert!(
            !ops(&r.plan)
                .iter()
                .any(|o| o.to_lowercase().contains("team_alpha"))
        );
    })
}

#[test]
fn a_key_three_principals_map_to_holds_back_all_three_and_their_memberships() {
    let caps = Capabilities {
        case_insensitive_keys: true,
        ..Capabilities::full()
    };
    let s = snap(
        vec![
            user("u1", "Dup@x"),
            user("u2", "alice@x"),
            user("u3", "DUP@x"),
            user("u4", "dup@x"),
        ],
        vec![],
        vec![group(
            "g1",
            "TEAM",
            &[Member::user("u1"), Member::user("u2"), Member::user("u4")],
        )],
    );
    let d = idsync_engine::map_snapshot(&s, &Mapping::defaults(), &caps);
    let keys: Vec<String> = d.principals.keys().map(ToString::to_string).collect();
    assert_eq!(keys, [r#"user "alice@x""#, r#"group "team""#]);
    let held: Vec<(&str, Option<String>)> = d
        .held_back
        .iter()
        .map(|(s, h)| (s.id.as_str(), h.key.as_ref().map(ToString::to_string)))
        .collect();
    let dup = Some(r#"user "dup@x""#.to_owned());
    assert_eq!(
        held,
        [("u1", dup.clone()), ("u3", dup.clone()), ("u4", dup)]
    );
    // The claimants in the order they were mapped (the snapshot's).
    assert!(
        d.held_back.values().all(|h| h.reason
            == r#"3 source principals map to user "dup@x" (source ids u1, u3, u4); rename one in the source or change the mapping"#),
        "{:?}",
        d.held_back
    );
    // Their memberships are neither synced nor counted as missing.
    let team = PKey::new(Kind::Group, "team");
    let members: Vec<String> = d.members[&team].iter().map(ToString::to_string).collect();
    assert_eq!(members, [r#"user "alice@x""#]);
    assert_eq!((d.missing_members, d.dangling_members), (0, 0));
}

#[test]
fn stale_links_and_vanished_principals_heal() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        // Someone deletes alice and TEAM_ZETA in the target, behind idsync's back.
        let alice = st.link(Kind::User, "u1").unwrap().to_owned();
        let zeta = st.link(Kind::Group, "g3").unwrap().to_owned();
        for (k, key, id) in [
            (Kind::User, "alice@x", &alice),
            (Kind::Group, "TEAM_ZETA", &zeta),
        ] {
            let target = idsync_model::PRef {
                kind: k,
                key: key.into(),
                id: Some(id.clone()),
            };
            t.execute(&Op::Delete {
                target,
                frees_key: false,
            })
            .await
            .unwrap();
        }
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            [
                "forget user \"alice@x\"",
                "forget group \"TEAM_ZETA\"",
                "create user \"alice@x\"",
                "create group \"TEAM_ZETA\"",
                "addMembers group \"TEAM_ALPHA\" [\"alice@x\"]",
                "addMembers group \"TEAM_ZETA\" [\"bob@x\"]",
            ]
        );
        assert!(r.report.unwrap().is_success());
        assert!(!st.owns(Kind::User, &alice));
        assert_ne!(st.link(Kind::User, "u1").unwrap(), alice);
        // An owned principal gone from the target and from the source is forgotten.
        let mut s = base();
        s.users.remove("u2");
        s.groups.get_mut("g3").unwrap().members.clear();
        let bob = st.link(Kind::User, "u2").unwrap().to_owned();
        let target = idsync_model::PRef {
            kind: Kind::User,
            key: "bob@x".into(),
            id: Some(bob.clone()),
        };
        t.execute(&Op::Delete {
            target,
            frees_key: false,
        })
        .await
        .unwrap();
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert_eq!(ops(&r.plan), ["forget user \"bob@x\""]);
        assert!(!st.owns(Kind::User, &bob));
    })
}

#[test]
fn a_crash_in_the_middle_of_an_apply_resumes_cleanly() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        t.fail_after(Some(4));
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        let rep = r.report.unwrap();
        assert!(!rep.is_success());
        assert_eq!(rep.writes, 4);
        // The crash happened before the state learnt of the creates: simulate the worst case, a
        // state that still has only the journal written before the first write.
        let mut crashed = AgreementState::new("t");
        idsync_engine::apply::begin(&r.plan, &t.capabilities(), &mut crashed);
        t.fail_after(None);
        let r = sync(&base(), &t, &mut crashed, &Policy::default()).await;
        assert!(r.plan.conflicts.is_empty(), "{:?}", r.plan.conflicts);
        assert!(r.plan.notes.iter().any(|n| n.contains("did not finish")));
        assert!(r.report.unwrap().is_success());
        let o = t.observe().await.unwrap();
        assert_eq!(o.len(), 7, "nothing duplicated");
        assert!(crashed.journal.is_none());
        // What the dead run created is recorded as created, not as adopted.
        for kind in Kind::ALL {
            for (id, owned) in crashed.owned.get(kind) {
                assert_eq!(
                    owned.how,
                    idsync_model::Ownership::Created,
                    "{kind} {id} {}",
                    owned.key
                );
            }
        }
        assert!(
            sync(&base(), &t, &mut crashed, &Policy::default())
                .await
                .plan
                .ops
                .is_empty()
        );
    })
}

#[test]
fn yielded_attributes_and_members_are_left_to_the_target() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let mut s = base();
        s.user_mut("u1").unwrap().display_name = "changed".into();
        s.groups.get_mut("g3").unwrap().members.clear();
        let policy = Policy {
            yield_attributes: [idsync_model::Attr::DisplayName].into(),
            yield_members: true,
            ..Policy::default()
        };
        assert!(sync(&s, &t, &mut st, &policy).await.plan.ops.is_empty());
    })
}

#[test]
fn default_policies_are_attached_to_groups() {
    block(async {
        let caps = Capabilities {
            group_policies: true,
            ..flat_caps()
        };
        let t = MemoryTarget::new(caps);
        let mut st = AgreementState::new("t");
        let mut mapping = Mapping::defaults();
        mapping.group_policies = [
            "AuthManageOwnCredentials".to_string(),
            "FSReadAll".to_string(),
        ]
        .into();
        let r = sync_with(&base(), &t, &mut st, &Policy::default(), &mapping).await;
        assert_eq!(
            r.plan
                .ops
                .iter()
                .filter(|o| matches!(o, Op::AttachPolicies { .. }))
                .count(),
            3
        );
        assert!(r.report.unwrap().is_success());
        mapping.group_policies.insert("FSWriteAll".into());
        let r = sync_with(&base(), &t, &mut st, &Policy::default(), &mapping).await;
        assert_eq!(r.plan.ops.len(), 3);
        assert!(r.plan.ops.iter().all(
            |o| matches!(o, Op::AttachPolicies { policies, .. } if policies == &["FSWriteAll"])
        ));
    })
}

#[test]
fn members_added_outside_idsync_to_an_owned_group_are_removed() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let stranger = t.insert(Principal::new(Kind::User, "stranger@x"));
        let zeta = st.link(Kind::Group, "g3").unwrap().to_owned();
        t.insert_member(&zeta, Kind::User, &stranger);
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&r.plan),
            ["removeMembers group \"TEAM_ZETA\" [\"stranger@x\"]"]
        );
        // The stranger itself is not idsync's and stays.
        assert!(
            t.observe()
                .await
                .unwrap()
                .get(Kind::User, &stranger)
                .is_some()
        );
    })
}

#[test]
fn guests_map_by_mail_and_unmappable_principals_are_held_back_not_deprovisioned() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let mut s = base();
        let g = s.user_mut("u2").unwrap();
        g.user_type = UserType::Guest;
        g.user_name = "bob_ext#EXT#@corp.onmicrosoft.com".into();
        g.emails = vec!["bob@partner.example".into()];
        let policy = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        let r = sync(&s, &t, &mut st, &policy).await;
        assert!(ops(&r.plan).contains(&"create user \"bob@partner.example\"".to_string()));
        // The guest's mail disappears: the user cannot be mapped, so it is held back, not deleted.
        s.user_mut("u2").unwrap().emails.clear();
        let r = sync(&s, &t, &mut st, &policy).await;
        assert!(
            !ops(&r.plan).iter().any(|o| o.starts_with("delete")),
            "{:?}",
            ops(&r.plan)
        );
        assert!(
            r.plan.notes.iter().any(|n| n.contains("{mail} is empty")),
            "{:?}",
            r.plan.notes
        );
    })
}

#[test]
fn lakefs_style_user_ids_from_templates() {
    block(async {
        let t = MemoryTarget::new(flat_caps());
        let mut st = AgreementState::new("t");
        let mut mapping = Mapping::defaults();
        mapping.user_name = Mapping::user_template("waad|{id}").unwrap();
        mapping.guest_user_name = None;
        let r = sync_with(&base(), &t, &mut st, &Policy::default(), &mapping).await;
        assert!(ops(&r.plan).contains(&"create user \"waad|u1\"".to_string()));
    })
}

// ----- Findings of the first review, each pinned by a test. -----

#[test]
fn a_refused_create_is_not_remembered_so_a_hand_made_principal_is_never_adopted() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let p = plan_only(&base(), &t, &st, &Policy::default(), &Mapping::defaults()).await;
        // Between plan and apply, an admin creates TEAM_ZETA by hand: idsync's create is refused.
        let hand = t.insert(Principal::new(Kind::Group, "TEAM_ZETA"));
        let caps = t.capabilities();
        let file = idsync_model::PlanFile {
            plan: p.clone(),
            snapshot: base().into(),
            cursors: Default::default(),
            checksum: None,
        };
        idsync_engine::apply::begin(&p, &caps, &mut st);
        let rep = idsync_engine::apply(&p, &t, &mut st, &Default::default()).await;
        assert_eq!(rep.failed.len(), 1);
        idsync_engine::apply::finish(&file, &rep, &caps, &mut st, true);
        assert!(st.journal.is_none(), "a refused create is not pending");
        let r = plan_only(&base(), &t, &st, &Policy::default(), &Mapping::defaults()).await;
        assert!(
            r.conflicts
                .iter()
                .any(|c| c.target_id.as_deref() == Some(hand.as_str())),
            "{:?}",
            r.conflicts
        );
    })
}

#[test]
fn a_journaled_key_whose_external_id_says_someone_else_is_not_adopted() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut crashed = AgreementState::new("t");
        let p = plan_only(
            &base(),
            &t,
            &crashed,
            &Policy::default(),
            &Mapping::defaults(),
        )
        .await;
        idsync_engine::apply::begin(&p, &t.capabilities(), &mut crashed);
        let mut other = Principal::new(Kind::User, "alice@x");
        other.external_id = Some("someone-else".into());
        t.insert(other);
        let r = plan_only(
            &base(),
            &t,
            &crashed,
            &Policy::default(),
            &Mapping::defaults(),
        )
        .await;
        assert_eq!(r.conflicts.len(), 1, "{:?}", r.conflicts);
    })
}

#[test]
fn a_key_freed_by_a_user_who_cannot_be_renamed_is_not_handed_to_a_new_hire() {
    block(async {
        let t = MemoryTarget::new(Capabilities {
            renamable: [Kind::Group].into(),
            ..Capabilities::full()
        });
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let old_alice = st.link(Kind::User, "u1").unwrap().to_owned();
        let mut s = base();
        s.user_mut("u1").unwrap().user_name = "alice.smith@x".into();
        s.users
            .insert("u9".into(), std::sync::Arc::new(user("u9", "alice@x"))); // the new hire gets the old name
        s.groups
            .get_mut("g3")
            .unwrap()
            .members
            .insert(Member::user("u9"));
        let p = Policy {
            on_conflict: OnConflict::Skip,
            ..Policy::default()
        };
        let r = sync(&s, &t, &mut st, &p).await;
        let c = r
            .plan
            .conflicts
            .iter()
            .find(|c| c.target_id.as_deref() == Some(old_alice.as_str()))
            .expect("a conflict");
        assert!(c.reason.contains("still in the source"), "{}", c.reason);
        assert_ne!(st.link(Kind::User, "u9"), Some(old_alice.as_str()));
        assert_eq!(
            st.link(Kind::User, "u1").map(|l| l != old_alice),
            Some(true)
        );
    })
}

#[test]
fn held_back_principals_keep_their_memberships() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let mut s = base();
        let g = s.user_mut("u2").unwrap();
        g.user_type = UserType::Guest;
        g.emails = vec!["bob@partner".into()];
        sync(&s, &t, &mut st, &Policy::default()).await;
        // The guest's mail goes away: it cannot be mapped, and must not be removed from groups.
        s.user_mut("u2").unwrap().emails.clear();
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert!(r.plan.ops.is_empty(), "{:?}", ops(&r.plan));
    })
}

#[test]
fn a_flattened_group_is_incomplete_when_a_nested_group_is() {
    block(async {
        let t = MemoryTarget::new(flat_caps());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        // TEAM_ETA (nested in TEAM_ALPHA) could not be read completely: kevin is missing from it.
        let mut s = base();
        s.groups.get_mut("g2").unwrap().members.clear();
        s.incomplete_groups.insert("g2".into());
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        assert!(
            !ops(&r.plan).iter().any(|o| o.starts_with("removeMembers")),
            "{:?}",
            ops(&r.plan)
        );
    })
}

#[test]
fn a_target_that_lost_most_of_what_idsync_owns_halts() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let empty = MemoryTarget::new(Capabilities::full()); // a wrong path, a wrong account
        let r = sync(&base(), &empty, &mut st, &Policy::default()).await;
        let h = r.plan.halt.expect("halted");
        assert_eq!(h.reason, HaltReason::TargetVanished);
        assert!(h.message.contains("--approve-deletions 7"), "{}", h.message);
        assert_eq!(empty.writes(), 0);
        assert_eq!(st.owned_count(), 7, "ownership kept");
        let ok = Policy {
            approved_deletions: 7,
            ..Policy::default()
        };
        assert!(
            sync(&base(), &empty, &mut st, &ok)
                .await
                .plan
                .halt
                .is_none()
        );
    })
}

#[test]
fn adopt_keys_match_case_insensitively_where_the_target_does() {
    block(async {
        let t = MemoryTarget::new(Capabilities {
            case_insensitive_keys: true,
            ..Capabilities::full()
        });
        t.insert(Principal::new(Kind::User, "Alice@X"));
        let mut st = AgreementState::new("t");
        let p = Policy {
            adopt_keys: [PKey::new(Kind::User, "ALICE@x")].into(),
            ..Policy::default()
        };
        let r = sync(&base(), &t, &mut st, &p).await;
        assert!(r.plan.conflicts.is_empty(), "{:?}", r.plan.conflicts);
        assert_eq!(ops(&r.plan)[0], "adopt user \"Alice@X\"");
    })
}

#[test]
fn a_deletion_that_frees_a_key_runs_with_the_principals() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        // TEAM_ETA leaves the source; TEAM_ZETA is renamed TEAM_ETA.
        let mut s = base();
        s.groups.remove("g2");
        s.users.remove("u3");
        s.groups
            .get_mut("g1")
            .unwrap()
            .members
            .remove(&Member::group("g2"));
        s.groups.get_mut("g3").unwrap().display_name = "TEAM_ETA".into();
        let p = Policy {
            deprovision: Deprovision::Delete,
            ..Policy::default()
        };
        let plan = plan_only(&s, &t, &st, &p, &Mapping::defaults()).await;
        let del = plan
            .ops
            .iter()
            .find(|o| {
                matches!(
                    o,
                    Op::Delete {
                        frees_key: true,
                        ..
                    }
                )
            })
            .expect("an early delete");
        assert_eq!(del.stage(), idsync_model::Stage::Principals);
        // The principals stage alone (--dry-run-members) succeeds.
        let caps = t.capabilities();
        idsync_engine::apply::begin(&plan, &caps, &mut st);
        let opts = idsync_engine::ApplyOptions {
            workers: 4,
            stages: [idsync_model::Stage::Principals].into(),
            ..Default::default()
        };
        let rep = idsync_engine::apply(&plan, &t, &mut st, &opts).await;
        assert!(rep.is_success(), "{rep:?}");
    })
}

/// Ctrl-C or SIGTERM mid-apply: no further write starts, what was written is recorded, the run is
/// not complete (no picture, no last applied snapshot), and the next run does the rest.
#[test]
fn a_stopped_apply_records_what_it_wrote_and_the_next_run_finishes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    struct StopAfter<'a> {
        inner: &'a MemoryTarget,
        left: AtomicUsize,
        stop: Arc<AtomicBool>,
    }
    #[async_trait::async_trait]
    impl idsync_engine::Target for StopAfter<'_> {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn observe(&self) -> Result<idsync_model::Observed, idsync_engine::TargetError> {
            self.inner.observe().await
        }
        async fn execute(
            &self,
            op: &idsync_model::Op,
        ) -> Result<idsync_engine::Outcome, idsync_engine::TargetError> {
            let out = self.inner.execute(op).await;
            if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.stop.store(true, Ordering::SeqCst);
            }
            out
        }
    }
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = StopAfter {
            inner: &t,
            left: AtomicUsize::new(3),
            stop: stop.clone(),
        };
        let mut st = AgreementState::new("t");
        let opts = idsync_runner::RunOptions {
            workers: 1,
            reconcile: None,
            stop: Some(stop),
            ..Default::default()
        };
        let out = idsync_runner::testing::run_seeded(
            &stopping,
            &base(),
            &Mapping::defaults(),
            &Policy::default(),
            &mut st,
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(out.code, idsync_runner::exit::ERROR);
        let rep = out.report.unwrap();
        assert_eq!((rep.writes, rep.pending), (3, 7), "{rep:?}");
        assert_eq!(st.owned_count(), 3, "what was written is recorded");
        assert!(st.last_applied.is_none() && st.trust.is_none() && st.cursors.is_empty());
        let again = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert_eq!(again.report.unwrap().writes, 7);
        assert!(
            sync(&base(), &t, &mut st, &Policy::default())
                .await
                .plan
                .ops
                .is_empty()
        );
    })
}

/// Found by a hostile run: a group containing itself was reported as groups nesting "each other",
/// and members the source does not have were blamed on the search depth.
#[test]
fn self_membership_and_members_the_source_lacks_are_named_for_what_they_are() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let st = AgreementState::new("t");
        let s = snap(
            vec![user("u1", "alice@x")],
            vec![],
            vec![
                group(
                    "g1",
                    "SELFISH",
                    &[
                        Member::group("g1"),
                        Member::user("u1"),
                        Member::user("gone"),
                    ],
                ),
                group("g2", "PARENT", &[Member::group("beyond")]),
            ],
        );
        let notes = idsync_engine::scope::cycle_notes(&s);
        assert_eq!(
            notes,
            ["group \"SELFISH\" contains itself; it is synced once"]
        );
        let p = plan_only(&s, &t, &st, &Policy::default(), &Mapping::defaults()).await;
        let text = p.notes.join("\n");
        assert!(
            text.contains(
                "1 membership(s) point at users or service principals the source does not have"
            ),
            "{text}"
        );
        assert!(
            text.contains("1 membership(s) point at groups outside the scope"),
            "{text}"
        );
    })
}

/// Found in review: a stop before the first phase dropped the journal of an earlier crash, so the
/// principals that crash created became conflicts. State-only operations run after a stop.
#[test]
fn a_stop_still_adopts_what_an_interrupted_apply_created() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        t.fail_after(Some(4));
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        t.fail_after(None);
        let mut crashed = AgreementState::new("t");
        idsync_engine::apply::begin(&r.plan, &t.capabilities(), &mut crashed);
        let p = plan_only(
            &base(),
            &t,
            &crashed,
            &Policy::default(),
            &Mapping::defaults(),
        )
        .await;
        let adoptions = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Adopt { .. }))
            .count();
        assert_eq!(adoptions, 4, "{:?}", ops(&p));
        let caps = t.capabilities();
        idsync_engine::apply::begin(&p, &caps, &mut crashed);
        let opts = idsync_engine::ApplyOptions {
            stop: Some(Arc::new(AtomicBool::new(true))),
            ..Default::default()
        };
        let rep = idsync_engine::apply(&p, &t, &mut crashed, &opts).await;
        assert_eq!(rep.writes, 0, "no write starts after a stop");
        assert_eq!(rep.stopped, p.ops.len() - adoptions, "{rep:?}");
        let file = idsync_model::PlanFile {
            plan: p.clone(),
            snapshot: base().into(),
            cursors: Default::default(),
            checksum: None,
        };
        idsync_engine::apply::finish(&file, &rep, &caps, &mut crashed, false);
        assert_eq!(
            crashed.owned_count(),
            4,
            "the crash's creates are adopted back"
        );
        for kind in Kind::ALL {
            for owned in crashed.owned.get(kind).values() {
                assert_eq!(owned.how, idsync_model::Ownership::Created);
            }
        }
        // The next run finishes without conflicts.
        let again = sync(&base(), &t, &mut crashed, &Policy::default()).await;
        assert!(
            again.plan.conflicts.is_empty(),
            "{:?}",
            again.plan.conflicts
        );
        assert!(again.report.unwrap().is_success());
    })
}

/// A target whose creates fail without a known outcome: the first `lost` creates of each key are
/// made and their answer lost; the next `refused` attempts fail before anything is made.
struct Stormy {
    inner: MemoryTarget,
    lost: usize,
    refused: usize,
    tries: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

#[async_trait::async_trait]
impl Target for Stormy {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self) -> Result<idsync_model::Observed, idsync_engine::TargetError> {
        self.inner.observe().await
    }
    async fn observe_some(
        &self,
        want: &idsync_engine::observe::Interest,
    ) -> Result<Option<idsync_engine::observe::Partial>, idsync_engine::TargetError> {
        self.inner.observe_some(want).await
    }
    async fn execute(&self, op: &Op) -> Result<idsync_engine::Outcome, idsync_engine::TargetError> {
        let Op::Create { principal, .. } = op else {
            return self.inner.execute(op).await;
        };
        let n = {
            let mut t = self.tries.lock().unwrap();
            let n = t.entry(principal.key.clone()).or_default();
            *n += 1;
            *n
        };
        let storm = idsync_engine::TargetError::new(
            idsync_engine::TargetErrorKind::Unavailable,
            "502 Bad Gateway",
        );
        if n <= self.lost {
            self.inner.execute(op).await?;
            Err(storm)
        } else if n <= self.lost + self.refused {
            Err(storm)
        } else {
            self.inner.execute(op).await
        }
    }
}

/// Found by the fault suite at full size: under a 50 % storm, creates whose answer was lost were
/// left to the next run, and a 900-user sync did not converge in 10 runs. Now a create whose
/// outcome is unknown is looked up by key (made: recorded as created, never made twice) or tried
/// again (not made), within the run.
#[test]
fn a_create_whose_answer_was_lost_is_found_by_key_and_one_never_made_is_tried_again() {
    block(async {
        for (lost, refused) in [(1, 0), (0, 2), (1, 2)] {
            let t = Stormy {
                inner: MemoryTarget::new(Capabilities::full()),
                lost,
                refused,
                tries: Default::default(),
            };
            let mut st = AgreementState::new("t");
            let r = sync(&base(), &t, &mut st, &Policy::default()).await;
            let rep = r.report.unwrap();
            assert!(rep.is_success(), "lost {lost}, refused {refused}: {rep:?}");
            assert_eq!(st.owned_count(), 7);
            let data = t.inner.data();
            assert_eq!(
                data.principals.len(),
                7,
                "nothing twice: {:?}",
                data.principals
            );
            let again = sync(&base(), &t, &mut st, &Policy::default()).await;
            assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));
        }
        // More failures than the retries: left to the next run, which converges.
        let t = Stormy {
            inner: MemoryTarget::new(Capabilities::full()),
            lost: 0,
            refused: 9,
            tries: Default::default(),
        };
        let mut st = AgreementState::new("t");
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        assert!(!r.report.unwrap().failed.is_empty());
        let mut runs = 1;
        loop {
            runs += 1;
            let r = sync(&base(), &t, &mut st, &Policy::default()).await;
            if r.report.as_ref().is_some_and(|r| r.is_success()) {
                break;
            }
            assert!(runs < 4, "{:?}", r.report);
        }
        assert_eq!(t.inner.data().principals.len(), 7);
    })
}

/// A group another tool made (as the Databricks script does, externalId = the Entra id), since
/// renamed in the source: without adoption a conflict that names it (creating a second one
/// would duplicate it); with adopt = true it is adopted and renamed, and nothing is created.
#[test]
fn a_principal_carrying_the_source_id_as_external_id_is_the_same_one_after_a_rename() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut old = Principal::new(Kind::Group, "TEAM_ALPHA_OLD");
        old.external_id = Some("g1".into());
        let id = t.insert(old);
        let mut st = AgreementState::new("t");
        let r = sync(&base(), &t, &mut st, &Policy::default()).await;
        let c: Vec<_> = r
            .plan
            .conflicts
            .iter()
            .filter(|c| c.target_id.as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(c.len(), 1, "{:?}", r.plan.conflicts);
        assert!(c[0].reason.contains("externalId"), "{}", c[0].reason);
        assert!(
            c[0].reason.contains("group:TEAM_ALPHA_OLD"),
            "{}",
            c[0].reason
        );
        assert_eq!(t.writes(), 0);

        let policy = Policy {
            adopt_keys: [PKey::new(Kind::Group, "TEAM_ALPHA_OLD")].into(),
            ..Policy::default()
        };
        let r = sync(&base(), &t, &mut st, &policy).await;
        assert!(r.plan.conflicts.is_empty(), "{:?}", r.plan.conflicts);
        let o = ops(&r.plan);
        assert!(
            o.iter().any(|x| x == "adopt group \"TEAM_ALPHA_OLD\""),
            "{o:?}"
        );
        assert!(
            !o.iter()
                .any(|x| x.starts_with("create group \"TEAM_ALPHA\"")),
            "{o:?}"
        );
        assert!(r.report.unwrap().is_success());
        let seen = t.observe().await.unwrap();
        assert_eq!(
            seen.get(Kind::Group, &id).unwrap().principal.key,
            "TEAM_ALPHA",
            "renamed"
        );
        assert!(st.owns(Kind::Group, &id));
        let again = sync(&base(), &t, &mut st, &policy).await;
        assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));
    })
}

/// A group whose members come and go in one run: on a target that sends removals and additions
/// together (SCIM), one write per group; additions of nested groups still wait for every removal.
#[test]
fn a_groups_removals_and_additions_are_one_write_where_the_target_combines_them() {
    block(async {
        let mut changed = base();
        let alpha = changed.groups.get_mut("g1").unwrap();
        alpha.members.retain(|m| m.id != "u1");
        alpha.members.insert(Member::user("u2"));
        let eta = changed.groups.get_mut("g2").unwrap();
        eta.members.retain(|m| m.id != "u3");
        eta.members.insert(Member::group("g3"));
        changed
            .groups
            .get_mut("g3")
            .unwrap()
            .members
            .insert(Member::user("u1"));
        let mut writes = Vec::new();
        for combine in [false, true] {
            let t = if combine {
                MemoryTarget::new(Capabilities::full()).combining_member_changes()
            } else {
                MemoryTarget::new(Capabilities::full())
            };
            let mut st = AgreementState::new("t");
            sync(&base(), &t, &mut st, &Policy::default()).await;
            let before = t.writes();
            let r = sync(&changed, &t, &mut st, &Policy::default()).await;
            assert_eq!(
                ops(&r.plan),
                [
                    "removeMembers group \"TEAM_ALPHA\" [\"alice@x\"]",
                    "removeMembers group \"TEAM_ETA\" [\"kevin@x\"]",
                    "addMembers group \"TEAM_ALPHA\" [\"bob@x\"]",
                    "addMembers group \"TEAM_ETA\" [\"TEAM_ZETA\"]",
                    "addMembers group \"TEAM_ZETA\" [\"alice@x\"]",
                ]
            );
            let rep = r.report.unwrap();
            assert!(rep.is_success(), "{rep:?}");
            // Operations are counted as before; the target's requests are what changes.
            assert_eq!((rep.applied, rep.writes), (5, 5));
            writes.push(t.writes() - before);
            let again = sync(&changed, &t, &mut st, &Policy::default()).await;
            assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));
        }
        // TEAM_ALPHA's removal and addition went out together; TEAM_ETA's addition of a group
        // did not (a removal elsewhere may be what keeps it from closing a cycle).
        assert_eq!(writes, [5, 4]);
    })
}

/// A combined member write that fails fails both of its operations, and changes nothing.
#[test]
fn a_failed_combined_member_write_fails_both_operations() {
    block(async {
        let t = MemoryTarget::new(Capabilities::full()).combining_member_changes();
        let mut st = AgreementState::new("t");
        sync(&base(), &t, &mut st, &Policy::default()).await;
        let before = t.observe().await.unwrap();
        let mut changed = base();
        let alpha = changed.groups.get_mut("g1").unwrap();
        alpha.members.retain(|m| m.id != "u1");
        alpha.members.insert(Member::user("u2"));
        t.fail_after(Some(0));
        let rep = sync(&changed, &t, &mut st, &Policy::default())
            .await
            .report
            .unwrap();
        let failed: Vec<(&str, &str)> = rep
            .failed
            .iter()
            .map(|f| {
                let name = match f.op {
                    Op::RemoveMembers { .. } => "remove",
                    Op::AddMembers { .. } => "add",
                    _ => "other",
                };
                (name, f.error.as_str())
            })
            .collect();
        assert_eq!(
            failed,
            [
                ("remove", "connection reset (injected)"),
                ("add", "connection reset (injected)")
            ]
        );
        assert_eq!(t.observe().await.unwrap(), before);
        // The next run, with the target back, plans and applies both again.
        t.fail_after(None);
        let r = sync(&changed, &t, &mut st, &Policy::default()).await;
        assert_eq!(r.plan.ops.len(), 2, "{:?}", ops(&r.plan));
        assert!(r.report.unwrap().is_success());
    })
}

/// Groups beyond the search depth (`edge_groups = "empty"`): created without members and nested
/// where the target nests; members someone adds to them in the target are left alone.
#[test]
fn edge_groups_are_created_empty_nested_and_their_members_left_alone() {
    block(async {
        let mut s = base();
        s.groups
            .get_mut("g1")
            .unwrap()
            .members
            .insert(Member::group("g9"));
        s.edge_groups
            .insert("g9".into(), group("g9", "TEAM_EDGE", &[]));
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        let plan = ops(&r.plan);
        assert!(
            plan.contains(&"create group \"TEAM_EDGE\"".to_owned()),
            "{plan:?}"
        );
        assert!(
            plan.contains(
                &"addMembers group \"TEAM_ALPHA\" [\"alice@x\", \"app-1\", \"TEAM_EDGE\", \"TEAM_ETA\"]"
                    .to_owned()
            ),
            "{plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|o| o.starts_with("addMembers group \"TEAM_EDGE\""))
        );
        assert!(r.report.unwrap().is_success());
        // Someone fills the edge group in the target: idsync never read its members, so it
        // removes none.
        let o = t.observe().await.unwrap();
        let id = |kind: Kind, key: &str| {
            o.principals
                .get(kind)
                .values()
                .find(|p| p.principal.key == key)
                .unwrap()
                .id
                .clone()
        };
        let pref = |kind: Kind, key: &str| idsync_model::PRef {
            kind,
            key: key.into(),
            id: Some(id(kind, key)),
        };
        t.execute(&Op::AddMembers {
            group: pref(Kind::Group, "TEAM_EDGE"),
            members: vec![pref(Kind::User, "bob@x")],
        })
        .await
        .unwrap();
        let again = sync(&s, &t, &mut st, &Policy::default()).await;
        assert!(again.plan.ops.is_empty(), "{:?}", ops(&again.plan));

        // Where groups are flattened, the edge group is created, empty, and brings no member.
        let t = MemoryTarget::new(flat_caps());
        let mut st = AgreementState::new("t");
        let r = sync(&s, &t, &mut st, &Policy::default()).await;
        let plan = ops(&r.plan);
        assert!(
            plan.contains(&"create group \"TEAM_EDGE\"".to_owned()),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|o| o.contains("TEAM_EDGE\" [")),
            "{plan:?}"
        );
        assert!(r.report.unwrap().is_success());
    })
}

/// Key changes run together, except one that takes a key another frees, which waits for it: a
/// tenant renamed to a new domain is not renamed one principal at a time.
#[test]
fn renames_run_together_unless_one_takes_a_key_another_frees() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Records each rename's start and end, and how many ran at once.
    struct Timed<'a> {
        inner: &'a MemoryTarget,
        now: AtomicUsize,
        most: AtomicUsize,
        log: Mutex<Vec<(String, &'static str)>>,
    }
    fn taken(op: &idsync_model::Op) -> Option<String> {
        match op {
            idsync_model::Op::Update { changes, .. } => {
                changes.iter().find_map(|c| match (c.attr, &c.to) {
                    (idsync_model::Attr::Key, idsync_model::AttrValue::Text(Some(k))) => {
                        Some(k.clone())
                    }
                    _ => None,
                })
            }
            _ => None,
        }
    }
    #[async_trait::async_trait]
    impl idsync_engine::Target for Timed<'_> {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn observe(&self) -> Result<idsync_model::Observed, idsync_engine::TargetError> {
            self.inner.observe().await
        }
        async fn execute(
            &self,
            op: &idsync_model::Op,
        ) -> Result<idsync_engine::Outcome, idsync_engine::TargetError> {
            let Some(to) = taken(op) else {
                return self.inner.execute(op).await;
            };
            let from = op.subject().1.to_owned();
            self.log.lock().unwrap().push((from, "start"));
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let out = self.inner.execute(op).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.log.lock().unwrap().push((to, "took"));
            out
        }
    }
    block(async {
        let t = MemoryTarget::new(Capabilities::full());
        let mut st = AgreementState::new("t");
        let before: Vec<_> = (1..=6)
            .map(|i| user(&format!("u{i}"), &format!("a{i}@x")))
            .chain([user("u7", "b@x"), user("u8", "c@x")])
            .collect();
        sync(
            &snap(before, vec![], vec![]),
            &t,
            &mut st,
            &Policy::default(),
        )
        .await;
        // A new domain for six, and a chain: c@x moves to d@x, then b@x takes c@x.
        let after: Vec<_> = (1..=6)
            .map(|i| user(&format!("u{i}"), &format!("z{i}@x")))
            .chain([user("u7", "c@x"), user("u8", "d@x")])
            .collect();
        let timed = Timed {
            inner: &t,
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        };
        let opts = idsync_runner::RunOptions {
            workers: 8,
            reconcile: None,
            ..Default::default()
        };
        let out = idsync_runner::testing::run_seeded(
            &timed,
            &snap(after, vec![], vec![]),
            &Mapping::defaults(),
            &Policy::default(),
            &mut st,
            &opts,
        )
        .await
        .unwrap();
        assert!(out.report.unwrap().is_success());
        let log = timed.log.lock().unwrap().clone();
        assert_eq!(log.len(), 16, "{log:?}");
        assert!(
            timed.most.load(Ordering::SeqCst) >= 7,
            "the renames ran one by one: {log:?}"
        );
        // b@x → c@x starts only once c@x was freed (renamed to d@x).
        let freed = log.iter().position(|e| *e == ("d@x".into(), "took"));
        let takes = log.iter().position(|e| *e == ("b@x".into(), "start"));
        assert!(freed.unwrap() < takes.unwrap(), "{log:?}");
        let keys: std::collections::BTreeSet<String> = t
            .data()
            .principals
            .into_iter()
            .map(|p| p.principal.key)
            .collect();
        assert!(keys.contains("c@x") && keys.contains("d@x") && keys.contains("z6@x"));
    });
}

/// Where the target takes a group's member writes in parallel, a first sync writes a group's
/// members as soon as they exist, in parts, while it still creates (issue #17 item 4); a member
/// whose create fails is reported, and the rest of the group is written.
#[test]
fn a_first_sync_writes_members_while_it_still_creates() {
    use std::sync::Mutex;
    /// Logs each write; refuses to create one user.
    struct Logged<'a> {
        inner: &'a MemoryTarget,
        log: Mutex<Vec<String>>,
        refuse: &'static str,
    }
    #[async_trait::async_trait]
    impl idsync_engine::Target for Logged<'_> {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        fn combines_member_changes(&self) -> bool {
            self.inner.combines_member_changes()
        }
        fn parallel_member_writes(&self) -> bool {
            self.inner.parallel_member_writes()
        }
        async fn observe(&self) -> Result<idsync_model::Observed, idsync_engine::TargetError> {
            self.inner.observe().await
        }
        async fn execute(
            &self,
            op: &Op,
        ) -> Result<idsync_engine::Outcome, idsync_engine::TargetError> {
            let line = match op {
                Op::Create { principal, .. } => format!("create {}", principal.key),
                Op::AddMembers { group, members } => format!(
                    "add {} {}",
                    group.key,
                    members
                        .iter()
                        .map(|m| m.key.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => format!("{other:?}"),
            };
            self.log.lock().unwrap().push(line);
            if matches!(op, Op::Create { principal, .. } if principal.key == self.refuse) {
                return Err(idsync_engine::TargetError::new(
                    idsync_engine::TargetErrorKind::Invalid,
                    "refused (injected)",
                ));
            }
            self.inner.execute(op).await
        }
    }
    block(async {
        let users: Vec<_> = (1..=6)
            .map(|i| user(&format!("u{i}"), &format!("user{i}@x")))
            .collect();
        let members: Vec<Member> = (1..=6)
            .rev()
            .map(|i| Member::user(format!("u{i}")))
            .collect();
        let s = snap(users, vec![], vec![group("g1", "TEAM", &members)]);
        let caps = Capabilities {
            max_members_per_write: 2,
            ..Capabilities::full()
        };
        let inner = MemoryTarget::new(caps).writing_members_in_parallel();
        let t = Logged {
            inner: &inner,
            log: Mutex::new(Vec::new()),
            refuse: "user3@x",
        };
        let mut st = AgreementState::new("t");
        // One worker: the order is deterministic.
        let opts = idsync_runner::RunOptions {
            workers: 1,
            reconcile: None,
            ..Default::default()
        };
        let out = idsync_runner::testing::run_seeded(
            &t,
            &s,
            &Mapping::defaults(),
            &Policy::default(),
            &mut st,
            &opts,
        )
        .await
        .unwrap();
        assert_eq!(
            *t.log.lock().unwrap(),
            [
                "create TEAM",
                "create user1@x",
                "create user2@x",
                "add TEAM user1@x,user2@x",
                "create user3@x",
                "create user4@x",
                "add TEAM user4@x",
                "create user5@x",
                "create user6@x",
                "add TEAM user5@x,user6@x",
            ]
        );
        let rep = out.report.unwrap();
        // One addition in the plan, however many parts it ran in.
        assert_eq!(rep.applied, 7, "{rep:?}");
        assert_eq!(rep.failed.len(), 1, "{rep:?}");
        assert!(
            matches!(&rep.failed[0].op, Op::Create { principal, .. } if principal.key == "user3@x")
        );
        let skipped: Vec<&str> = rep.skipped.iter().map(|f| f.error.as_str()).collect();
        assert_eq!(
            skipped,
            ["member user \"user3@x\" was not created, so it is not added"]
        );
        let held = inner.observe().await.unwrap();
        let team = held
            .principals
            .groups
            .values()
            .find(|p| p.principal.key == "TEAM")
            .unwrap();
        assert_eq!(held.members[&team.id].len(), 5);
        // The next run creates the refused user (the target takes it now) and adds it.
        let again = sync(&s, &inner, &mut st, &Policy::default()).await;
        assert_eq!(
            ops(&again.plan),
            [
                "create user \"user3@x\"",
                "addMembers group \"TEAM\" [\"user3@x\"]"
            ]
        );
        assert!(again.report.unwrap().is_success());
    })
}

/// A split addition reports as one operation: a part that failed fails it (with that part's
/// members), yet it counts as run when another part succeeded, so that a rollback undoes it; a
/// part whose members were all refused names each of them.
#[test]
fn a_split_addition_that_partly_failed_is_reported_and_counted_as_run() {
    /// Refuses two creates, and an addition that holds user2@x.
    struct Refusing<'a> {
        inner: &'a MemoryTarget,
    }
    #[async_trait::async_trait]
    impl idsync_engine::Target for Refusing<'_> {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        fn parallel_member_writes(&self) -> bool {
            true
        }
        async fn observe(&self) -> Result<idsync_model::Observed, idsync_engine::TargetError> {
            self.inner.observe().await
        }
        async fn execute(
            &self,
            op: &Op,
        ) -> Result<idsync_engine::Outcome, idsync_engine::TargetError> {
            let refused = match op {
                Op::Create { principal, .. } => {
                    ["user3@x", "user4@x"].contains(&principal.key.as_str())
                }
                Op::AddMembers { members, .. } => members.iter().any(|m| m.key == "user2@x"),
                _ => false,
            };
            if refused {
                return Err(idsync_engine::TargetError::new(
                    idsync_engine::TargetErrorKind::Invalid,
                    "refused (injected)",
                ));
            }
            self.inner.execute(op).await
        }
    }
    block(async {
        let users: Vec<_> = (1..=6)
            .map(|i| user(&format!("u{i}"), &format!("user{i}@x")))
            .collect();
        let members: Vec<Member> = (1..=6).map(|i| Member::user(format!("u{i}"))).collect();
        let s = snap(users, vec![], vec![group("g1", "TEAM", &members)]);
        let inner = MemoryTarget::new(Capabilities {
            max_members_per_write: 2,
            ..Capabilities::full()
        });
        let t = Refusing { inner: &inner };
        let mut st = AgreementState::new("t");
        let opts = idsync_runner::RunOptions {
            workers: 4,
            reconcile: None,
            ..Default::default()
        };
        let out = idsync_runner::testing::run_seeded(
            &t,
            &s,
            &Mapping::defaults(),
            &Policy::default(),
            &mut st,
            &opts,
        )
        .await
        .unwrap();
        let plan = out.file.unwrap().plan;
        let add = plan
            .ops
            .iter()
            .position(|o| matches!(o, Op::AddMembers { .. }))
            .unwrap();
        let rep = out.report.unwrap();
        // Parts (created in this order): user1+user2 refused, user3+user4 never created,
        // user5+user6 written.
        let failed: Vec<String> = rep
            .failed
            .iter()
            .map(|f| match &f.op {
                Op::AddMembers { members, .. } => format!(
                    "add {}",
                    members
                        .iter()
                        .map(|m| m.key.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => format!("create {}", other.subject().1),
            })
            .collect();
        assert_eq!(
            failed,
            ["create user3@x", "create user4@x", "add user1@x,user2@x"],
            "{rep:?}"
        );
        let skipped: Vec<&str> = rep.skipped.iter().map(|f| f.error.as_str()).collect();
        assert_eq!(
            skipped,
            [
                "member user \"user3@x\" was not created, so it is not added",
                "member user \"user4@x\" was not created, so it is not added"
            ]
        );
        assert!(
            rep.ran.contains(&add),
            "the addition partly ran: {:?}",
            rep.ran
        );
        assert_eq!(rep.ran.iter().filter(|&&i| i == add).count(), 1);
        let held = inner.observe().await.unwrap();
        let team = held
            .principals
            .groups
            .values()
            .find(|p| p.principal.key == "TEAM")
            .unwrap();
        assert_eq!(held.members[&team.id].len(), 2, "user5 and user6");
    })
}
