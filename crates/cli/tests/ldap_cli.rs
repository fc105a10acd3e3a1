//! The real binary reading a real directory into the Databricks, lakeFS and Kanidm emulators and a
//! real SCIM server (scim2-server): the source alone (`--query-graph-only`, `graph`), a full sync, a
//! change in the directory read incrementally, then a run that writes nothing. Once against
//! OpenLDAP (`scripts/ldap.sh`), once against Active Directory (`scripts/samba.sh`); the scripts
//! start the servers and set the variables the tests read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn var(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name}: run scripts/ldap.sh or scripts/samba.sh"))
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

fn writes(counts: std::collections::BTreeMap<String, u64>) -> u64 {
    counts
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| v)
        .sum()
}

/// A directory server and what the flow writes into it.
struct Directory {
    url: String,
    bind_dn: String,
    password: String,
    /// The organizational unit the test owns.
    ou: String,
    /// LDIF (changetype records) that makes the unit, ann and bob, and "data (eng)" holding both.
    setup: String,
    /// LDIF that adds cy to "data (eng)" and changes bob's mail.
    change: String,
    /// The DNs of ann, bob and cy.
    dns: [String; 3],
    /// The login names of ann, bob and cy (the users' default key).
    logins: [String; 3],
    /// Source settings that differ by server.
    extra_source: String,
}

impl Directory {
    /// Applies LDIF with ldapmodify (ldap-utils, which the scripts install with the servers).
    fn ldif(&self, text: &str) {
        let mut c = Command::new("ldapmodify")
            .args([
                "-x",
                "-H",
                &self.url,
                "-D",
                &self.bind_dn,
                "-w",
                &self.password,
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
}

async fn flow(d: Directory) {
    use idsync_emulators::databricks::{ACCOUNT_ID, TOKEN, Type};
    use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let (scim, scim_token) = (var("IDSYNC_TEST_SCIM"), var("IDSYNC_TEST_SCIM_TOKEN"));
    d.ldif(&d.setup);
    let lake = idsync_emulators::Lakefs::start_on(0).await.unwrap();
    let dbx = idsync_emulators::Databricks::start_on(0, None)
        .await
        .unwrap();
    let idm = idsync_emulators::Kanidm::start_on(0).await.unwrap();
    // lakeFS's default_user_group exists, as lakeFS's own LDAP setting needs it to.
    lake.state.add_group("g-viewers", "Viewers");
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
bind_dn = "{bind}"
user_base_dn = "OU=people,{ou}"
group_base_dn = "OU=groups,{ou}"
page_size = 1
{extra}

[scope]
search_depth = 2

[targets.lakefs]
kind = "lakefs"
endpoint = "{l}"
access_key_id = "{ACCESS_KEY_ID}"
default_user_group = "Viewers"

[targets.databricks]
kind = "databricks"
host = "{dbx}"
account_id = "{ACCOUNT_ID}"

[targets.databricks.mapping]
user_name = "{{userName}}@corp.example"

[targets.scim]
kind = "scim"
url = "{scim}"

[targets.kanidm]
kind = "kanidm"
url = "{k}"

[targets.kanidm.mapping]
group_name = "{{displayName|slug}}"
"#,
            url = d.url,
            bind = d.bind_dn,
            ou = d.ou,
            extra = d.extra_source,
            l = lake.server.base_url,
            dbx = dbx.server.base_url,
            k = idm.server.base_url,
        ),
    );
    let env: Vec<(&str, String)> = vec![
        ("LDAP_BIND_PASSWORD", d.password.clone()),
        ("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
        ("DATABRICKS_TOKEN", TOKEN.into()),
        ("SCIM_TOKEN", scim_token.clone()),
        (
            "KANIDM_SYNC_TOKEN",
            idsync_emulators::kanidm::SYNC_TOKEN.into(),
        ),
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
    let [ann, bob, cy] = &d.logins;
    let lowered = |dn: &str| dn.to_lowercase();

    // The source alone: --query-graph-only and `idsync graph` read it and touch no target.
    let (s, only) = run(s, vec!["sync", "--query-graph-only"]).await;
    assert_eq!(code(&only), 0, "{}", text(&only));
    assert!(text(&only).contains("data (eng)"), "{}", text(&only));
    let (s, graph) = run(s, vec!["graph"]).await;
    assert_eq!(code(&graph), 0, "{}", text(&graph));
    assert!(text(&graph).contains("data (eng)"), "{}", text(&graph));
    assert_eq!(writes(dbx.state.infra.accounting.snapshot()), 0);

    let (s, first) = run(s, vec!["sync"]).await;
    assert_eq!(code(&first), 0, "{}", text(&first));
    assert!(
        !text(&first).contains(&d.password),
        "the bind password leaked"
    );
    assert!(
        text(&first).contains("operations applied") && text(&first).contains("requests sent ("),
        "{}",
        text(&first)
    );
    {
        let data = dbx.state.data();
        assert_eq!(data[&Type::Users].len(), 2);
        let g = data[&Type::Groups]
            .values()
            .find(|g| g["displayName"] == "data (eng)")
            .unwrap();
        assert_eq!(g["members"].as_array().unwrap().len(), 2, "{g}");
        assert!(
            data[&Type::Users]
                .values()
                .any(|u| u["userName"] == format!("{ann}@corp.example"))
        );
    }
    // lakeFS users are named by their DN (the preset for an LDAP source), as lakeFS names the
    // users it makes at an LDAP login, and joined the default user group.
    let lake_users: Vec<String> = lake.state.data().users.keys().map(|u| lowered(u)).collect();
    for dn in &d.dns[..2] {
        assert!(lake_users.contains(&lowered(dn)), "{dn}: {lake_users:?}");
    }
    assert_eq!(
        lake.state.group_by_name("Viewers").unwrap().members.len(),
        2
    );
    // scim2-server: the users under their login names (the default), the group with both.
    let users = scim_list(&scim, &scim_token, "Users");
    assert!(users.iter().any(|u| u["userName"] == *ann), "{users:?}");
    let groups = scim_list(&scim, &scim_token, "Groups");
    let g = groups
        .iter()
        .find(|g| g["displayName"] == "data (eng)")
        .unwrap_or_else(|| panic!("{groups:?}"));
    assert_eq!(g["members"].as_array().unwrap().len(), 2, "{g}");
    // Kanidm: the people under their login names (AD's sAMAccountName lowered), keyed by the
    // directory's UUIDs (entryUUID, objectGUID), the group slugged, with both.
    let kanidm = |name: &str| {
        idm.state
            .data()
            .entries
            .into_values()
            .find(|e| e.name.as_deref() == Some(name))
    };
    let kg = kanidm("data-eng").expect("the group in Kanidm");
    assert_eq!(kg.members.len(), 2, "{kg:?}");
    let ka = kanidm(&ann.to_lowercase()).expect("ann in Kanidm");
    assert_eq!(
        ka.uuid,
        ka.external_id.as_deref().unwrap().to_lowercase(),
        "the entry's UUID is the directory's id"
    );

    // A change: cy joins, bob's mail changes. The next run reads only that.
    d.ldif(&d.change);
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
    let viewers: Vec<String> = lake
        .state
        .group_by_name("Viewers")
        .unwrap()
        .members
        .iter()
        .map(|m| lowered(m))
        .collect();
    assert!(viewers.contains(&lowered(&d.dns[2])), "{viewers:?}");
    let groups = scim_list(&scim, &scim_token, "Groups");
    let g = groups
        .iter()
        .find(|g| g["displayName"] == "data (eng)")
        .unwrap();
    assert_eq!(g["members"].as_array().unwrap().len(), 3, "{g}");
    let users = scim_list(&scim, &scim_token, "Users");
    assert!(users.iter().any(|u| u["userName"] == *cy), "{users:?}");
    assert_eq!(kanidm("data-eng").unwrap().members.len(), 3);
    assert_eq!(
        kanidm(&bob.to_lowercase()).unwrap().mail,
        ["robert@corp.example".to_owned()].into()
    );
    // The SCIM target keeps mails (the Databricks target does not write them).
    assert!(
        users
            .iter()
            .any(|u| u["userName"] == *bob
                && u["emails"].to_string().contains("robert@corp.example")),
        "bob's new mail: {users:?}"
    );

    // Nothing changed: nothing is written.
    let (l0, d0) = (
        writes(lake.state.infra.accounting.snapshot()),
        writes(dbx.state.infra.accounting.snapshot()),
    );
    let applied = idm.state.data().applied;
    let (_s, third) = run(s, vec!["sync"]).await;
    assert_eq!(code(&third), 0, "{}", text(&third));
    assert_eq!(writes(lake.state.infra.accounting.snapshot()), l0);
    assert_eq!(writes(dbx.state.infra.accounting.snapshot()), d0);
    // Every agreement, scim2-server's too, has nothing to do.
    assert_eq!(
        text(&third).matches("in sync: nothing to do").count(),
        4,
        "{}",
        text(&third)
    );
    assert_eq!(idm.state.data().applied, applied, "nothing sent to Kanidm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs slapd: scripts/ldap.sh"]
async fn openldap_into_databricks_lakefs_and_scim2_server_full_then_incremental_then_nothing() {
    let ou = format!("ou=cli{},dc=idsync,dc=test", std::process::id());
    let o = &ou[3..ou.find(',').unwrap()];
    let dn = |uid: &str| format!("uid={uid},ou=people,{ou}");
    let group = format!("cn=data (eng),ou=groups,{ou}");
    flow(Directory {
        url: var("IDSYNC_TEST_LDAP"),
        bind_dn: "cn=admin,dc=idsync,dc=test".into(),
        password: var("IDSYNC_TEST_LDAP_PASSWORD"),
        setup: format!(
            "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: {o}\n\n\
             dn: ou=people,{ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{ou}\nchangetype: add\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: {ann}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: ann\ncn: Ann Lee\nsn: Lee\nmail: ann@corp.example\n\n\
             dn: {bob}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: bob\ncn: Bob O'Brien\nsn: O'Brien\nmail: bob@corp.example\n\n\
             dn: {group}\nchangetype: add\nobjectClass: groupOfNames\ncn: data (eng)\nmember: {ann}\nmember: {bob}\n",
            ann = dn("ann"),
            bob = dn("bob"),
        ),
        change: format!(
            "dn: {cy}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: cy\ncn: Cy\nsn: Cy\nmail: cy@corp.example\n\n\
             dn: {group}\nchangetype: modify\nadd: member\nmember: {cy}\n\n\
             dn: {bob}\nchangetype: modify\nreplace: mail\nmail: robert@corp.example\n",
            cy = dn("cy"),
            bob = dn("bob"),
        ),
        dns: [dn("ann"), dn("bob"), dn("cy")],
        logins: ["ann".into(), "bob".into(), "cy".into()],
        extra_source: "username_attribute = \"uid\"".into(),
        ou: ou.clone(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn active_directory_into_databricks_lakefs_and_scim2_server_full_then_incremental_then_nothing()
 {
    let tag = std::process::id() % 100_000;
    let ou = format!("OU=cli{tag},DC=idsync,DC=test");
    let dn = |cn: &str| format!("CN={cn},OU=people,{ou}");
    let group = format!("CN=data (eng),OU=groups,{ou}");
    let login = |n: &str| format!("{n}{tag}");
    let user = |cn: &str, n: &str, mail: &str| {
        format!(
            "dn: {}\nchangetype: add\nobjectClass: user\nsAMAccountName: {}\ndisplayName: {cn}\nmail: {mail}\nuserAccountControl: 544\n\n",
            dn(cn),
            login(n)
        )
    };
    flow(Directory {
        url: var("IDSYNC_TEST_AD"),
        bind_dn: "Administrator@IDSYNC.TEST".into(),
        password: var("IDSYNC_TEST_AD_PASSWORD"),
        setup: format!(
            "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: OU=people,{ou}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: OU=groups,{ou}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             {}{}\
             dn: {group}\nchangetype: add\nobjectClass: group\nsAMAccountName: data{tag}\nmember: {}\nmember: {}\n",
            user("Ann Lee", "ann", "ann@corp.example"),
            user("Bob O'Brien", "bob", "bob@corp.example"),
            dn("Ann Lee"),
            dn("Bob O'Brien"),
        ),
        change: format!(
            "{}dn: {group}\nchangetype: modify\nadd: member\nmember: {}\n\n\
             dn: {}\nchangetype: modify\nreplace: mail\nmail: robert@corp.example\n",
            user("Cy", "cy", "cy@corp.example"),
            dn("Cy"),
            dn("Bob O'Brien"),
        ),
        dns: [dn("Ann Lee"), dn("Bob O'Brien"), dn("Cy")],
        logins: [login("ann"), login("bob"), login("cy")],
        extra_source: String::new(),
        ou: ou.clone(),
    })
    .await;
}
