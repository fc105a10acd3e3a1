//! The shared HTTP client against the emulators' fault injection and throttling, on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use idsync_connectors::http::{Auth, ErrorKind, Http, HttpConfig};
use idsync_emulators::infra::{Faults, ThrottleConfig};
use idsync_emulators::tenant::Tenant;
use idsync_emulators::{Databricks, Graph, Tls};
use idsync_model::Secret;
use reqwest::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn cfg() -> HttpConfig {
    HttpConfig {
        base_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_secs(2),
        ..HttpConfig::new("Microsoft Graph")
    }
}

async fn graph() -> (Graph, Auth) {
    let g = Graph::start(Tenant::new(idsync_emulators::generator::generate(
        &Default::default(),
    )))
    .await
    .unwrap();
    let (tok, _) = g.state.issue_token(idsync_emulators::graph::GRAPH_AUDIENCE);
    (g, Auth::Bearer(Secret::new(tok)))
}

fn requests(g: &Graph, key: &str) -> u64 {
    g.state
        .infra
        .accounting
        .snapshot()
        .get(key)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_429_storm_converges_and_lowers_the_shared_limit() {
    let (g, auth) = graph().await;
    g.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 2.0,
        per_second: 40.0,
    }));
    let http = Arc::new(
        Http::new(HttpConfig {
            max_concurrency: 8,
            ..cfg()
        })
        .unwrap(),
    );
    let url = format!("{}/users?$top=5&$select=id", g.graph_url());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            http.send(Method::GET, &url, &auth, &[], None, true).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every request gets through");
    }
    assert!(
        requests(&g, "GET /v1.0/users") > 16,
        "some were throttled and retried"
    );
    assert!(
        http.concurrency() < 8,
        "the shared limit came down: {}",
        http.concurrency()
    );
}

/// A queue longer than a service's rate slows requests instead of failing them: 40 concurrent
/// PATCHes against Databricks' PATCH bucket (2, refilled at 2 a second; whole-second
/// Retry-After) all get through. Bounded by 8 attempts about a second apart, at most about
/// 2 + 2 x 8 of them could.
#[tokio::test]
async fn a_queue_on_a_slow_bucket_is_slowed_not_failed() {
    let d = Databricks::start_on(0, None).await.unwrap();
    let auth = Auth::Bearer(Secret::new(idsync_emulators::databricks::TOKEN));
    let http = Arc::new(
        Http::new(HttpConfig {
            service: "Databricks".into(),
            max_concurrency: 10,
            ..cfg()
        })
        .unwrap(),
    );
    let groups = format!("{}/Groups", d.scim_url());
    let body = br#"{"displayName":"QUEUE"}"#.to_vec();
    let a = http
        .send(
            Method::POST,
            &groups,
            &auth,
            &[],
            Some(("application/scim+json", body)),
            false,
        )
        .await
        .unwrap();
    let id = a
        .json::<serde_json::Value>("Databricks", "the create")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    d.state.infra.set_throttles(vec![(
        vec!["PATCH".into()],
        ThrottleConfig {
            capacity: 2.0,
            per_second: 2.0,
        },
    )]);
    let url = format!("{groups}/{id}");
    let patch = br#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"displayName","value":"QUEUE"}]}"#;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        let body = Some(("application/scim+json", patch.to_vec()));
        tasks.push(tokio::spawn(async move {
            http.send(Method::PATCH, &url, &auth, &[], body, true).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every PATCH gets through");
    }
    let elapsed = started.elapsed();
    let counts = d.state.infra.accounting.snapshot();
    let key = "PATCH /api/2.0/accounts/{acct}/scim/v2/{type}/{id}";
    let throttled = counts.get(&format!("429 {key}")).copied().unwrap_or(0);
    assert_eq!(counts[key] - throttled, 40, "{counts:?}");
    assert!(throttled > 0, "{counts:?}");
    // The bucket lets 40 through in no less than 19 s; coarse bounds only.
    assert!(
        elapsed >= Duration::from_secs(15) && elapsed < Duration::from_secs(120),
        "{elapsed:?}"
    );
}

/// A service that never stops throttling fails a request after `throttle_deadline`, with a
/// clear error, having retried.
#[tokio::test]
async fn endless_throttling_fails_in_bounded_time() {
    let (g, auth) = graph().await;
    g.state.infra.set_throttle(Some(ThrottleConfig {
        capacity: 0.0,
        per_second: 0.001,
    }));
    let http = Http::new(HttpConfig {
        throttle_deadline: Duration::from_secs(5),
        ..cfg()
    })
    .unwrap();
    let started = std::time::Instant::now();
    let e = http
        .send(
            Method::GET,
            &format!("{}/users", g.graph_url()),
            &auth,
            &[],
            None,
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Throttled);
    assert_eq!(e.status, Some(429));
    assert!(e.message.contains("still throttled after"), "{}", e.message);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(requests(&g, "429 GET /v1.0/users") >= 2, "it retried");
}

#[tokio::test]
async fn server_errors_and_cut_off_answers_are_retried_for_reads_only() {
    let (g, auth) = graph().await;
    let http = Http::new(cfg()).unwrap();
    let url = format!("{}/users?$top=2&$select=id", g.graph_url());
    g.state.infra.set_faults(Faults {
        error_rate: 0.3,
        truncate_rate: 0.2,
        reset_rate: 0.1,
        ..Faults::default()
    });
    for _ in 0..20 {
        let a = http
            .send(Method::GET, &url, &auth, &[], None, true)
            .await
            .unwrap();
        let v: serde_json::Value = a.json("Microsoft Graph", "a page").unwrap();
        assert_eq!(v["value"].as_array().unwrap().len(), 2);
    }
    assert!(requests(&g, "GET /v1.0/users") > 20);
    // A POST that reached the service and failed is not repeated (it might have happened).
    g.state.infra.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    g.state.infra.accounting.reset();
    let batch = format!("{}/$batch", g.graph_url());
    let e = http
        .send(
            Method::POST,
            &batch,
            &auth,
            &[],
            Some(("application/json", b"{\"requests\":[]}".to_vec())),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    assert_eq!(requests(&g, "POST /v1.0/$batch"), 1);
}

#[tokio::test]
async fn errors_name_the_code_and_request_id_and_never_the_token() {
    let (g, _) = graph().await;
    let http = Http::new(cfg()).unwrap();
    let secret = "eyJ0eXAiOiJKV1QiLCJ-very-secret-token";
    let e = http
        .send(
            Method::GET,
            &format!("{}/users", g.graph_url()),
            &Auth::Bearer(Secret::new(secret)),
            &[],
            None,
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    assert_eq!(e.code.as_deref(), Some("InvalidAuthenticationToken"));
    assert!(e.request_id.is_some());
    assert!(
        e.message.contains("Microsoft Graph: GET") && e.message.contains("answered 401"),
        "{}",
        e.message
    );
    assert!(!e.message.contains(secret), "{}", e.message);

    let (g, auth) = graph().await;
    g.state.infra.set_faults(Faults {
        html_rate: 1.0,
        ..Faults::default()
    });
    let e = Http::new(HttpConfig {
        max_attempts: 2,
        ..cfg()
    })
    .unwrap()
    .send(
        Method::GET,
        &format!("{}/users", g.graph_url()),
        &auth,
        &[],
        None,
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    assert!(e.message.contains("HTML page"), "{}", e.message);

    // Nothing listening: a clear error, after the attempts, not a hang.
    let closed = format!("http://127.0.0.1:{}/v1.0/users", g.server.addr.port());
    drop(g);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = Http::new(HttpConfig {
        max_attempts: 3,
        ..cfg()
    })
    .unwrap()
    .send(Method::GET, &closed, &auth, &[], None, true)
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
}

#[tokio::test]
async fn a_custom_ca_bundle_is_trusted_and_nothing_else_is() {
    let tls = Tls::generate().unwrap();
    let g = Graph::start_with(Tenant::new(Default::default()), 0, Some(&tls))
        .await
        .unwrap();
    let (tok, _) = g.state.issue_token(idsync_emulators::graph::GRAPH_AUDIENCE);
    let auth = Auth::Bearer(Secret::new(tok));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.cert_pem).unwrap();
    let url = format!("{}/users", g.graph_url());
    assert!(url.starts_with("https://127.0.0.1:"));
    let trusted = Http::new(HttpConfig {
        ca_bundle: Some(ca),
        ..cfg()
    })
    .unwrap();
    trusted
        .send(Method::GET, &url, &auth, &[], None, true)
        .await
        .unwrap();
    // Its connections closed, the next one trusts the bundle too.
    trusted.close_idle();
    trusted
        .send(Method::GET, &url, &auth, &[], None, true)
        .await
        .unwrap();
    let untrusted = Http::new(HttpConfig {
        max_attempts: 1,
        ..cfg()
    })
    .unwrap();
    let e = untrusted
        .send(Method::GET, &url, &auth, &[], None, true)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.message);
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    assert!(
        Http::new(HttpConfig {
            ca_bundle: Some(bad),
            ..cfg()
        })
        .is_err()
    );
}

/// A server on 127.0.0.1 that keeps connections open (HTTP/1.1 keep-alive) and answers every
/// request with `{}`: counts the connections it accepted and those the client closed.
fn keep_alive_server() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use std::io::{BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                while common::read_request(&mut reader).is_some() {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
                    );
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (base, opened, closed)
}

/// A burst's connections are kept for the requests to come until `close_idle`: then they are
/// closed (the server sees them end), and the next request opens a new one.
#[tokio::test]
async fn idle_connections_are_closed_on_request_and_the_next_request_opens_one() {
    let (base, opened, closed) = keep_alive_server();
    let http = Http::new(cfg()).unwrap();
    let url = format!("{base}/x");
    for _ in 0..3 {
        http.send(Method::GET, &url, &Auth::None, &[], None, true)
            .await
            .unwrap();
    }
    assert_eq!(opened.load(Ordering::SeqCst), 1, "one connection, kept");
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    http.close_idle();
    let mut waited = 0;
    while closed.load(Ordering::SeqCst) == 0 && waited < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert_eq!(
        closed.load(Ordering::SeqCst),
        1,
        "the idle connection was closed"
    );
    http.send(Method::GET, &url, &Auth::None, &[], None, true)
        .await
        .unwrap();
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "the next request opened a new one"
    );
}
