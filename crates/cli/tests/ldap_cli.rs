//! The real binary reading a real OpenLDAP (`scripts/ldap.sh` starts it with a scim2-server and
//! sets `IDSYNC_TEST_LDAP`, `IDSYNC_TEST_LDAP_PASSWORD`, `IDSYNC_TEST_SCIM` and
//! `IDSYNC_TEST_SCIM_TOKEN`) into the Databricks and lakeFS emulators and the real SCIM server:
//! the source alone (`--query-graph-only`, `graph`), a full sync, a change in the directory read
//! incrementally, then a run that writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name}: run scripts/ldap.sh"))
}

/// What scim2-server holds of `resource` (Users or Groups), through its API.
fn scim_list(url: &str, token: &str, resource: &str) -> Vec<serde_json::Value> {
    let o = Command::new("curl")
        .args([
            "-sf",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("{url}/{resource}?count=1000"),
        ])
        .output()
        .expect("curl");
    assert!(o.status.success(), "listing {resource} on scim2-server");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Resources"].as_array().cloned().unwrap_or_default()
}

/// Applies LDIF with ldapmodify (ldap-utils, which scripts/ldap.sh installs with slapd).
fn ldif(url: &str, password: &str, text: &str) {
    let mut c = Command::new("ldapmodify")
        .args([
            "-x",
            "-H",
            url,
            "-D",
            "cn=admin,dc=idsync,dc=test",
            "-w",
            password,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ldapmodify (ldap-utils)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "ldapmodify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn writes(counts: std::collections::BTreeMap<String, u64>) -> u64 {
    counts
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs slapd: scripts/ldap.sh"]
async fn ldap_into_databricks_lakefs_and_scim2_server_full_then_incremental_then_nothing() {
    use idsync_emulators::databricks::{ACCOUNT_ID, TOKEN, Type};
    use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let (url, pw) = (var("IDSYNC_TEST_LDAP"), var("IDSYNC_TEST_LDAP_PASSWORD"));
    let (scim, scim_token) = (var("IDSYNC_TEST_SCIM"), var("IDSYNC_TEST_SCIM_TOKEN"));
    let ou = format!("ou=cli{},dc=idsync,dc=test", std::process::id());
    ldif(
        &url,
        &pw,
        &format!(
            "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: {o}\n\n\
             dn: ou=people,{ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: uid=ann,ou=people,{ou}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: ann\ncn: Ann Lee\nsn: Lee\nmail: ann@corp.example\n\n\
             dn: uid=bob,ou=people,{ou}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: bob\ncn: Bob O'Brien\nsn: O'Brien\nmail: bob@corp.example\n\n\
             dn: cn=data (eng),ou=groups,{ou}\nchangetype: add\nobjectClass: groupOfNames\ncn: data (eng)\nmember: uid=ann,ou=people,{ou}\nmember: uid=bob,ou=people,{ou}\n",
            o = &ou[3..ou.find(',').unwrap()]
        ),
    );
    let lake = idsync_emulators::Lakefs::start_on(0).await.unwrap();
    let dbx = idsync_emulators::Databricks::start_on(0, None)
        .await
        .unwrap();
    // lakeFS's default_user_group exists, as lakeFS's own LDAP setting needs it to.
    lake.state.data_mut().groups.insert(
        "g-viewers".into(),
        idsync_emulators::lakefs::LGroup {
            id: "g-viewers".into(),
            name: "Viewers".into(),
            description: None,
            creation_date: 0,
            members: Default::default(),
            policies: Default::default(),
        },
    );
    let s = Sandbox::new("");
    s.write(
        "idsync.toml",
        &format!(
            r#"
[state]
url = "state"

[source]
kind = "ldap"
server_endpoint = "{url}"
bind_dn = "cn=admin,dc=idsync,dc=test"
user_base_dn = "ou=people,{ou}"
group_base_dn = "ou=groups,{ou}"
username_attribute = "uid"
page_size = 1

[scope]
search_depth = 2

[targets.lakefs]
kind = "lakefs"
endpoint = "{l}"
access_key_id = "{ACCESS_KEY_ID}"
default_user_group = "Viewers"

[targets.databricks]
kind = "databricks"
host = "{d}"
account_id = "{ACCOUNT_ID}"

[targets.databricks.mapping]
user_name = "{{uid}}@corp.example"

[targets.scim]
kind = "scim"
url = "{scim}"
"#,
            l = lake.server.base_url,
            d = dbx.server.base_url,
        ),
    );
    let env: Vec<(&str, String)> = vec![
        ("LDAP_BIND_PASSWORD", pw.clone()),
        ("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
        ("DATABRICKS_TOKEN", TOKEN.into()),
        ("SCIM_TOKEN", scim_token.clone()),
    ];
    let run = move |s: Sandbox, args: Vec<&'static str>| {
        let env = env.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let o = s.run_env(&args, &e);
                (s, o)
            })
            .await
            .unwrap()
        }
    };
    // The source alone: --query-graph-only and `idsync graph` read it and touch no target.
    let (s, only) = run(s, vec!["sync", "--query-graph-only"]).await;
    assert_eq!(code(&only), 0, "{}", text(&only));
    assert!(text(&only).contains("2 users"), "{}", text(&only));
    let (s, graph) = run(s, vec!["graph"]).await;
    assert_eq!(code(&graph), 0, "{}", text(&graph));
    assert!(text(&graph).contains("data (eng)"), "{}", text(&graph));
    assert_eq!(writes(dbx.state.infra.accounting.snapshot()), 0);
    let (s, first) = run(s, vec!["sync"]).await;
    assert_eq!(code(&first), 0, "{}", text(&first));
    assert!(!text(&first).contains(&pw), "the bind password leaked");
    {
        let d = dbx.state.data();
        assert_eq!(d[&Type::Users].len(), 2);
        let g = d[&Type::Groups]
            .values()
            .find(|g| g["displayName"] == "data (eng)")
            .unwrap();
        assert_eq!(g["members"].as_array().unwrap().len(), 2, "{g}");
        assert!(
            d[&Type::Users]
                .values()
                .any(|u| u["userName"] == "ann@corp.example")
        );
    }
    // lakeFS users are named by their DN (the preset for an LDAP source), as lakeFS names the
    // users it makes at an LDAP login, and joined the default user group.
    let lake_users: Vec<String> = lake.state.data().users.keys().cloned().collect();
    assert!(
        lake_users.contains(&format!("uid=ann,ou=people,{ou}")),
        "{lake_users:?}"
    );
    assert!(
        lake_users.contains(&format!("uid=bob,ou=people,{ou}")),
        "{lake_users:?}"
    );
    assert_eq!(
        lake.state.group_by_name("Viewers").unwrap().members.len(),
        2
    );
    // scim2-server: the users under their login names (the default), the group with both.
    let users = scim_list(&scim, &scim_token, "Users");
    assert!(users.iter().any(|u| u["userName"] == "ann"), "{users:?}");
    let groups = scim_list(&scim, &scim_token, "Groups");
    let g = groups
        .iter()
        .find(|g| g["displayName"] == "data (eng)")
        .unwrap_or_else(|| panic!("{groups:?}"));
    assert_eq!(g["members"].as_array().unwrap().len(), 2, "{g}");

    // A change: cy joins, bob's mail changes. The next run reads only that.
    ldif(
        &url,
        &pw,
        &format!(
            "dn: uid=cy,ou=people,{ou}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: cy\ncn: Cy\nsn: Cy\n\n\
             dn: cn=data (eng),ou=groups,{ou}\nchangetype: modify\nadd: member\nmember: uid=cy,ou=people,{ou}\n\n\
             dn: uid=bob,ou=people,{ou}\nchangetype: modify\nreplace: mail\nmail: robert@corp.example\n"
        ),
    );
    let before = writes(dbx.state.infra.accounting.snapshot());
    let (s, second) = run(s, vec!["sync"]).await;
    assert_eq!(code(&second), 0, "{}", text(&second));
    assert!(
        text(&second).to_lowercase().contains("incremental read"),
        "{}",
        text(&second)
    );
    assert_eq!(dbx.state.data()[&Type::Users].len(), 3);
    // cy's create, bob's update and the group's new member: no more.
    let changed = writes(dbx.state.infra.accounting.snapshot()) - before;
    assert!(changed <= 3, "{changed} writes for 3 changes");
    assert!(
        lake.state
            .group_by_name("Viewers")
            .unwrap()
            .members
            .contains(&format!("uid=cy,ou=people,{ou}"))
    );
    let groups = scim_list(&scim, &scim_token, "Groups");
    let g = groups
        .iter()
        .find(|g| g["displayName"] == "data (eng)")
        .unwrap();
    assert_eq!(g["members"].as_array().unwrap().len(), 3, "{g}");

    // Nothing changed: nothing is written.
    let (l0, d0) = (
        writes(lake.state.infra.accounting.snapshot()),
        writes(dbx.state.infra.accounting.snapshot()),
    );
    let (_s, third) = run(s, vec!["sync"]).await;
    assert_eq!(code(&third), 0, "{}", text(&third));
    // Every agreement, scim2-server's too, has nothing to do.
    assert_eq!(
        text(&third).matches("in sync: nothing to do").count(),
        3,
        "{}",
        text(&third)
    );
    assert_eq!(writes(lake.state.infra.accounting.snapshot()), l0);
    assert_eq!(writes(dbx.state.infra.accounting.snapshot()), d0);
}
