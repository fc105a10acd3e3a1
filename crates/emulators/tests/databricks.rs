//! The Databricks account SCIM emulator over real HTTP on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_emulators::databricks::{ACCOUNT_ID, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, TOKEN, Type};
use idsync_emulators::infra::ThrottleConfig;
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
use idsync_emulators::{Databricks, Graph};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct T {
    d: Databricks,
    http: reqwest::Client,
    token: String,
}

impl T {
    async fn call(&self, m: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(m, format!("{}{path}", self.d.scim_url()))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let s = resp.status();
        let text = resp.text().await.unwrap();
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

async fn t() -> T {
    T {
        d: Databricks::start_on(0, None).await.unwrap(),
        http: client(),
        token: TOKEN.into(),
    }
}

#[tokio::test]
async fn create_list_filter_and_conflicts() {
    let t = t().await;
    let (s, u) = t.call(Method::POST, "/Users", Some(json!({"userName": "Jane.Doe@corp.example", "displayName": "Jane", "emails": [{"value": "jane@corp.example", "primary": true}]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    assert_eq!(u["active"], true);
    let (s, e) = t
        .call(
            Method::POST,
            "/Users",
            Some(json!({"userName": "jane.doe@corp.example"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        e["detail"],
        "User with email jane.doe@corp.example already exists in this account"
    );
    assert_eq!(e["status"], "409");
    let (_, sp) = t
        .call(
            Method::POST,
            "/ServicePrincipals",
            Some(json!({"applicationId": "app-1", "displayName": "ci"})),
        )
        .await;
    for i in 0..5 {
        t.call(
            Method::POST,
            "/Users",
            Some(json!({"userName": format!("user{i}@corp.example")})),
        )
        .await;
    }
    let (_, l) = t
        .call(
            Method::GET,
            "/Users?filter=userName%20eq%20%22jane.doe%40corp.example%22",
            None,
        )
        .await;
    assert_eq!(l["totalResults"], 1);
    assert_eq!(l["Resources"][0]["id"], u["id"]);
    let (_, l) = t
        .call(
            Method::GET,
            "/Users?filter=userName%20sw%20'user'&startIndex=3&count=2",
            None,
        )
        .await;
    assert_eq!(l["totalResults"], 5);
    assert_eq!(l["Resources"].as_array().unwrap().len(), 2);
    let (_, end) = t
        .call(Method::GET, "/Users?startIndex=100&count=10", None)
        .await;
    assert_eq!(
        end["Resources"],
        json!([]),
        "past the end: an empty page, where the SDK stops"
    );
    let (s, e) = t
        .call(Method::GET, "/Users?filter=userName%20gt%20%22a%22", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("Given filter operator is not supported")
    );

    // Groups with users, service principals and groups as members; listed without members.
    let (_, inner) = t
        .call(
            Method::POST,
            "/Groups",
            Some(json!({"displayName": "inner"})),
        )
        .await;
    let members = json!([{"value": u["id"]}, {"value": sp["id"]}, {"value": inner["id"]}]);
    let (s, g) = t
        .call(
            Method::POST,
            "/Groups",
            Some(json!({"displayName": "O'Brien \"Équipe\"", "members": members})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    let (_, l) = t
        .call(
            Method::GET,
            "/Groups?filter=displayName%20eq%20%22O'Brien%20%5C%22%C3%89quipe%5C%22%22",
            None,
        )
        .await;
    assert_eq!(l["totalResults"], 1, "{l}");
    assert!(
        l["Resources"][0].get("members").is_none(),
        "listed without members"
    );
    let (_, one) = t
        .call(
            Method::GET,
            &format!("/Groups/{}", g["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(one["members"].as_array().unwrap().len(), 3);
    let (s, _) = t
        .call(
            Method::POST,
            "/Groups",
            Some(json!({"displayName": "x", "members": [{"value": "999999"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn patch_members_deactivation_and_the_username_rule() {
    let t = t().await;
    let (_, a) = t
        .call(Method::POST, "/Users", Some(json!({"userName": "a@x"})))
        .await;
    let (_, b) = t
        .call(Method::POST, "/Users", Some(json!({"userName": "b@x"})))
        .await;
    let (_, g) = t
        .call(Method::POST, "/Groups", Some(json!({"displayName": "g"})))
        .await;
    let gp = format!("/Groups/{}", g["id"].as_str().unwrap());
    let op = |ops: Value| json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops});
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "add", "value": {"members": [{"value": a["id"]}, {"value": b["id"]}]}}])))).await;
    // The API reference shows an empty answer to PATCH.
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "remove", "path": format!("members[value eq \"{}\"]", a["id"].as_str().unwrap())}])))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &gp, None).await.1;
    assert_eq!(r["members"], json!([{"value": b["id"]}]));
    // Adding a member the group holds, or the same member twice, adds it once.
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "add", "path": "members", "value": [{"value": b["id"]}, {"value": a["id"]}, {"value": a["id"]}]}])))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &gp, None).await.1;
    assert_eq!(
        r["members"],
        json!([{"value": b["id"]}, {"value": a["id"]}])
    );
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "remove", "path": format!("members[value eq \"{}\"]", a["id"].as_str().unwrap())}])))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // A group's removals and additions in one PATCH, removals first.
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "remove", "path": format!("members[value eq \"{}\"]", b["id"].as_str().unwrap())}, {"op": "add", "path": "members", "value": [{"value": a["id"]}, {"value": b["id"]}]}, {"op": "remove", "path": format!("members[value eq \"{}\"]", a["id"].as_str().unwrap())}])))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &gp, None).await.1;
    assert_eq!(r["members"], json!([{"value": b["id"]}]));
    // Removing an absent member is a no-op.
    let (s, _) = t
        .call(
            Method::PATCH,
            &gp,
            Some(op(
                json!([{"op": "remove", "path": "members[value eq \"424242\"]"}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // A failing operation leaves the resource as it was.
    let (s, _) = t.call(Method::PATCH, &gp, Some(op(json!([{"op": "add", "path": "members", "value": [{"value": a["id"]}]}, {"op": "add", "path": "members", "value": [{"value": "999"}]}])))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        t.call(Method::GET, &gp, None).await.1["members"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (s, _) = t
        .call(
            Method::PATCH,
            &gp,
            Some(op(
                json!([{"op": "Replace", "path": "displayName", "value": "renamed"}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &gp, None).await.1;
    assert_eq!(r["displayName"], "renamed");

    let ap = format!("/Users/{}", a["id"].as_str().unwrap());
    let (s, _) = t
        .call(
            Method::PATCH,
            &ap,
            Some(op(
                json!([{"op": "replace", "path": "active", "value": false}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &ap, None).await.1;
    assert_eq!(r["active"], false);
    let (s, _) = t
        .call(
            Method::PATCH,
            &ap,
            Some(op(
                json!([{"op": "replace", "path": "active", "value": "true"}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &ap, None).await.1;
    assert_eq!(r["active"], true);
    // The SDK bug that drops `value: false`: refused, not silently applied.
    let (s, _) = t
        .call(
            Method::PATCH,
            &ap,
            Some(op(json!([{"op": "replace", "path": "active"}]))),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t
        .call(
            Method::PATCH,
            &ap,
            Some(op(
                json!([{"op": "replace", "path": "userName", "value": "new@x"}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t.call(Method::GET, &ap, None).await.1;
    assert_eq!(r["userName"], "a@x", "userName cannot change");
    assert_eq!(
        t.call(Method::DELETE, &ap, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        t.call(Method::DELETE, &ap, None).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn auth_pat_oauth_m2m_entra_and_throttling() {
    let t = t().await;
    let r = t
        .http
        .get(format!("{}/Users", t.d.scim_url()))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // OAuth M2M: discovery, then the token endpoint with HTTP Basic.
    let disc: Value = t
        .http
        .get(format!(
            "{}/oidc/accounts/{ACCOUNT_ID}/.well-known/oauth-authorization-server",
            t.d.server.base_url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tok_url = disc["token_endpoint"].as_str().unwrap();
    let r = t
        .http
        .post(tok_url)
        .basic_auth(OAUTH_CLIENT_ID, Some("wrong"))
        .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let tok: Value = t
        .http
        .post(tok_url)
        .basic_auth(OAUTH_CLIENT_ID, Some(OAUTH_CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = t
        .http
        .get(format!("{}/Users", t.d.scim_url()))
        .bearer_auth(tok["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // An Entra token for the Azure Databricks resource, from the Graph emulator's v1 endpoint.
    let g = Graph::start(Tenant::new(Default::default())).await.unwrap();
    let d = Databricks::start_on(0, Some(g.state.clone()))
        .await
        .unwrap();
    let v1 = g.token_url().replace("/oauth2/v2.0/token", "/oauth2/token");
    let e: Value = t
        .http
        .post(v1)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("resource", "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = t
        .http
        .get(format!("{}/Users", d.scim_url()))
        .bearer_auth(e["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // 429 with Retry-After in integer seconds and a SCIM error body.
    t.d.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 1.0,
        per_second: 0.01,
    }));
    assert_eq!(t.call(Method::GET, "/Groups", None).await.0, StatusCode::OK);
    let r = t
        .http
        .get(format!("{}/Groups", t.d.scim_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "429");
}

#[tokio::test]
async fn bad_bodies_filters_and_put_are_scim_errors() {
    let t = t().await;
    let raw = |m: Method, path: &str, body: &'static str| {
        let req = t
            .http
            .request(m, format!("{}{path}", t.d.scim_url()))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, b) = raw(Method::POST, "/Users", "{").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["status"], "400");
    let (_, u) = t
        .call(Method::POST, "/Users", Some(json!({"userName": "a@x"})))
        .await;
    let (s, _) = raw(
        Method::PUT,
        &format!("/Users/{}", u["id"].as_str().unwrap()),
        "[]",
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a non-object body is refused, not a crash"
    );
    let (_, g1) = t
        .call(Method::POST, "/Groups", Some(json!({"displayName": "one"})))
        .await;
    t.call(Method::POST, "/Groups", Some(json!({"displayName": "two"})))
        .await;
    let (s, _) = t
        .call(
            Method::PUT,
            &format!("/Groups/{}", g1["id"].as_str().unwrap()),
            Some(json!({"displayName": "TWO"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "PUT keeps names unique");
    let many = vec!["userName eq \"x\""; 120].join(" or ");
    let (s, b) = t
        .call(
            Method::GET,
            &format!(
                "/Users?filter={}",
                many.replace(' ', "%20").replace('"', "%22")
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("INVALID_FILTER"));
    // terraform's form of a deactivation.
    let op = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "path": "active", "value": [{"value": "false"}]}]});
    let (s, _) = t
        .call(
            Method::PATCH,
            &format!("/Users/{}", u["id"].as_str().unwrap()),
            Some(op),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let r = t
        .call(
            Method::GET,
            &format!("/Users/{}", u["id"].as_str().unwrap()),
            None,
        )
        .await
        .1;
    assert_eq!(r["active"], false);
}

/// A client for the tests. The workspace builds reqwest without a default TLS crypto provider
/// (the connectors install ring's), so install it here too, as idsync does.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Uniqueness holds through the key index whatever changed a key: a PATCH of a service
/// principal's applicationId, a deletion that frees a name, an edit from outside the API.
#[tokio::test]
async fn unique_keys_follow_patches_deletions_and_outside_edits() {
    let t = t().await;
    let op = |ops: Value| json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops});
    let (_, sp) = t
        .call(
            Method::POST,
            "/ServicePrincipals",
            Some(json!({"applicationId": "app-1"})),
        )
        .await;
    let sp_path = format!("/ServicePrincipals/{}", sp["id"].as_str().unwrap());
    let (s, _) = t
        .call(
            Method::PATCH,
            &sp_path,
            Some(op(
                json!([{"op": "replace", "path": "applicationId", "value": "app-2"}]),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let body = Some(json!({"applicationId": "APP-2"}));
    let (s, _) = t.call(Method::POST, "/ServicePrincipals", body).await;
    assert_eq!(s, StatusCode::CONFLICT, "app-2 was taken by a PATCH");
    let body = Some(json!({"applicationId": "app-1"}));
    let (s, _) = t.call(Method::POST, "/ServicePrincipals", body).await;
    assert_eq!(s, StatusCode::CREATED, "app-1 was freed by the PATCH");

    let (_, u) = t
        .call(Method::POST, "/Users", Some(json!({"userName": "a@x"})))
        .await;
    let up = format!("/Users/{}", u["id"].as_str().unwrap());
    assert_eq!(
        t.call(Method::DELETE, &up, None).await.0,
        StatusCode::NO_CONTENT
    );
    let (s, _) = t
        .call(Method::POST, "/Users", Some(json!({"userName": "A@x"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "a deleted user frees its name");

    // An edit from outside the API (as in the console) is seen too.
    let id =
        t.d.state
            .insert(Type::Users, json!({"userName": "outside@x"}));
    let (s, _) = t
        .call(
            Method::POST,
            "/Users",
            Some(json!({"userName": "Outside@X"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    t.d.state
        .data_mut()
        .get_mut(&Type::Users)
        .unwrap()
        .get_mut(&id)
        .unwrap()["userName"] = json!("renamed@x");
    let (s, _) = t
        .call(
            Method::POST,
            "/Users",
            Some(json!({"userName": "outside@x"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "the outside rename freed the name");
    let (s, _) = t
        .call(
            Method::POST,
            "/Users",
            Some(json!({"userName": "renamed@x"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "and took the new one");
}
