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
    /// A group every user idsync creates is added to, once, as lakeFS adds the users it creates
    /// at an LDAP login (lakeFS's `auth.ldap.default_user_group`, e.g. "Viewers"); it must exist
    /// (`LAKEFS_DEFAULT_USER_GROUP`).
    default_user_group: Option<String>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
    /// Allow plain http:// to a host other than this machine (credentials and people's data in
    /// clear text on the network) [default: false].
    allow_insecure_http: Option<bool>,
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
    EnvVar {
        names: &["LAKEFS_DEFAULT_USER_GROUP"],
        setting: "default_user_group",
        form: EnvForm::Text,
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
    /// The group every user idsync creates joins.
    pub default_user_group: Option<String>,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Plain http:// to other hosts allowed.
    pub allow_insecure_http: bool,
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
            default_user_group: self.default_user_group.filter(|g| !g.trim().is_empty()),
            ca_bundle: self.ca_bundle.as_deref().map(|p| c.resolve(p)),
            allow_insecure_http: self.allow_insecure_http.unwrap_or(false),
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
    /// lakeFS names the user it creates at an LDAP login by the user's DN: idsync's users are
    /// the same users when their id is the DN.
    fn default_user_name(&self, source_kind: &str) -> Option<&'static str> {
        (source_kind == "ldap").then_some("{dn}")
    }
    fn build(&self, workers: usize, _: &dyn SourceConfig) -> Result<Box<dyn Target>, TargetError> {
        let cfg = super::LakefsConfig {
            endpoint: self.endpoint.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            http: HttpConfig {
                allow_insecure_http: self.allow_insecure_http,
                ..HttpConfig::new("lakeFS").bounded(workers, self.ca_bundle.clone())
            },
            default_user_group: self.default_user_group.clone(),
        };
        Ok(Box::new(super::LakefsTarget::new(cfg)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{apply_env, check};
    use serde_json::json;

    /// Secrets may come from files, as Kubernetes mounts them: `NAME_FILE`.
    #[test]
    fn a_secret_comes_from_a_file_named_by_its_variable() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("secret");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let path = f.display().to_string();
        let settings = json!({"endpoint": "https://lakefs.example", "access_key_id": "AKIA"});
        let c = check::target(
            &KIND,
            settings.clone(),
            &[("LAKEFS_SECRET_ACCESS_KEY_FILE", path.as_str())],
            None,
        )
        .unwrap();
        let c = c.as_any().downcast_ref::<LakefsTargetConfig>().unwrap();
        assert_eq!(c.secret_access_key.expose(), "from-a-file");
        // The variable itself wins over its file.
        let c = check::target(
            &KIND,
            settings.clone(),
            &[
                ("LAKEFS_SECRET_ACCESS_KEY", "from-the-variable"),
                ("LAKEFS_SECRET_ACCESS_KEY_FILE", path.as_str()),
            ],
            None,
        )
        .unwrap();
        let c = c.as_any().downcast_ref::<LakefsTargetConfig>().unwrap();
        assert_eq!(c.secret_access_key.expose(), "from-the-variable");
        // A file that cannot be read is a problem of that variable.
        let problems = check::with_env(
            &[("LAKEFS_SECRET_ACCESS_KEY_FILE", "/nonexistent/secret")],
            |cx| apply_env(&mut settings.clone(), KIND.env_vars(), cx),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].env, Some("LAKEFS_SECRET_ACCESS_KEY"));
        assert!(
            problems[0].message.contains("cannot be read"),
            "{problems:?}"
        );
    }
}
