//! MIGRATING.md's first run, as written there, against the emulated Entra tenant, Databricks
//! account and lakeFS, starting from what the scripts leave behind: every principal of the scope
//! in Databricks with `externalId` = the Entra object id, lakeFS groups named like the Entra
//! groups with the default policies attached, and one Databricks group still under the name it
//! had before it was renamed in Entra. The starting point is written by an idsync run whose state
//! is then set aside, which writes what the scripts write (the same names, externalId and
//! policies); to the idsync under test it is a target it did not create.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_run_adopts_what_the_scripts_made_changes_only_what_is_due_then_nothing() {
    use idsync_emulators::databricks::{ACCOUNT_ID, TOKEN, Type};
    use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
    let dir: idsync_model::Directory =
        serde_json::from_str(include_str!("../../demo/src/directory.json")).unwrap();
    let graph = idsync_emulators::Graph::start(Tenant::new(dir.try_into().unwrap()))
        .await
        .unwrap();
    let lake = idsync_emulators::Lakefs::start_on(0).await.unwrap();
    let dbx = idsync_emulators::Databricks::start_on(0, None)
        .await
        .unwrap();
    let s = Sandbox {
        dir: tempfile::tempdir().unwrap(),
    };
    let g = &graph.server.base_url;
    let tenant = graph.state.tenant().tenant_id.clone();
    s.write(
        "groups_to_sync.json",
        r#"["TEAM_ALPHA", "TEAM_EPSILON", "TEAM_ZETA"]"#,
    );
    // MIGRATING.md's configuration, pointed at the emulators.
    let config = |adopt: bool| {
        format!(
            r#"
[state]
url = "state"

[source]
kind = "entra"
tenant_id = "{tenant}"
client_id = "{DEFAULT_CLIENT_ID}"
authority_host = "{g}"
graph_url = "{g}"

[scope]
groups_file = "groups_to_sync.json"
search_depth = 2
edge_groups = "empty"

[policy]
adopt = {adopt}

[targets.databricks]
kind = "databricks"
host = "{d}"
account_id = "{ACCOUNT_ID}"

[targets.lakefs]
kind = "lakefs"
endpoint = "{l}"
access_key_id = "{ACCESS_KEY_ID}"

[targets.lakefs.mapping]
user_name = "waad|{{id}}"
"#,
            d = dbx.server.base_url,
            l = lake.server.base_url,
        )
    };
    let env = [
        ("ENTRA_CLIENT_SECRET_VALUE", DEFAULT_CLIENT_SECRET),
        ("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
        ("DATABRICKS_TOKEN", TOKEN),
    ];
    let writes = |counts: std::collections::BTreeMap<String, u64>| -> u64 {
        counts
            .iter()
            .filter(|(k, _)| !k.starts_with("GET "))
            .map(|(_, v)| v)
            .sum()
    };

    // What the scripts leave: written under a state that is then set aside.
    s.write("idsync.toml", &config(false));
    let (s, made) = tokio::task::spawn_blocking(move || {
        let mut e = env.to_vec();
        e.push(("IDSYNC_STATE", "the-scripts"));
        let o = s.run_env(&["sync"], &e);
        (s, o)
    })
    .await
    .unwrap();
    assert_eq!(code(&made), 0, "{}", text(&made));
    // TEAM_ALPHA was renamed in Entra after the script last ran: Databricks has the old name.
    {
        let mut d = dbx.state.data_mut();
        let alpha = d
            .get_mut(&Type::Groups)
            .unwrap()
            .values_mut()
            .find(|g| g["displayName"] == "TEAM_ALPHA")
            .unwrap();
        alpha["displayName"] = serde_json::json!("TEAM_ALPHA_BEFORE_THE_RENAME");
        assert!(alpha["externalId"].is_string(), "{alpha}");
    }
    let (dbx_principals, lake_groups) = (
        dbx.state
            .data()
            .values()
            .map(std::collections::BTreeMap::len)
            .sum::<usize>(),
        lake.state.data().groups.len(),
    );

    // Without adoption: one conflict per principal, exit 3, nothing written.
    let (d0, l0) = (
        writes(dbx.state.infra.accounting.snapshot()),
        writes(lake.state.infra.accounting.snapshot()),
    );
    let (s, refused) = tokio::task::spawn_blocking(move || {
        let o = s.run_env(&["sync"], &env);
        (s, o)
    })
    .await
    .unwrap();
    assert_eq!(code(&refused), 3, "{}", text(&refused));
    assert!(text(&refused).contains("adopt"), "{}", text(&refused));
    assert_eq!(writes(dbx.state.infra.accounting.snapshot()), d0);
    assert_eq!(writes(lake.state.infra.accounting.snapshot()), l0);

    // MIGRATING.md's commands, in its order.
    s.write("idsync.toml", &config(true));
    let (s, outs) = tokio::task::spawn_blocking(move || {
        let outs: Vec<std::process::Output> = [
            &["validate"][..],
            &["sync", "--query-graph-only"],
            &["plan"],
            &["sync"],
            &["plan"],
        ]
        .iter()
        .map(|args| s.run_env(args, &env))
        .collect();
        (s, outs)
    })
    .await
    .unwrap();
    let [validate, graph_only, plan, sync, again] = &outs[..] else {
        panic!()
    };
    assert_eq!(code(validate), 0, "{}", text(validate));
    assert_eq!(code(graph_only), 0, "{}", text(graph_only));
    assert!(
        text(graph_only).contains("TEAM_ETA"),
        "{}",
        text(graph_only)
    );
    assert_eq!(code(plan), 2, "{}", text(plan));
    let p = text(plan);
    assert!(p.contains("adopt"), "{p}");
    assert!(
        !p.contains("+ create"),
        "nothing is created a second time: {p}"
    );
    assert!(
        p.contains("TEAM_ALPHA_BEFORE_THE_RENAME"),
        "the renamed group is found by its externalId: {p}"
    );
    assert_eq!(code(sync), 0, "{}", text(sync));
    // Only what was due: the rename in Databricks (one PATCH); lakeFS already right.
    assert_eq!(
        writes(dbx.state.infra.accounting.snapshot()) - d0,
        1,
        "{}",
        text(sync)
    );
    assert_eq!(
        writes(lake.state.infra.accounting.snapshot()) - l0,
        0,
        "{}",
        text(sync)
    );
    let total: usize = dbx
        .state
        .data()
        .values()
        .map(std::collections::BTreeMap::len)
        .sum();
    assert_eq!(total, dbx_principals, "no principal was duplicated");
    assert_eq!(lake.state.data().groups.len(), lake_groups);
    assert!(
        dbx.state.data()[&Type::Groups]
            .values()
            .any(|g| g["displayName"] == "TEAM_ALPHA")
    );
    assert_eq!(code(again), 0, "{}", text(again));
    assert_eq!(
        text(again).matches("in sync: nothing to do").count(),
        2,
        "{}",
        text(again)
    );
    drop(s);
}
