//! The Graph emulator over real HTTP on 127.0.0.1: token endpoint, lists, members, delta, batch,
//! throttling, faults and accounting.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_emulators::Graph;
use idsync_emulators::graph::Settings;
use idsync_emulators::infra::{Faults, ThrottleConfig};
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
use idsync_model::{Directory, Group, Kind, Member, Snapshot, User};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn fixture() -> Snapshot {
    let dir: Directory = serde_json::from_value(json!({
        "users": [
            {"id": "u-alice", "userName": "alice@contoso.example", "displayName": "Alice", "emails": ["alice@contoso.example"]},
            {"id": "u-bob", "userName": "bob@contoso.example", "displayName": "Bob", "active": false},
            {"id": "u-carol", "userName": "carol@contoso.example", "displayName": "Carol"},
            {"id": "u-guest", "userName": "gus_partner#EXT#@contoso.onmicrosoft.com", "displayName": "Gus", "emails": ["gus@partner.example"], "userType": "guest"},
            {"id": "u-dave", "userName": "dave@contoso.example", "displayName": "Dave"}
        ],
        "servicePrincipals": [{"id": "s-ci", "appId": "app-ci", "displayName": "ci"}],
        "groups": [
            {"id": "g-1", "displayName": "O'Brien Équipe", "members": [
                {"type": "user", "id": "u-alice"}, {"type": "user", "id": "u-carol"}, {"type": "user", "id": "u-guest"},
                {"type": "servicePrincipal", "id": "s-ci"}, {"type": "group", "id": "g-2"}]},
            {"id": "g-2", "displayName": "Platform", "members": [{"type": "user", "id": "u-bob"}, {"type": "group", "id": "g-1"}]},
            {"id": "g-3", "displayName": "Other", "members": []}
        ]
    }))
    .unwrap();
    dir.try_into().unwrap()
}

struct T {
    g: Graph,
    http: reqwest::Client,
    token: String,
}

impl T {
    async fn new() -> T {
        let g = Graph::start(Tenant::new(fixture())).await.unwrap();
        let http = client();
        let token = token(
            &http,
            &g.token_url(),
            &[
                ("scope", "https://graph.microsoft.com/.default"),
                ("client_secret", DEFAULT_CLIENT_SECRET),
            ],
        )
        .await
        .1["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        T { g, http, token }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.get_with(path, &[]).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.g.server.base_url)
        };
        let mut r = self.http.get(url).bearer_auth(&self.token);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Follows nextLinks, returning every item and the final page.
    async fn all(&self, path: &str) -> (Vec<Value>, Value) {
        let mut items = Vec::new();
        let mut next = path.to_owned();
        loop {
            let (s, body) = self.get(&next).await;
            assert_eq!(s, StatusCode::OK, "{body}");
            items.extend(body["value"].as_array().unwrap().iter().cloned());
            match body["@odata.nextLink"].as_str() {
                Some(n) => next = n.to_owned(),
                None => return (items, body),
            }
        }
    }
}

async fn token(http: &reqwest::Client, url: &str, extra: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", DEFAULT_CLIENT_ID),
    ];
    for (k, v) in extra {
        form.retain(|(fk, _)| fk != k);
        form.push((k, v));
    }
    let r = http.post(url).form(&form).send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

fn jwt(claims: Value) -> String {
    let enc = |v: &Value| {
        let s = v.to_string();
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, c)| acc | (u32::from(*c) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    format!(
        "{}.{}.c2ln",
        enc(&json!({"alg": "RS256", "typ": "JWT"})),
        enc(&claims)
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn the_token_endpoint_grants_and_refuses_like_entra() {
    let t = T::new().await;
    let url = t.g.token_url();
    let graph = ("scope", "https://graph.microsoft.com/.default");
    let (s, b) = token(&t.http, &url, &[graph, ("client_secret", "wrong")]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["error"], "invalid_client");
    assert_eq!(b["error_codes"][0], 7000215);
    assert!(
        !b.to_string().contains("wrong"),
        "the secret is never echoed"
    );
    let bad_tenant = url.replace(&t.g.state.tenant().tenant_id, "not-my-tenant");
    assert_eq!(
        token(
            &t.http,
            &bad_tenant,
            &[graph, ("client_secret", DEFAULT_CLIENT_SECRET)]
        )
        .await
        .1["error_codes"][0],
        90002
    );
    assert_eq!(
        token(
            &t.http,
            &url,
            &[graph, ("client_id", "nobody"), ("client_secret", "x")]
        )
        .await
        .1["error_codes"][0],
        700016
    );
    let two = (
        "scope",
        "https://graph.microsoft.com/.default 2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default",
    );
    assert_eq!(
        token(
            &t.http,
            &url,
            &[two, ("client_secret", DEFAULT_CLIENT_SECRET)]
        )
        .await
        .1["error_codes"][0],
        700022
    );
    assert_eq!(
        token(&t.http, &url, &[graph]).await.1["error_codes"][0],
        7000218
    );

    // Workload identity: a federated token whose subject the app trusts.
    let assertion = |sub: &str, exp: i64| {
        jwt(
            json!({"iss": "https://kubernetes.default.svc", "sub": sub, "aud": "api://AzureADTokenExchange", "exp": exp}),
        )
    };
    let kind = (
        "client_assertion_type",
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    );
    let ok = assertion("system:serviceaccount:idsync:idsync", now() + 300);
    let (s, b) = token(&t.http, &url, &[graph, kind, ("client_assertion", &ok)]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["access_token"].as_str().is_some());
    let stranger = assertion("system:serviceaccount:other:app", now() + 300);
    assert_eq!(
        token(
            &t.http,
            &url,
            &[graph, kind, ("client_assertion", &stranger)]
        )
        .await
        .1["error_codes"][0],
        700213
    );
    let old = assertion("system:serviceaccount:idsync:idsync", now() - 10);
    assert_eq!(
        token(&t.http, &url, &[graph, kind, ("client_assertion", &old)])
            .await
            .1["error_codes"][0],
        700024
    );

    // v1, for Azure Databricks: numbers as strings, and not valid for Graph.
    let v1 = url.replace("/oauth2/v2.0/token", "/oauth2/token");
    let (s, b) = token(
        &t.http,
        &v1,
        &[
            ("resource", "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d"),
            ("client_secret", DEFAULT_CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["expires_in"].is_string());
    let dbx = b["access_token"].as_str().unwrap();
    let r = t
        .http
        .get(format!("{}/users", t.g.graph_url()))
        .bearer_auth(dbx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // An expired Graph token.
    t.g.state.set_settings(Settings {
        token_ttl_secs: 0,
        ..Settings::default()
    });
    let (_, b) = token(
        &t.http,
        &url,
        &[graph, ("client_secret", DEFAULT_CLIENT_SECRET)],
    )
    .await;
    let r = t
        .http
        .get(format!("{}/users", t.g.graph_url()))
        .bearer_auth(b["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    let r = t
        .http
        .get(format!("{}/users", t.g.graph_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no token at all");

    let (s, b) = t
        .get(&format!(
            "/{}/v2.0/.well-known/openid-configuration",
            t.g.state.tenant().tenant_id
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b["token_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/oauth2/v2.0/token")
    );
}

#[tokio::test]
async fn lists_page_select_filter_and_count() {
    let t = T::new().await;
    let (users, last) = t
        .all("/v1.0/users?$top=2&$select=id,accountEnabled,userType")
        .await;
    assert_eq!(users.len(), 5);
    assert!(last.get("@odata.nextLink").is_none());
    let bob = users.iter().find(|u| u["id"] == "u-bob").unwrap();
    assert_eq!(
        bob,
        &json!({"id": "u-bob", "accountEnabled": false, "userType": "Member"})
    );
    let (_, one) = t.get("/v1.0/users/u-guest").await;
    assert!(
        one.get("accountEnabled").is_none(),
        "not in the default property set: {one}"
    );
    assert_eq!(one["mail"], "gus@partner.example");
    let (s, b) = t.get("/v1.0/users?$top=1000").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Must be between 1 and 999")
    );
    let (s, b) = t.get("/v1.0/users?$select=id,nonsense").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    // A quote and non-ASCII, escaped as OData wants.
    let (s, b) = t
        .get("/v1.0/groups?$filter=displayName%20eq%20'O''Brien%20%C3%89quipe'")
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["value"].as_array().unwrap().len(), 1);
    assert_eq!(b["value"][0]["id"], "g-1");
    let (_, b) = t.get("/v1.0/groups?$filter=id%20in%20('g-2','g-3')").await;
    assert_eq!(b["value"].as_array().unwrap().len(), 2);
    let (_, b) = t
        .get("/v1.0/users?$filter=startswith(userPrincipalName,'ali')")
        .await;
    assert_eq!(b["value"][0]["id"], "u-alice");
    let (s, _) = t
        .get("/v1.0/groups?$filter=displayName%20eq%20'unterminated")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, b) = t.get("/v1.0/users?$count=true").await;
    assert!(
        b.get("@odata.count").is_none(),
        "ignored without ConsistencyLevel"
    );
    let (_, b) = t
        .get_with(
            "/v1.0/users?$count=true&$top=1",
            &[("ConsistencyLevel", "eventual")],
        )
        .await;
    assert_eq!(b["@odata.count"], 5);
    let (s, b) = t.get("/v1.0/users/$count").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (_, b) = t
        .get_with("/v1.0/users/$count", &[("ConsistencyLevel", "eventual")])
        .await;
    assert_eq!(b, json!(5));
    let (s, b) = t.get("/v1.0/users/nobody").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["error"]["code"], "Request_ResourceNotFound");
}

#[tokio::test]
async fn members_v1_omits_service_principals_beta_does_not() {
    let t = T::new().await;
    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (v1, _) = t.all("/v1.0/groups/g-1/members?$select=id&$top=2").await;
    assert_eq!(ids(&v1), ["u-alice", "u-carol", "u-guest", "g-2"]);
    let (beta, _) = t.all("/beta/groups/g-1/members?$select=id").await;
    assert_eq!(beta.len(), 5);
    assert!(
        beta.iter()
            .any(|m| m["@odata.type"] == "#microsoft.graph.servicePrincipal")
    );
    let (users, _) = t
        .all("/v1.0/groups/g-1/members/microsoft.graph.user?$select=id,accountEnabled")
        .await;
    assert_eq!(users.len(), 3);
    assert!(
        users
            .iter()
            .all(|m| m["@odata.type"] == "#microsoft.graph.user"
                && m.get("accountEnabled").is_some())
    );
    let (s, _) = t
        .get("/v1.0/groups/g-1/members/microsoft.graph.device")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t.get("/v1.0/groups/g-1/members/$count").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, n) = t
        .get_with(
            "/beta/groups/g-1/members/$count",
            &[("ConsistencyLevel", "eventual")],
        )
        .await;
    assert_eq!(n, json!(5));
    // Transitive, through the g-1 ∋ g-2 ∋ g-1 cycle.
    let (all, _) = t.all("/beta/groups/g-2/transitiveMembers?$select=id").await;
    let mut got = ids(&all);
    got.sort();
    assert_eq!(
        got,
        [
            "g-1", "g-2", "s-ci", "u-alice", "u-bob", "u-carol", "u-guest"
        ]
    );
    let (s, _) = t.get("/v1.0/groups/nope/members").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn group_delta_rounds_report_member_changes_and_expire() {
    let t = T::new().await;
    t.g.state.set_settings(Settings {
        delta_page_size: 2,
        member_chunk: 2,
        ..Settings::default()
    });
    // Initial round: all groups, members split across pages; merge by group id.
    let (items, last) = t
        .all("/v1.0/groups/delta?$select=displayName,members")
        .await;
    let mut members: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for it in &items {
        let e = members
            .entry(it["id"].as_str().unwrap().to_owned())
            .or_default();
        for m in it["members@delta"].as_array().unwrap() {
            e.push(m["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(members["g-1"].len(), 5, "{items:#?}");
    assert!(
        items.iter().filter(|i| i["id"] == "g-1").count() >= 3,
        "a large group spans pages"
    );
    let delta_link = last["@odata.deltaLink"].as_str().unwrap().to_owned();
    assert!(last.get("@odata.nextLink").is_none());

    // msgraph-sdk calls the function form, `delta()`: the same round.
    let (fn_items, fn_last) = t
        .all("/v1.0/groups/delta()?$select=displayName,members")
        .await;
    assert_eq!(fn_items.len(), items.len());
    assert!(
        fn_last["@odata.deltaLink"]
            .as_str()
            .unwrap()
            .contains("/groups/delta()?")
    );

    // Nothing changed: an empty round and a new deltaLink.
    let (none, last2) = t.all(&delta_link).await;
    assert!(none.is_empty());
    assert!(last2["@odata.deltaLink"].as_str().is_some());

    // Changes, as an administrator makes them.
    {
        let mut ten = t.g.state.tenant_mut();
        ten.add_member("g-3", Member::user("u-dave"));
        ten.remove_member("g-1", &Member::user("u-carol"));
        let mut g2 = ten.groups["g-2"].clone();
        g2.display_name = "Platform Team".into();
        ten.upsert_group(g2);
        ten.remove(Kind::User, "u-guest");
    }
    let (changes, _) = t.all(&delta_link).await;
    let by_id = |id: &str| {
        changes
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        by_id("g-3")["members@delta"],
        json!([{"@odata.type": "#microsoft.graph.user", "id": "u-dave"}])
    );
    let g1 = by_id("g-1")["members@delta"].as_array().unwrap().clone();
    assert!(g1.contains(&json!({"@odata.type": "#microsoft.graph.user", "id": "u-carol", "@removed": {"reason": "deleted"}})), "{g1:?}");
    assert!(
        g1.iter()
            .any(|m| m["id"] == "u-guest" && m.get("@removed").is_some()),
        "a deleted user leaves its groups"
    );
    assert_eq!(by_id("g-2")["displayName"], "Platform Team");
    assert!(by_id("g-2").get("members@delta").is_none());

    // Without members in $select, member changes do not surface.
    let (_, latest) = t
        .get("/v1.0/groups/delta?$deltatoken=latest&$select=displayName")
        .await;
    assert!(latest["value"].as_array().unwrap().is_empty());
    let names_only = latest["@odata.deltaLink"].as_str().unwrap().to_owned();
    t.g.state
        .tenant_mut()
        .add_member("g-3", Member::user("u-alice"));
    let (quiet, _) = t.all(&names_only).await;
    assert!(quiet.is_empty(), "{quiet:?}");

    // An expired token: 410 syncStateNotFound.
    t.g.state.tenant_mut().expire_delta_tokens();
    let (s, b) = t.get(&delta_link).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(b["error"]["code"], "syncStateNotFound");
}

#[tokio::test]
async fn user_and_service_principal_delta_report_disables_and_deletes() {
    let t = T::new().await;
    let (_, last) = t
        .all("/v1.0/users/delta?$select=id,accountEnabled,userPrincipalName")
        .await;
    let link = last["@odata.deltaLink"].as_str().unwrap().to_owned();
    let (_, sp_last) = t
        .all("/v1.0/servicePrincipals/delta?$select=id,appId,accountEnabled")
        .await;
    let sp_link = sp_last["@odata.deltaLink"].as_str().unwrap().to_owned();
    {
        let mut ten = t.g.state.tenant_mut();
        let mut alice: User = ten.users["u-alice"].clone();
        alice.active = false;
        ten.upsert_user(alice);
        ten.remove(Kind::User, "u-dave");
        ten.remove(Kind::ServicePrincipal, "s-ci");
        ten.upsert_group(Group {
            id: "g-9".into(),
            display_name: "New".into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: Default::default(),
        });
    }
    let (changes, _) = t.all(&link).await;
    assert_eq!(
        changes,
        vec![
            json!({"id": "u-alice", "accountEnabled": false, "userPrincipalName": "alice@contoso.example"}),
            json!({"id": "u-dave", "@removed": {"reason": "changed"}}), /* soft-deleted: restorable */
        ]
    );
    let (sp_changes, _) = t.all(&sp_link).await;
    assert_eq!(
        sp_changes,
        vec![json!({"id": "s-ci", "@removed": {"reason": "changed"}})]
    );
}

#[tokio::test]
async fn batch_runs_items_with_dependencies_and_per_item_throttling() {
    let t = T::new().await;
    let url = format!("{}/$batch", t.g.graph_url());
    let send = |body: Value| {
        let http = t.http.clone();
        let tok = t.token.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(url)
                .bearer_auth(tok)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = send(json!({"requests": [
        {"id": "1", "method": "GET", "url": "/groups/g-1/members/microsoft.graph.user?$select=id&$count=true", "headers": {"ConsistencyLevel": "eventual"}},
        {"id": "2", "method": "GET", "url": "/users/nobody"},
        {"id": "3", "dependsOn": ["2"], "method": "GET", "url": "/users/u-alice"},
        {"id": "4", "dependsOn": ["1"], "method": "GET", "url": "/users/u-alice?$select=id,accountEnabled"}
    ]}))
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let item = |id: &str| {
        b["responses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(item("1")["status"], 200);
    assert_eq!(item("1")["body"]["@odata.count"], 3);
    assert_eq!(item("2")["status"], 404);
    assert_eq!(item("3")["status"], 424);
    assert_eq!(item("4")["body"]["accountEnabled"], true);

    let many: Vec<Value> = (0..21)
        .map(|i| json!({"id": i.to_string(), "method": "GET", "url": "/users"}))
        .collect();
    assert_eq!(
        send(json!({"requests": many})).await.0,
        StatusCode::BAD_REQUEST
    );
    let dup = json!({"requests": [{"id": "a", "method": "GET", "url": "/users"}, {"id": "A", "method": "GET", "url": "/users"}]});
    assert_eq!(send(dup).await.0, StatusCode::BAD_REQUEST);

    // Throttling applies to each item: some are 429 inside a 200 envelope, with Retry-After.
    t.g.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 3.0,
        per_second: 0.01,
    }));
    let five: Vec<Value> = (0..5)
        .map(|i| json!({"id": i.to_string(), "method": "GET", "url": "/users?$select=id"}))
        .collect();
    let (s, b) = send(json!({"requests": five})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let throttled: Vec<&Value> = b["responses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 429)
        .collect();
    assert_eq!(throttled.len(), 3, "the batch itself took a token: {b}");
    assert!(throttled[0]["headers"]["retry-after"].as_str().is_some());
}

#[tokio::test]
async fn throttling_faults_and_accounting() {
    let t = T::new().await;
    t.g.state.infra.accounting.reset();
    t.g.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 2.0,
        per_second: 0.01,
    }));
    assert_eq!(t.get("/v1.0/users").await.0, StatusCode::OK);
    assert_eq!(t.get("/v1.0/groups/g-1/members").await.0, StatusCode::OK);
    let r = t
        .http
        .get(format!("{}/users", t.g.graph_url()))
        .bearer_auth(&t.token)
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
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TooManyRequests");
    t.g.state.infra.set_throttle(None);

    let counts = t.g.state.infra.accounting.snapshot();
    assert_eq!(counts["GET /v1.0/users"], 2);
    assert_eq!(counts["GET /v1.0/groups/{id}/members"], 1);

    t.g.state.infra.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (s, b) = t.get("/v1.0/users").await;
    assert!(s.is_server_error(), "{s}");
    assert!(b["error"]["code"].is_string(), "Graph's error shape: {b}");
    t.g.state.infra.set_faults(Faults {
        html_rate: 1.0,
        ..Faults::default()
    });
    let r = t
        .http
        .get(format!("{}/users", t.g.graph_url()))
        .bearer_auth(&t.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    for f in [
        Faults {
            truncate_rate: 1.0,
            ..Faults::default()
        },
        Faults {
            reset_rate: 1.0,
            ..Faults::default()
        },
    ] {
        t.g.state.infra.set_faults(f);
        // The connection drops: before the headers reach the client, or in the middle of the body.
        match t
            .http
            .get(format!("{}/users", t.g.graph_url()))
            .bearer_auth(&t.token)
            .send()
            .await
        {
            Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
            Ok(r) => assert!(r.text().await.is_err(), "the body is cut off"),
        }
    }
    // Only matching paths are affected.
    t.g.state.infra.set_faults(Faults {
        error_rate: 1.0,
        path_contains: "/groups".into(),
        ..Faults::default()
    });
    assert_eq!(t.get("/v1.0/users").await.0, StatusCode::OK);
    assert!(t.get("/v1.0/groups").await.0.is_server_error());
    t.g.state.infra.set_faults(Faults::default());
    assert_eq!(t.get("/v1.0/groups").await.0, StatusCode::OK);

    // The admin API does the same over HTTP.
    let admin = |p: &str| format!("{}/_admin/{p}", t.g.server.base_url);
    let r = t
        .http
        .put(admin("faults"))
        .json(&json!({"errorRate": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(t.get("/v1.0/users").await.0.is_server_error());
    t.http
        .put(admin("faults"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let r = t
        .http
        .post(admin("groups/g-3/members"))
        .json(&json!({"type": "user", "id": "u-bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(
        t.g.state.tenant().groups["g-3"]
            .members
            .contains(&Member::user("u-bob"))
    );
    let counts: Value = t
        .http
        .get(admin("requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(counts["GET /v1.0/users"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn delta_pages_can_be_fetched_again_and_tokens_keep_the_filter() {
    let t = T::new().await;
    t.g.state.set_settings(Settings {
        delta_page_size: 2,
        ..Settings::default()
    });
    // The last page of a round, fetched twice (its first response was lost): the same answer.
    let (_, first) = t.get("/v1.0/users/delta?$select=id").await;
    let mut next = first["@odata.nextLink"].as_str().unwrap().to_owned();
    let last = loop {
        let (s, b) = t.get(&next).await;
        assert_eq!(s, StatusCode::OK);
        match b["@odata.nextLink"].as_str() {
            Some(n) => next = n.to_owned(),
            None => break b,
        }
    };
    let (s, again) = t.get(&next).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["@odata.deltaLink"], last["@odata.deltaLink"]);

    // A round started with $filter keeps it in its deltaLink: changes to others do not show.
    let (_, r) = t
        .get("/v1.0/users/delta?$select=id,displayName&$filter=id%20eq%20'u-alice'")
        .await;
    assert_eq!(r["value"].as_array().unwrap().len(), 1);
    let link = r["@odata.deltaLink"].as_str().unwrap().to_owned();
    {
        let mut ten = t.g.state.tenant_mut();
        for id in ["u-alice", "u-carol"] {
            let mut u = ten.users[id].clone();
            u.display_name = format!("{id} renamed");
            ten.upsert_user(u);
        }
    }
    let (_, changes) = t.get(&link).await;
    let ids: Vec<&str> = changes["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u-alice"]);
    assert_eq!(
        changes["value"][0]["displayName"], "u-alice renamed",
        "the token kept the $select too"
    );
}

#[tokio::test]
async fn hostile_queries_are_rejected_not_fatal() {
    let t = T::new().await;
    let deep = format!("{}id%20eq%20'a'{}", "(".repeat(5000), ")".repeat(5000));
    let (s, _) = t.get(&format!("/v1.0/users?$filter={deep}")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t.get("/v1.0/users?$skip=10").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = t
        .get_with(
            "/v1.0/users?$filter=id%20ne%20'a'",
            &[("ConsistencyLevel", "eventual")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "ne needs $count=true as well");
    let (s, _) = t
        .get_with(
            "/v1.0/users?$filter=id%20ne%20'a'&$count=true",
            &[("ConsistencyLevel", "eventual")],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let huge = odata_skip(u64::MAX);
    let (s, _) = t.get(&format!("/v1.0/users/delta?$skiptoken={huge}")).await;
    assert!(s.is_client_error(), "{s}");
    // A client cannot claim to be a batch item to dodge faults.
    t.g.state.infra.set_faults(idsync_emulators::infra::Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let (s, _) = t
        .get_with("/v1.0/users", &[("x-emulator-batch-item", "1")])
        .await;
    assert!(s.is_server_error(), "{s}");
}

fn odata_skip(offset: u64) -> String {
    idsync_emulators::graph::odata::encode_token(&format!("r1|{offset}"))
}

/// A client for the tests. The workspace builds reqwest without a default TLS crypto provider
/// (the connectors install ring's), so install it here too, as idsync does.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A trailing slash names the same resource (the Databricks script asks for
/// `/v1.0/groups/delta/?...`); a route Graph does not have gets Graph's JSON error with a
/// request id, never an empty 404; the token is still checked on the slashed path.
#[tokio::test]
async fn a_trailing_slash_is_the_same_resource_and_unknown_routes_get_graphs_error() {
    let t = T::new().await;
    let (s, plain) = t.get("/v1.0/groups/delta?$select=id,displayName").await;
    assert_eq!(s, StatusCode::OK, "{plain}");
    let (s, slashed) = t.get("/v1.0/groups/delta/?$select=id,displayName").await;
    assert_eq!(s, StatusCode::OK, "{slashed}");
    assert_eq!(
        plain["value"].as_array().unwrap().len(),
        slashed["value"].as_array().unwrap().len()
    );
    let (s, users) = t.get("/v1.0/users/").await;
    assert_eq!(s, StatusCode::OK, "{users}");
    assert!(!users["value"].as_array().unwrap().is_empty());

    let (s, e) = t.get("/v1.0/gropus").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "BadRequest");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("'gropus'"),
        "{e}"
    );
    assert!(e["error"]["innerError"]["request-id"].is_string(), "{e}");

    let r = t
        .http
        .get(format!("{}/v1.0/users/", t.g.server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no token, no answer");
}
