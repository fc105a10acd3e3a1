//! `[targets.NAME] kind = "scim"`: any SCIM 2.0 service provider.

use crate::http::HttpConfig;
use crate::registry::{
    Context, EnvForm, EnvVar, Problem, SourceConfig, TargetConfig, TargetKind, required, settings,
};
use idsync_engine::{Target, TargetError, TargetIdentity};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// The settings of a `scim` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
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
}

const ENV: &[EnvVar] = &[EnvVar {
    names: &["SCIM_TOKEN"],
    setting: "token",
    form: EnvForm::Secret,
}];

/// The `scim` target kind.
pub struct ScimKind;

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
}

impl TargetKind for ScimKind {
    fn name(&self) -> &'static str {
        "scim"
    }

    fn env(&self) -> &'static [EnvVar] {
        ENV
    }

    fn configure(
        &self,
        value: serde_json::Value,
        cx: &Context<'_>,
        _source: Option<&dyn SourceConfig>,
    ) -> Result<Box<dyn TargetConfig>, Vec<Problem>> {
        let s: Settings = settings(value)?;
        let mut problems = Vec::new();
        let url = required(
            &mut problems,
            "url",
            s.url.as_ref(),
            "the SCIM base URL (e.g. https://scim.example.com/scim/v2)",
        );
        if s.token.as_ref().is_none_or(Secret::is_empty) {
            problems.push(Problem::at(
                "token",
                "missing: set SCIM_TOKEN (keep secrets out of the file)",
            ));
        }
        let member_chunk = s.member_chunk.unwrap_or(100);
        if member_chunk == 0 {
            problems.push(Problem::at("member_chunk", "must be at least 1"));
        }
        match url {
            Some(u) if problems.is_empty() => Ok(Box::new(ScimTargetConfig {
                url: u.clone(),
                token: s.token.clone(),
                member_chunk,
                nested_groups: s.nested_groups.unwrap_or(false),
                ca_bundle: s.ca_bundle.as_deref().map(|p| cx.resolve(p)),
            })),
            _ => Err(problems),
        }
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
            http: HttpConfig::new("the SCIM provider").bounded(workers, self.ca_bundle.clone()),
            member_chunk: self.member_chunk,
            nested_groups: self.nested_groups,
        };
        Ok(Box::new(super::ScimTarget::new(cfg)?))
    }
}
