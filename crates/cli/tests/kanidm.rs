//! `kind = "kanidm"` through the binary: a sync, then the agreement ended on Kanidm's side with
//! `idsync agreement terminate` (a plan, then `--yes-delete N`) or `finalise`, against the Kanidm
//! emulator (always) and Kanidm's own server library (`IDSYNC_TEST_KANIDM`, `scripts/kanidm.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::Sandbox;
use serde_json::Value;

/// People and groups with names Kanidm takes (no `@`, no spaces).
const DIRECTORY: &str = r#"{
  "users": [
    { "id": "6a1d2c3e-0000-4000-8000-000000000001", "userName": "alice@corp.example", "displayName": "Alice", "emails": ["alice@corp.example"] },
    { "id": "6a1d2c3e-0000-4000-8000-000000000002", "userName": "bob@corp.example", "displayName": "Bob \"B\" O'Brien" },
    { "id": "6a1d2c3e-0000-4000-8000-000000000003", "userName": "carol@corp.example", "displayName": "Carol" }
  ],
  "servicePrincipals": [ { "id": "s1", "appId": "app-1", "displayName": "ci" } ],
  "groups": [
    { "id": "7b2e3d4f-0000-4000-8000-000000000001", "displayName": "data_eng", "members": [
      { "type": "user", "id": "6a1d2c3e-0000-4000-8000-000000000001" }, { "type": "servicePrincipal", "id": "s1" },
      { "type": "group", "id": "7b2e3d4f-0000-4000-8000-000000000002" } ] },
    { "id": "7b2e3d4f-0000-4000-8000-000000000002", "displayName": "platform", "members": [
      { "type": "user", "id": "6a1d2c3e-0000-4000-8000-000000000002" } ] }
  ]
}"#;

/// A Kanidm server: the emulator on a runtime of its own, or the real library's harness.
struct Server {
    url: String,
    sync_token: String,
    admin_token: String,
    sync_account: String,
    _emulator: Option<(tokio::runtime::Runtime, idsync_emulators::Kanidm)>,
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

fn emulated() -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let k = rt.block_on(idsync_emulators::Kanidm::start_on(0)).unwrap();
    Server {
        url: k.server.base_url.clone(),
        sync_token: idsync_emulators::kanidm::SYNC_TOKEN.into(),
        admin_token: idsync_emulators::kanidm::ADMIN_TOKEN.into(),
        sync_account: idsync_emulators::kanidm::SYNC_ACCOUNT.into(),
        _emulator: Some((rt, k)),
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
    let text = |k: &str| v[k].as_str().unwrap().to_owned();
    Server {
        url: text("url"),
        sync_token: text("sync_token"),
        admin_token: text("admin_token"),
        sync_account: text("sync_account"),
        _emulator: None,
        child: Some(child),
    }
}

impl Server {
    /// The person and group entries (`synced`: still under the sync account's authority).
    /// One request to a test-only route; the answer's body.
    fn call(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://");
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(" 200 "), "{method} {path}: {head}");
        body.to_owned()
    }

    /// The person and group entries (`synced`: still under the sync account's authority).
    fn entries(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.call("GET", "/_idsync/entries", ""))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn entry(&self, name: &str) -> Value {
        self.entries()
            .into_iter()
            .find(|e| e["name"] == name)
            .unwrap_or(Value::Null)
    }

    fn names(&self, synced: bool) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries()
            .iter()
            .filter(|e| e["synced"] == synced)
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .filter(|n| n != "idm_admin")
            .collect();
        v.sort();
        v
    }

    /// A sandbox whose one target is this server.
    fn sandbox(&self) -> Sandbox {
        let s = Sandbox::new("");
        s.write("directory.json", DIRECTORY);
        s.write(
            "idsync.toml",
            &format!(
                r#"
[state]
url = "state"

[source]
kind = "file"
path = "directory.json"

[scope]
search_depth = 2

[policy]
deprovision = "delete"

[targets.idm]
kind = "kanidm"
url = "{}"
sync_account = "{}"

[targets.idm.mapping]
user_name = "{{userName|localpart}}"
"#,
                self.url, self.sync_account
            ),
        );
        s
    }

    fn env(&self, admin: bool) -> Vec<(&'static str, String)> {
        let mut e = vec![("KANIDM_SYNC_TOKEN", self.sync_token.clone())];
        if admin {
            e.push(("KANIDM_ADMIN_TOKEN", self.admin_token.clone()));
        }
        e
    }
}

fn run(s: &Sandbox, k: &Server, admin: bool, args: &[&str]) -> (i32, String) {
    let env = k.env(admin);
    let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let o = s.run_env(args, &env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !text.contains(&k.sync_token),
        "the sync token shows:\n{text}"
    );
    assert!(
        !text.contains(&k.admin_token),
        "the admin token shows:\n{text}"
    );
    (o.status.code().unwrap_or(-1), text)
}

fn state(s: &Sandbox) -> Value {
    common::state_of(s, "idm")
}

/// Carol is in no group of the scope; the service principal has no place in Kanidm.
const SYNCED: [&str; 4] = ["alice", "bob", "data_eng", "platform"];

fn terminate(k: &Server) {
    let s = k.sandbox();
    // Kanidm's names: people by their login's local part, guests by their mail slugged.
    s.write(
        "idsync.toml",
        &s.read("idsync.toml")
            .replace("user_name = \"{userName|localpart}\"\n", ""),
    );
    let (code, out) = run(&s, k, false, &["validate"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("users keyed by {userName|localpart} (guests {mail|slug})"),
        "{out}"
    );
    let (code, out) = run(&s, k, false, &["sync"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(k.names(true), SYNCED, "{out}");
    // A plan first: four deletions, nothing deleted.
    let (code, out) = run(&s, k, true, &["agreement", "terminate", "idm"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--yes-delete 4"), "{out}");
    assert_eq!(k.names(true), SYNCED);
    // Confirmed: Kanidm terminates the agreement, its entries and the sync account.
    let (code, out) = run(
        &s,
        k,
        true,
        &["agreement", "terminate", "idm", "--yes-delete", "4"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("terminated on the target's side"), "{out}");
    assert!(
        k.names(true).is_empty() && k.names(false).is_empty(),
        "{:?}",
        k.entries()
    );
    let (code, out) = run(&s, k, false, &["sync"]);
    assert_ne!(code, 0, "a terminated agreement does not run: {out}");
    assert!(out.contains("terminated"), "{out}");
}

fn finalise(k: &Server) {
    let s = k.sandbox();
    let (code, out) = run(&s, k, false, &["sync"]);
    assert_eq!(code, 0, "{out}");
    let before = state(&s);
    // Without an admin token, Kanidm cannot be asked: refused, nothing changes.
    let (code, out) = run(&s, k, false, &["agreement", "finalise", "idm", "--yes"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("KANIDM_ADMIN_TOKEN"), "{out}");
    assert_eq!(state(&s), before);
    assert_eq!(k.names(true), SYNCED);
    // With it: the entries stay, Kanidm's own now.
    let (code, out) = run(&s, k, true, &["agreement", "finalise", "idm", "--yes"]);
    assert_eq!(code, 0, "{out}");
    assert!(k.names(true).is_empty(), "{:?}", k.entries());
    assert_eq!(k.names(false), SYNCED);
    assert_eq!(state(&s)["status"], "finalised");
}

/// A saved plan: applied against the picture it was made from; refused once Kanidm moved.
fn saved_plans(k: &Server) {
    let s = k.sandbox();
    let (code, out) = run(&s, k, false, &["sync"]);
    assert_eq!(code, 0, "{out}");
    let edit = |name: &str| {
        let mut dir: Value = serde_json::from_str(DIRECTORY).unwrap();
        dir["users"][0]["displayName"] = name.into();
        s.write("directory.json", &dir.to_string());
    };
    edit("Alice Liddell");
    let (code, out) = run(&s, k, false, &["plan", "--out", "p.json"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = run(&s, k, false, &["apply", "p.json"]);
    assert_eq!(code, 0, "{out}");
    let alice = k.entry("alice");
    assert_eq!(alice["displayname"], "Alice Liddell");
    // The whole entry went, from idsync's picture: the mail the update did not touch stays.
    assert_eq!(alice["mail"], serde_json::json!(["alice@corp.example"]));

    // Planned, then Kanidm is force-refreshed: the plan was made against a picture that no longer
    // holds, so it is refused and nothing is written.
    edit("Alice L.");
    let (code, out) = run(&s, k, false, &["plan", "--out", "q.json"]);
    assert_eq!(code, 2, "{out}");
    k.call("POST", "/_idsync/force_refresh", "{}");
    let (code, out) = run(&s, k, false, &["apply", "q.json"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no longer where idsync left it"), "{out}");
    assert_eq!(k.entry("alice")["displayname"], "Alice Liddell");
    // A sync sends everything again, the change with it.
    let (code, out) = run(&s, k, false, &["sync"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(k.entry("alice")["displayname"], "Alice L.");
    assert_eq!(k.names(true), SYNCED);
}

#[test]
fn the_emulator_takes_saved_plans() {
    saved_plans(&emulated());
}

#[test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
fn kanidm_takes_saved_plans() {
    saved_plans(&real());
}

#[test]
fn the_emulator_is_terminated_through_the_binary() {
    terminate(&emulated());
}

#[test]
fn the_emulator_is_finalised_through_the_binary() {
    finalise(&emulated());
}

#[test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
fn kanidm_is_terminated_through_the_binary() {
    terminate(&real());
}

#[test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
fn kanidm_is_finalised_through_the_binary() {
    finalise(&real());
}
