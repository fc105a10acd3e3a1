//! The HTTP client every connector uses: retries that honour `Retry-After`, a concurrency limit
//! shared by all requests to one service that halves on a 429 and grows back with successes,
//! jittered backoff for 5xx and dropped connections, a custom CA bundle, and errors that name the
//! service's error code and request id and never carry a secret.

use bytes::Bytes;
use idsync_model::Secret;
pub use reqwest::Method;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Every request this process sent, for metrics: by service, method and answer (`200`, `429`, or
/// `error` when none came), and per service the 429s and the time spent waiting before a retry.
/// Counts only grow.
pub mod ledger {
    use std::collections::BTreeMap;
    use std::sync::{LazyLock, Mutex};
    use std::time::Duration;

    /// What the ledger holds.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct Ledger {
        /// (service, method, status) → requests.
        pub requests: BTreeMap<(String, String, String), u64>,
        /// service → answers 429.
        pub throttled: BTreeMap<String, u64>,
        /// service → seconds waited before retries (`Retry-After` and backoff).
        pub retry_wait_seconds: BTreeMap<String, f64>,
    }

    static LEDGER: LazyLock<Mutex<Ledger>> = LazyLock::new(Mutex::default);

    fn with<T>(f: impl FnOnce(&mut Ledger) -> T) -> T {
        f(&mut LEDGER.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn request(service: &str, method: &str, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        with(|l| {
            *l.requests
                .entry((service.to_owned(), method.to_owned(), status))
                .or_default() += 1;
        });
    }

    pub(crate) fn throttled(service: &str) {
        with(|l| *l.throttled.entry(service.to_owned()).or_default() += 1);
    }

    pub(crate) fn waited(service: &str, d: Duration) {
        with(|l| *l.retry_wait_seconds.entry(service.to_owned()).or_default() += d.as_secs_f64());
    }

    /// A copy of the ledger now.
    pub fn snapshot() -> Ledger {
        with(|l| l.clone())
    }
}

/// How to talk to one service.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// The service's name, for messages ("Microsoft Graph", "lakeFS").
    pub service: String,
    /// Extra CA certificates (PEM) to trust, besides the system's.
    pub ca_bundle: Option<PathBuf>,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Requests in flight at most (`--worker-threads`); lowered on throttling, raised back after.
    pub max_concurrency: usize,
    /// Attempts per request, the first included, for 5xx answers and failed connections. A 429
    /// is bounded by `throttle_deadline` instead.
    pub max_attempts: u32,
    /// How long a request may keep being answered 429 before it fails. Each 429 waits its
    /// `Retry-After`; requests competing for a service's rate win in turn, so a long queue slows
    /// the run instead of failing it, and a service that never stops throttling fails the request
    /// after this long. The Databricks SDK's deadline is 300 s.
    pub throttle_deadline: Duration,
    /// Rounds of attempts for a paged read that keeps failing transiently (a 5xx or 429 storm,
    /// dropped connections): after each failed round the read pauses, then asks for the same page
    /// again, so a storm slows a paged read instead of failing it.
    pub read_rounds: u32,
    /// Allow plain `http://` to hosts other than this machine (loopback) and the cloud metadata
    /// endpoint: off by default, as credentials, tokens and people's data would cross the network
    /// in clear text.
    pub allow_insecure_http: bool,
    /// First backoff; doubled per attempt, with full jitter.
    pub base_backoff: Duration,
    /// Longest single wait, `Retry-After` included.
    pub max_backoff: Duration,
    /// Name requests by the service's origin only (`POST https://hooks.slack.com/…`), in logs and
    /// errors: for URLs whose path is itself a credential (a chat webhook).
    pub hide_path: bool,
}

impl HttpConfig {
    /// Defaults for a service.
    pub fn new(service: &str) -> Self {
        HttpConfig {
            service: service.to_owned(),
            ca_bundle: None,
            timeout: Duration::from_secs(60),
            max_concurrency: 10,
            max_attempts: 8,
            throttle_deadline: Duration::from_secs(300),
            read_rounds: 4,
            allow_insecure_http: false,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            hide_path: false,
        }
    }

    /// With at most `workers` requests in flight, trusting `ca_bundle` besides the system's roots.
    pub fn bounded(self, workers: usize, ca_bundle: Option<std::path::PathBuf>) -> Self {
        HttpConfig {
            max_concurrency: workers,
            ca_bundle,
            ..self
        }
    }
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Nothing.
    None,
    /// `Authorization: Bearer ...`.
    Bearer(Secret),
    /// HTTP Basic.
    Basic(String, Secret),
}

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 401: credentials missing or wrong.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 409.
    Conflict,
    /// 410 (an expired delta token, a vanished round).
    Gone,
    /// Other 4xx: the request was refused as invalid.
    Invalid,
    /// 501: the service does not implement this.
    NotImplemented,
    /// Still throttled after every retry.
    Throttled,
    /// 5xx or a network failure, after every retry.
    Unavailable,
    /// An answer that cannot be read (truncated, not JSON, an HTML page).
    Protocol,
}

/// A failed request. Its message names the service, the request, the status, the service's
/// error code and request id; never a credential.
#[derive(Clone, Debug)]
pub struct HttpError {
    /// The category.
    pub kind: ErrorKind,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// The service's error code (`Request_ResourceNotFound`, `syncStateNotFound`, ...).
    pub code: Option<String>,
    /// The service's request id, for its support.
    pub request_id: Option<String>,
    /// The whole message.
    pub message: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// A successful answer.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, or a protocol error that says what came instead.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        service: &str,
        what: &str,
    ) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| self.not_json(service, what, &e))
    }

    /// The error of an answer whose body is not the JSON expected (`e`: why), with the start
    /// of the body.
    pub fn not_json(&self, service: &str, what: &str, e: &serde_json::Error) -> HttpError {
        HttpError {
            kind: ErrorKind::Protocol,
            status: Some(self.status.as_u16()),
            code: None,
            request_id: request_id(&self.headers),
            message: format!(
                "{service}: the answer to {what} is not the JSON expected ({e}); it began with {:?}",
                preview(&self.body)
            ),
        }
    }
}

/// The concurrency limit shared by all requests to one service: halved on a 429, raised by one
/// after `limit` successes in a row; and a shared "not before" instant from `Retry-After`.
#[derive(Debug)]
struct Limiter {
    sem: Semaphore,
    state: Mutex<LimitState>,
    max: usize,
}

#[derive(Debug)]
struct LimitState {
    limit: usize,
    /// Permits to swallow as they come back (the limit shrank below what is in flight).
    debt: usize,
    streak: usize,
    not_before: Option<Instant>,
}

impl Limiter {
    fn new(max: usize) -> Self {
        let max = max.max(1);
        Limiter {
            sem: Semaphore::new(max),
            state: Mutex::new(LimitState {
                limit: max,
                debt: 0,
                streak: 0,
                not_before: None,
            }),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn throttled(&self, wait: Duration) {
        let mut s = self.lock();
        let until = Instant::now() + wait;
        s.not_before = Some(s.not_before.map_or(until, |n| n.max(until)));
        s.streak = 0;
        let target = (s.limit / 2).max(1);
        s.debt += s.limit - target;
        s.limit = target;
    }

    fn succeeded(&self) {
        let mut s = self.lock();
        s.streak += 1;
        if s.streak >= s.limit && s.limit < self.max {
            s.streak = 0;
            s.limit += 1;
            if s.debt > 0 {
                s.debt -= 1;
            } else {
                self.sem.add_permits(1);
            }
        }
    }

    /// Returns a permit, unless the limit shrank and it must be swallowed.
    fn give_back(&self, permit: tokio::sync::SemaphorePermit<'_>) {
        let mut s = self.lock();
        if s.debt > 0 {
            s.debt -= 1;
            permit.forget();
        }
    }

    fn current(&self) -> usize {
        self.lock().limit
    }

    fn not_before(&self) -> Option<Instant> {
        self.lock().not_before.filter(|t| *t > Instant::now())
    }
}

/// An HTTP client for one service.
#[derive(Debug)]
pub struct Http {
    /// The client of the requests to come: replaced by a fresh one (an empty pool) when the
    /// idle connections are closed ([`Http::close_idle`]).
    client: Mutex<reqwest::Client>,
    /// The CA bundle's certificates, to build a fresh client with.
    roots: Vec<reqwest::Certificate>,
    cfg: HttpConfig,
    limiter: Limiter,
    rng: Mutex<u64>,
    /// Requests sent (every attempt, retries included): reads (GET, HEAD) and writes.
    sent_reads: std::sync::atomic::AtomicU64,
    sent_writes: std::sync::atomic::AtomicU64,
}

impl Http {
    /// Runs a page read again when it failed transiently after the client's own retries, after a
    /// pause (a quarter of `max_backoff`), up to `read_rounds` rounds: a storm slows a paged read
    /// instead of failing it, and the caller, which keeps the pages already read, asks again for
    /// the page that failed.
    pub async fn persist<T, E, Fut>(
        &self,
        transient: impl Fn(&E) -> bool,
        mut read: impl FnMut() -> Fut,
    ) -> Result<T, E>
    where
        E: fmt::Display,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut round = 1;
        loop {
            match read().await {
                Err(e) if round < self.cfg.read_rounds && transient(&e) => {
                    let pause = (self.cfg.max_backoff / 4).max(self.cfg.base_backoff);
                    tracing::warn!(
                        service = %self.cfg.service,
                        error = %e,
                        round,
                        pause_ms = pause.as_millis() as u64,
                        "a page kept failing; pausing, then reading it again"
                    );
                    tokio::time::sleep(pause).await;
                    round += 1;
                }
                other => return other,
            }
        }
    }
}

/// Whether a request may go to `url` without TLS: `https://`, or plain `http://` to this machine
/// (loopback) or to the link-local cloud metadata endpoint (managed identity, which sends no
/// credential).
pub fn safe_to_send(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => true,
        "http" => {
            let host = u.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_link_local())
                || host
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// Whether an HTTP error may pass on its own (worth another round of a read).
pub fn transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unavailable | ErrorKind::Throttled | ErrorKind::Protocol
    )
}

fn request_id(h: &HeaderMap) -> Option<String> {
    [
        "request-id",
        "x-ms-request-id",
        "x-request-id",
        "x-databricks-request-id",
        "x-amz-request-id",
    ]
    .iter()
    .find_map(|n| h.get(*n).and_then(|v| v.to_str().ok()).map(str::to_owned))
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The service's error code and message, from the error body shapes idsync meets: Graph
/// (`{"error": {"code", "message"}}`), OAuth (`{"error", "error_description"}`), SCIM (`{"detail",
/// "scimType"}`), lakeFS (`{"message"}`), Databricks (`{"error_code", "message"}`).
fn service_error(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body);
        if text.trim_start().starts_with('<') {
            return (
                None,
                Some(
                    "an HTML page instead of the API's answer (a proxy or gateway in the way?)"
                        .into(),
                ),
            );
        }
        return (None, (!text.trim().is_empty()).then(|| preview(body)));
    };
    let s = |x: &serde_json::Value| x.as_str().map(str::to_owned);
    // Kanidm: an `OperationError` as a JSON string (`"invalidsyncstate"`), or a one-key object
    // down to a string (`{"plugin":{"attrunique":"duplicate value detected"}}`).
    if let Some(code) = v.as_str() {
        return (Some(code.to_owned()), None);
    }
    if let Some(attrs) = v.get("conflicting_attributes").and_then(|a| a.as_array()) {
        let attrs: Vec<String> = attrs.iter().filter_map(&s).collect();
        return (
            Some("attributeuniqueness".into()),
            Some(format!(
                "{} (conflicting attributes: {})",
                s(&v["error"]).unwrap_or_default(),
                attrs.join(", ")
            )),
        );
    }
    if let Some(obj) = v.as_object().filter(|o| o.len() == 1) {
        let mut path = Vec::new();
        let mut cur = &v;
        let mut o = Some(obj);
        while let Some((k, next)) = o.filter(|m| m.len() == 1).and_then(|m| m.iter().next()) {
            path.push(k.clone());
            cur = next;
            o = cur.as_object();
        }
        if let Some(text) = cur.as_str()
            && !matches!(
                path.first().map(String::as_str),
                Some("error" | "message" | "detail")
            )
        {
            return (Some(path.join("/")), Some(text.to_owned()));
        }
    }
    if let Some(e) = v.get("error").filter(|e| e.is_object()) {
        return (s(&e["code"]), s(&e["message"]));
    }
    if let Some(code) = s(&v["error"]) {
        return (Some(code), s(&v["error_description"]));
    }
    if v.get("detail").is_some() {
        return (s(&v["scimType"]), s(&v["detail"]));
    }
    (s(&v["error_code"]), s(&v["message"]))
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl Http {
    /// A client for a service. Fails only on an unreadable CA bundle.
    pub fn new(cfg: HttpConfig) -> Result<Http, HttpError> {
        // One crypto provider for the process (ring); installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = Vec::new();
        if let Some(path) = &cfg.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| HttpError {
                kind: ErrorKind::Invalid,
                status: None,
                code: None,
                request_id: None,
                message: format!("cannot read the CA bundle {}: {e}", path.display()),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| HttpError {
                kind: ErrorKind::Invalid,
                status: None,
                code: None,
                request_id: None,
                message: format!(
                    "the CA bundle {} is not PEM certificates: {e}",
                    path.display()
                ),
            })?;
            if certs.is_empty() {
                return Err(HttpError {
                    kind: ErrorKind::Invalid,
                    status: None,
                    code: None,
                    request_id: None,
                    message: format!("the CA bundle {} holds no PEM certificate", path.display()),
                });
            }
            roots = certs;
        }
        let client = Http::client_for(&cfg, &roots).map_err(|e| HttpError {
            kind: ErrorKind::Invalid,
            status: None,
            code: None,
            request_id: None,
            message: format!("cannot set up HTTPS for {}: {e}", cfg.service),
        })?;
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        Ok(Http {
            client: Mutex::new(client),
            roots,
            limiter: Limiter::new(cfg.max_concurrency),
            cfg,
            rng: Mutex::new(seed | 1),
            sent_reads: Default::default(),
            sent_writes: Default::default(),
        })
    }

    fn client_for(
        cfg: &HttpConfig,
        roots: &[reqwest::Certificate],
    ) -> Result<reqwest::Client, reqwest::Error> {
        let mut b = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .user_agent(concat!("idsync/", env!("CARGO_PKG_VERSION")));
        for c in roots {
            b = b.add_root_certificate(c.clone());
        }
        b.build()
    }

    fn client(&self) -> reqwest::Client {
        self.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Closes the connections kept open for the requests to come, once a burst of them is over:
    /// each keeps a read buffer grown to the largest answer it carried (after a full Graph read of
    /// 100k users, 13.5 MB of them, kept through the plan and the apply). Requests under way keep
    /// theirs; the next request opens a new connection.
    pub fn close_idle(&self) {
        match Http::client_for(&self.cfg, &self.roots) {
            Ok(fresh) => {
                *self
                    .client
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            }
            // Built once already with the same settings; should it fail now, the old pool stays.
            Err(e) => {
                tracing::debug!(service = %self.cfg.service, error = %e, "connections kept open")
            }
        }
    }

    /// The requests sent so far (every attempt, retries included).
    pub fn sent(&self) -> idsync_engine::Requests {
        use std::sync::atomic::Ordering::Relaxed;
        idsync_engine::Requests {
            reads: self.sent_reads.load(Relaxed),
            writes: self.sent_writes.load(Relaxed),
        }
    }

    /// The current concurrency limit (lowered by throttling).
    pub fn concurrency(&self) -> usize {
        self.limiter.current()
    }

    fn jitter(&self, attempt: u32) -> Duration {
        let cap = self
            .cfg
            .base_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.cfg.max_backoff);
        let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *r ^= *r << 13;
        *r ^= *r >> 7;
        *r ^= *r << 17;
        cap.mul_f64((*r % 1000) as f64 / 1000.0)
    }

    /// Sends a request and returns a 2xx answer, retrying what may be retried: 429 (after
    /// `Retry-After`), 5xx, and failures to connect or to read the whole answer. A non-idempotent
    /// request (`idempotent = false`, e.g. a create) is retried only when it surely did not reach
    /// the service (connect errors) or the service said to (429).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        auth: &Auth,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
        idempotent: bool,
    ) -> Result<Answer, HttpError> {
        let what = if self.cfg.hide_path {
            let origin = reqwest::Url::parse(url)
                .map(|u| u.origin().ascii_serialization())
                .unwrap_or_else(|_| "(an unreadable URL)".into());
            format!("{method} {origin}/…")
        } else {
            format!("{method} {}", url.split('?').next().unwrap_or(url))
        };
        if !self.cfg.allow_insecure_http && !safe_to_send(url) {
            return Err(self.fail(
                ErrorKind::Invalid,
                None,
                &what,
                "refusing plain http:// to a host outside this machine: credentials and people's data would cross the network in clear text. Use https://, or set allow_insecure_http = true for this connector".into(),
                None,
                None,
            ));
        }
        let first = Instant::now();
        // Requests sent (for the log and the backoff), and of them the failures other than 429
        // (counted against `max_attempts`).
        let mut attempt = 0u32;
        let mut failures = 0u32;
        loop {
            attempt += 1;
            let permit = loop {
                if let Some(t) = self.limiter.not_before() {
                    tokio::time::sleep_until(t.into()).await;
                }
                let permit = self.limiter.sem.acquire().await.map_err(|_| {
                    self.fail(
                        ErrorKind::Unavailable,
                        None,
                        &what,
                        "the client is shutting down".into(),
                        None,
                        None,
                    )
                })?;
                // Another request may have been throttled while this one waited for a slot: wait
                // too, rather than spend an attempt on a 429.
                if self.limiter.not_before().is_none() {
                    break permit;
                }
                self.limiter.give_back(permit);
            };
            let mut req = self.client().request(method.clone(), url);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(*k), HeaderValue::try_from(*v)) {
                    req = req.header(k, v);
                }
            }
            req = match auth {
                Auth::None => req,
                Auth::Bearer(t) => req.bearer_auth(t.expose()),
                Auth::Basic(u, p) => req.basic_auth(u, Some(p.expose())),
            };
            if let Some((ctype, bytes)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, *ctype)
                    .body(bytes.clone());
            }
            let started = std::time::Instant::now();
            let counter = if method == Method::GET || method == Method::HEAD {
                &self.sent_reads
            } else {
                &self.sent_writes
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let result = req.send().await;
            let outcome = match result {
                Err(e) => {
                    let sent = !(e.is_connect() || e.is_builder());
                    Err((ErrorKind::Unavailable, None, transport_message(e), sent))
                }
                Ok(resp) => {
                    let status = resp.status();
                    let h = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(body) => Ok((status, h, body)),
                        Err(e) => Err((
                            ErrorKind::Protocol,
                            Some(status),
                            format!("the answer was cut off ({})", transport_message(e)),
                            true,
                        )),
                    }
                }
            };
            self.limiter.give_back(permit);
            ledger::request(
                &self.cfg.service,
                method.as_str(),
                match &outcome {
                    Ok((status, _, _)) | Err((_, Some(status), _, _)) => Some(status.as_u16()),
                    Err(_) => None,
                },
            );
            // One line per request for `--debug`: the path without its query (which can hold delta
            // and skip tokens), never a header or a body.
            match &outcome {
                Ok((status, _, body)) => tracing::debug!(
                    service = %self.cfg.service,
                    request = %what,
                    attempt,
                    status = status.as_u16(),
                    bytes = body.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "request"
                ),
                Err((kind, _, message, _)) => tracing::debug!(
                    service = %self.cfg.service,
                    request = %what,
                    attempt,
                    error = ?kind,
                    detail = %message,
                    ms = started.elapsed().as_millis() as u64,
                    "request failed"
                ),
            }
            let last = failures + 1 >= self.cfg.max_attempts;
            match outcome {
                Ok((status, h, body)) if status.is_success() => {
                    self.limiter.succeeded();
                    return Ok(Answer {
                        status,
                        headers: h,
                        body,
                    });
                }
                Ok((status, h, body)) if status == StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(&h)
                        .unwrap_or_else(|| self.jitter(attempt))
                        .min(self.cfg.max_backoff);
                    self.limiter.throttled(wait);
                    ledger::throttled(&self.cfg.service);
                    ledger::waited(&self.cfg.service, wait);
                    tracing::info!(service = %self.cfg.service, request = %what, wait_ms = wait.as_millis() as u64, "throttled");
                    let waited = first.elapsed();
                    if waited + wait > self.cfg.throttle_deadline {
                        let (code, msg) = service_error(&body);
                        let mut detail = msg.unwrap_or_default();
                        if !detail.is_empty() {
                            detail.push_str("; ");
                        }
                        detail.push_str(&format!(
                            "still throttled after {attempt} attempts in {} s",
                            waited.as_secs()
                        ));
                        return Err(self.fail(
                            ErrorKind::Throttled,
                            Some(status),
                            &what,
                            detail,
                            code,
                            request_id(&h),
                        ));
                    }
                }
                Ok((status, h, body))
                    if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED =>
                {
                    let (code, msg) = service_error(&body);
                    if last || !idempotent {
                        return Err(self.fail(
                            ErrorKind::Unavailable,
                            Some(status),
                            &what,
                            msg.unwrap_or_default(),
                            code,
                            request_id(&h),
                        ));
                    }
                    let wait = retry_after(&h)
                        .unwrap_or_else(|| self.jitter(attempt))
                        .min(self.cfg.max_backoff);
                    tracing::info!(service = %self.cfg.service, request = %what, status = status.as_u16(), "server error; retrying");
                    failures += 1;
                    ledger::waited(&self.cfg.service, wait);
                    tokio::time::sleep(wait).await;
                }
                Ok((status, h, body)) => {
                    let (code, msg) = service_error(&body);
                    let kind = match status.as_u16() {
                        401 => ErrorKind::Unauthorized,
                        403 => ErrorKind::Forbidden,
                        404 => ErrorKind::NotFound,
                        409 => ErrorKind::Conflict,
                        410 => ErrorKind::Gone,
                        501 => ErrorKind::NotImplemented,
                        _ => ErrorKind::Invalid,
                    };
                    return Err(self.fail(
                        kind,
                        Some(status),
                        &what,
                        msg.unwrap_or_default(),
                        code,
                        request_id(&h),
                    ));
                }
                Err((kind, status, msg, sent)) => {
                    if last || (sent && !idempotent) {
                        return Err(self.fail(kind, status, &what, msg, None, None));
                    }
                    tracing::info!(service = %self.cfg.service, request = %what, error = %msg, "retrying");
                    failures += 1;
                    let wait = self.jitter(attempt);
                    ledger::waited(&self.cfg.service, wait);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn fail(
        &self,
        kind: ErrorKind,
        status: Option<StatusCode>,
        what: &str,
        detail: String,
        code: Option<String>,
        rid: Option<String>,
    ) -> HttpError {
        let mut m = format!("{}: {what}", self.cfg.service);
        if let Some(s) = status {
            m.push_str(&format!(" answered {}", s.as_u16()));
        } else {
            m.push_str(" failed");
        }
        if let Some(c) = &code {
            m.push_str(&format!(" {c}"));
        }
        if !detail.is_empty() {
            m.push_str(&format!(": {detail}"));
        }
        if let Some(r) = &rid {
            m.push_str(&format!(" (request-id {r})"));
        }
        let hint = match kind {
            ErrorKind::Unauthorized => {
                " Check the credentials (and that they are for this tenant or account)."
            }
            ErrorKind::Throttled => {
                " The service kept throttling; lower --worker-threads or run later."
            }
            ErrorKind::Unavailable => {
                " The service or the network failed repeatedly; the next run retries what is left."
            }
            _ => "",
        };
        m.push_str(hint);
        HttpError {
            kind,
            status: status.map(|s| s.as_u16()),
            code,
            request_id: rid,
            message: m,
        }
    }
}

/// An access token from an OAuth token endpoint (a client-credentials form post), cached until
/// `margin` before it expires. The Entra source and the Databricks target share it.
#[derive(Debug, Default)]
pub struct TokenCache {
    cached: tokio::sync::Mutex<Option<(Secret, Instant)>>,
}

impl TokenCache {
    /// The cached token, or a fresh one from `url`. The token endpoint's `expires_in` may be a
    /// number (v2, OAuth) or a string (Entra's v1 endpoint).
    pub async fn get(
        &self,
        http: &Http,
        url: &str,
        auth: &Auth,
        form: String,
        service: &str,
        margin: Duration,
    ) -> Result<Secret, HttpError> {
        let mut cached = self.cached.lock().await;
        if let Some((t, exp)) = cached.as_ref()
            && *exp > Instant::now() + margin
        {
            return Ok(t.clone());
        }
        let body = Some(("application/x-www-form-urlencoded", form.into_bytes()));
        let a = http.send(Method::POST, url, auth, &[], body, true).await?;
        let v: serde_json::Value = a.json(service, "the token request")?;
        let Some(token) = v.get("access_token").and_then(|t| t.as_str()) else {
            return Err(HttpError {
                kind: ErrorKind::Protocol,
                status: Some(a.status.as_u16()),
                code: None,
                request_id: request_id(&a.headers),
                message: format!("{service} answered the token request without an access_token"),
            });
        };
        let ttl = v
            .get("expires_in")
            .and_then(|x| {
                x.as_u64()
                    .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(3599);
        let secret = Secret::new(token);
        *cached = Some((secret.clone(), Instant::now() + Duration::from_secs(ttl)));
        Ok(secret)
    }
}

/// Percent-encodes `s` for a URL path segment, a query value or a form field: everything but the
/// unreserved characters (RFC 3986) and those in `keep` is escaped, byte by byte (UTF-8).
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || keep.contains(&b)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A transport error's message without the URL (which may hold a token in its query).
fn transport_message(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut m = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_goes_only_to_this_machine_and_the_metadata_endpoint() {
        use super::safe_to_send;
        for ok in [
            "https://graph.microsoft.com/v1.0/users",
            "http://127.0.0.1:8080/api",
            "http://127.1.2.3/x",
            "http://localhost:4000/",
            "http://[::1]:80/",
            "http://169.254.169.254/metadata/identity/oauth2/token",
        ] {
            assert!(safe_to_send(ok), "{ok}");
        }
        for refused in [
            "http://lakefs.corp.example/api/v1",
            "http://10.0.0.5/scim",
            "http://192.168.1.1/",
            "http://[2001:db8::1]/",
            "http://localhost.evil.example/",
            "ftp://127.0.0.1/",
            "not a url",
        ] {
            assert!(!safe_to_send(refused), "{refused}");
        }
    }

    use super::*;

    #[test]
    fn error_bodies_of_every_service_are_read() {
        let g = br#"{"error":{"code":"Request_ResourceNotFound","message":"gone"}}"#;
        assert_eq!(
            service_error(g),
            (Some("Request_ResourceNotFound".into()), Some("gone".into()))
        );
        let o = br#"{"error":"invalid_client","error_description":"AADSTS7000215: bad"}"#;
        assert_eq!(service_error(o).0.as_deref(), Some("invalid_client"));
        let scim = br#"{"detail":"exists","scimType":"uniqueness","status":"409"}"#;
        assert_eq!(
            service_error(scim),
            (Some("uniqueness".into()), Some("exists".into()))
        );
        assert_eq!(
            service_error(br#"{"message":"user not found"}"#)
                .1
                .as_deref(),
            Some("user not found")
        );
        assert!(
            service_error(b"<html><body>502</body></html>")
                .1
                .unwrap()
                .contains("HTML page")
        );
    }

    #[test]
    fn the_limit_halves_on_throttling_and_grows_back() {
        let l = Limiter::new(8);
        l.throttled(Duration::from_millis(1));
        assert_eq!(l.current(), 4);
        l.throttled(Duration::from_millis(1));
        l.throttled(Duration::from_millis(1));
        l.throttled(Duration::from_millis(1));
        assert_eq!(l.current(), 1, "never below one");
        for _ in 0..1 {
            l.succeeded();
        }
        assert_eq!(l.current(), 2);
    }
}
