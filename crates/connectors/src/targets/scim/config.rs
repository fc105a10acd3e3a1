//! `[targets.NAME] kind = "scim"`: any SCIM 2.0 service provider.

use crate::http::HttpConfig;
use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, TargetConfig, TargetSettings};
use idsync_engine::{Target, TargetError, TargetIdentity};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// The settings of a `scim` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The SCIM base URL, e.g. `https://scim.example.com/scim/v2`.
    url: Option<String>,
    /// The bearer token; keep it out of the file (`SCIM_TOKEN`).
    token: Option<Secret>,
    /// Members per PATCH [default: 100].
    member_chunk: Option<usize>,
    /// The provider keeps groups in groups [default: false: nested groups are flattened].
    nested_groups: Option<bool>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
    /// Allow plain http:// to a host other than this machine (credentials and people's data in
    /// clear text on the network) [default: false].
    allow_insecure_http: Option<bool>,
}

const ENV: &[EnvVar] = &[EnvVar {
    names: &["SCIM_TOKEN"],
    setting: "token",
    form: EnvForm::Secret,
}];

/// The `scim` target kind.
pub static KIND: KindOf<Settings> = KindOf::new("scim", ENV);

/// A configured SCIM target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScimTargetConfig {
    /// Base URL.
    pub url: String,
    /// Bearer token.
    pub token: Option<Secret>,
    /// Members per PATCH.
    pub member_chunk: usize,
    /// The provider keeps groups in groups.
    pub nested_groups: bool,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Plain http:// to other hosts allowed.
    pub allow_insecure_http: bool,
}

impl TargetSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>> {
        let url = c.required(
            "url",
            self.url.as_ref(),
            "the SCIM base URL (e.g. https://scim.example.com/scim/v2)",
        );
        if self.token.as_ref().is_none_or(Secret::is_empty) {
            c.problem(
                "token",
                "missing: set SCIM_TOKEN (keep secrets out of the file)",
            );
        }
        let member_chunk = self.member_chunk.unwrap_or(100);
        if member_chunk == 0 {
            c.problem("member_chunk", "must be at least 1");
        }
        Some(Box::new(ScimTargetConfig {
            url: url?.clone(),
            token: self.token,
            member_chunk,
            nested_groups: self.nested_groups.unwrap_or(false),
            ca_bundle: self.ca_bundle.as_deref().map(|p| c.resolve(p)),
            allow_insecure_http: self.allow_insecure_http.unwrap_or(false),
        }))
    }
}

impl TargetConfig for ScimTargetConfig {
    fn identity(&self) -> TargetIdentity {
        TargetIdentity::new("scim", self.url.clone())
    }
    fn describe(&self) -> String {
        format!("SCIM {}", self.url)
    }
    fn build(&self, workers: usize, _: &dyn SourceConfig) -> Result<Box<dyn Target>, TargetError> {
        let cfg = super::ScimConfig {
            url: self.url.clone(),
            token: self.token.clone(),
            http: HttpConfig {
                allow_insecure_http: self.allow_insecure_http,
                ..HttpConfig::new("the SCIM provider").bounded(workers, self.ca_bundle.clone())
            },
            member_chunk: self.member_chunk,
            nested_groups: self.nested_groups,
        };
        Ok(Box::new(super::ScimTarget::new(cfg)?))
    }
}
