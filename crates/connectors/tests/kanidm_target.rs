//! The Kanidm target through the runner, against the Kanidm emulator (always) and against Kanidm's
//! own server library (`tests/kanidm`, started from `IDSYNC_TEST_KANIDM` by `scripts/kanidm.sh`;
//! `#[ignore]`d for a bare `cargo test`): the same flows, checked on what the server holds (its
//! test-only `/_idsync/entries`), never on what idsync believes it wrote.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use idsync_connectors::http::HttpConfig;
use idsync_connectors::targets::kanidm::{KanidmConfig, KanidmTarget, entry_uuid, wire};
use idsync_engine::{Deprovision, Mapping, Policy, Target};
use idsync_model::{AgreementState, Group, Kind, Member, Secret, Snapshot, User};
use idsync_runner::testing::run_seeded;
use idsync_runner::{RunOptions, exit};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// A server under test: the emulator, or the real library behind the same routes.
struct Server {
    url: String,
    sync_token: String,
    http: reqwest::Client,
    emulator: Option<idsync_emulators::Kanidm>,
    child: Option<std::process::Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn emulated() -> Server {
    let k = idsync_emulators::Kanidm::start_on(0).await.unwrap();
    // Kanidm's built-in `idm_admin` holds that name; the emulator starts empty.
    k.state
        .add_local_person("00000000-0000-0000-0000-000000000018", "idm_admin");
    Server {
        url: k.server.base_url.clone(),
        sync_token: idsync_emulators::kanidm::SYNC_TOKEN.into(),
        http: client(),
        emulator: Some(k),
        child: None,
    }
}

fn real() -> Server {
    use std::io::BufRead;
    let bin = std::env::var("IDSYNC_TEST_KANIDM").expect("IDSYNC_TEST_KANIDM");
    let mut child = std::process::Command::new(bin)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).expect(&line);
    Server {
        url: v["url"].as_str().unwrap().to_owned(),
        sync_token: v["sync_token"].as_str().unwrap().to_owned(),
        http: client(),
        emulator: None,
        child: Some(child),
    }
}

impl Server {
    fn target(&self) -> KanidmTarget {
        self.target_with(|_| {})
    }

    fn target_with(&self, f: impl FnOnce(&mut KanidmConfig)) -> KanidmTarget {
        let mut cfg = KanidmConfig {
            url: self.url.clone(),
            token: Secret::new(self.sync_token.clone()),
            http: HttpConfig {
                base_backoff: Duration::from_millis(5),
                // A large import takes a debug build of Kanidm's library minutes.
                timeout: Duration::from_secs(3600),
                ..HttpConfig::new("Kanidm")
            },
            max_request_bytes: idsync_connectors::targets::kanidm::KANIDM_MAX_BYTES,
            yield_attributes: Default::default(),
            admin: None,
        };
        f(&mut cfg);
        KanidmTarget::new(cfg).unwrap()
    }

    /// The person and group entries, by UUID.
    async fn entries(&self) -> BTreeMap<String, Value> {
        let v: Value = self
            .http
            .get(format!("{}/_idsync/entries", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["synced"] == true)
            .map(|e| (e["uuid"].as_str().unwrap().to_owned(), e.clone()))
            .collect()
    }

    async fn cookie(&self) -> Value {
        self.http
            .get(format!("{}/scim/v1/Sync", self.url))
            .bearer_auth(&self.sync_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A sync request sent as another tool would (the cookie it moves is not idsync's).
    async fn post_sync(&self, body: Value) {
        let r = self
            .http
            .post(format!("{}/scim/v1/Sync", self.url))
            .bearer_auth(&self.sync_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
    }

    async fn poke(&self, path: &str, body: Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

fn user(id: &str, name: &str, display: &str) -> User {
    User {
        id: id.into(),
        user_name: format!("{name}@example.com"),
        display_name: display.into(),
        emails: vec![format!("{name}@example.com")],
        active: true,
        user_type: Default::default(),
        external_id: None,
        attributes: Default::default(),
    }
}

fn group(id: &str, name: &str, members: &[(Kind, &str)]) -> Group {
    Group {
        id: id.into(),
        display_name: name.into(),
        description: Some(format!("the {name} team")),
        members: members
            .iter()
            .map(|(k, m)| Member {
                kind: *k,
                id: (*m).into(),
            })
            .collect(),
        security_enabled: true,
        mail_enabled: false,
    }
}

const ALICE: &str = "0b6f1c2e-0000-4000-8000-00000000a1ce";
const BOB: &str = "0b6f1c2e-0000-4000-8000-000000000b0b";
const CAROL: &str = "0b6f1c2e-0000-4000-8000-0000000ca201";
const DEVS: &str = "9e7a0000-0000-4000-8000-000000000de5";
const ALL: &str = "9e7a0000-0000-4000-8000-000000000a11";

fn directory() -> Snapshot {
    let mut s = Snapshot::default();
    for u in [
        user(ALICE, "alice", "Alice Andersen"),
        user(BOB, "bob", "Bob Berg"),
        user(CAROL, "carol", "Carol Chen"),
    ] {
        s.users.insert(u.id.clone(), std::sync::Arc::new(u));
    }
    for g in [
        group(DEVS, "devs", &[(Kind::User, ALICE), (Kind::User, BOB)]),
        group(ALL, "everyone", &[(Kind::Group, DEVS), (Kind::User, CAROL)]),
    ] {
        s.groups.insert(g.id.clone(), g);
    }
    s
}

/// Kanidm names: the mail's local part (Kanidm's names hold no `@`).
fn mapping() -> Mapping {
    Mapping {
        user_name: Mapping::user_template("{userName|localpart}").unwrap(),
        group_description: Some(Mapping::group_template("{description}").unwrap()),
        ..Mapping::defaults()
    }
}

fn policy(deprovision: Deprovision) -> Policy {
    Policy {
        deprovision,
        approved_deletions: usize::MAX,
        ..Policy::default()
    }
}

fn opts() -> RunOptions {
    RunOptions {
        workers: 4,
        reconcile: None,
        ..RunOptions::default()
    }
}

/// One `idsync sync`; the exit code, the writes sent, and the error's message if it failed.
async fn sync(
    t: &KanidmTarget,
    dir: &Snapshot,
    st: &mut AgreementState,
    p: &Policy,
) -> (u8, u64, String) {
    let before = t.requests().unwrap();
    let out = run_seeded(t, dir, &mapping(), p, st, &opts()).await;
    let sent = t.requests().unwrap() - before;
    match out {
        // What failed, when the run went on.
        Ok(o) => {
            let failed: Vec<String> = o
                .report
                .iter()
                .flat_map(|r| r.failed.iter().map(|f| f.error.clone()))
                .collect();
            (o.code, sent.writes, failed.join("\n"))
        }
        Err(e) => (e.exit_code(), sent.writes, format!("{e}")),
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The members of the group with this source id, as Kanidm holds them.
fn members(e: &BTreeMap<String, Value>, source_id: &str) -> Vec<String> {
    sorted(
        e[&entry_uuid(source_id)]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect(),
    )
}

fn names(e: &BTreeMap<String, Value>) -> Vec<String> {
    let mut v: Vec<String> = e
        .values()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

/// Every flow of the Kanidm target, in order, on one server.
async fn flows(s: &Server) {
    let t = s.target();
    let mut st = AgreementState::new("kanidm");
    let mut dir = directory();
    let keep = policy(Deprovision::Delete);

    // The first run: Kanidm asks for a refresh, which carries everything.
    assert_eq!(s.cookie().await, json!("Refresh"));
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 1), "{e}");
    let e = s.entries().await;
    assert_eq!(names(&e), ["alice", "bob", "carol", "devs", "everyone"]);
    let alice = &e[&entry_uuid(ALICE)];
    assert_eq!(alice["displayname"], "Alice Andersen");
    assert_eq!(alice["mail"], json!(["alice@example.com"]));
    assert_eq!(alice["external_id"], ALICE);
    assert_eq!(
        members(&e, DEVS),
        sorted(vec![entry_uuid(ALICE), entry_uuid(BOB)])
    );
    assert_eq!(
        members(&e, ALL),
        sorted(vec![entry_uuid(CAROL), entry_uuid(DEVS)])
    );
    assert_eq!(e[&entry_uuid(ALL)]["description"], "the everyone team");
    let cookie = s.cookie().await;
    assert_eq!(
        cookie.pointer("/Active/cookie").and_then(Value::as_str),
        st.target_cursor.as_deref(),
        "the state records Kanidm's cookie"
    );

    // No change: nothing is sent, and the cookie stays.
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 0), "{e}");
    assert_eq!(s.cookie().await, cookie);

    // An increment: bob's display name, carol joins devs. One request, with only what changed.
    dir.user_mut(BOB).unwrap().display_name = "Bob B. Berg".into();
    dir.groups.get_mut(DEVS).unwrap().members.insert(Member {
        kind: Kind::User,
        id: CAROL.into(),
    });
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 1), "{e}");
    let e = s.entries().await;
    assert_eq!(e[&entry_uuid(BOB)]["displayname"], "Bob B. Berg");
    assert_eq!(e[&entry_uuid(BOB)]["mail"], json!(["bob@example.com"]));
    assert_eq!(e[&entry_uuid(DEVS)]["members"].as_array().unwrap().len(), 3);
    assert_eq!(e[&entry_uuid(ALL)]["description"], "the everyone team");

    // A conflict: a new person whose name Kanidm's own idm_admin holds. The import is refused
    // whole (bob's change in the same run too), exit 3, the target unchanged.
    let before = s.entries().await;
    let cookie = s.cookie().await;
    let mut clash = dir.clone();
    let mut u = user(
        "0b6f1c2e-0000-4000-8000-0000000bad01",
        "idm_admin",
        "Not The Admin",
    );
    u.user_name = "idm_admin@example.com".into();
    clash.users.insert(u.id.clone(), std::sync::Arc::new(u));
    clash.user_mut(BOB).unwrap().display_name = "Bob Again".into();
    let (code, _, e) = sync(&t, &clash, &mut st, &keep).await;
    assert_eq!(code, exit::HALTED, "{e}");
    assert!(
        e.contains("idm_admin") && e.contains("map it to another name"),
        "{e}"
    );
    assert_eq!(s.entries().await, before);
    assert_eq!(s.cookie().await, cookie);
    // Resolved by leaving it out: the run goes through and sends bob's change.
    clash.users.remove("0b6f1c2e-0000-4000-8000-0000000bad01");
    let (code, _, e) = sync(&t, &clash, &mut st, &keep).await;
    assert_eq!(code, exit::OK, "{e}");
    assert_eq!(
        s.entries().await[&entry_uuid(BOB)]["displayname"],
        "Bob Again"
    );
    dir = clash;

    // A name Kanidm would refuse (a space): that person fails alone, named, before anything is
    // sent; carol's change in the same run goes through.
    let mut odd = dir.clone();
    let mut u = user("0b6f1c2e-0000-4000-8000-0000000bad02", "dave", "Dave");
    u.user_name = "dave smith@example.com".into();
    odd.users.insert(u.id.clone(), std::sync::Arc::new(u));
    odd.user_mut(CAROL).unwrap().display_name = "Carol Chen-Li".into();
    let (code, writes, e) = sync(&t, &odd, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::ERROR, 1), "{e}");
    assert!(
        e.contains("\"dave smith\" cannot be a Kanidm name: it holds a space"),
        "{e}"
    );
    let e = s.entries().await;
    assert_eq!(e[&entry_uuid(CAROL)]["displayname"], "Carol Chen-Li");
    assert!(!names(&e).contains(&"dave smith".to_owned()));
    dir.user_mut(CAROL).unwrap().display_name = "Carol Chen-Li".into();

    // deprovision = "none": bob leaves the source and stays in Kanidm.
    let none = policy(Deprovision::None);
    let mut without_bob = dir.clone();
    without_bob.users.remove(BOB);
    for g in without_bob.groups.values_mut() {
        g.members.retain(|m| m.id != BOB);
    }
    let (code, _, e) = sync(&t, &without_bob, &mut st, &none).await;
    assert_eq!(code, exit::OK, "{e}");
    let e = s.entries().await;
    assert!(e.contains_key(&entry_uuid(BOB)));
    assert_eq!(e[&entry_uuid(DEVS)]["members"].as_array().unwrap().len(), 2);
    // deprovision = "delete": now it goes, with Delete(uuid).
    let (code, _, e) = sync(&t, &without_bob, &mut st, &keep).await;
    assert_eq!(code, exit::OK, "{e}");
    assert!(!s.entries().await.contains_key(&entry_uuid(BOB)));
    dir = without_bob;

    // A force-refresh on Kanidm's side: the next run sends everything again, and nothing is lost.
    let before = s.entries().await;
    s.poke("/_idsync/force_refresh", json!({})).await;
    assert_eq!(s.cookie().await, json!("Refresh"));
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 1), "{e}");
    assert_eq!(s.entries().await, before);
    assert!(s.cookie().await.get("Active").is_some());

    // Moved: another tool wrote through the same sync account (a stray person), so Kanidm's cookie
    // is not the one idsync recorded. The picture is not trusted: everything idsync wants is sent
    // in full, and under deprovision = "delete" with Retain, so the stray goes too.
    let stray = json!({
        "schemas": [format!("{}account", wire::SCHEMA_PREFIX), format!("{}person", wire::SCHEMA_PREFIX)],
        "id": "3c0ffee0-0000-4000-8000-00000000beef",
        "externalId": "uid=stray,ou=people,dc=example,dc=com",
        "name": "stray",
        "displayname": "Stray",
    });
    s.post_sync(json!({
        "from_state": s.cookie().await,
        "to_state": { "Active": { "cookie": "b3RoZXItdG9vbA" } },
        "entries": [stray],
        "retain": "Ignore",
    }))
    .await;
    assert!(names(&s.entries().await).contains(&"stray".to_owned()));
    dir.user_mut(ALICE).unwrap().display_name = "Alice A.".into();
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 1), "{e}");
    let e = s.entries().await;
    assert_eq!(e[&entry_uuid(ALICE)]["displayname"], "Alice A.");
    assert_eq!(names(&e), ["alice", "carol", "devs", "everyone"]);
    assert_eq!(
        members(&e, ALL),
        sorted(vec![entry_uuid(CAROL), entry_uuid(DEVS)])
    );
    let (code, writes, _) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 0), "settled after the full send");

    // A yielded attribute: mail yielded to Kanidm. Sending it would be refused; with it in the
    // target's yield_attributes it is never sent, and Kanidm keeps its value.
    s.poke("/_idsync/yield", json!(["mail"])).await;
    dir.user_mut(CAROL).unwrap().display_name = "Carol C.".into();
    let (code, _, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_ne!(code, exit::OK, "Kanidm refuses a yielded attribute");
    assert!(e.contains("yield_attributes"), "{e}");
    let yielding = s.target_with(|c| c.yield_attributes = ["mail".to_owned()].into());
    let (code, _, e) = sync(&yielding, &dir, &mut st, &keep).await;
    assert_eq!(code, exit::OK, "{e}");
    let e = s.entries().await;
    assert_eq!(e[&entry_uuid(CAROL)]["displayname"], "Carol C.");
    assert_eq!(e[&entry_uuid(CAROL)]["mail"], json!(["carol@example.com"]));
    s.poke("/_idsync/yield", json!([])).await;

    // A revoked (here: wrong) token: refused with what to do, nothing sent.
    let revoked = s.target_with(|c| c.token = Secret::new("not-the-token"));
    let (code, _, e) = sync(&revoked, &dir, &mut st, &keep).await;
    assert_eq!(code, exit::ERROR);
    assert!(e.contains("generate-token"), "{e}");
    assert!(!e.contains(&s.sync_token), "the token never shows");
}

/// Large imports go in parts below `max_request_bytes`, people first and groups after the groups
/// they hold; a refresh lists everything first, then sends the groups' members.
async fn parts(s: &Server) {
    let small = s.target_with(|c| c.max_request_bytes = 4096);
    let t = s.target_with(|c| c.max_request_bytes = 14_000);
    let mut st = AgreementState::new("parts");
    let mut dir = Snapshot::default();
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = format!("0b6f1c2e-0000-4000-8000-{i:012}");
        dir.users.insert(
            id.clone(),
            std::sync::Arc::new(user(&id, &format!("user{i}"), &format!("User {i}"))),
        );
        ids.push(id);
    }
    // Nested three deep, created in the same run.
    let g = |i: usize| format!("9e7a0000-0000-4000-8000-{i:012}");
    dir.groups.insert(
        g(1),
        group(
            &g(1),
            "outer",
            &[(Kind::Group, &g(2)), (Kind::User, &ids[0])],
        ),
    );
    dir.groups.insert(
        g(2),
        group(
            &g(2),
            "middle",
            &[(Kind::Group, &g(3)), (Kind::User, &ids[1])],
        ),
    );
    let inner: Vec<(Kind, &str)> = ids.iter().map(|i| (Kind::User, i.as_str())).collect();
    dir.groups.insert(g(3), group(&g(3), "inner", &inner));
    let keep = policy(Deprovision::Delete);
    // A refresh must list every entry in one request: too small a limit is refused up front.
    let (code, writes, e) = sync(&small, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::ERROR, 0), "{e}");
    assert!(e.contains("even in their smallest form"), "{e}");
    assert_eq!(s.cookie().await, json!("Refresh"));
    assert!(s.entries().await.is_empty());
    // Everything listed in the first request in its smallest form (names only), then in full.
    let (code, writes, e) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!((code, writes), (exit::OK, 3), "{e}");
    let e = s.entries().await;
    assert_eq!(e.len(), 43);
    assert_eq!(
        e[&entry_uuid(&ids[7])]["mail"],
        json!(["user7@example.com"])
    );
    assert_eq!(e[&entry_uuid(&ids[7])]["external_id"], ids[7]);
    assert_eq!(e[&entry_uuid(&g(2))]["external_id"], g(2));
    assert_eq!(e[&entry_uuid(&g(2))]["description"], "the middle team");
    assert_eq!(
        e[&entry_uuid(&g(3))]["members"].as_array().unwrap().len(),
        40
    );
    assert_eq!(
        members(&e, &g(1)),
        sorted(vec![entry_uuid(&ids[0]), entry_uuid(&g(2))])
    );
    assert_eq!(
        members(&e, &g(2)),
        sorted(vec![entry_uuid(&ids[1]), entry_uuid(&g(3))])
    );
    // An increment in parts, with a deletion.
    for id in &ids[..20] {
        dir.user_mut(id)
            .unwrap()
            .display_name
            .push_str(" (changed)");
    }
    dir.users.remove(&ids[39]);
    let (code, writes, e) = sync(&small, &dir, &mut st, &keep).await;
    assert_eq!(code, exit::OK, "{e}");
    assert!(writes >= 2, "{writes} requests");
    let e = s.entries().await;
    assert_eq!(e.len(), 42);
    assert_eq!(e[&entry_uuid(&ids[5])]["displayname"], "User 5 (changed)");
    assert_eq!(
        e[&entry_uuid(&g(3))]["members"].as_array().unwrap().len(),
        39
    );
    let (_, writes, _) = sync(&t, &dir, &mut st, &keep).await;
    assert_eq!(writes, 0);
}

#[tokio::test]
async fn the_emulator_takes_every_flow() {
    let s = emulated().await;
    flows(&s).await;
    // The emulator saw the requests the flows account for, and nothing else.
    assert!(s.emulator.as_ref().unwrap().state.data().applied > 5);
}

#[tokio::test]
async fn the_emulator_takes_imports_in_parts() {
    parts(&emulated().await).await;
}

#[tokio::test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
async fn kanidm_takes_every_flow() {
    flows(&real()).await;
}

#[tokio::test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
async fn kanidm_takes_imports_in_parts() {
    parts(&real()).await;
}

/// `IDSYNC_KANIDM_SCALE=N`: N people and N/10 groups of about 100 members (three levels of
/// nesting), synced in full, then 100 changes, then nothing, into the Kanidm emulator, or into
/// Kanidm's server library with `IDSYNC_TEST_KANIDM` (`IDSYNC_KANIDM_MAX_BYTES`: parts smaller
/// than Kanidm's limit); prints a row of `bench/RESULTS.md`.
#[tokio::test]
#[ignore = "a measurement: IDSYNC_KANIDM_SCALE=N, see bench/RESULTS.md"]
async fn kanidm_at_scale() {
    let n: usize = std::env::var("IDSYNC_KANIDM_SCALE")
        .expect("IDSYNC_KANIDM_SCALE")
        .parse()
        .unwrap();
    let s = if std::env::var("IDSYNC_TEST_KANIDM").is_ok() {
        real()
    } else {
        emulated().await
    };
    let mut dir = idsync_emulators::generator::generate(&idsync_emulators::generator::Params {
        users: n,
        guest_ratio: 0.0,
        disabled_ratio: 0.0,
        service_principals: 0,
        groups: (n / 10).max(1),
        memberships: n * 10,
        ..Default::default()
    });
    let mapping = Mapping {
        group_name: Mapping::group_template("{displayName|lower}").unwrap(),
        ..mapping()
    };
    // IDSYNC_KANIDM_MAX_BYTES: smaller parts than Kanidm's limit.
    let t = match std::env::var("IDSYNC_KANIDM_MAX_BYTES") {
        Ok(m) => s.target_with(|c| c.max_request_bytes = m.parse().unwrap()),
        Err(_) => s.target(),
    };
    let mut st = AgreementState::new("scale");
    let p = policy(Deprovision::Delete);
    let mut row = format!(
        "| {} | {} | {} |",
        n,
        dir.groups.len(),
        dir.groups.values().map(|g| g.members.len()).sum::<usize>()
    );
    for step in ["full", "100 changes", "no change"] {
        if step == "100 changes" {
            for u in dir.users.values_mut().take(100) {
                std::sync::Arc::make_mut(u)
                    .display_name
                    .push_str(" (changed)");
            }
        }
        let before = t.sync_requests();
        let started = std::time::Instant::now();
        let out = run_seeded(&t, &dir, &mapping, &p, &mut st, &opts()).await;
        let took = started.elapsed();
        let code = match &out {
            Ok(o) => o.code,
            Err(e) => panic!("{step}: {e}"),
        };
        assert_eq!(code, exit::OK, "{step}");
        let after = t.sync_requests();
        let largest = if step == "full" {
            format!(", largest {:.1} MB", after.2 as f64 / 1e6)
        } else {
            String::new()
        };
        row.push_str(&format!(
            " {} request(s), {:.2} MB{largest}, {:.1} s |",
            after.0 - before.0,
            (after.1 - before.1) as f64 / 1e6,
            took.as_secs_f64()
        ));
    }
    let e = s.entries().await;
    assert_eq!(e.len(), n + dir.groups.len());
    println!("{row}");
}
