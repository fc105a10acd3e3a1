//! A Google Cloud Storage emulator for the XML API subset that state storage uses: objects put,
//! read, stat and deleted with generations and `x-goog-if-generation-match` preconditions (0 =
//! only if absent), and V2 listing by prefix. No emulator in the package registries honours
//! those preconditions for `object_store`'s writes (fake-gcs-server 1.54.0 answers its XML
//! `PUT /bucket/object` with 400 and checks preconditions only on multipart uploads;
//! gcp-storage-emulator ignores them and sends no ETags), and compare-and-swap is exactly what
//! idsync needs to test. The state conformance suite runs against it in process
//! (`crates/state/tests/backends.rs`), and so does the fault suite (`scripts/servers.sh`).
//!
//! Authentication as `object_store` performs it with a service account key: a self-signed RS256
//! JWT as the bearer token; or a token from the emulator's own STS, service account impersonation
//! or metadata server endpoints. When the emulator is given the account's certificate, it verifies
//! the signature; without, it only requires a bearer token.

use crate::infra::{self, Infra};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

struct Object {
    bytes: Bytes,
    generation: u64,
    modified: u64,
}

/// The emulator's state.
pub struct GcsState {
    buckets: Mutex<BTreeSet<String>>,
    objects: Mutex<BTreeMap<(String, String), Object>>,
    generation: Mutex<u64>,
    /// A certificate (PEM) whose key must sign bearer tokens; none = any bearer token.
    pub signer_certificate: Mutex<Option<String>>,
    /// Access tokens this emulator's STS and IAM credentials endpoints issued (always accepted).
    issued: Mutex<BTreeSet<String>>,
    /// Lifetime of the tokens STS, impersonation and the metadata server issue, in seconds.
    pub ttl_secs: std::sync::atomic::AtomicU64,
    /// Service accounts federated principals may impersonate; none: any.
    pub impersonable: Mutex<Option<BTreeSet<String>>>,
    /// Accounting and faults.
    pub infra: Arc<Infra>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// GCS's XML error body.
pub fn gcs_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{}</Message></Error>",
        message.replace('&', "&amp;").replace('<', "&lt;")
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn http_date(t: u64) -> String {
    let (y, m, d, hh, mm, ss, wd) = idsync_model::civil(t);
    let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {hh:02}:{mm:02}:{ss:02} GMT",
        days[wd],
        months[(m - 1) as usize]
    )
}

fn rfc3339(t: u64) -> String {
    let (y, m, d, hh, mm, ss, _) = idsync_model::civil(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.000Z")
}

fn etag(bytes: &[u8], generation: u64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}{generation:x}\"")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl GcsState {
    /// An emulator with these buckets.
    pub fn new(buckets: &[&str]) -> Arc<Self> {
        Arc::new(GcsState {
            buckets: Mutex::new(buckets.iter().map(|b| (*b).to_owned()).collect()),
            objects: Mutex::new(BTreeMap::new()),
            generation: Mutex::new(1_700_000_000_000_000),
            signer_certificate: Mutex::new(None),
            issued: Mutex::new(BTreeSet::new()),
            ttl_secs: std::sync::atomic::AtomicU64::new(3600),
            impersonable: Mutex::new(None),
            infra: Infra::new(gcs_error),
        })
    }

    fn ttl(&self) -> u64 {
        self.ttl_secs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requires bearer tokens signed by the key of this certificate (PEM).
    pub fn require_signer(&self, certificate_pem: &str) {
        *lock(&self.signer_certificate) = Some(certificate_pem.to_owned());
    }

    /// An object's bytes, as stored.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        lock(&self.objects)
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|o| o.bytes.to_vec())
    }

    /// Overwrites an object's bytes behind the client's back (a test corrupting state).
    pub fn overwrite(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let generation = self.next_generation();
        lock(&self.objects).insert(
            (bucket.to_owned(), key.to_owned()),
            Object {
                bytes: Bytes::copy_from_slice(bytes),
                generation,
                modified: now(),
            },
        );
    }

    fn next_generation(&self) -> u64 {
        let mut g = lock(&self.generation);
        *g += 1;
        *g
    }

    /// The caller's token checked, then the bucket's existence.
    fn admit(&self, headers: &HeaderMap, bucket: &str) -> Result<(), Response> {
        self.authorized(headers)?;
        if lock(&self.buckets).contains(bucket) {
            Ok(())
        } else {
            Err(no_bucket(bucket))
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> Result<(), Response> {
        let denied = |why: &str| {
            Err(gcs_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationRequired",
                why,
            ))
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return denied("Anonymous caller does not have storage.objects access.");
        };
        if lock(&self.issued).contains(token) {
            return Ok(());
        }
        let cert = lock(&self.signer_certificate).clone();
        match cert {
            None => Ok(()),
            Some(pem) if crate::graph::token::verify_rs256(token, &pem) => Ok(()),
            Some(_) => denied("Invalid Credentials: the token's signature does not verify."),
        }
    }
}

fn with_meta(mut r: Response, o: &Object) -> Response {
    let h = r.headers_mut();
    let pairs = [
        (header::ETAG.as_str(), etag(&o.bytes, o.generation)),
        ("x-goog-generation", o.generation.to_string()),
        ("x-goog-metageneration", "1".to_owned()),
        (header::LAST_MODIFIED.as_str(), http_date(o.modified)),
        (header::CONTENT_LENGTH.as_str(), o.bytes.len().to_string()),
    ];
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::try_from(k),
            HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    r
}

fn no_bucket(bucket: &str) -> Response {
    gcs_error(
        StatusCode::NOT_FOUND,
        "NoSuchBucket",
        &format!("The specified bucket {bucket} does not exist."),
    )
}

async fn put_object(
    State(st): State<Arc<GcsState>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = st.admit(&headers, &bucket) {
        return r;
    }
    let want: Option<u64> = headers
        .get("x-goog-if-generation-match")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut objects = lock(&st.objects);
    let generation = st.next_generation();
    let k = (bucket, key);
    let current = objects.get(&k).map(|o| o.generation);
    if let Some(w) = want
        && current.unwrap_or(0) != w
    {
        return gcs_error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold.",
        );
    }
    let o = Object {
        bytes: body,
        generation,
        modified: now(),
    };
    let r = with_meta(StatusCode::OK.into_response(), &o);
    objects.insert(k, o);
    r
}

async fn get_object(
    State(st): State<Arc<GcsState>>,
    Path((bucket, key)): Path<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(&headers, &bucket) {
        return r;
    }
    let objects = lock(&st.objects);
    let Some(o) = objects.get(&(bucket, key.clone())) else {
        return gcs_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            &format!("The specified key {key} does not exist."),
        );
    };
    let body = if method == axum::http::Method::HEAD {
        Bytes::new()
    } else {
        o.bytes.clone()
    };
    with_meta((StatusCode::OK, body).into_response(), o)
}

async fn delete_object(
    State(st): State<Arc<GcsState>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(&headers, &bucket) {
        return r;
    }
    match lock(&st.objects).remove(&(bucket, key.clone())) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => gcs_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            &format!("The specified key {key} does not exist."),
        ),
    }
}

async fn list_objects(
    State(st): State<Arc<GcsState>>,
    Path(bucket): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = st.admit(&headers, &bucket) {
        return r;
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let after = q.get("start-after").cloned().unwrap_or_default();
    let mut xml = format!(
        "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns=\"http://doc.s3.amazonaws.com/2006-03-01\"><Name>{}</Name><Prefix>{}</Prefix>",
        xml_escape(&bucket),
        xml_escape(&prefix)
    );
    let objects = lock(&st.objects);
    let mut count = 0;
    for ((b, k), o) in objects.iter() {
        if *b != bucket || !k.starts_with(&prefix) || k.as_str() <= after.as_str() {
            continue;
        }
        count += 1;
        xml.push_str(&format!(
            "<Contents><Key>{}</Key><Generation>{}</Generation><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size></Contents>",
            xml_escape(k),
            o.generation,
            rfc3339(o.modified),
            xml_escape(&etag(&o.bytes, o.generation)),
            o.bytes.len()
        ));
    }
    xml.push_str(&format!(
        "<KeyCount>{count}</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>"
    ));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml")],
        xml,
    )
        .into_response()
}

fn issue(st: &GcsState, kind: &str) -> String {
    let t = format!("emu-{kind}.{:x}", st.next_generation());
    lock(&st.issued).insert(t.clone());
    t
}

/// `POST /sts/v1/token`: Google's STS token exchange for workload identity federation (any
/// non-empty subject token is accepted; the audience must name a workload identity provider).
async fn sts_token(
    State(st): State<Arc<GcsState>>,
    axum::extract::Form(f): axum::extract::Form<BTreeMap<String, String>>,
) -> Response {
    let err = |code: &str, d: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": code, "error_description": d})),
        )
            .into_response()
    };
    if f.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:token-exchange")
    {
        return err("invalid_request", "Invalid value for \"grant_type\".");
    }
    if !f
        .get("audience")
        .is_some_and(|a| a.contains("/workloadIdentityPools/") && a.contains("/providers/"))
    {
        return err("invalid_request", "Invalid value for \"audience\".");
    }
    if f.get("subject_token").is_none_or(|t| t.trim().is_empty()) {
        return err("invalid_grant", "The subject token is empty.");
    }
    if f.get("subject_token_type").map(String::as_str)
        == Some("urn:ietf:params:aws:token-type:aws4_request")
    {
        let audience = f.get("audience").map_or("", String::as_str);
        if let Err(why) = check_aws_subject(&f["subject_token"], audience) {
            return err("invalid_grant", &why);
        }
    }
    let token = issue(&st, "sts");
    axum::Json(serde_json::json!({"access_token": token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer", "expires_in": st.ttl()}))
    .into_response()
}

/// `%XX` and `+` decoded (a form value, or Google's clients' quoted JSON).
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// An AWS subject token as Google's STS takes it: a quoted JSON serialisation of a SigV4-signed
/// `POST` of STS `GetCallerIdentity`, whose `x-goog-cloud-target-resource` header names the
/// provider (the exchange's audience). Google forwards the request to AWS to learn the caller;
/// here its form is checked (the signature is AWS's to verify). Accepted as each of Google's
/// libraries writes it: header names in any case and order, the target header once or twice.
fn check_aws_subject(token: &str, audience: &str) -> Result<(), String> {
    let json = form_decode(token).ok_or("The AWS subject token is not URL-encoded JSON.")?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .map_err(|_| "The AWS subject token is not valid JSON.".to_owned())?;
    if v["method"].as_str() != Some("POST") {
        return Err("The AWS request must use the POST method.".into());
    }
    let url = v["url"].as_str().unwrap_or_default();
    let host = url
        .strip_prefix("https://")
        .and_then(|r| r.split(['/', '?']).next())
        .unwrap_or_default();
    let regional_sts = host.starts_with("sts.") && host.ends_with(".amazonaws.com");
    if !regional_sts || !url.contains("Action=GetCallerIdentity") {
        return Err(format!(
            "The AWS request URL {url:?} is not a regional STS GetCallerIdentity request."
        ));
    }
    let headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .ok_or("The AWS subject token has no headers.")?
        .iter()
        .filter_map(|h| {
            Some((
                h["key"].as_str()?.to_ascii_lowercase(),
                h["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let get = |k: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let auth = get("authorization").next().unwrap_or_default();
    if !auth.starts_with("AWS4-HMAC-SHA256 Credential=") || !auth.contains("/sts/aws4_request") {
        return Err("The AWS request is not signed with SigV4 for STS.".into());
    }
    if get("host").next() != Some(host) || get("x-amz-date").next().is_none() {
        return Err("The AWS request lacks its host or x-amz-date header.".into());
    }
    if get("x-goog-cloud-target-resource").any(|t| t != audience)
        || get("x-goog-cloud-target-resource").next().is_none()
    {
        return Err(
            "The x-goog-cloud-target-resource header of the AWS request does not match the audience."
                .into(),
        );
    }
    Ok(())
}

/// `POST /iam/v1/projects/-/serviceAccounts/{email}:generateAccessToken`: impersonation, for a
/// token this emulator's STS issued.
async fn generate_access_token(
    State(st): State<Arc<GcsState>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !rest.ends_with(":generateAccessToken") {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !bearer.starts_with("emu-sts.") || !lock(&st.issued).contains(bearer) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})),
        )
            .into_response();
    }
    let email = rest.trim_end_matches(":generateAccessToken");
    if lock(&st.impersonable)
        .as_ref()
        .is_some_and(|allowed| !allowed.contains(email))
    {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).", "status": "PERMISSION_DENIED"}})),
        )
            .into_response();
    }
    let token = issue(&st, "sa");
    axum::Json(serde_json::json!({"accessToken": token, "expireTime": rfc3339(now() + st.ttl())}))
        .into_response()
}

/// `GET /computeMetadata/v1/instance/service-accounts/default/token`: the metadata server of
/// Compute Engine and GKE (workload identity), which wants `Metadata-Flavor: Google`; a token for
/// the instance's service account. `GCE_METADATA_HOST` points clients here.
async fn metadata_token(State(st): State<Arc<GcsState>>, headers: HeaderMap) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"",
        )
            .into_response();
    }
    let token = issue(&st, "metadata");
    axum::Json(
        serde_json::json!({"access_token": token, "expires_in": st.ttl(), "token_type": "Bearer"}),
    )
    .into_response()
}

/// The emulator's routes.
pub fn router(st: Arc<GcsState>) -> Router {
    Router::new()
        .route("/sts/v1/token", axum::routing::post(sts_token))
        .route(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            get(metadata_token),
        )
        .route(
            "/iam/v1/projects/-/serviceAccounts/{*rest}",
            axum::routing::post(generate_access_token),
        )
        .route("/{bucket}", get(list_objects))
        .route(
            "/{bucket}/{*key}",
            get(get_object)
                .head(get_object)
                .put(put_object)
                .delete(delete_object),
        )
        .layer(axum::middleware::from_fn_with_state(
            st.infra.clone(),
            infra::layer,
        ))
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(rfc3339(1_795_377_600), "2026-11-22T20:00:00.000Z");
        assert_eq!(http_date(1_795_377_600), "Sun, 22 Nov 2026 20:00:00 GMT");
    }
}
