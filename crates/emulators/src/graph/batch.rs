//! `POST /$batch`: up to 20 requests, `dependsOn`, per-item status. Each item goes through the
//! emulator's own routes, so it is authenticated, counted (as `BATCH GET /v1.0/...`) and throttled
//! on its own: a throttled item is a 429 inside a 200 envelope, as Graph answers.

use super::{GraphState, bad};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tower::ServiceExt;

/// The header marking a request replayed from a batch.
pub const BATCH_ITEM: &str = "x-emulator-batch-item";

/// The header's value: random per process, so a client cannot claim to be a batch item and skip
/// fault injection.
pub fn batch_marker() -> &'static str {
    static MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARKER.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{:x}", t ^ u128::from(std::process::id()) << 64)
    })
}

#[derive(Deserialize)]
struct Envelope {
    requests: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    id: String,
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    depends_on: Vec<String>,
}

/// The `$batch` handler.
pub async fn batch(
    State(st): State<Arc<GraphState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let env: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return bad("BadRequest", &format!("Invalid batch payload: {e}")),
    };
    if env.requests.len() > 20 {
        return bad(
            "BadRequest",
            "Invalid batch payload format. The number of requests exceeds the limit of 20.",
        );
    }
    let mut ids = BTreeSet::new();
    for r in &env.requests {
        if !ids.insert(r.id.to_lowercase()) {
            return bad(
                "BadRequest",
                &format!("Batch request id '{}' is duplicated.", r.id),
            );
        }
    }
    let version = if uri.path().starts_with("/beta/") {
        "/beta"
    } else {
        "/v1.0"
    };
    let Some(router) = st.router.get().cloned() else {
        return bad("BadRequest", "the emulator is not ready");
    };
    let mut status_of: BTreeMap<String, u16> = BTreeMap::new();
    // Each item's answer as JSON text: an item's body goes in as its route wrote it, checked but
    // not parsed into a tree and written again (20 pages of 999 members are megabytes).
    let mut out: Vec<Vec<u8>> = Vec::new();
    for item in env.requests {
        let failed_dep = item
            .depends_on
            .iter()
            .find(|d| status_of.get(&d.to_lowercase()).is_none_or(|s| *s >= 400));
        if let Some(d) = failed_dep {
            status_of.insert(item.id.to_lowercase(), 424);
            let failed = json!({"id": item.id, "status": 424, "headers": {},
                "body": {"error": {"code": "FailedDependency", "message": format!("Request '{d}' it depends on failed.")}}});
            out.push(failed.to_string().into_bytes());
            continue;
        }
        let path = item
            .url
            .strip_prefix("https://graph.microsoft.com")
            .unwrap_or(&item.url);
        let path = path.strip_prefix(version).unwrap_or(path);
        let target = format!(
            "{version}{}{}",
            if path.starts_with('/') { "" } else { "/" },
            path
        );
        let method =
            Method::from_bytes(item.method.to_uppercase().as_bytes()).unwrap_or(Method::GET);
        let mut req = Request::builder().method(method).uri(target);
        for name in [header::AUTHORIZATION, header::HOST] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v.clone());
            }
        }
        for (k, v) in &item.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                req = req.header(k, v);
            }
        }
        req = req.header(BATCH_ITEM, batch_marker());
        let body = item
            .body
            .as_ref()
            .map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = match req.body(body) {
            Ok(r) => router
                .clone()
                .oneshot(r)
                .await
                .unwrap_or_else(|e| match e {}),
            Err(e) => bad("BadRequest", &format!("Invalid request '{}': {e}", item.id)),
        };
        let status = resp.status().as_u16();
        let mut hs = Map::new();
        for (k, v) in resp.headers() {
            if let Ok(v) = v.to_str() {
                hs.insert(k.as_str().to_owned(), json!(v));
            }
        }
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        status_of.insert(item.id.to_lowercase(), status);
        // Everything but the body, then the body where the closing brace was.
        let mut answer = json!({"id": item.id, "status": status, "headers": hs})
            .to_string()
            .into_bytes();
        answer.pop();
        answer.extend_from_slice(b",\"body\":");
        if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            answer.extend_from_slice(&bytes);
        } else {
            // Not JSON (a `$count` is plain text): a string.
            answer.extend(
                json!(String::from_utf8_lossy(&bytes))
                    .to_string()
                    .into_bytes(),
            );
        }
        answer.push(b'}');
        out.push(answer);
    }
    let mut body = b"{\"responses\":[".to_vec();
    for (i, answer) in out.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(answer);
    }
    body.extend_from_slice(b"]}");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
