//! `[targets.NAME] kind = "lakefs"`: the lakeFS auth API, with the environment names of the
//! existing Entra → lakeFS script.

use crate::http::HttpConfig;
use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, TargetConfig, TargetSettings};
use idsync_engine::{Mapping, Target, TargetError, TargetIdentity};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// The policies the existing script attaches to every group it creates.
pub const DEFAULT_POLICIES: &[&str] = &["AuthManageOwnCredentials", "FSReadAll"];

/// The settings of a `lakefs` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The lakeFS URL, e.g. `https://org.region.lakefscloud.io` (`LAKEFS_ENDPOINT`).
    endpoint: Option<String>,
    /// Access key id (`LAKEFS_ACCESS_KEY_ID`).
    access_key_id: Option<String>,
    /// Secret access key; keep it out of the file (`LAKEFS_SECRET_ACCESS_KEY`).
    secret_access_key: Option<Secret>,
    /// Policies attached to every group idsync creates [default: AuthManageOwnCredentials,
    /// FSReadAll] (`LAKEFS_DEFAULT_POLICIES`, comma-separated).
    default_policies: Option<Vec<String>>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
}

const ENV: &[EnvVar] = &[
    EnvVar {
        names: &["LAKEFS_ENDPOINT"],
        setting: "endpoint",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["LAKEFS_ACCESS_KEY_ID"],
        setting: "access_key_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["LAKEFS_SECRET_ACCESS_KEY"],
        setting: "secret_access_key",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["LAKEFS_DEFAULT_POLICIES"],
        setting: "default_policies",
        form: EnvForm::List,
    },
];

/// The `lakefs` target kind: added by its variables when the configuration names no target.
pub static KIND: KindOf<Settings> = KindOf::new("lakefs", ENV).implied_by(ENV);

/// A configured lakeFS target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LakefsTargetConfig {
    /// Base URL.
    pub endpoint: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Policies for the groups idsync creates.
    pub default_policies: Vec<String>,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
}

impl TargetSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>> {
        let endpoint = c.required(
            "endpoint",
            self.endpoint.as_ref(),
            "set endpoint or LAKEFS_ENDPOINT",
        );
        let id = c.required(
            "access_key_id",
            self.access_key_id.as_ref(),
            "set access_key_id or LAKEFS_ACCESS_KEY_ID",
        );
        let key = self.secret_access_key.clone().filter(|k| !k.is_empty());
        if key.is_none() {
            c.problem(
                "secret_access_key",
                "missing; set LAKEFS_SECRET_ACCESS_KEY (keep secrets out of the file)",
            );
        }
        Some(Box::new(LakefsTargetConfig {
            endpoint: endpoint?.clone(),
            access_key_id: id?.clone(),
            secret_access_key: key?,
            default_policies: self
                .default_policies
                .unwrap_or_else(|| DEFAULT_POLICIES.iter().map(|p| (*p).to_owned()).collect()),
            ca_bundle: self.ca_bundle.as_deref().map(|p| c.resolve(p)),
        }))
    }
}

impl TargetConfig for LakefsTargetConfig {
    fn identity(&self) -> TargetIdentity {
        TargetIdentity::new("lakefs", self.endpoint.clone())
    }
    fn describe(&self) -> String {
        format!("lakeFS {}", self.endpoint)
    }
    fn adjust_mapping(&self, mapping: &mut Mapping) {
        mapping.group_policies = self.default_policies.iter().cloned().collect();
    }
    fn build(&self, workers: usize, _: &dyn SourceConfig) -> Result<Box<dyn Target>, TargetError> {
        let cfg = super::LakefsConfig {
            endpoint: self.endpoint.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            http: HttpConfig::new("lakeFS").bounded(workers, self.ca_bundle.clone()),
        };
        Ok(Box::new(super::LakefsTarget::new(cfg)?))
    }
}
