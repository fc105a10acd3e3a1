//! Hostile answers from the services idsync reads: a canned HTTP server on 127.0.0.1 answers
//! Microsoft Graph, a SCIM provider and lakeFS with HTML for JSON, truncated JSON, values of the
//! wrong type, an error inside a 200, pages that link to themselves, a nextLink to another host and
//! a huge page. Each read either succeeds with exactly what was sent or fails with an error that
//! says what happened; none is read as an empty (or shorter) list, which would take every member
//! for gone; none loops forever; the token never leaves for another host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use idsync_connectors::entra_auth::EntraCredential;
use idsync_connectors::http::HttpConfig;
use idsync_connectors::sources::entra::{EntraSource, EntraSourceConfig};
use idsync_connectors::targets::lakefs::{LakefsConfig, LakefsTarget};
use idsync_connectors::targets::scim::{ScimConfig, ScimTarget};
use idsync_engine::{Scope, Source, Target};
use idsync_model::{Kind, Secret};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What the canned server answers a request (method, path with query, its own base URL):
/// status, content type, body.
type Answer = dyn Fn(&str, &str, &str) -> (u16, &'static str, String) + Send + Sync;

/// A server on 127.0.0.1 that answers every request with `answer`, and counts requests.
struct Canned {
    base: String,
    requests: Arc<AtomicUsize>,
}

fn serve(answer: Arc<Answer>) -> Canned {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let (b, n) = (base.clone(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (answer, b, n) = (answer.clone(), b.clone(), n.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let Some((method, path, _)) = common::read_request(&mut reader) else {
                    return;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let (status, kind, text) = answer(&method, &path, &b);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    Canned { base, requests }
}

fn http(name: &str) -> HttpConfig {
    HttpConfig {
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        ..HttpConfig::new(name)
    }
}

const TOKEN: &str = r#"{"access_token":"canned-token","token_type":"Bearer","expires_in":3600}"#;
const JSON: &str = "application/json";

/// Graph behind the canned server: the token endpoint answers, every Graph request gets `page`.
fn graph(
    page: impl Fn(&str, &str) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> (Canned, EntraSource) {
    let server = serve(Arc::new(move |_m: &str, path: &str, base: &str| {
        if path.contains("/oauth2/") {
            (200, JSON, TOKEN.to_owned())
        } else if path.contains("/delta") {
            // The change feed's starting point, asked before the full read: a plain one.
            let link = format!("{base}/v1.0/groups/delta?$deltatoken=canned");
            (
                200,
                JSON,
                format!(r#"{{"value": [], "@odata.deltaLink": "{link}"}}"#),
            )
        } else {
            page(path, base)
        }
    }));
    let source = EntraSource::new(EntraSourceConfig {
        authority: server.base.clone(),
        graph: server.base.clone(),
        tenant_id: "00000000-0000-4000-8000-000000000001".into(),
        credential: EntraCredential::ClientSecret {
            client_id: "00000000-0000-4000-8000-000000000002".into(),
            secret: Secret::new("canned-secret"),
        },
        http: http("Microsoft Graph"),
    })
    .unwrap();
    (server, source)
}

async fn graph_error(
    page: impl Fn(&str, &str) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> String {
    let (_server, source) = graph(page);
    let read = tokio::time::timeout(Duration::from_secs(30), source.read_full(&Scope::default()))
        .await
        .expect("the read ends");
    match read {
        Ok(r) => panic!(
            "read {} groups from a hostile answer",
            r.snapshot.groups.len()
        ),
        Err(e) => {
            assert!(!e.message.contains("canned-secret") && !e.message.contains("canned-token"));
            e.message
        }
    }
}

#[tokio::test]
async fn graph_html_instead_of_json_is_an_error() {
    let e =
        graph_error(|_, _| (200, "text/html", "<html><body>Sign in</body></html>".into())).await;
    assert!(
        e.contains("not the JSON expected") && e.contains("<html>"),
        "{e}"
    );
}

#[tokio::test]
async fn graph_truncated_json_is_an_error() {
    let e = graph_error(|_, _| {
        (
            200,
            JSON,
            r#"{"value": [{"id": "g1", "displayName": "Te"#.into(),
        )
    })
    .await;
    assert!(e.contains("Microsoft Graph"), "{e}");
}

#[tokio::test]
async fn graph_value_of_the_wrong_type_is_not_an_empty_list() {
    let e = graph_error(|_, _| (200, JSON, r#"{"value": "oops"}"#.into())).await;
    assert!(e.contains("`value` that is not a list"), "{e}");
}

#[tokio::test]
async fn graph_page_without_value_is_not_an_empty_list() {
    let e = graph_error(|_, _| (200, JSON, r#"{"@odata.context": "x"}"#.into())).await;
    assert!(e.contains("no `value` list"), "{e}");
}

#[tokio::test]
async fn graph_error_inside_a_200_is_an_error() {
    let e = graph_error(|_, _| {
        (
            200,
            JSON,
            r#"{"error": {"code": "generalException", "message": "Something went wrong"}}"#.into(),
        )
    })
    .await;
    assert!(e.contains("Something went wrong"), "{e}");
}

#[tokio::test]
async fn graph_next_link_to_itself_is_a_loop_not_forever() {
    let e = graph_error(|path, base| {
        (
            200,
            JSON,
            format!(r#"{{"value": [], "@odata.nextLink": "{base}{path}"}}"#),
        )
    })
    .await;
    assert!(e.contains("a loop"), "{e}");
}

#[tokio::test]
async fn graph_next_link_to_another_host_gets_no_token() {
    let elsewhere = serve(Arc::new(|_: &str, _: &str, _: &str| {
        (200, JSON, r#"{"value": []}"#.into())
    }));
    let target = elsewhere.base.clone();
    let e = graph_error(move |_, _| {
        (
            200,
            JSON,
            format!(r#"{{"value": [], "@odata.nextLink": "{target}/v1.0/groups?page=2"}}"#),
        )
    })
    .await;
    assert!(e.contains("does not send its token elsewhere"), "{e}");
    assert_eq!(
        elsewhere.requests.load(Ordering::SeqCst),
        0,
        "no request went there"
    );
}

#[tokio::test]
async fn graph_huge_page_is_read_whole() {
    let groups: Vec<String> = (0..5_000)
        .map(|i| {
            format!(r#"{{"id": "g{i}", "displayName": "Group {i}", "securityEnabled": true}}"#)
        })
        .collect();
    let page = format!(r#"{{"value": [{}]}}"#, groups.join(","));
    let (_server, source) = graph(move |path, _| {
        if path.contains("/members") {
            (200, JSON, r#"{"value": []}"#.into())
        } else {
            (200, JSON, page.clone())
        }
    });
    let scope = Scope {
        search_depth: 1,
        ..Scope::default()
    };
    let r = source.read_full(&scope).await.unwrap();
    assert_eq!(r.snapshot.groups.len(), 5_000);
}

/// A SCIM provider behind the canned server: `/ServiceProviderConfig` is not there (cautious
/// defaults); every list gets `list`.
fn scim(
    list: impl Fn(&str) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> (Canned, ScimTarget) {
    let server = serve(Arc::new(move |_m: &str, path: &str, _b: &str| {
        if path.contains("ServiceProviderConfig") {
            (404, JSON, "{}".into())
        } else {
            list(path)
        }
    }));
    let target = ScimTarget::new(ScimConfig {
        url: server.base.clone(),
        token: Some(Secret::new("canned-scim-token")),
        http: http("SCIM"),
        member_chunk: 10,
        nested_groups: false,
    })
    .unwrap();
    (server, target)
}

async fn scim_error(
    list: impl Fn(&str) -> (u16, &'static str, String) + Send + Sync + 'static,
) -> String {
    let (_server, target) = scim(list);
    let observed = tokio::time::timeout(Duration::from_secs(30), target.observe())
        .await
        .expect("the observation ends");
    match observed {
        Ok(o) => panic!(
            "observed {} users from a hostile answer",
            o.principals.get(Kind::User).len()
        ),
        Err(e) => {
            assert!(!e.message.contains("canned-scim-token"));
            e.message
        }
    }
}

#[tokio::test]
async fn scim_html_instead_of_json_is_an_error() {
    let e = scim_error(|_| (200, "text/html", "<!DOCTYPE html><p>proxy login</p>".into())).await;
    assert!(
        e.contains("not the JSON expected") && e.contains("<!DOCTYPE html>"),
        "{e}"
    );
}

#[tokio::test]
async fn scim_truncated_json_is_an_error() {
    let e = scim_error(|_| {
        (
            200,
            "application/scim+json",
            r#"{"Resources": [{"id": "1", "userN"#.into(),
        )
    })
    .await;
    assert!(e.contains("SCIM"), "{e}");
}

#[tokio::test]
async fn scim_resources_of_the_wrong_type_are_an_error() {
    let e = scim_error(|_| {
        (
            200,
            JSON,
            r#"{"totalResults": 3, "Resources": "three"}"#.into(),
        )
    })
    .await;
    assert!(e.contains("not a SCIM ListResponse"), "{e}");
}

#[tokio::test]
async fn scim_error_inside_a_200_is_an_error() {
    let e = scim_error(|_| {
        (200, JSON, r#"{"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "500", "detail": "backend down"}"#.into())
    })
    .await;
    assert!(e.contains("backend down"), "{e}");
}

#[tokio::test]
async fn scim_list_without_resources_is_not_an_empty_list() {
    let e = scim_error(|_| (200, JSON, r#"{"totalResults": 12}"#.into())).await;
    assert!(e.contains("without `Resources`"), "{e}");
}

#[tokio::test]
async fn scim_server_that_ignores_start_index_is_not_read_forever() {
    let e = scim_error(|_| {
        (200, JSON, r#"{"totalResults": 1000000, "Resources": [{"id": "u1", "userName": "a@x", "active": true}]}"#.into())
    })
    .await;
    assert!(e.contains("does it ignore startIndex"), "{e}");
}

#[tokio::test]
async fn lakefs_pagination_that_leads_back_is_an_error_not_a_short_list() {
    let server = serve(Arc::new(|_: &str, path: &str, _: &str| {
        if path.contains("/auth/users") || path.contains("/auth/groups") {
            (200, JSON, r#"{"pagination": {"has_more": true, "next_offset": "a", "results": 1, "max_per_page": 1000}, "results": [{"id": "alice", "creation_date": 1}]}"#.into())
        } else {
            (
                200,
                JSON,
                r#"{"user": {"id": "admin", "creation_date": 1}}"#.into(),
            )
        }
    }));
    let t = LakefsTarget::new(LakefsConfig {
        endpoint: server.base.clone(),
        access_key_id: "AKIACANNED".into(),
        secret_access_key: Secret::new("canned-lakefs-secret"),
        http: http("lakeFS"),
        default_user_group: None,
    })
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), t.observe())
        .await
        .expect("the observation ends")
        .unwrap_err();
    assert!(e.message.contains("leads nowhere new"), "{}", e.message);
    assert!(!e.message.contains("canned-lakefs-secret"));
}
