//! The Kanidm sync-account conformance suite: one sequence of requests, and what each must answer,
//! run against idsync's Kanidm emulator (always) and against Kanidm's own server library behind
//! the same routes (`tests/kanidm`, run by `scripts/kanidm.sh` with `IDSYNC_TEST_KANIDM`). Where
//! the emulator and the real thing differ, this suite fails on one of them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use reqwest::StatusCode;
use serde_json::{Value, json};

const PREFIX: &str = "urn:ietf:params:scim:schemas:kanidm:sync:1:";
const ALICE: &str = "5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a001";
const BOB: &str = "5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a002";
const DEVS: &str = "5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a003";
const CAROL: &str = "5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a004";
const DAVE: &str = "5f1c3a1e-0b7d-4e55-9b41-2f7f64f4a005";

/// A server under test.
struct Server {
    url: String,
    sync_token: String,
    admin_token: String,
    sync_account: String,
    http: reqwest::Client,
}

impl Server {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    async fn state(&self) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::GET,
            "/scim/v1/Sync",
            Some(&self.sync_token),
            None,
        )
        .await
    }

    async fn sync(&self, req: &Value) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::POST,
            "/scim/v1/Sync",
            Some(&self.sync_token),
            Some(req),
        )
        .await
    }

    /// The person and group entries, by UUID.
    async fn entries(&self) -> std::collections::BTreeMap<String, Value> {
        let (s, v) = self
            .call(reqwest::Method::GET, "/_idsync/entries", None, None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["uuid"].as_str().unwrap().to_owned(), e.clone()))
            .collect()
    }

    async fn test_only(&self, path: &str, body: &Value) {
        let (s, v) = self
            .call(reqwest::Method::POST, path, None, Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
}

fn active(cookie: &str) -> Value {
    json!({ "Active": { "cookie": cookie } })
}

fn person(id: &str, name: &str, display: &str, mail: Option<&str>) -> Value {
    let mut p = json!({
        "schemas": [format!("{PREFIX}account"), format!("{PREFIX}person")],
        "id": id,
        "externalId": format!("uid={name},ou=people,dc=example,dc=com"),
        "name": name,
        "displayname": display,
    });
    if let Some(m) = mail {
        p["mail"] = json!([{ "value": m, "primary": true }]);
    }
    p
}

fn group(id: &str, name: &str, members: &[&str]) -> Value {
    json!({
        "schemas": [format!("{PREFIX}group")],
        "id": id,
        "externalId": format!("cn={name},ou=groups,dc=example,dc=com"),
        "name": name,
        "member": members.iter().map(|m| json!({ "external_id": m })).collect::<Vec<_>>(),
    })
}

fn ext(name: &str) -> String {
    format!("uid={name},ou=people,dc=example,dc=com")
}

fn request(from: Value, to: Value, entries: Vec<Value>, retain: Value) -> Value {
    json!({ "from_state": from, "to_state": to, "entries": entries, "retain": retain })
}

/// The whole sequence; `terminate` picks how the agreement ends.
async fn suite(s: &Server, terminate: bool) {
    // A new agreement starts with a Refresh.
    let (st, v) = s.state().await;
    assert_eq!((st, &v), (StatusCode::OK, &json!("Refresh")));

    // No token, and a token that is not a sync account's.
    let (st, _) = s
        .call(reqwest::Method::GET, "/scim/v1/Sync", None, None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = s
        .call(
            reqwest::Method::GET,
            "/scim/v1/Sync",
            Some(&s.admin_token),
            None,
        )
        .await;
    // Kanidm 1.7 fails to read an admin session as a sync token.
    assert_eq!(
        (st, &v),
        (StatusCode::INTERNAL_SERVER_ERROR, &json!("serdejsonerror")),
        "an admin token on the sync API: {v}"
    );

    // The first sync: two people and a group, its member by external id.
    let first = request(
        json!("Refresh"),
        active("Y29va2llLTE"),
        vec![
            person(ALICE, "alice", "Alice A", Some("alice@example.com")),
            person(BOB, "bob", "Bob", None),
            group(DEVS, "devs", &[&ext("alice")]),
        ],
        json!("Ignore"),
    );
    let (st, v) = s.sync(&first).await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    let e = s.entries().await;
    assert_eq!(e.len(), 3, "{e:?}");
    let alice = &e[ALICE];
    assert_eq!(alice["name"], "alice");
    assert_eq!(alice["displayname"], "Alice A");
    assert_eq!(alice["mail"], json!(["alice@example.com"]));
    assert_eq!(alice["external_id"], ext("alice"));
    assert_eq!(alice["synced"], true);
    assert_eq!(
        alice["classes"],
        json!(["account", "person", "sync_object"])
    );
    assert_eq!(e[DEVS]["members"], json!([ALICE]));
    assert_eq!(e[DEVS]["classes"], json!(["group", "sync_object"]));
    let (st, v) = s.state().await;
    assert_eq!((st, v), (StatusCode::OK, active("Y29va2llLTE")));

    // A stale cookie: refused, nothing changes.
    let stale = request(
        active("b3RoZXI"),
        active("Y29va2llLTI"),
        vec![person(BOB, "bob", "Changed", None)],
        json!("Ignore"),
    );
    let (st, v) = s.sync(&stale).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v, json!("invalidsyncstate"));
    assert_eq!(s.entries().await[BOB]["displayname"], "Bob");

    // An increment: bob renamed, devs now holds bob (by UUID), alice deleted.
    let second = request(
        active("Y29va2llLTE"),
        active("Y29va2llLTI"),
        vec![
            person(BOB, "bob", "Bob B", None),
            group(DEVS, "devs", &[BOB]),
        ],
        json!({ "Delete": [ALICE] }),
    );
    let (st, v) = s.sync(&second).await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    let e = s.entries().await;
    assert!(!e.contains_key(ALICE), "{e:?}");
    assert_eq!(e[BOB]["displayname"], "Bob B");
    assert_eq!(e[DEVS]["members"], json!([BOB]));

    // A conflict: carol takes bob's name. The whole request is refused, the cookie stays.
    let mut carol = person(CAROL, "bob", "Carol", None);
    carol["externalId"] = json!(ext("carol"));
    let clash = request(
        active("Y29va2llLTI"),
        active("Y29va2llLTM"),
        vec![person(DAVE, "dave", "Dave", None), carol],
        json!("Ignore"),
    );
    let (st, v) = s.sync(&clash).await;
    // Kanidm 1.7: the attribute uniqueness plugin's error, 500 (409 came in 1.9).
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(
        v,
        json!({ "plugin": { "attrunique": "duplicate value detected" } })
    );
    let e = s.entries().await;
    assert!(!e.contains_key(CAROL) && !e.contains_key(DAVE), "{e:?}");
    assert_eq!(s.state().await.1, active("Y29va2llLTI"));
    // Another entry with bob's external id (in another case): the same refusal.
    let mut twin = person(CAROL, "carol", "Carol", None);
    twin["externalId"] = json!(ext("BOB"));
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTI"),
            active("Y29va2llLTM"),
            vec![twin],
            json!("Ignore"),
        ))
        .await;
    assert_eq!(
        (st, v),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "plugin": { "attrunique": "duplicate value detected" } })
        )
    );
    assert!(!s.entries().await.contains_key(CAROL));

    // Names Kanidm does not take (an `@`, a space, a leading digit, over 64 characters, `root`):
    // refused, nothing changes; upper case is lowered.
    for bad in [
        "bob@example.com",
        "data (eng)",
        "1bob",
        &"b".repeat(65),
        "root",
        "chloé",
    ] {
        let (st, v) = s
            .sync(&request(
                active("Y29va2llLTI"),
                active("Y29va2llLTM"),
                vec![person(BOB, bad, "Bob B", None)],
                json!("Ignore"),
            ))
            .await;
        assert_eq!(
            (st, &v),
            (
                StatusCode::BAD_REQUEST,
                &json!({ "schemaviolation": { "invalidattributesyntax": "name" } })
            ),
            "{bad:?}: {v}"
        );
    }
    assert_eq!(s.entries().await[BOB]["name"], "bob");

    // An entry without an external id: refused, nothing changes.
    let mut anonymous = person(BOB, "bob", "Bob Nobody", None);
    anonymous.as_object_mut().unwrap().remove("externalId");
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTI"),
            active("Y29va2llLTM"),
            vec![anonymous],
            json!("Ignore"),
        ))
        .await;
    assert_eq!(
        (st, &v),
        (StatusCode::BAD_REQUEST, &json!("emptyrequest")),
        "{v}"
    );
    assert_eq!(s.entries().await[BOB]["displayname"], "Bob B");

    // An attribute the entry's classes do not have: refused.
    let mut odd = person(BOB, "bob", "Bob B", None);
    odd["description"] = json!("a person has no description here");
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTI"),
            active("Y29va2llLTM"),
            vec![odd],
            json!("Ignore"),
        ))
        .await;
    // Kanidm 1.7.4 answers an attribute it will not take from this sync account as an entry
    // in an invalid state (500), whatever the release's error mapping for other errors.
    assert_eq!(
        (st, &v),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!("invalidentrystate")
        ),
        "{v}"
    );
    let unowned = (st, v);

    // A yielded attribute may no longer be sent; the rest may.
    s.test_only("/_idsync/yield", &json!(["mail"])).await;
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTI"),
            active("Y29va2llLTM"),
            vec![person(BOB, "bob", "Bob B", Some("bob@example.com"))],
            json!("Ignore"),
        ))
        .await;
    assert_eq!(
        (st, v),
        unowned,
        "a yielded attribute is refused as an unowned one"
    );
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTI"),
            active("Y29va2llLTM"),
            vec![person(BOB, "bob", "Bob C", None)],
            json!("Ignore"),
        ))
        .await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    s.test_only("/_idsync/yield", &json!([])).await;

    // A forced refresh: an Active from_state is refused until a Refresh comes; the Refresh
    // removes what it does not list.
    s.test_only("/_idsync/force_refresh", &Value::Null).await;
    assert_eq!(s.state().await.1, json!("Refresh"));
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTM"),
            active("Y29va2llLTQ"),
            vec![],
            json!("Ignore"),
        ))
        .await;
    assert_eq!(
        (st, v),
        (StatusCode::INTERNAL_SERVER_ERROR, json!("invalidsyncstate"))
    );
    let (st, v) = s
        .sync(&request(
            json!("Refresh"),
            active("Y29va2llLTQ"),
            vec![person(BOB, "bob", "Bob C", None)],
            json!("Ignore"),
        ))
        .await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    let e = s.entries().await;
    assert_eq!(e.keys().collect::<Vec<_>>(), [BOB], "{e:?}");

    // Retain: what is not listed goes.
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTQ"),
            active("Y29va2llLTU"),
            vec![person(DAVE, "dave", "Dave", None)],
            json!({ "Retain": [BOB, DAVE] }),
        ))
        .await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    assert_eq!(s.entries().await.len(), 2);
    let (st, v) = s
        .sync(&request(
            active("Y29va2llLTU"),
            active("Y29va2llLTY"),
            vec![],
            json!({ "Retain": [BOB] }),
        ))
        .await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    assert_eq!(s.entries().await.keys().collect::<Vec<_>>(), [BOB]);

    // The end of the agreement.
    let what = if terminate { "_terminate" } else { "_finalise" };
    let path = format!("/v1/sync_account/{}/{what}", s.sync_account);
    let (st, v) = s
        .call(reqwest::Method::GET, &path, Some(&s.sync_token), None)
        .await;
    assert!(
        !st.is_success(),
        "the sync token cannot end its own agreement: {v}"
    );
    let (st, v) = s
        .call(reqwest::Method::GET, &path, Some(&s.admin_token), None)
        .await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    let e = s.entries().await;
    if terminate {
        assert!(e.is_empty(), "terminate removes what was synced: {e:?}");
    } else {
        let bob = &e[BOB];
        assert_eq!(bob["synced"], false, "{bob}");
        assert_eq!(bob["classes"], json!(["account", "person"]), "{bob}");
        assert_eq!(bob["external_id"], Value::Null, "{bob}");
        assert_eq!(bob["displayname"], "Bob C");
    }
    let (st, v) = s.state().await;
    assert!(!st.is_success(), "the agreement is over: {st} {v}");
}

/// Later releases answer a duplicate value with 409 and the attributes in conflict.
#[tokio::test]
async fn the_emulator_answers_a_conflict_as_later_releases_do() {
    let (k, s) = emulated().await;
    k.state
        .set_release(idsync_emulators::kanidm::Release::Current);
    let mut carol = person(CAROL, "bob", "Carol", None);
    carol["externalId"] = json!(ext("carol"));
    let clash = request(
        json!("Refresh"),
        active("Y29va2llLTE"),
        vec![person(BOB, "bob", "Bob", None), carol],
        json!("Ignore"),
    );
    let (st, v) = s.sync(&clash).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        v,
        json!({ "error": "Attribute uniqueness error", "conflicting_attributes": ["name"] })
    );
    assert!(s.entries().await.is_empty());
}

/// Kanidm takes a sync request of up to 32 MiB (axum's own default would stop at 2 MB).
#[tokio::test]
async fn the_emulator_takes_sync_bodies_up_to_kanidms_limit() {
    let (_k, s) = emulated().await;
    let many = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| {
                let id = format!("5f1c3a1e-0b7d-4e55-9b41-{i:012x}");
                person(&id, &format!("user{i}"), &"x".repeat(200), None)
            })
            .collect()
    };
    let body = request(json!("Refresh"), active("Yg"), many(8_000), json!("Ignore"));
    assert!(body.to_string().len() > 3_000_000);
    let (st, v) = s.sync(&body).await;
    assert_eq!((st, &v), (StatusCode::OK, &Value::Null), "{v}");
    assert_eq!(s.entries().await.len(), 8_000);
    let big = request(active("Yg"), active("Yw"), many(90_000), json!("Ignore"));
    let text = big.to_string();
    assert!(text.len() > idsync_emulators::kanidm::MAX_SYNC_BYTES);
    let r = s
        .http
        .post(format!("{}/scim/v1/Sync", s.url))
        .bearer_auth(&s.sync_token)
        .header("content-type", "application/json")
        .body(text)
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE),
        // Refused before it was all sent.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    assert_eq!(s.state().await.1, active("Yg"));
}

async fn emulated() -> (idsync_emulators::Kanidm, Server) {
    let k = idsync_emulators::Kanidm::start_on(0).await.unwrap();
    let s = Server {
        url: k.server.base_url.clone(),
        sync_token: idsync_emulators::kanidm::SYNC_TOKEN.into(),
        admin_token: idsync_emulators::kanidm::ADMIN_TOKEN.into(),
        sync_account: idsync_emulators::kanidm::SYNC_ACCOUNT.into(),
        http: client(),
    };
    (k, s)
}

#[tokio::test]
async fn the_emulator_follows_the_suite_to_finalise() {
    let (_k, s) = emulated().await;
    suite(&s, false).await;
}

#[tokio::test]
async fn the_emulator_follows_the_suite_to_terminate() {
    let (_k, s) = emulated().await;
    suite(&s, true).await;
}

/// Kanidm's own server library behind the same routes (`tests/kanidm`): the binary named by
/// `IDSYNC_TEST_KANIDM` prints its address and tokens as one JSON line.
struct Real {
    child: std::process::Child,
    server: Server,
}

impl Drop for Real {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn real() -> Real {
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
    Real {
        server: Server {
            url: text("url"),
            sync_token: text("sync_token"),
            admin_token: text("admin_token"),
            sync_account: text("sync_account"),
            http: client(),
        },
        child,
    }
}

#[tokio::test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
async fn kanidm_follows_the_suite_to_finalise() {
    let r = real();
    suite(&r.server, false).await;
}

#[tokio::test]
#[ignore = "needs Kanidm's server library: run scripts/kanidm.sh"]
async fn kanidm_follows_the_suite_to_terminate() {
    let r = real();
    suite(&r.server, true).await;
}

/// An HTTP client (reqwest without a default crypto provider: ring, as idsync uses).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
