//! What every emulator has: request accounting, fault injection and throttling, as one axum
//! middleware, switchable at run time (in process, or through `/_admin/faults`).

use crate::generator::Rng;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests counted by `"METHOD /route/{template}"`.
#[derive(Debug, Default)]
pub struct Accounting {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Accounting {
    /// Counts one request.
    pub fn record(&self, key: String) {
        *lock(&self.counts).entry(key).or_default() += 1;
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.counts).clone()
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        lock(&self.counts).values().sum()
    }

    /// Starts counting from zero.
    pub fn reset(&self) {
        lock(&self.counts).clear();
    }
}

/// Faults to inject, per request. Rates are probabilities from 0.0 to 1.0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every request.
    pub latency_ms: u64,
    /// Up to this much more, at random.
    pub jitter_ms: u64,
    /// Answer a 5xx with the API's error body.
    pub error_rate: f64,
    /// Answer a 502 with an HTML page, as a proxy in front of the API would.
    pub html_rate: f64,
    /// Send the response's headers and half its body, then drop the connection.
    pub truncate_rate: f64,
    /// Send the headers, then drop the connection before any body.
    pub reset_rate: f64,
    /// Only requests whose path contains this are affected (all when empty).
    pub path_contains: String,
    /// Writes (any method but GET and HEAD) after this many hang, never answered and never made:
    /// the fault suite kills idsync there, at an exact write boundary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_after_writes: Option<u64>,
    /// The write with this number (from 1, counted as [`Infra::writes`] counts) is answered 409
    /// and not made: a conflict in the middle of an apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict_at_write: Option<u64>,
}

/// A token bucket: `capacity` requests at once, refilled at `per_second`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Bucket size.
    pub capacity: f64,
    /// Tokens added per second.
    pub per_second: f64,
}

#[derive(Debug)]
struct Bucket {
    config: ThrottleConfig,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.config.per_second).min(self.config.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.config.per_second.max(1e-9);
            Err(Duration::from_secs_f64(wait))
        }
    }
}

/// Builds an error response in the API's own shape: (status, code, message) → response.
pub type ErrorFormat = fn(StatusCode, &str, &str) -> Response;

/// The shared machinery of one emulator.
#[derive(Debug)]
pub struct Infra {
    /// Request counts.
    pub accounting: Accounting,
    faults: Mutex<Faults>,
    /// Buckets with the requests they govern (`"METHOD /route"` or `"METHOD"`; empty: all), in
    /// order: a request takes a token from the first bucket that governs it.
    throttle: Mutex<Vec<(Vec<String>, Bucket)>>,
    rng: Mutex<Rng>,
    error: ErrorFormat,
    /// Writes that reached the API (stalled ones not counted).
    writes_started: std::sync::atomic::AtomicU64,
    /// Of those, the ones answered.
    writes_done: std::sync::atomic::AtomicU64,
    /// Requests answered with an injected fault (5xx, HTML page, cut body, dropped connection).
    injected: std::sync::atomic::AtomicU64,
}

impl Infra {
    /// New machinery answering errors with `error`.
    pub fn new(error: ErrorFormat) -> Arc<Self> {
        Arc::new(Infra {
            accounting: Accounting::default(),
            faults: Mutex::new(Faults::default()),
            throttle: Mutex::new(Vec::new()),
            rng: Mutex::new(Rng::new(7)),
            error,
            writes_started: Default::default(),
            writes_done: Default::default(),
            injected: Default::default(),
        })
    }

    /// Requests answered with an injected fault so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn inject(&self) {
        self.injected
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes answered since the start (or the last [`Infra::reset_writes`]), injected conflicts
    /// included; those that failed with an injected 5xx, HTML page or 429 are not writes.
    pub fn writes(&self) -> u64 {
        self.writes_done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes let through, answered or not yet.
    pub fn writes_started(&self) -> u64 {
        self.writes_started
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts writes from zero again.
    pub fn reset_writes(&self) {
        self.writes_started
            .store(0, std::sync::atomic::Ordering::SeqCst);
        self.writes_done
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the faults to inject.
    pub fn set_faults(&self, f: Faults) {
        *lock(&self.faults) = f;
    }

    /// The faults being injected.
    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Turns throttling on (or off, with `None`): one bucket for every request.
    pub fn set_throttle(&self, t: Option<ThrottleConfig>) {
        self.set_throttles(t.map(|t| (Vec::new(), t)).into_iter().collect());
    }

    /// Throttles per kind of request, as APIs with per-method limits do: each bucket governs the
    /// requests named (`"POST"`, or `"GET /route/{id}"` as the accounting names them; none: all).
    /// A request takes a token from the first bucket that governs it; others pass.
    pub fn set_throttles(&self, buckets: Vec<(Vec<String>, ThrottleConfig)>) {
        *lock(&self.throttle) = buckets
            .into_iter()
            .map(|(matches, config)| {
                let bucket = Bucket {
                    tokens: config.capacity,
                    config,
                    at: Instant::now(),
                };
                (matches, bucket)
            })
            .collect();
    }

    /// Takes a throttling token for a request (`"METHOD /route"`), or returns the 429 to send (and
    /// counts it again as `"429 METHOD /route"`).
    pub fn throttle(&self, request: &str) -> Result<(), Response> {
        let mut t = lock(&self.throttle);
        let method = request.split(' ').next().unwrap_or_default();
        let Some((_, bucket)) = t
            .iter_mut()
            .find(|(m, _)| m.is_empty() || m.iter().any(|x| x == request || x == method))
        else {
            return Ok(());
        };
        bucket.take().map_err(|wait| {
            // Counted apart too, so a throttled write is not taken for a write made.
            self.accounting.record(format!("429 {request}"));
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut r = (self.error)(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests; retry after the time in Retry-After",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            r
        })
    }

    /// The error response in the API's shape.
    pub fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        (self.error)(status, code, message)
    }

    fn roll(&self) -> f64 {
        lock(&self.rng).unit()
    }
}

/// The `/_admin` routes every emulator shares: `GET /_admin/requests` (the accounting),
/// `POST /_admin/requests/reset`, `PUT /_admin/faults`, `PUT /_admin/throttle` (a config, or `null`
/// to turn it off). Merged into an emulator's own router.
pub fn admin_router<S: Clone + Send + Sync + 'static>(infra: Arc<Infra>) -> axum::Router<S> {
    use axum::routing::{get, post, put};
    async fn requests(State(i): State<Arc<Infra>>) -> Response {
        axum::Json(i.accounting.snapshot()).into_response()
    }
    async fn reset(State(i): State<Arc<Infra>>) -> StatusCode {
        i.accounting.reset();
        StatusCode::NO_CONTENT
    }
    async fn faults(State(i): State<Arc<Infra>>, axum::Json(f): axum::Json<Faults>) -> StatusCode {
        i.set_faults(f);
        StatusCode::NO_CONTENT
    }
    async fn throttle(
        State(i): State<Arc<Infra>>,
        axum::Json(t): axum::Json<Option<ThrottleConfig>>,
    ) -> StatusCode {
        i.set_throttle(t);
        StatusCode::NO_CONTENT
    }
    axum::Router::new()
        .route("/_admin/requests", get(requests))
        .route("/_admin/requests/reset", post(reset))
        .route("/_admin/faults", put(faults))
        .route("/_admin/throttle", put(throttle))
        .with_state(infra)
}

/// The middleware: counts, delays, injects faults, throttles. `/_admin` is exempt from all of it.
pub async fn layer(State(infra): State<Arc<Infra>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path.starts_with("/_admin") {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| path.clone(), |m| m.as_str().to_owned());
    // A request replayed from a batch: counted and throttled on its own, but not faulted again
    // (the batch request itself was).
    let batch_item = req
        .headers()
        .get(crate::graph::batch::BATCH_ITEM)
        .is_some_and(|v| v.as_bytes() == crate::graph::batch::batch_marker().as_bytes());
    if batch_item {
        infra
            .accounting
            .record(format!("BATCH {} {route}", req.method()));
        if let Err(r) = infra.throttle(&format!("{} {route}", req.method())) {
            return r;
        }
        return next.run(req).await;
    }
    let request = format!("{} {route}", req.method());
    infra.accounting.record(request.clone());

    let f = infra.faults();
    let applies = f.path_contains.is_empty() || path.contains(&f.path_contains);
    if applies && (f.latency_ms > 0 || f.jitter_ms > 0) {
        let jitter = if f.jitter_ms > 0 {
            (infra.roll() * f.jitter_ms as f64) as u64
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(f.latency_ms + jitter)).await;
    }
    if applies && infra.roll() < f.error_rate {
        let status = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ][(infra.roll() * 4.0) as usize % 4];
        infra.inject();
        return infra.error(status, "serviceNotAvailable", "injected server error");
    }
    if applies && infra.roll() < f.html_rate {
        infra.inject();
        let page = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>The upstream server did not answer.</p></body></html>";
        return (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response();
    }
    if let Err(r) = infra.throttle(&request) {
        return r;
    }
    let truncate = applies && infra.roll() < f.truncate_rate;
    let reset = applies && infra.roll() < f.reset_rate;
    let write = !matches!(req.method().as_str(), "GET" | "HEAD");
    if write {
        use std::sync::atomic::Ordering;
        let n = infra.writes_started.fetch_add(1, Ordering::SeqCst) + 1;
        if f.stall_after_writes.is_some_and(|s| n > s) {
            infra.writes_started.fetch_sub(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if f.conflict_at_write == Some(n) {
            infra.writes_done.fetch_add(1, Ordering::SeqCst);
            return infra.error(StatusCode::CONFLICT, "conflict", "injected conflict");
        }
    }
    let resp = next.run(req).await;
    if write {
        infra
            .writes_done
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    if !(truncate || reset) {
        return resp;
    }
    infra.inject();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let keep = if reset { 0 } else { bytes.len() / 2 };
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(bytes.slice(..keep)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection drop",
        )),
    ];
    let mut r = Response::from_parts(parts, Body::from_stream(futures::stream::iter(chunks)));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    r
}
