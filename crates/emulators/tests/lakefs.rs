//! The lakeFS auth API emulator over real HTTP on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_emulators::Lakefs;
use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct T {
    l: Lakefs,
    http: reqwest::Client,
}

impl T {
    async fn new() -> T {
        T {
            l: Lakefs::start_on(0).await.unwrap(),
            http: client(),
        }
    }

    async fn call(&self, m: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.l.api_url()))
            .basic_auth(ACCESS_KEY_ID, Some(SECRET_ACCESS_KEY));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let s = resp.status();
        let text = resp.text().await.unwrap();
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn users_groups_members_policies_and_the_id_name_quirk() {
    let t = T::new().await;
    let (s, _) = t
        .call(
            Method::POST,
            "/auth/users",
            Some(json!({"id": "waad|0b6f"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, b) = t
        .call(
            Method::POST,
            "/auth/users",
            Some(json!({"id": "waad|0b6f"})),
        )
        .await;
    assert_eq!(
        (s, b),
        (StatusCode::CONFLICT, json!({"message": "Already exists"}))
    );
    let (s, b) = t
        .call(Method::POST, "/auth/users", Some(json!({"id": "50%off"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    let (s, g) = t
        .call(
            Method::POST,
            "/auth/groups",
            Some(json!({"id": "Data \"Eng\" Équipe", "description": "d"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let gid = g["id"].as_str().unwrap().to_owned();
    assert_ne!(
        gid, "Data \"Eng\" Équipe",
        "the id is assigned; the name is what was sent"
    );
    assert_eq!(g["name"], "Data \"Eng\" Équipe");
    let (_, one) = t
        .call(Method::GET, &format!("/auth/groups/{gid}"), None)
        .await;
    assert_eq!(
        one["id"], "Data \"Eng\" Équipe",
        "GET one answers the name as id"
    );
    assert!(one.get("name").is_none());
    let (s, _) = t
        .call(
            Method::POST,
            "/auth/groups",
            Some(json!({"id": "Data \"Eng\" Équipe"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    assert_eq!(
        t.call(
            Method::PUT,
            &format!("/auth/groups/{gid}/members/waad%7C0b6f"),
            None
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(
        t.call(
            Method::PUT,
            &format!("/auth/groups/{gid}/members/nobody"),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (_, members) = t
        .call(Method::GET, &format!("/auth/groups/{gid}/members"), None)
        .await;
    assert_eq!(members["results"][0]["id"], "waad|0b6f");
    let (_, groups) = t
        .call(Method::GET, "/auth/users/waad%7C0b6f/groups", None)
        .await;
    assert_eq!(groups["results"][0]["id"], gid);

    for p in ["AuthManageOwnCredentials", "FSReadAll"] {
        assert_eq!(
            t.call(
                Method::PUT,
                &format!("/auth/groups/{gid}/policies/{p}"),
                None
            )
            .await
            .0,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        t.call(
            Method::PUT,
            &format!("/auth/groups/{gid}/policies/NoSuch"),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (_, pols) = t
        .call(Method::GET, &format!("/auth/groups/{gid}/policies"), None)
        .await;
    assert_eq!(pols["results"].as_array().unwrap().len(), 2);

    assert_eq!(
        t.call(
            Method::DELETE,
            &format!("/auth/groups/{gid}/members/waad%7C0b6f"),
            None
        )
        .await
        .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.call(
            Method::DELETE,
            &format!("/auth/groups/{gid}/members/waad%7C0b6f"),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.call(Method::DELETE, "/auth/users/waad%7C0b6f", None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (s, b) = t.call(Method::GET, "/auth/users/waad%7C0b6f", None).await;
    assert_eq!(
        (s, b),
        (StatusCode::NOT_FOUND, json!({"message": "user not found"}))
    );
}

#[tokio::test]
async fn pagination_follows_next_offset() {
    let t = T::new().await;
    for i in 0..25 {
        t.call(
            Method::POST,
            "/auth/users",
            Some(json!({"id": format!("user{i:02}")})),
        )
        .await;
    }
    let mut after = String::new();
    let mut seen = Vec::new();
    loop {
        let (_, b) = t
            .call(
                Method::GET,
                &format!("/auth/users?prefix=user&amount=10&after={after}"),
                None,
            )
            .await;
        for u in b["results"].as_array().unwrap() {
            seen.push(u["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(b["pagination"]["max_per_page"], 0);
        if !b["pagination"]["has_more"].as_bool().unwrap() {
            assert_eq!(b["pagination"]["next_offset"], "");
            break;
        }
        after = b["pagination"]["next_offset"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen.len(), 25);
    let (_, b) = t.call(Method::GET, "/auth/users?amount=5000", None).await;
    assert_eq!(
        b["results"].as_array().unwrap().len(),
        26,
        "amount is clamped to 1000; admin is there too"
    );
}

#[tokio::test]
async fn wrong_keys_are_401_and_open_source_lakefs_is_501() {
    let t = T::new().await;
    let r = t
        .http
        .get(format!("{}/auth/users", t.l.api_url()))
        .basic_auth(ACCESS_KEY_ID, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"message": "error authenticating request"})
    );
    t.l.state.set_rbac(false);
    let (s, b) = t
        .call(Method::POST, "/auth/groups", Some(json!({"id": "x"})))
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_IMPLEMENTED,
            json!({"message": "Not Implemented"})
        )
    );
    assert_eq!(
        t.call(Method::GET, "/auth/users", None).await.0,
        StatusCode::OK
    );
    let counts = t.l.state.infra.accounting.snapshot();
    assert_eq!(counts["GET /api/v1/auth/users"], 2);
}

/// A client for the tests. The workspace builds reqwest without a default TLS crypto provider
/// (the connectors install ring's), so install it here too, as idsync does.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
