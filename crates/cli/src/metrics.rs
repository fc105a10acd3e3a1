//! `idsync run --listen ADDR`: metrics in the Prometheus text format at `/metrics` (with
//! `prometheus-client`), `/healthz` (the process answers) and `/readyz` (the configuration is
//! valid and the state store answered). Off by default; meant for a loopback or cluster-internal
//! address: it shows agreement names, counts and services, never a principal or a secret.

use crate::run::exit;
use idsync_connectors::http::ledger::{self, Ledger};
use idsync_runner::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabel {
    agreement: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    agreement: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    agreement: String,
    op: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    agreement: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.25, 2.0, 14))
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    last_success: Family<AgreementLabel, Gauge<f64, AtomicU64>>,
    duration: Family<AgreementLabel, Histogram, fn() -> Histogram>,
    operations: Family<OpLabels, Counter>,
    owned: Family<KindLabels, Gauge>,
    trusted: Family<AgreementLabel, Gauge>,
    requests: Family<RequestLabels, Counter>,
    throttled: Family<ServiceLabel, Counter>,
    retry_wait: Family<ServiceLabel, Counter<f64, AtomicU64>>,
    cycles: Counter,
    /// The ledger as last copied into the counters.
    seen: Mutex<Ledger>,
    /// The configuration is valid and the state store answered.
    pub ready: AtomicBool,
    /// What the status page shows besides the state.
    pub board: crate::status::Board,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

/// The outcome label of an agreement's exit code.
fn outcome(code: u8) -> &'static str {
    match code {
        exit::OK => "success",
        exit::PENDING => "pending",
        exit::HALTED => "halted",
        exit::BUSY => "busy",
        _ => "failure",
    }
}

impl Metrics {
    /// Every series, registered and empty.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("idsync");
        let m = Metrics {
            runs: Family::default(),
            last_success: Family::default(),
            duration: Family::new_with_constructor(buckets as fn() -> Histogram),
            operations: Family::default(),
            owned: Family::default(),
            trusted: Family::default(),
            requests: Family::default(),
            throttled: Family::default(),
            retry_wait: Family::default(),
            cycles: Counter::default(),
            seen: Mutex::new(Ledger::default()),
            ready: AtomicBool::new(false),
            board: crate::status::Board::new(),
            registry: Registry::default(),
        };
        registry.register(
            "runs",
            "Agreement runs, by outcome (success, pending, halted, busy, failure)",
            m.runs.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "When each agreement last ran successfully (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "How long each agreement's run took",
            m.duration.clone(),
        );
        registry.register(
            "operations",
            "Operations an apply attempted, by operation and result (applied, failed, unknown, skipped)",
            m.operations.clone(),
        );
        registry.register(
            "principals_owned",
            "Principals idsync owns in each target, by kind",
            m.owned.clone(),
        );
        registry.register(
            "picture_trusted",
            "1 when the state trusts its picture of the target (incremental runs may read only what changed)",
            m.trusted.clone(),
        );
        registry.register(
            "http_requests",
            "Requests sent, by service, method and status (error: no answer)",
            m.requests.clone(),
        );
        registry.register(
            "http_throttled",
            "Requests answered 429, by service",
            m.throttled.clone(),
        );
        registry.register(
            "http_retry_wait_seconds",
            "Time waited before retries (Retry-After and backoff), by service",
            m.retry_wait.clone(),
        );
        registry.register("cycles", "Cycles of `idsync run` started", m.cycles.clone());
        Arc::new(Metrics { registry, ..m })
    }

    /// A cycle starts.
    pub fn cycle(&self) {
        self.cycles.inc();
    }

    /// One agreement's run ended.
    pub fn agreement(
        &self,
        name: &str,
        result: &anyhow::Result<Outcome>,
        took: Duration,
        code_of_error: u8,
    ) {
        let a = AgreementLabel {
            agreement: name.to_owned(),
        };
        let code = match result {
            Ok(o) => o.code,
            Err(_) => code_of_error,
        };
        let report = result.as_ref().ok().and_then(|o| o.report.as_ref());
        self.board.record(
            name,
            crate::status::LastRun {
                at: idsync_runner::unix_now(),
                outcome: outcome(code),
                code,
                took,
                applied: report.map_or(0, |r| r.applied),
                failed: report.map_or(0, |r| r.failed.len()),
                error: result.as_ref().err().map(|e| format!("{e:#}")),
            },
        );
        self.runs
            .get_or_create(&RunLabels {
                agreement: name.to_owned(),
                outcome: outcome(code).to_owned(),
            })
            .inc();
        self.duration.get_or_create(&a).observe(took.as_secs_f64());
        if code == exit::OK {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_success.get_or_create(&a).set(now);
        }
        let Ok(Outcome {
            file: Some(file),
            report: Some(report),
            ..
        }) = result
        else {
            return;
        };
        let empty = idsync_model::AgreementState::new(name);
        let applied = idsync_runner::changes::Applied {
            agreement: name,
            run: "",
            now: 0,
            plan: &file.plan,
            report,
            state: &empty,
        };
        applied.each_record(|c| {
            self.operations
                .get_or_create(&OpLabels {
                    agreement: name.to_owned(),
                    op: c.op,
                    result: c.result,
                })
                .inc();
        });
        for (kind, n) in idsync_model::Kind::ALL.iter().zip(report.owned_after) {
            self.owned
                .get_or_create(&KindLabels {
                    agreement: name.to_owned(),
                    kind: kind.as_str().to_owned(),
                })
                .set(n as i64);
        }
        self.trusted
            .get_or_create(&a)
            .set(i64::from(report.trusted_after));
    }

    /// Copies what the HTTP ledger counted since the last call into the counters.
    fn sync_ledger(&self) {
        let now = ledger::snapshot();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for ((service, method, status), n) in &now.requests {
            let before = seen
                .requests
                .get(&(service.clone(), method.clone(), status.clone()))
                .copied()
                .unwrap_or(0);
            self.requests
                .get_or_create(&RequestLabels {
                    service: service.clone(),
                    method: method.clone(),
                    status: status.clone(),
                })
                .inc_by(n - before);
        }
        for (service, n) in &now.throttled {
            let before = seen.throttled.get(service).copied().unwrap_or(0);
            self.throttled
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .inc_by(n - before);
        }
        for (service, s) in &now.retry_wait_seconds {
            let before = seen.retry_wait_seconds.get(service).copied().unwrap_or(0.0);
            self.retry_wait
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .inc_by((s - before).max(0.0));
        }
        *seen = now;
    }

    /// The exposition, in the Prometheus / OpenMetrics text format.
    pub fn encode(&self) -> String {
        self.sync_ledger();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers and tools
/// that do not ask for OpenMetrics (`promtool check metrics`, older Prometheus): a counter's
/// `HELP` and `TYPE` name its `_total` series, and there is no `# EOF`.
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves the status page (`/`), `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// process ends.
pub fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let m = metrics.clone();
    let r = metrics.clone();
    let p = metrics;
    let app = axum::Router::new()
        .route(
            "/",
            get(move || {
                let p = p.clone();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            (header::CACHE_CONTROL, "no-store"),
                            (
                                header::CONTENT_SECURITY_POLICY,
                                "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
                            ),
                        ],
                        p.board.page().await,
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = m.clone();
                async move {
                    // OpenMetrics for a scraper that asks for it (Prometheus does), else the
                    // classic text format.
                    let open = headers
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|a| a.contains("application/openmetrics-text"));
                    let text = m.encode();
                    if open {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                    } else {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            classic(&text),
                        )
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.ready.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the configuration or the state store is not usable yet\n",
                        )
                            .into_response()
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("error: the metrics listener stopped: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_total_series() {
        let open = "# HELP idsync_runs Runs.\n# TYPE idsync_runs counter\nidsync_runs_total{agreement=\"a\"} 2\n# HELP idsync_trusted T.\n# TYPE idsync_trusted gauge\nidsync_trusted 1\n# EOF\n";
        assert_eq!(
            classic(open),
            "# HELP idsync_runs_total Runs.\n# TYPE idsync_runs_total counter\nidsync_runs_total{agreement=\"a\"} 2\n# HELP idsync_trusted T.\n# TYPE idsync_trusted gauge\nidsync_trusted 1\n"
        );
    }

    #[test]
    fn a_new_service_is_not_ready_and_shows_series_once_they_exist() {
        let m = Metrics::new();
        assert!(!m.ready.load(Ordering::SeqCst));
        let text = m.encode();
        assert!(text.contains("idsync_cycles_total 0\n"), "{text}");
        // A family shows once it has a series (no agreement has run yet).
        assert!(!text.contains("idsync_runs_total"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        m.cycle();
        assert!(m.encode().contains("idsync_cycles_total 1\n"));
    }
}
