//! Notifications (`[notify]`): a short JSON summary posted to a chat webhook when an agreement's
//! run fails or halts, and, with `on = "change"`, when a run changed a target.
//!
//! - The URL is a credential (a Slack or Teams webhook's path is its token): it comes from
//!   `IDSYNC_WEBHOOK_URL` (or `[notify] webhook_url`), is held as a [`Secret`], and requests are
//!   named by the service's origin only in logs and errors.
//! - Posting never holds a run up: each summary is sent by its own task while the next agreement
//!   runs, and sent again after a 429 (its `Retry-After`) or a failed connection; not after a 5xx
//!   or a timeout, when the message may have been posted already. When the command
//!   ends it waits at most `timeout` for what is still being sent, then says what was not
//!   delivered.
//! - Shapes (`format`), see `docs/apis/webhooks.md`: `slack` is `{"text": ...}`, which Slack's
//!   incoming webhooks and Teams' Office 365 connector webhooks accept; `teams` is an Adaptive Card
//!   in a `message` envelope, which Teams Workflows webhooks require; `json` is the summary's own
//!   fields, for a receiver of one's own.

use idsync_connectors::http::{Auth, Http, HttpConfig};
use idsync_model::Secret;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// When a summary is posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// A run failed or halted.
    Failure,
    /// That, and a run that applied or failed any operation.
    Change,
}

/// The payload's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"text": "..."}` (Slack; Teams connector webhooks).
    Slack,
    /// An Adaptive Card in a `message` envelope (Teams Workflows).
    Teams,
    /// The summary's fields.
    Json,
}

/// `[notify]`, validated.
#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// The webhook.
    pub url: Secret,
    /// When to post.
    pub on: On,
    /// The payload's shape.
    pub format: Format,
    /// Per request, and for what is still being sent when the command ends.
    pub timeout: Duration,
    /// Extra trusted roots (a private CA in front of the receiver).
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Plain `http://` to a host off this machine.
    pub allow_insecure_http: bool,
}

/// What happened to one agreement's run, as posted.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// `failed`, `halted` or `changed`.
    pub outcome: &'static str,
    /// The agreement (`[targets.NAME]`), or empty for a run that could not start.
    pub agreement: String,
    /// The exit code the agreement asks for.
    pub exit_code: u8,
    /// The host the run ran on.
    pub host: String,
    /// When (UTC, RFC 3339).
    pub time: String,
    /// The error or halt message (no secret reaches either).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Operations applied.
    pub applied: usize,
    /// Operations that failed.
    pub failed: usize,
    /// Up to ten operations, `op principal: result` (failures first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    /// How many operations are not listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub more: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The longest message posted (a chat message is not a log file).
const MAX_MESSAGE: usize = 1500;

impl Summary {
    /// The summary of `result`, or `None` when `on` does not ask for one.
    pub fn of(
        agreement: &str,
        result: &anyhow::Result<idsync_runner::Outcome>,
        error_code: u8,
        on: On,
    ) -> Option<Summary> {
        use crate::run::exit;
        let mut s = Summary {
            outcome: "failed",
            agreement: agreement.to_owned(),
            exit_code: error_code,
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            time: now(),
            message: None,
            applied: 0,
            failed: 0,
            operations: Vec::new(),
            more: 0,
        };
        let o = match result {
            // Another run holds the lease: that run reports on itself.
            Err(_) if error_code == exit::BUSY => return None,
            Err(e) => {
                s.message = Some(shorten(&format!("{e:#}")));
                return Some(s);
            }
            Ok(o) => o,
        };
        s.exit_code = o.code;
        if let Some(r) = &o.report {
            s.applied = r.applied;
            s.failed = r.failed.len();
            if let Some(file) = &o.file {
                let empty = idsync_model::AgreementState::new(agreement);
                // The first ten lines, those that did not apply first; a first sync has a
                // million records, counted and dropped one by one.
                let (mut failed, mut applied, mut total) = (Vec::new(), Vec::new(), 0_usize);
                let apply = idsync_runner::changes::Applied {
                    agreement,
                    run: "",
                    now: 0,
                    plan: &file.plan,
                    report: r,
                    state: &empty,
                };
                apply.each_record(|c| {
                    total += 1;
                    let ok = c.result == "applied";
                    let keep = if ok { &mut applied } else { &mut failed };
                    if keep.len() < 10 {
                        let error = c.error.map(|e| format!(" ({e})")).unwrap_or_default();
                        keep.push(format!("{} {}: {}{error}", c.op, c.principal, c.result));
                    }
                });
                s.more = total.saturating_sub(10);
                s.operations = failed
                    .into_iter()
                    .chain(applied)
                    .take(10)
                    .map(|l| shorten(&l))
                    .collect();
            }
        }
        let halt = o.file.as_ref().and_then(|f| f.plan.halt.as_ref());
        match o.code {
            exit::HALTED => {
                s.outcome = "halted";
                s.message = Some(shorten(&match halt {
                    Some(h) => h.message.clone(),
                    None => "the run halted: `idsync state show` says why".into(),
                }));
            }
            exit::ERROR if o.report.is_none() => {
                s.message = Some("the run stopped before it applied anything".into());
            }
            exit::ERROR => {
                s.message = Some(format!(
                    "{} operation(s) failed; the next run tries them again",
                    s.failed
                ));
            }
            _ if on == On::Change && (s.applied > 0 || s.failed > 0) => s.outcome = "changed",
            _ => return None,
        }
        Some(s)
    }

    /// A run that failed before any agreement started (the configuration, the state store).
    pub fn not_started(e: &anyhow::Error, code: u8) -> Summary {
        Summary {
            outcome: "failed",
            agreement: String::new(),
            exit_code: code,
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            time: now(),
            message: Some(shorten(&format!("{e:#}"))),
            applied: 0,
            failed: 0,
            operations: Vec::new(),
            more: 0,
        }
    }

    /// One line for people: what, where, and the counts.
    fn headline(&self) -> String {
        let what = if self.agreement.is_empty() {
            "the run".to_owned()
        } else {
            format!("target {}", self.agreement)
        };
        match self.outcome {
            "changed" => format!(
                "idsync: {what} changed on {}: {} applied, {} failed",
                self.host, self.applied, self.failed
            ),
            outcome => format!(
                "idsync: {what} {outcome} on {} (exit code {})",
                self.host, self.exit_code
            ),
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut l = Vec::new();
        if let Some(m) = &self.message {
            l.push(m.clone());
        }
        l.extend(self.operations.iter().map(|o| format!("• {o}")));
        if self.more > 0 {
            l.push(format!(
                "… and {} more: `idsync log {}`",
                self.more, self.agreement
            ));
        }
        l
    }

    /// The payload, in `format`.
    pub fn payload(&self, format: Format) -> serde_json::Value {
        match format {
            Format::Json => serde_json::to_value(self).unwrap_or_default(),
            Format::Slack => {
                // Names and errors come from the directory: escaped as Slack asks (&, <, >), so
                // a group named `<!channel>` pings nobody and no link is hidden.
                let mut text = format!("*{}*", slack_escape(&self.headline()));
                for l in self.lines() {
                    text.push('\n');
                    text.push_str(&slack_escape(&l));
                }
                serde_json::json!({ "text": text })
            }
            Format::Teams => {
                let mut body = vec![serde_json::json!({
                    "type": "TextBlock", "text": self.headline(), "weight": "Bolder",
                    "size": "Medium", "wrap": true,
                    "color": if self.outcome == "changed" { "Default" } else { "Attention" },
                })];
                body.extend(
                    self.lines().into_iter().map(
                        |l| serde_json::json!({ "type": "TextBlock", "text": l, "wrap": true }),
                    ),
                );
                body.push(serde_json::json!({
                    "type": "FactSet",
                    "facts": [
                        { "title": "Agreement", "value": self.agreement },
                        { "title": "Time", "value": self.time },
                        { "title": "Applied", "value": self.applied.to_string() },
                        { "title": "Failed", "value": self.failed.to_string() },
                    ],
                }));
                serde_json::json!({
                    "type": "message",
                    "attachments": [{
                        "contentType": "application/vnd.microsoft.card.adaptive",
                        "contentUrl": null,
                        "content": {
                            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                            "type": "AdaptiveCard",
                            "version": "1.4",
                            "body": body,
                        },
                    }],
                })
            }
        }
    }
}

/// Slack's escaping of `&`, `<` and `>` in message text
/// (<https://docs.slack.dev/messaging/formatting-message-text/#escaping>).
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn now() -> String {
    let secs = idsync_runner::unix_now();
    let (y, m, d, hh, mm, ss, _) = idsync_model::civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(MAX_MESSAGE).collect();
    t.push_str(" …");
    t
}

/// A summary being posted: what it is about, and the task posting it.
type Sending = (String, tokio::task::JoinHandle<Result<(), String>>);

/// Posts summaries in the background.
pub struct Notifier {
    cfg: NotifyConfig,
    http: Arc<Http>,
    sending: Mutex<Vec<Sending>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier(..)")
    }
}

impl Notifier {
    /// A notifier for `cfg`. Fails on an unreadable CA bundle.
    pub fn new(cfg: NotifyConfig) -> anyhow::Result<Notifier> {
        let http = Http::new(HttpConfig {
            timeout: cfg.timeout,
            max_concurrency: 2,
            max_attempts: 4,
            throttle_deadline: cfg.timeout.max(Duration::from_secs(1)) * 3,
            read_rounds: 1,
            base_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
            allow_insecure_http: cfg.allow_insecure_http,
            hide_path: true,
            ..HttpConfig::new("the notification webhook").bounded(2, cfg.ca_bundle.clone())
        })
        .map_err(|e| anyhow::anyhow!("[notify]: {e}"))?;
        Ok(Notifier {
            cfg,
            http: Arc::new(http),
            sending: Mutex::new(Vec::new()),
        })
    }

    /// A notifier, or `None` with a warning when it cannot be set up (an unreadable CA bundle):
    /// notifications never stop a run.
    pub fn start(cfg: &NotifyConfig) -> Option<Notifier> {
        match Notifier::new(cfg.clone()) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("warning: notifications are off for this run: {e:#}");
                None
            }
        }
    }

    /// When summaries are posted.
    pub fn on(&self) -> On {
        self.cfg.on
    }

    /// Starts posting `summary`; returns at once.
    pub fn post(&self, summary: &Summary) {
        let body = serde_json::to_vec(&summary.payload(self.cfg.format)).unwrap_or_default();
        let http = self.http.clone();
        let url = self.cfg.url.clone();
        let task = tokio::spawn(async move {
            http.send(
                idsync_connectors::http::Method::POST,
                url.expose(),
                &Auth::None,
                &[],
                Some(("application/json", body)),
                // A chat message posted twice is worse than a retry skipped: a POST is sent
                // again only when it surely did not arrive (no connection) or after a 429.
                false,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.message)
        });
        let what = if summary.agreement.is_empty() {
            format!("the {} run", summary.outcome)
        } else {
            format!("target {}'s {} run", summary.agreement, summary.outcome)
        };
        let mut sending = self.sending.lock().unwrap_or_else(|p| p.into_inner());
        sending.push((what, task));
    }

    /// Waits, at most the configured timeout in all, for what is still being posted, and reports
    /// on standard error what was not delivered.
    pub async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.sending.lock().unwrap_or_else(|p| p.into_inner()));
        let until = tokio::time::Instant::now() + self.cfg.timeout;
        for (what, mut task) in tasks {
            match tokio::time::timeout_at(until, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    eprintln!("warning: the notification of {what} was not delivered: {e}");
                }
                Ok(Err(e)) => {
                    eprintln!("warning: the notification of {what} was not delivered: {e}");
                }
                Err(_) => {
                    task.abort();
                    eprintln!(
                        "warning: the notification of {what} was not delivered: the webhook did not answer within {} s",
                        self.cfg.timeout.as_secs()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Summary {
        Summary::not_started(
            &anyhow::anyhow!("reading the source: Microsoft Graph answered 503"),
            1,
        )
    }

    #[test]
    fn each_format_carries_the_headline_and_the_message() {
        let s = failed();
        let slack = s.payload(Format::Slack);
        let text = slack["text"].as_str().unwrap_or_default();
        assert!(text.starts_with("*idsync: the run failed on "), "{text}");
        let hostile = Summary::not_started(&anyhow::anyhow!("group <!channel> & <https://x|y>"), 1);
        let escaped = hostile.payload(Format::Slack)["text"].to_string();
        assert!(
            escaped.contains("group &lt;!channel&gt; &amp; &lt;https://x|y&gt;"),
            "{escaped}"
        );
        assert!(text.contains("Microsoft Graph answered 503"), "{text}");
        assert_eq!(slack.as_object().map(|o| o.len()), Some(1));

        let teams = s.payload(Format::Teams);
        assert_eq!(teams["type"], "message");
        let card = &teams["attachments"][0];
        assert_eq!(
            card["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["content"]["type"], "AdaptiveCard");
        let body = card["content"]["body"].to_string();
        assert!(body.contains("Microsoft Graph answered 503"), "{body}");

        let json = s.payload(Format::Json);
        assert_eq!(json["outcome"], "failed");
        assert_eq!(json["exitCode"], 1);
    }

    #[test]
    fn a_long_message_is_shortened() {
        let long = "x".repeat(5000);
        let s = Summary::not_started(&anyhow::anyhow!(long), 1);
        let m = s.message.unwrap_or_default();
        assert_eq!(m.chars().count(), MAX_MESSAGE + 2);
        assert!(m.ends_with(" …"));
    }
}
