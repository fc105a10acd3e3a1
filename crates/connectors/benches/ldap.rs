//! The LDAP source against a real slapd (`scripts/ldap.sh bench` starts it with syncprov and
//! runs this): a generated directory of USERS users and GROUPS groups (every group holds
//! PER_GROUP users; every tenth group holds the one before it) is loaded with `ldapadd`, read in
//! full, then 100 changes are made (40 users change their mail, 20 are added to a group, 20 leave
//! one, 10 new users join a group, 10 users are deleted) and read incrementally. Prints the time,
//! the searches and the entries of each read, and checks that the incremental read equals a full
//! one. Run: `cargo bench -p idsync-connectors --bench ldap -- [USERS] [GROUPS] [PER_GROUP]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use idsync_connectors::sources::ldap::LdapSource;
use idsync_connectors::sources::ldap::config::{Flavour, LdapSourceConfig};
use idsync_engine::scope::Scope;
use idsync_engine::{Changes, Source};
use idsync_model::Secret;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ldif(url: &str, pw: &str, tool: &str, text: &str) {
    let mut c = Command::new(tool)
        .args([
            "-x",
            "-c",
            "-H",
            url,
            "-D",
            "cn=admin,dc=idsync,dc=test",
            "-w",
            pw,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect(tool);
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let users = args.first().copied().unwrap_or(10_000);
    let groups = args.get(1).copied().unwrap_or(1_000);
    let per_group = args.get(2).copied().unwrap_or(20);
    let url =
        std::env::var("IDSYNC_TEST_LDAP").expect("IDSYNC_TEST_LDAP: run scripts/ldap.sh bench");
    let pw = std::env::var("IDSYNC_TEST_LDAP_PASSWORD").expect("IDSYNC_TEST_LDAP_PASSWORD");
    let ou = format!("ou=bench{},dc=idsync,dc=test", std::process::id());
    let people = format!("ou=people,{ou}");
    let gbase = format!("ou=groups,{ou}");
    let user_dn = |i: usize| format!("uid=user{i},{people}");
    let group_dn = |g: usize| format!("cn=group {g},{gbase}");

    let mut text = format!(
        "dn: {ou}\nobjectClass: organizationalUnit\nou: bench{}\n\n\
         dn: {people}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: {gbase}\nobjectClass: organizationalUnit\nou: groups\n\n",
        std::process::id()
    );
    for i in 0..users {
        text += &format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: user{i}\ncn: User {i}\nsn: {i}\nmail: user{i}@corp.example\n\n",
            user_dn(i)
        );
    }
    for g in 0..groups {
        text += &format!(
            "dn: {}\nobjectClass: groupOfNames\ncn: group {g}\n",
            group_dn(g)
        );
        for k in 0..per_group {
            text += &format!("member: {}\n", user_dn((g * per_group + k) % users));
        }
        if g % 10 == 0 && g > 0 {
            text += &format!("member: {}\n", group_dn(g - 1));
        }
        text += "\n";
    }
    let t = Instant::now();
    ldif(&url, &pw, "ldapadd", &text);
    let load = t.elapsed();

    let src = LdapSource::new(LdapSourceConfig {
        server_endpoint: url.clone(),
        bind_dn: Some("cn=admin,dc=idsync,dc=test".into()),
        bind_password: Some(Secret::new(pw.clone())),
        user_base_dn: people.clone(),
        user_filter: None,
        username_attribute: None,
        group_base_dn: gbase.clone(),
        group_filter: None,
        group_name_attribute: "cn".into(),
        member_attribute: "member".into(),
        mail_attribute: "mail".into(),
        display_name_attribute: None,
        disabled_attribute: None,
        disabled_value: None,
        start_tls: false,
        ca_bundle: None,
        page_size: 500,
        timeout: Duration::from_secs(60),
        flavour: Flavour::Auto,
    });
    let scope = Scope {
        search_depth: 3,
        ..Scope::default()
    };
    let c0 = src.counts();
    let t = Instant::now();
    let full = src.read_full_blocking(&scope);
    let full_time = t.elapsed();
    let full_cost = src.counts() - c0;
    assert_eq!(full.snapshot.groups.len(), groups);

    // 100 changes.
    let mut edit = String::new();
    for i in 0..40 {
        edit += &format!(
            "dn: {}\nchangetype: modify\nreplace: mail\nmail: renamed{i}@corp.example\n\n",
            user_dn(i * 7)
        );
    }
    for j in 0..20 {
        edit += &format!(
            "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n\n",
            group_dn(j * 3),
            user_dn((j * 3 * per_group + per_group + 1) % users)
        );
    }
    for j in 0..20 {
        edit += &format!(
            "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n\n",
            group_dn(j * 5 + 1),
            user_dn((j * 5 + 1) * per_group % users)
        );
    }
    for j in 0..10 {
        let n = users + j;
        edit += &format!(
            "dn: {}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: user{n}\ncn: User {n}\nsn: {n}\n\n\
             dn: {}\nchangetype: modify\nadd: member\nmember: {}\n\n",
            user_dn(n),
            group_dn(j * 11 + 2),
            user_dn(n)
        );
    }
    for j in 0..10 {
        edit += &format!(
            "dn: {}\nchangetype: delete\n\n",
            user_dn(users - 1 - j * 13)
        );
    }
    ldif(&url, &pw, "ldapmodify", &edit);

    let c0 = src.counts();
    let t = Instant::now();
    let inc = match src.read_changes_blocking(&scope, &full) {
        Changes::Read(r) => r,
        other => panic!("no change read: {other:?}"),
    };
    let inc_time = t.elapsed();
    let inc_cost = src.counts() - c0;
    let again = src.read_full_blocking(&scope);
    assert_eq!(
        inc.snapshot, again.snapshot,
        "the incremental read equals a full one"
    );

    println!(
        "directory: {users} users, {groups} groups of {per_group} members (every tenth nests the one before), loaded by ldapadd in {:.1} s",
        load.as_secs_f64()
    );
    println!(
        "full read: {:.2} s, {} searches, {} entries, {} connection(s)",
        full_time.as_secs_f64(),
        full_cost.searches,
        full_cost.entries,
        full_cost.connections
    );
    println!(
        "incremental read after 100 changes: {:.3} s, {} searches, {} entries, {} connection(s)",
        inc_time.as_secs_f64(),
        inc_cost.searches,
        inc_cost.entries,
        inc_cost.connections
    );
}

/// Blocking helpers: the bench is a plain program.
trait Blocking {
    fn read_full_blocking(&self, scope: &Scope) -> idsync_engine::Read;
    fn read_changes_blocking(&self, scope: &Scope, base: &idsync_engine::Read) -> Changes;
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Blocking for LdapSource {
    fn read_full_blocking(&self, scope: &Scope) -> idsync_engine::Read {
        rt().block_on(self.read_full(scope)).unwrap()
    }
    fn read_changes_blocking(&self, scope: &Scope, base: &idsync_engine::Read) -> Changes {
        rt().block_on(self.read_changes(scope, &base.snapshot, &base.cursors))
            .unwrap()
    }
}
