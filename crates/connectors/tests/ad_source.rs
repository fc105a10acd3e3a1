//! The LDAP source against a real Active Directory: a Samba AD domain controller that
//! `scripts/samba.sh` provisions and starts (it sets `IDSYNC_TEST_AD`, `IDSYNC_TEST_AD_PASSWORD`
//! and `IDSYNC_TEST_AD_READER_PASSWORD`). Each test builds its own organizational unit, reads it
//! in full, edits it as an administrator would, and checks that the incremental read (uSNChanged,
//! tombstones) equals a full read of the directory now, and what it cost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idsync_connectors::sources::ldap::config::{Flavour, LdapSourceConfig};
use idsync_connectors::sources::ldap::escape::{dn_key, dn_value};
use idsync_connectors::sources::ldap::{AD_CURSOR, LdapSource};
use idsync_engine::scope::Scope;
use idsync_engine::{Changes, Source, SourceErrorKind};
use idsync_model::{Member, Secret};
use ldap3::{LdapConnAsync, Mod};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const DOMAIN: &str = "DC=idsync,DC=test";
const ADMIN: &str = "Administrator@IDSYNC.TEST";
const READER: &str = "CN=idsync-reader,CN=Users,DC=idsync,DC=test";

/// The server and the administrator's password (the tests run only through scripts/samba.sh).
fn server() -> (String, String) {
    (
        std::env::var("IDSYNC_TEST_AD").expect("IDSYNC_TEST_AD: run scripts/samba.sh"),
        std::env::var("IDSYNC_TEST_AD_PASSWORD").expect("IDSYNC_TEST_AD_PASSWORD"),
    )
}

/// An administrator's connection.
struct Admin {
    ldap: ldap3::Ldap,
    /// Appended to every login name (unique in the domain), so a test can run again against a
    /// server that is still up (`scripts/samba.sh serve`).
    tag: String,
}

impl Admin {
    async fn new(url: &str, password: &str) -> Admin {
        let (conn, mut ldap) = LdapConnAsync::new(url).await.unwrap();
        ldap3::drive!(conn);
        ldap.simple_bind(ADMIN, password)
            .await
            .unwrap()
            .success()
            .unwrap();
        Admin {
            ldap,
            tag: String::new(),
        }
    }

    async fn add(&mut self, dn: &str, attrs: Vec<(&str, Vec<String>)>) {
        let a: Vec<(String, HashSet<String>)> = attrs
            .into_iter()
            .map(|(k, vs)| (k.to_owned(), vs.into_iter().collect()))
            .collect();
        self.ldap
            .add(dn, a)
            .await
            .unwrap()
            .success()
            .unwrap_or_else(|e| panic!("adding {dn}: {e}"));
    }

    /// An enabled user (no password: userAccountControl NORMAL_ACCOUNT | PASSWD_NOTREQD).
    async fn user(&mut self, ou: &str, sam: &str, cn: &str) -> String {
        let dn = format!("CN={},{ou}", dn_value(cn));
        self.add(
            &dn,
            vec![
                ("objectClass", vec!["user".into()]),
                ("sAMAccountName", vec![self.sam(sam)]),
                ("displayName", vec![cn.into()]),
                ("mail", vec![format!("{}@corp.example", self.sam(sam))]),
                ("userAccountControl", vec!["544".into()]),
                ("employeeID", vec![format!("E-{}", self.sam(sam))]),
            ],
        )
        .await;
        dn
    }

    async fn group(&mut self, ou: &str, cn: &str, members: &[&str]) -> String {
        let dn = format!("CN={},{ou}", dn_value(cn));
        let sam = format!(
            "g{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut attrs = vec![
            ("objectClass", vec!["group".to_owned()]),
            ("sAMAccountName", vec![sam]),
        ];
        if !members.is_empty() {
            attrs.push(("member", members.iter().map(|m| (*m).to_owned()).collect()));
        }
        self.add(&dn, attrs).await;
        dn
    }

    async fn modify(&mut self, dn: &str, mods: Vec<Mod<String>>) {
        self.ldap
            .modify(dn, mods)
            .await
            .unwrap()
            .success()
            .unwrap_or_else(|e| panic!("modifying {dn}: {e}"));
    }

    /// The login name a test's `sam` gets.
    fn sam(&self, sam: &str) -> String {
        format!("{sam}.{}", self.tag)
    }

    /// Makes sure the domain holds a tombstone: a user made and deleted.
    async fn tombstone(&mut self, ou: &str) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dn = self
            .user(&format!("OU=elsewhere,{ou}"), &format!("gone{n}"), "Gone")
            .await;
        self.ldap.delete(&dn).await.unwrap().success().unwrap();
    }

    async fn members(&mut self, group: &str, add: &[&str], remove: &[&str]) {
        let mut mods = Vec::new();
        if !add.is_empty() {
            mods.push(Mod::Add(
                "member".to_owned(),
                add.iter().map(|m| (*m).to_owned()).collect(),
            ));
        }
        if !remove.is_empty() {
            mods.push(Mod::Delete(
                "member".to_owned(),
                remove.iter().map(|m| (*m).to_owned()).collect(),
            ));
        }
        self.modify(group, mods).await;
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh organizational unit with `people` and `groups` below it.
async fn unit(admin: &mut Admin) -> String {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let name = format!("t{}-{n}", std::process::id() % 100_000);
    let ou = format!("OU={name},{DOMAIN}");
    admin.tag = format!("{}{n}", std::process::id() % 1000);
    admin
        .add(
            &ou,
            vec![("objectClass", vec!["organizationalUnit".into()])],
        )
        .await;
    for sub in ["people", "groups", "elsewhere"] {
        admin
            .add(
                &format!("OU={sub},{ou}"),
                vec![("objectClass", vec!["organizationalUnit".into()])],
            )
            .await;
    }
    ou
}

fn config(url: &str, bind: &str, password: &str, ou: &str) -> LdapSourceConfig {
    LdapSourceConfig {
        server_endpoint: url.to_owned(),
        bind_dn: Some(bind.to_owned()),
        bind_password: Some(Secret::new(password)),
        user_base_dn: format!("OU=people,{ou}"),
        user_filter: None,
        username_attribute: None,
        group_base_dn: format!("OU=groups,{ou}"),
        group_filter: None,
        group_name_attribute: "cn".into(),
        member_attribute: "member".into(),
        mail_attribute: "mail".into(),
        display_name_attribute: None,
        disabled_attribute: None,
        disabled_value: None,
        start_tls: false,
        ca_bundle: None,
        page_size: 3,
        timeout: Duration::from_secs(20),
        flavour: Flavour::Auto,
    }
}

fn all_groups(depth: u32) -> Scope {
    Scope {
        search_depth: depth,
        ..Scope::default()
    }
}

/// Users, nested groups, a cycle and names with every filter metacharacter, read in full in pages
/// of 3; then a rename, a changed attribute, a disabled user, a user who leaves every group and
/// is deleted (a tombstone), a new member whose DN needs escaping, a new nested group and a user
/// moved out of the base: the incremental read equals a full read.
#[tokio::test]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn active_directory_full_then_incremental_equals_full() {
    let (url, pw) = server();
    let mut admin = Admin::new(&url, &pw).await;
    let ou = unit(&mut admin).await;
    let people = format!("OU=people,{ou}");
    let groups = format!("OU=groups,{ou}");
    let ann = admin.user(&people, "ann", "Ann Lee").await;
    let bob = admin
        .user(&people, "bob", "Bob O'Brien (ops) *\\ Zoë")
        .await;
    let cy = admin.user(&people, "cy", "Lee, Cy").await;
    let dee = admin.user(&people, "dee", "Dee").await;
    let fay = admin.user(&people, "fay", "Fay").await;
    let hal = admin.user(&people, "hal", "Hal").await;
    let jo = admin.user(&people, "jo", "Jo").await;
    let ivy = admin
        .user(&format!("OU=elsewhere,{ou}"), "ivy", "Ivy")
        .await;
    let ops = admin.group(&groups, "ops (EU)*", &[&cy]).await;
    let eng = admin.group(&groups, "eng", &[&ann, &bob, &ops]).await;
    // Groups no change below touches: what happens to their members is seen only through the
    // tombstones (hal, jo), the search of the whole naming context (fay moves out) and the
    // newcomer's memberOf (ivy moves in).
    admin.group(&groups, "g-fay", &[&fay]).await;
    admin.group(&groups, "g-hal", &[&hal]).await;
    admin.group(&groups, "g-jo", &[&jo]).await;
    admin.group(&groups, "g-ivy", &[&ivy]).await;
    // A cycle: ops contains eng back.
    admin.members(&ops, &[&eng], &[]).await;

    admin.tombstone(&ou).await;

    let src = LdapSource::new(config(&url, ADMIN, &pw, &ou));
    let scope = all_groups(3);
    let first = src.read_full(&scope).await.unwrap();
    let s = &first.snapshot;
    assert_eq!(
        s.users.len(),
        6,
        "dee is in no group, ivy outside the base: {:?}",
        s.users
    );
    assert_eq!(s.groups.len(), 6);
    let bob_user = s
        .users
        .values()
        .find(|u| u.user_name == admin.sam("bob"))
        .unwrap();
    assert_eq!(bob_user.display_name, "Bob O'Brien (ops) *\\ Zoë");
    assert_eq!(
        bob_user.emails,
        [format!("{}@corp.example", admin.sam("bob"))]
    );
    assert!(bob_user.active);
    assert_eq!(
        bob_user.attributes["employeeID"],
        format!("E-{}", admin.sam("bob"))
    );
    assert_eq!(dn_key(&bob_user.attributes["dn"]), dn_key(&bob));
    // objectGUID as a GUID string, never the raw bytes; no back links among the attributes.
    assert!(bob_user.id.len() == 36 && bob_user.id.matches('-').count() == 4);
    assert!(!bob_user.attributes.contains_key("memberOf"));
    assert!(!bob_user.attributes.contains_key("objectGUID"));
    let eng_g = s.groups.values().find(|g| g.display_name == "eng").unwrap();
    let ops_g = s
        .groups
        .values()
        .find(|g| g.display_name == "ops (EU)*")
        .unwrap();
    assert!(eng_g.members.contains(&Member::group(ops_g.id.clone())));
    assert!(ops_g.members.contains(&Member::group(eng_g.id.clone())));
    assert!(first.cursors.contains_key(AD_CURSOR), "{:?}", first.notes);
    assert!(
        !first.notes.iter().any(|n| n.contains("Deleted Objects")),
        "the administrator reads tombstones: {:?}",
        first.notes
    );

    let src_ref = &src;
    let (admin_ref, people_ref, ou_ref) = (&mut admin, &people, &ou);
    idsync_runner::testing::source_conformance(src_ref, &scope, || async move {
        // ann is renamed: her objectGUID stays, eng's member value follows.
        admin_ref
            .ldap
            .modifydn(&ann, "CN=Ann Lee-Smith", true, None)
            .await
            .unwrap()
            .success()
            .unwrap();
        // bob gets a new mail and is disabled (userAccountControl bit 2).
        admin_ref
            .modify(
                &bob,
                vec![
                    Mod::Replace("mail".into(), HashSet::from(["robert@corp.example".into()])),
                    Mod::Replace("userAccountControl".into(), HashSet::from(["546".into()])),
                ],
            )
            .await;
        // cy leaves ops (his only group), then is deleted: a tombstone.
        admin_ref.members(&ops, &[], &[&cy]).await;
        admin_ref.ldap.delete(&cy).await.unwrap().success().unwrap();
        // A new user whose DN needs escaping joins eng; dee (who existed) joins ops.
        let eve = admin_ref.user(people_ref, "eve", "Eve (x)*\\,y").await;
        admin_ref.members(&eng, &[&eve], &[]).await;
        admin_ref.members(&ops, &[&dee], &[]).await;
        // A new group nested in ops.
        let sub = admin_ref
            .group(&format!("OU=groups,{ou_ref}"), "sub", &[&dee])
            .await;
        admin_ref.members(&ops, &[&sub], &[]).await;
        // hal is deleted; jo changes, then is deleted: their groups are not touched.
        admin_ref
            .ldap
            .delete(&hal)
            .await
            .unwrap()
            .success()
            .unwrap();
        admin_ref
            .modify(
                &jo,
                vec![Mod::Replace(
                    "mail".into(),
                    HashSet::from(["jo2@corp.example".into()]),
                )],
            )
            .await;
        admin_ref.ldap.delete(&jo).await.unwrap().success().unwrap();
        // ivy moves into the users' base: g-ivy, untouched, now holds her.
        admin_ref
            .ldap
            .modifydn(&ivy, "CN=Ivy", true, Some(people_ref))
            .await
            .unwrap()
            .success()
            .unwrap();
        // fay moves out of the users' base: g-fay still lists her, but she is out of scope.
        admin_ref
            .ldap
            .modifydn(
                &fay,
                "CN=Fay",
                true,
                Some(&format!("OU=elsewhere,{ou_ref}")),
            )
            .await
            .unwrap()
            .success()
            .unwrap();
    })
    .await
    .unwrap();
}

/// A group of 2,000 members is read in ranges of 1,500 (`member;range=0-1499`, then
/// `member;range=1500-*`), in full and when it changes; an incremental read after one member
/// leaves and one joins costs a handful of searches, not the directory.
#[tokio::test]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn a_2000_member_group_is_read_in_ranges_and_its_change_costs_little() {
    let (url, pw) = server();
    let mut admin = Admin::new(&url, &pw).await;
    let ou = unit(&mut admin).await;
    let people = format!("OU=people,{ou}");
    let mut dns = Vec::new();
    for i in 0..2000 {
        dns.push(
            admin
                .user(&people, &format!("m{i}"), &format!("Member {i}"))
                .await,
        );
    }
    let refs: Vec<&str> = dns.iter().map(String::as_str).collect();
    let big = admin.group(&format!("OU=groups,{ou}"), "big", &refs).await;
    let mut cfg = config(&url, ADMIN, &pw, &ou);
    cfg.page_size = 500;
    let src = LdapSource::new(cfg);
    let scope = all_groups(1);
    let before = src.counts();
    let first = src.read_full(&scope).await.unwrap();
    let full_cost = src.counts() - before;
    let g = first.snapshot.groups.values().next().unwrap();
    assert_eq!(g.members.len(), 2000, "every range read");
    assert_eq!(first.snapshot.users.len(), 2000);
    // 2,000 users in pages of 500, the group, its second range, the position: about ten.
    assert!(full_cost.searches >= 6, "{full_cost:?}");
    assert!(full_cost.entries >= 2001, "{full_cost:?}");

    let newcomer = admin.user(&people, "newcomer", "New Comer").await;
    admin.members(&big, &[&newcomer], &[&dns[7]]).await;

    let before = src.counts();
    let Changes::Read(inc) = src
        .read_changes(&scope, &first.snapshot, &first.cursors)
        .await
        .unwrap()
    else {
        panic!("no change read");
    };
    let cost = src.counts() - before;
    let full = src.read_full(&scope).await.unwrap();
    assert_eq!(inc.snapshot, full.snapshot);
    let g = inc.snapshot.groups.values().next().unwrap();
    assert_eq!(g.members.len(), 2000);
    // The dialect's root DSE, the position (root DSE, NTDS Settings, tombstone lifetime),
    // objects changed anywhere, tombstones, changed users, changed groups (the group: 2 ranges):
    // 9 when this was written; the entries are what changed, not the 2,000 users.
    assert!(cost.searches <= 12, "{cost:?}");
    assert!(cost.entries <= 12, "{cost:?}");
    assert_eq!(cost.connections, 1, "{cost:?}");
    eprintln!(
        "2,000 users, one 2,000-member group: full read {full_cost:?}; change read after 2 changes {cost:?}"
    );
}

/// An account that may not read the Deleted Objects container is told what incremental runs
/// miss and how to grant it; a cursor from another domain controller (another invocationId) or
/// one that is not a cursor makes the next read a full one, with the reason.
#[tokio::test]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn tombstone_rights_and_foreign_cursors_are_explained() {
    let (url, pw) = server();
    let reader_pw = std::env::var("IDSYNC_TEST_AD_READER_PASSWORD").unwrap();
    let mut admin = Admin::new(&url, &pw).await;
    let ou = unit(&mut admin).await;
    let a = admin.user(&format!("OU=people,{ou}"), "solo", "Solo").await;
    admin.group(&format!("OU=groups,{ou}"), "g", &[&a]).await;

    admin.tombstone(&ou).await;
    let reader = LdapSource::new(config(&url, READER, &reader_pw, &ou));
    let r = reader.read_full(&all_groups(1)).await.unwrap();
    assert_eq!(r.snapshot.users.len(), 1);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("no deleted object") && n.contains(READER)),
        "{:?}",
        r.notes
    );

    let src = LdapSource::new(config(&url, ADMIN, &pw, &ou));
    let r = src.read_full(&all_groups(1)).await.unwrap();
    let parts: Vec<&str> = r.cursors[AD_CURSOR].split('/').collect();
    let (inv, usn) = (parts[0], parts[1]);
    assert_eq!(inv.len(), 36);
    let mut foreign = r.cursors.clone();
    foreign.insert(
        AD_CURSOR.into(),
        format!("00000000-0000-0000-0000-000000000001/{usn}"),
    );
    match src
        .read_changes(&all_groups(1), &r.snapshot, &foreign)
        .await
        .unwrap()
    {
        Changes::Expired(why) => assert!(why.contains("invocationId"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A cursor older than the tombstone lifetime (60 days when unset): deletions since may be
    // gone, so the run reads in full.
    let mut old = r.cursors.clone();
    old.insert(AD_CURSOR.into(), format!("{inv}/{usn}/0"));
    match src
        .read_changes(&all_groups(1), &r.snapshot, &old)
        .await
        .unwrap()
    {
        Changes::Expired(why) => assert!(why.contains("tombstone lifetime"), "{why}"),
        other => panic!("{other:?}"),
    }
    let garbage = BTreeMap::from([(AD_CURSOR.to_owned(), "not a cursor".to_owned())]);
    assert!(matches!(
        src.read_changes(&all_groups(1), &r.snapshot, &garbage)
            .await
            .unwrap(),
        Changes::Expired(_)
    ));
}

/// A wrong password is an authorisation error naming the bind DN, never the password.
#[tokio::test]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn a_refused_bind_is_a_clear_error() {
    let (url, _) = server();
    let e = LdapSource::new(config(
        &url,
        READER,
        "Wrong-Password-123!",
        "OU=x,DC=idsync,DC=test",
    ))
    .read_full(&all_groups(1))
    .await
    .unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unauthorized, "{e}");
    assert!(e.message.contains(READER), "{e}");
    assert!(!e.message.contains("Wrong-Password-123!"), "{e}");
}

/// A user filter on memberOf (a back link: joining a group does not change the user's
/// uSNChanged) cannot be read by changes: every run reads in full, and the note says why.
#[tokio::test]
#[ignore = "needs Samba AD: scripts/samba.sh"]
async fn a_member_of_filter_reads_in_full_and_says_why() {
    let (url, pw) = server();
    let mut admin = Admin::new(&url, &pw).await;
    let ou = unit(&mut admin).await;
    let a = admin.user(&format!("OU=people,{ou}"), "mo", "Mo").await;
    let g = admin
        .group(&format!("OU=groups,{ou}"), "lakefs-users", &[&a])
        .await;
    let mut cfg = config(&url, ADMIN, &pw, &ou);
    cfg.user_filter = Some(format!(
        "(&(objectClass=user)(memberOf={}))",
        idsync_connectors::sources::ldap::escape::filter_value(&g)
    ));
    let r = LdapSource::new(cfg)
        .read_full(&all_groups(1))
        .await
        .unwrap();
    assert_eq!(r.snapshot.users.len(), 1);
    assert!(r.cursors.is_empty(), "{:?}", r.cursors);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("memberOf") && n.contains("full")),
        "{:?}",
        r.notes
    );
}
