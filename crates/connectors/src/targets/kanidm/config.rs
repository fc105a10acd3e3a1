//! `[targets.NAME] kind = "kanidm"`: a Kanidm server's sync account.

use super::{KANIDM_MAX_BYTES, KanidmConfig, KanidmTarget};
use crate::http::HttpConfig;
use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, TargetConfig, TargetSettings};
use idsync_engine::{Target, TargetError, TargetIdentity};
use idsync_model::Secret;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The settings of a `kanidm` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The server's origin, e.g. `https://idm.example.com`.
    url: Option<String>,
    /// The sync account's token (`kanidm system sync generate-token`); keep it out of the file
    /// (`KANIDM_SYNC_TOKEN`).
    token: Option<Secret>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
    /// Allow plain http:// to a host other than this machine [default: false].
    allow_insecure_http: Option<bool>,
    /// The largest sync request to send, in bytes; larger imports go in parts [default and most:
    /// 33554432, Kanidm's limit].
    max_request_bytes: Option<usize>,
    /// Kanidm attributes yielded to Kanidm (`kanidm system sync set-yield-attributes`), which
    /// idsync must never send: among `displayname`, `mail`, `description`, `member`.
    yield_attributes: Option<Vec<String>>,
    /// The sync account's name or UUID, for `idsync agreement finalise` and `terminate`.
    sync_account: Option<String>,
    /// How long one sync request may take, in seconds: Kanidm applies a request whole before it
    /// answers [default: 900].
    timeout: Option<u64>,
    /// For finalise and terminate: a session token of an account that manages sync accounts;
    /// keep it out of the file (`KANIDM_ADMIN_TOKEN`).
    admin_token: Option<Secret>,
}

const ENV: &[EnvVar] = &[
    EnvVar {
        names: &["KANIDM_SYNC_TOKEN"],
        setting: "token",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["KANIDM_ADMIN_TOKEN"],
        setting: "admin_token",
        form: EnvForm::Secret,
    },
];

/// The attributes idsync writes that may be yielded.
const YIELDABLE: &[&str] = &["displayname", "mail", "description", "member"];

/// The `kanidm` target kind.
pub static KIND: KindOf<Settings> = KindOf::new("kanidm", ENV);

/// A configured Kanidm target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KanidmTargetConfig {
    /// The server's origin.
    pub url: String,
    /// The sync token.
    pub token: Secret,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Plain http:// to other hosts allowed.
    pub allow_insecure_http: bool,
    /// The largest request.
    pub max_request_bytes: usize,
    /// Attributes never sent.
    pub yield_attributes: BTreeSet<String>,
    /// The sync account's name or UUID.
    pub sync_account: Option<String>,
    /// A session token for finalise and terminate.
    pub admin_token: Option<Secret>,
    /// Per request.
    pub timeout: std::time::Duration,
}

impl TargetSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>> {
        let url = c.required(
            "url",
            self.url.as_ref(),
            "the Kanidm server's origin (e.g. https://idm.example.com)",
        );
        if self.token.as_ref().is_none_or(Secret::is_empty) {
            c.problem(
                "token",
                "missing: set KANIDM_SYNC_TOKEN to the sync account's token (`kanidm system sync generate-token`; keep secrets out of the file)",
            );
        }
        let max = self.max_request_bytes.unwrap_or(KANIDM_MAX_BYTES);
        if !(4096..=KANIDM_MAX_BYTES).contains(&max) {
            c.problem(
                "max_request_bytes",
                format!(
                    "{max} is outside 4096..={KANIDM_MAX_BYTES} (Kanidm refuses larger bodies)"
                ),
            );
        }
        let mut yielded = BTreeSet::new();
        for a in self.yield_attributes.unwrap_or_default() {
            let a = a.to_lowercase();
            if YIELDABLE.contains(&a.as_str()) {
                yielded.insert(a);
            } else {
                c.problem(
                    "yield_attributes",
                    format!(
                        "{a:?} is not an attribute idsync writes that can be yielded; use some of {}",
                        YIELDABLE.join(", ")
                    ),
                );
            }
        }
        let admin_token = self.admin_token.filter(|t| !t.is_empty());
        if admin_token.is_some() && self.sync_account.is_none() {
            c.problem(
                "sync_account",
                "missing: with an admin token, name the sync account (as `kanidm system sync list` shows it) so that finalise and terminate reach it",
            );
        }
        Some(Box::new(KanidmTargetConfig {
            url: url?.trim_end_matches('/').to_owned(),
            token: self.token.unwrap_or_else(|| Secret::new("")),
            ca_bundle: self.ca_bundle.as_deref().map(|p| c.resolve(p)),
            allow_insecure_http: self.allow_insecure_http.unwrap_or(false),
            max_request_bytes: max,
            yield_attributes: yielded,
            sync_account: self.sync_account,
            admin_token,
            timeout: std::time::Duration::from_secs(self.timeout.unwrap_or(900).max(1)),
        }))
    }
}

impl TargetConfig for KanidmTargetConfig {
    fn identity(&self) -> TargetIdentity {
        TargetIdentity::new("kanidm", self.url.clone())
    }
    fn describe(&self) -> String {
        format!("Kanidm {}", self.url)
    }
    /// Kanidm's names hold no `@` (the `@` separates a name from its domain in Kanidm's SPNs):
    /// people are named by their login's local part, `alice@corp.example` as `alice`.
    fn default_user_name(&self, _source_kind: &str) -> Option<&'static str> {
        Some("{userName|localpart}")
    }
    /// Guests' UPNs (`gus_partner.example#EXT#@…`) hold a `#`: they are named by their mail,
    /// slugged, `gus@partner.example` as `gus-partner.example`.
    fn default_guest_user_name(&self) -> Option<&'static str> {
        Some("{mail|slug}")
    }
    fn build(&self, workers: usize, _: &dyn SourceConfig) -> Result<Box<dyn Target>, TargetError> {
        let cfg = KanidmConfig {
            url: self.url.clone(),
            token: self.token.clone(),
            http: HttpConfig {
                allow_insecure_http: self.allow_insecure_http,
                timeout: self.timeout,
                ..HttpConfig::new("Kanidm").bounded(workers, self.ca_bundle.clone())
            },
            max_request_bytes: self.max_request_bytes,
            yield_attributes: self.yield_attributes.clone(),
            admin: self.admin_token.clone().zip(self.sync_account.clone()),
        };
        Ok(Box::new(KanidmTarget::new(cfg)?))
    }
}
