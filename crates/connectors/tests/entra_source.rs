//! The Entra source's full read against the Graph emulator: scope by name, id and filter, search
//! depth, service principals through beta, guests, quotes and non-ASCII names, errors, throttling.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_connectors::entra_auth::EntraCredential;
use idsync_connectors::http::HttpConfig;
use idsync_connectors::sources::entra::{EntraSource, EntraSourceConfig};
use idsync_emulators::Graph;
use idsync_emulators::infra::ThrottleConfig;
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
use idsync_engine::scope::NameRegex;
use idsync_engine::{Scope, Source};
use idsync_model::{Directory, Kind, Member, Secret, Snapshot, UserType};
use std::time::Duration;

fn tenant() -> Snapshot {
    let mut d: Directory =
        serde_json::from_str(include_str!("../../demo/src/directory.json")).unwrap();
    // A name with a quote and non-ASCII letters, and a cycle: TEAM_ETA also holds TEAM_ZETA.
    for g in &mut d.groups {
        if g.display_name == "TEAM_EPSILON" {
            g.display_name = "O'Brien Équipe".into();
        }
    }
    let zeta = d
        .groups
        .iter()
        .find(|g| g.display_name == "TEAM_ZETA")
        .unwrap()
        .id
        .clone();
    d.groups
        .iter_mut()
        .find(|g| g.display_name == "TEAM_ETA")
        .unwrap()
        .members
        .insert(Member::group(zeta));
    d.try_into().unwrap()
}

fn source(g: &Graph, secret: &str) -> EntraSource {
    EntraSource::new(EntraSourceConfig {
        authority: g.server.base_url.clone(),
        graph: g.server.base_url.clone(),
        tenant_id: g.state.tenant().tenant_id.clone(),
        credential: EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new(secret),
        },
        http: HttpConfig {
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_secs(2),
            ..HttpConfig::new("Microsoft Graph")
        },
    })
    .unwrap()
}

fn names(s: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s.groups.values().map(|g| g.display_name.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn reads_the_scope_by_name_with_depth_and_service_principals() {
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let scope = |depth| Scope {
        group_names: ["TEAM_ALPHA", "O'Brien Équipe", "TEAM_ZETA", "NO_SUCH_GROUP"]
            .map(String::from)
            .into(),
        search_depth: depth,
        ..Scope::default()
    };
    let r = src.read_full(&scope(1)).await.unwrap();
    assert_eq!(
        names(&r.snapshot),
        ["O'Brien Équipe", "TEAM_ALPHA", "TEAM_ZETA"]
    );
    assert!(
        r.notes.iter().any(|n| n.contains("NO_SUCH_GROUP")),
        "{:?}",
        r.notes
    );
    assert!(
        !r.snapshot
            .users
            .values()
            .any(|u| u.user_name == "kevin@company.com"),
        "kevin is only in the nested TEAM_ETA"
    );
    // The service principal is a member of TEAM_ALPHA: read through beta.
    assert_eq!(r.snapshot.service_principals.len(), 1);
    let alpha = r
        .snapshot
        .groups
        .values()
        .find(|g| g.display_name == "TEAM_ALPHA")
        .unwrap();
    assert!(
        alpha
            .members
            .iter()
            .any(|m| m.kind == Kind::ServicePrincipal)
    );
    let gus = r
        .snapshot
        .users
        .values()
        .find(|u| u.display_name == "Gus (Partner)")
        .unwrap();
    assert_eq!(gus.user_type, UserType::Guest);
    assert_eq!(gus.emails, ["gus@partner.example"]);

    let r = src.read_full(&scope(3)).await.unwrap();
    assert_eq!(
        names(&r.snapshot),
        ["O'Brien Équipe", "TEAM_ALPHA", "TEAM_ETA", "TEAM_ZETA"],
        "depth 2 found TEAM_ETA; the cycle back to TEAM_ZETA stops"
    );
    assert!(
        r.notes.iter().any(|n| n
            == "groups \"TEAM_ETA\", \"TEAM_ZETA\" nest each other in a cycle; each is synced once"),
        "{:?}",
        r.notes
    );
    assert!(
        r.snapshot
            .users
            .values()
            .any(|u| u.user_name == "kevin@company.com")
    );
    let eta = r
        .snapshot
        .groups
        .values()
        .find(|g| g.display_name == "TEAM_ETA")
        .unwrap();
    assert_eq!(r.depth[&eta.id], 2);

    // What it cost: one token, one lookup per read for all the names (15 to a
    // `displayName in (...)`), one member read per group, the groups of a level read together in
    // a `$batch` (a level of one group reads it directly).
    let counts = g.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /{tenant}/oauth2/v2.0/token"], 1, "{counts:?}");
    assert_eq!(
        counts["GET /v1.0/groups"], 2,
        "two reads, one name lookup each: {counts:?}"
    );
    assert_eq!(
        counts["BATCH GET /beta/groups/{id}/members"] + counts["GET /beta/groups/{id}/members"],
        3 + 4,
        "{counts:?}"
    );
    assert_eq!(counts["POST /beta/$batch"], 2, "{counts:?}");
}

/// `[scope] all_users = true` reads every user (the list used to ask Graph for group properties
/// and got a 400), and folding the changes keeps a user no group holds, as a full read does.
#[tokio::test]
async fn all_users_are_read_in_full_and_incrementally() {
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let scope = Scope {
        group_names: ["TEAM_ALPHA".to_owned()].into(),
        all_users: true,
        ..Scope::default()
    };
    let r = src.read_full(&scope).await.unwrap();
    assert_eq!(r.snapshot.users.len(), g.state.tenant().users.len());
    idsync_runner::testing::source_conformance(&src, &scope, || async {
        let mut t = g.state.tenant_mut();
        t.upsert_user(idsync_model::User {
            id: "loner".into(),
            user_name: "loner@company.com".into(),
            display_name: "In no group".into(),
            emails: vec![],
            active: true,
            user_type: UserType::Member,
            external_id: None,
            attributes: Default::default(),
        });
    })
    .await
    .unwrap();
}

/// `edge_groups = "empty"`: the groups nested one level beyond the depth come from the member
/// reads (no extra request), without their members; folding the changes (a new nesting at the
/// edge, an edge group renamed) draws them as a full read does.
#[tokio::test]
async fn edge_groups_are_read_without_members_and_follow_the_changes() {
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let scope = Scope {
        group_names: ["TEAM_ZETA".to_owned()].into(),
        search_depth: 1,
        edge_groups: idsync_engine::scope::EdgeGroups::Empty,
        ..Scope::default()
    };
    let r = src.read_full(&scope).await.unwrap();
    assert_eq!(names(&r.snapshot), ["TEAM_ZETA"]);
    let edges: Vec<&str> = r
        .snapshot
        .edge_groups
        .values()
        .map(|g| g.display_name.as_str())
        .collect();
    assert_eq!(edges, ["TEAM_ETA"]);
    assert!(
        r.snapshot
            .edge_groups
            .values()
            .all(|g| g.members.is_empty())
    );
    assert!(
        !r.snapshot
            .users
            .values()
            .any(|u| u.user_name == "kevin@company.com"),
        "TEAM_ETA's users stay out"
    );
    let id_of = |name: &str| {
        g.state
            .tenant()
            .groups
            .values()
            .find(|x| x.display_name == name)
            .unwrap()
            .id
            .clone()
    };
    let (zeta, alpha, eta) = (id_of("TEAM_ZETA"), id_of("TEAM_ALPHA"), id_of("TEAM_ETA"));
    idsync_runner::testing::source_conformance(&src, &scope, || async {
        let mut t = g.state.tenant_mut();
        t.add_member(&zeta, Member::group(alpha.clone()));
        let mut renamed = t.groups[&eta].clone();
        renamed.display_name = "TEAM_ETA (renamed)".into();
        t.upsert_group(renamed);
    })
    .await
    .unwrap();
    let now = src.read_full(&scope).await.unwrap();
    let mut edges: Vec<&str> = now
        .snapshot
        .edge_groups
        .values()
        .map(|g| g.display_name.as_str())
        .collect();
    edges.sort_unstable();
    assert_eq!(edges, ["TEAM_ALPHA", "TEAM_ETA (renamed)"]);
}

#[tokio::test]
async fn filters_select_all_errors_and_throttling() {
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let r = src
        .read_full(&Scope {
            group_filter: Some("TEAM_*".into()),
            ..Scope::default()
        })
        .await
        .unwrap();
    assert_eq!(names(&r.snapshot), ["TEAM_ALPHA", "TEAM_ETA", "TEAM_ZETA"]);
    let r = src
        .read_full(&Scope {
            group_regex: Some(NameRegex::new("^TEAM_(ALPHA|ZETA)$").unwrap()),
            ..Scope::default()
        })
        .await
        .unwrap();
    assert_eq!(names(&r.snapshot), ["TEAM_ALPHA", "TEAM_ZETA"]);
    let r = src
        .read_full(&Scope {
            group_regex: Some(NameRegex::new("(?i)équipe").unwrap()),
            ..Scope::default()
        })
        .await
        .unwrap();
    assert_eq!(
        names(&r.snapshot),
        ["O'Brien Équipe"],
        "found anywhere, unicode-aware"
    );
    let r = src.read_full(&Scope::default()).await.unwrap();
    assert_eq!(r.snapshot.groups.len(), 5, "no selector: every group");

    // A throttle that lets the batch in but answers 429 to most of its items: those items are
    // read again on their own, and the read is the same as an unthrottled one.
    let deep = Scope {
        search_depth: 3,
        ..Scope::default()
    };
    let calm = src.read_full(&deep).await.unwrap();
    g.state.infra.accounting.reset();
    g.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 2.0,
        per_second: 100.0,
    }));
    let r = src.read_full(&deep).await.unwrap();
    g.state.infra.set_throttle(None);
    assert_eq!(r.snapshot, calm.snapshot);
    let counts = g.state.infra.accounting.snapshot();
    assert!(
        counts
            .get("GET /beta/groups/{id}/members")
            .copied()
            .unwrap_or(0)
            >= 1,
        "throttled batch items were read alone: {counts:?}"
    );

    let e = source(&g, "not-the-secret")
        .read_full(&Scope::default())
        .await
        .unwrap_err();
    assert!(
        e.message.contains("7000215") || e.message.contains("invalid_client"),
        "{}",
        e.message
    );
    assert!(e.message.contains("ENTRA_"), "{}", e.message);
    assert!(!e.message.contains("not-the-secret"), "{}", e.message);
    assert_eq!(e.kind, idsync_engine::SourceErrorKind::Unauthorized);
}

#[tokio::test]
async fn an_incremental_read_equals_a_full_read_after_changes() {
    use idsync_engine::Changes;
    use idsync_model::{Group, User};
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let scope = Scope {
        group_names: ["TEAM_ALPHA", "O'Brien Équipe", "TEAM_ZETA", "NEW_TEAM"]
            .map(String::from)
            .into(),
        search_depth: 2,
        ..Scope::default()
    };
    let full = src.read_full(&scope).await.unwrap();
    assert_eq!(full.cursors.len(), 3);
    let id_of = |t: &idsync_emulators::tenant::Tenant, name: &str| -> String {
        t.users
            .values()
            .find(|u| u.user_name == name)
            .map(|u| u.id.clone())
            .or_else(|| {
                t.groups
                    .values()
                    .find(|g| g.display_name == name)
                    .map(|g| g.id.clone())
            })
            .unwrap()
    };
    {
        let mut t = g.state.tenant_mut();
        let alpha = id_of(&t, "TEAM_ALPHA");
        let epsilon = id_of(&t, "O'Brien Équipe");
        let zeta = id_of(&t, "TEAM_ZETA");
        let eta = id_of(&t, "TEAM_ETA");
        // A new user joins TEAM_ALPHA: not in the snapshot yet, so it is fetched.
        t.upsert_user(User {
            id: "new-user".into(),
            user_name: "nina@company.com".into(),
            display_name: "Nina".into(),
            emails: vec!["nina@company.com".into()],
            active: true,
            user_type: UserType::Member,
            external_id: None,
            attributes: Default::default(),
        });
        t.add_member(&alpha, Member::user("new-user"));
        // carol leaves her only group; dave is deleted; bob is disabled.
        let carol = id_of(&t, "carol@company.com");
        t.remove_member(&epsilon, &Member::user(carol));
        let dave = id_of(&t, "dave@company.com");
        t.remove(Kind::User, &dave);
        let mut bob = t.users[&id_of(&t, "bob@company.com")].clone();
        bob.active = false;
        t.upsert_user(bob);
        // The nested group is renamed; the service principal joins TEAM_ZETA too.
        let mut g_eta = t.groups[&eta].clone();
        g_eta.display_name = "TEAM_ETA_PLATFORM".into();
        t.upsert_group(g_eta);
        let sp = t.service_principals.keys().next().unwrap().clone();
        t.add_member(&zeta, Member::service_principal(sp));
        // A group with a name the scope asks for appears.
        let alice = id_of(&t, "alice@company.com");
        t.upsert_group(Group {
            id: "new-team".into(),
            display_name: "NEW_TEAM".into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: [Member::user(alice)].into(),
        });
    }
    g.state.infra.accounting.reset();
    let Changes::Read(inc) = src
        .read_changes(&scope, &full.snapshot, &full.cursors)
        .await
        .unwrap()
    else {
        panic!("expected changes")
    };
    let incremental_requests = g.state.infra.accounting.total();
    let again = src.read_full(&scope).await.unwrap();
    assert_eq!(inc.snapshot, again.snapshot, "incremental == full");
    assert!(inc.snapshot.users.contains_key("new-user"));
    assert!(
        !inc.snapshot
            .users
            .values()
            .any(|u| u.user_name == "carol@company.com"),
        "carol left every synced group"
    );
    assert_ne!(inc.cursors, full.cursors);
    assert!(
        incremental_requests <= 8,
        "the changes cost {incremental_requests} requests"
    );

    // A second incremental read with the new cursors sees nothing new.
    let Changes::Read(quiet) = src
        .read_changes(&scope, &inc.snapshot, &inc.cursors)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(quiet.snapshot, inc.snapshot);

    // Round two: a group selected by name is renamed out of the selection (it and what only it
    // reached leave, as a full read would have them leave); a group is nested under a group at
    // the search depth (beyond it: not read); a group is nested under a root (read).
    {
        let mut t = g.state.tenant_mut();
        let zeta = id_of(&t, "TEAM_ZETA");
        let mut z = t.groups[&zeta].clone();
        z.display_name = "TEAM_ZETA_ARCHIVED".into();
        t.upsert_group(z);
        let new_team = id_of(&t, "NEW_TEAM");
        let alpha = id_of(&t, "TEAM_ALPHA");
        let olga = id_of(&t, "olga@company.com");
        for (id, name) in [("deep", "DEEP_TEAM"), ("side", "SIDE_TEAM")] {
            t.upsert_group(Group {
                id: id.into(),
                display_name: name.into(),
                description: None,
                security_enabled: true,
                mail_enabled: false,
                members: [Member::user(olga.clone())].into(),
            });
        }
        t.add_member(&alpha, Member::group("side"));
        t.add_member("side", Member::group("deep"));
        let _ = new_team;
    }
    let Changes::Read(round2) = src
        .read_changes(&scope, &inc.snapshot, &inc.cursors)
        .await
        .unwrap()
    else {
        panic!()
    };
    let full2 = src.read_full(&scope).await.unwrap();
    assert_eq!(
        round2.snapshot, full2.snapshot,
        "incremental == full, round two"
    );
    assert_eq!(round2.depth, full2.depth);
    assert!(!names(&round2.snapshot).contains(&"TEAM_ZETA_ARCHIVED".to_owned()));
    assert!(round2.snapshot.groups.contains_key("side"));
    assert!(
        !round2.snapshot.groups.contains_key("deep"),
        "beyond the depth"
    );

    // Round three: SIDE_TEAM is renamed into the selection (TEAM_ZETA is asked for by name), so it
    // moves up to depth 1 and DEEP_TEAM, never read so far, comes within the depth.
    {
        let mut t = g.state.tenant_mut();
        let mut side = t.groups["side"].clone();
        side.display_name = "TEAM_ZETA".into();
        t.upsert_group(side);
    }
    let Changes::Read(round3) = src
        .read_changes(&scope, &round2.snapshot, &round2.cursors)
        .await
        .unwrap()
    else {
        panic!()
    };
    let full3 = src.read_full(&scope).await.unwrap();
    assert_eq!(
        round3.snapshot, full3.snapshot,
        "incremental == full, round three"
    );
    assert_eq!(round3.depth, full3.depth);
    assert_eq!(round3.depth.get("deep"), Some(&2));

    // Every group selected (no selector): a group created anywhere joins on the next read.
    let all = Scope::default();
    let base = src.read_full(&all).await.unwrap();
    g.state.tenant_mut().upsert_group(Group {
        id: "fresh".into(),
        display_name: "FRESH".into(),
        description: None,
        security_enabled: true,
        mail_enabled: false,
        members: Default::default(),
    });
    // A distribution list appears too: not security-enabled, so not in the scope.
    g.state.tenant_mut().upsert_group(Group {
        id: "dl".into(),
        display_name: "all-staff".into(),
        description: None,
        security_enabled: false,
        mail_enabled: true,
        members: Default::default(),
    });
    let Changes::Read(after) = src
        .read_changes(&all, &base.snapshot, &base.cursors)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(after.snapshot.groups.contains_key("fresh"));
    assert!(!after.snapshot.groups.contains_key("dl"));
    assert_eq!(after.snapshot, src.read_full(&all).await.unwrap().snapshot);

    // An expired token: the caller reads in full.
    g.state.tenant_mut().expire_delta_tokens();
    assert!(matches!(
        src.read_changes(&scope, &inc.snapshot, &inc.cursors)
            .await
            .unwrap(),
        Changes::Expired(_)
    ));
}

#[tokio::test]
async fn a_storm_of_errors_html_pages_and_cut_off_answers_reads_the_same() {
    use idsync_emulators::infra::Faults;
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let scope = Scope {
        search_depth: 3,
        ..Scope::default()
    };
    let calm = src.read_full(&scope).await.unwrap();
    g.state.infra.accounting.reset();
    g.state.infra.set_faults(Faults {
        error_rate: 0.1,
        html_rate: 0.05,
        truncate_rate: 0.05,
        reset_rate: 0.05,
        ..Faults::default()
    });
    for _ in 0..5 {
        let stormy = src.read_full(&scope).await.unwrap();
        assert_eq!(stormy.snapshot, calm.snapshot);
    }
    g.state.infra.set_faults(Faults::default());

    // Every answer an HTML page: a clear error that says so, after the retries.
    g.state.infra.set_faults(Faults {
        html_rate: 1.0,
        path_contains: "/groups".into(),
        ..Faults::default()
    });
    let e = src.read_full(&scope).await.unwrap_err();
    assert!(e.message.contains("HTML"), "{}", e.message);
    // The HTML pages come with a 5xx status: the service is unavailable, as far as idsync can tell.
    assert_eq!(e.kind, idsync_engine::SourceErrorKind::Unavailable);
}

/// A groups file of 40 names (quotes, accents, another case, names that do not exist) is read
/// in 3 requests of 15 names (`displayName in (...)`), not 40: every name that exists is found,
/// every one that does not is named in a note.
#[tokio::test]
async fn many_group_names_are_read_fifteen_to_a_request() {
    let g = Graph::start(Tenant::new(tenant())).await.unwrap();
    let src = source(&g, DEFAULT_CLIENT_SECRET);
    let mut group_names: std::collections::BTreeSet<String> =
        ["team_alpha", "O'Brien Équipe", "TEAM_ZETA"]
            .map(String::from)
            .into();
    for i in 0..37 {
        group_names.insert(format!("missing '{i}' (x)"));
    }
    assert_eq!(group_names.len(), 40);
    let r = src
        .read_full(&Scope {
            group_names,
            ..Scope::default()
        })
        .await
        .unwrap();
    assert_eq!(
        names(&r.snapshot),
        ["O'Brien Équipe", "TEAM_ALPHA", "TEAM_ZETA"]
    );
    let missing = r
        .notes
        .iter()
        .filter(|n| n.contains("was asked for but does not exist"))
        .count();
    assert_eq!(missing, 37, "{:?}", r.notes);
    let counts = g.state.infra.accounting.snapshot();
    assert_eq!(counts["GET /v1.0/groups"], 3, "{counts:?}");
}
