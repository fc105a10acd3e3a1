//! `[targets.NAME] kind = "databricks"`: the Databricks account SCIM API, with databricks-sdk's
//! environment names.

use super::DatabricksAuth;
use crate::entra_auth::EntraCredential;
use crate::http::HttpConfig;
use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, TargetConfig, TargetSettings};
use crate::sources::entra::config::PUBLIC_AUTHORITY;
use idsync_engine::{Target, TargetError, TargetErrorKind, TargetIdentity};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// Members per PATCH (additions and removals together). The server's maximum is not documented
/// (docs/apis/databricks-scim.md, PATCH; Databricks' own Entra script sends up to 50 operations),
/// so 100 is unverified against the real service.
pub const MEMBER_CHUNK: usize = 100;

/// The settings of a `databricks` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The accounts host, e.g. `https://accounts.azuredatabricks.net` (`DATABRICKS_HOST`).
    host: Option<String>,
    /// The account id (`DATABRICKS_ACCOUNT_ID`).
    account_id: Option<String>,
    /// An account admin or SCIM provisioning token; keep it out of the file (`DATABRICKS_TOKEN`).
    token: Option<Secret>,
    /// OAuth M2M client id (`DATABRICKS_CLIENT_ID`).
    client_id: Option<String>,
    /// OAuth M2M client secret (`DATABRICKS_CLIENT_SECRET`).
    client_secret: Option<Secret>,
    /// An Entra app's tenant, for Azure Databricks (`ARM_TENANT_ID`).
    azure_tenant_id: Option<String>,
    /// An Entra app's client id (`ARM_CLIENT_ID`).
    azure_client_id: Option<String>,
    /// An Entra app's client secret (`ARM_CLIENT_SECRET`).
    azure_client_secret: Option<Secret>,
    /// The Entra authority host [default: the public cloud] (`AZURE_AUTHORITY_HOST`).
    azure_authority_host: Option<String>,
    /// Sign in with the Entra source's credentials (any method) [default: false].
    azure_use_source: Option<bool>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
    /// Allow plain http:// to a host other than this machine (credentials and people's data in
    /// clear text on the network) [default: false].
    allow_insecure_http: Option<bool>,
}

const ENV: &[EnvVar] = &[
    EnvVar {
        names: &["DATABRICKS_HOST"],
        setting: "host",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["DATABRICKS_ACCOUNT_ID"],
        setting: "account_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["DATABRICKS_TOKEN"],
        setting: "token",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["DATABRICKS_CLIENT_ID"],
        setting: "client_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["DATABRICKS_CLIENT_SECRET"],
        setting: "client_secret",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["ARM_TENANT_ID"],
        setting: "azure_tenant_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["ARM_CLIENT_ID"],
        setting: "azure_client_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["ARM_CLIENT_SECRET"],
        setting: "azure_client_secret",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["AZURE_AUTHORITY_HOST"],
        setting: "azure_authority_host",
        form: EnvForm::Text,
    },
];

/// The variables that add a Databricks target when the configuration names none.
const IMPLYING: &[EnvVar] = &[ENV[0], ENV[1], ENV[2]];

/// The `databricks` target kind.
pub static KIND: KindOf<Settings> = KindOf::new("databricks", ENV).implied_by(IMPLYING);

/// How the target signs in, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabricksSignIn {
    /// A token (PAT or SCIM provisioning token).
    Token(Secret),
    /// OAuth M2M.
    OAuth {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
    },
    /// An Entra app's client secret.
    EntraApp {
        /// Authority host.
        authority: String,
        /// Tenant.
        tenant_id: String,
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
    },
    /// The Entra source's sign-in.
    EntraSource,
}

/// A configured Databricks target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabricksTargetConfig {
    /// Accounts host.
    pub host: String,
    /// Account id.
    pub account_id: String,
    /// How it signs in.
    pub sign_in: DatabricksSignIn,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// Plain http:// to other hosts allowed.
    pub allow_insecure_http: bool,
}

impl TargetSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>> {
        let s = self;
        let host = c.required(
            "host",
            s.host.as_ref(),
            "set host or DATABRICKS_HOST (e.g. https://accounts.azuredatabricks.net)",
        );
        let account = c.required(
            "account_id",
            s.account_id.as_ref(),
            "set account_id or DATABRICKS_ACCOUNT_ID",
        );
        let (host, account) = (host?, account?);
        let oauth = match (&s.client_id, &s.client_secret) {
            (Some(i), Some(sec)) => Some(DatabricksSignIn::OAuth {
                client_id: i.clone(),
                client_secret: sec.clone(),
            }),
            _ => None,
        };
        let entra = match (
            &s.azure_tenant_id,
            &s.azure_client_id,
            &s.azure_client_secret,
        ) {
            (Some(t), Some(ci), Some(sec)) => Some(DatabricksSignIn::EntraApp {
                authority: s
                    .azure_authority_host
                    .clone()
                    .unwrap_or_else(|| PUBLIC_AUTHORITY.into()),
                tenant_id: t.clone(),
                client_id: ci.clone(),
                client_secret: sec.clone(),
            }),
            _ => None,
        };
        let from_source = s.azure_use_source.unwrap_or(false);
        let entra_source = c.source().is_some_and(|s| s.entra().is_some());
        if from_source && !entra_source {
            c.problem(
                "azure_use_source",
                "the source is not Entra ID: there is no sign-in to reuse",
            );
        }
        if from_source && (s.token.is_some() || oauth.is_some() || entra.is_some()) {
            c.problem(
                "azure_use_source",
                "other Databricks credentials are set too (DATABRICKS_TOKEN, DATABRICKS_CLIENT_ID/SECRET or ARM_*), which would win: remove them or azure_use_source",
            );
        }
        let sign_in = s
            .token
            .clone()
            .map(DatabricksSignIn::Token)
            .or(oauth)
            .or(entra)
            .or(from_source.then_some(DatabricksSignIn::EntraSource));
        if sign_in.is_none() {
            c.problem(
                "token",
                "no credentials: set DATABRICKS_TOKEN (an account SCIM or admin token), or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (OAuth M2M), or ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET (an Entra app, for Azure Databricks), or azure_use_source = true (the Entra source's sign-in, any method)",
            );
        }
        Some(Box::new(DatabricksTargetConfig {
            host: host.clone(),
            account_id: account.clone(),
            sign_in: sign_in?,
            ca_bundle: s.ca_bundle.as_deref().map(|p| c.resolve(p)),
            allow_insecure_http: s.allow_insecure_http.unwrap_or(false),
        }))
    }
}

impl TargetConfig for DatabricksTargetConfig {
    fn identity(&self) -> TargetIdentity {
        TargetIdentity::new(
            "databricks",
            format!("{}/accounts/{}", self.host, self.account_id),
        )
    }
    fn describe(&self) -> String {
        format!("Databricks account {} at {}", self.account_id, self.host)
    }
    fn build(
        &self,
        workers: usize,
        source: &dyn SourceConfig,
    ) -> Result<Box<dyn Target>, TargetError> {
        let auth = match &self.sign_in {
            DatabricksSignIn::Token(t) => DatabricksAuth::Token(t.clone()),
            DatabricksSignIn::OAuth {
                client_id,
                client_secret,
            } => DatabricksAuth::OAuth {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
            },
            DatabricksSignIn::EntraApp {
                authority,
                tenant_id,
                client_id,
                client_secret,
            } => DatabricksAuth::Entra {
                authority: authority.clone(),
                tenant_id: tenant_id.clone(),
                credential: EntraCredential::ClientSecret {
                    client_id: client_id.clone(),
                    secret: client_secret.clone(),
                },
            },
            DatabricksSignIn::EntraSource => {
                let unauthorized = |m: String| TargetError::new(TargetErrorKind::Unauthorized, m);
                let e = source.entra().ok_or_else(|| {
                    unauthorized("the Databricks target has no credentials".into())
                })?;
                DatabricksAuth::Entra {
                    authority: e.authority_host.clone(),
                    tenant_id: e.tenant_id.clone(),
                    credential: e.credential().map_err(|e| unauthorized(e.to_string()))?,
                }
            }
        };
        let cfg = super::DatabricksConfig {
            host: self.host.clone(),
            account_id: self.account_id.clone(),
            auth,
            http: HttpConfig {
                allow_insecure_http: self.allow_insecure_http,
                ..HttpConfig::new("Databricks").bounded(workers, self.ca_bundle.clone())
            },
            member_chunk: MEMBER_CHUNK,
        };
        Ok(Box::new(super::DatabricksTarget::new(cfg)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::check;
    use crate::sources::entra::config::KIND as ENTRA;
    use crate::sources::file::config::KIND as FILE;
    use serde_json::json;

    #[test]
    fn an_entra_app_comes_from_the_arm_variables() {
        let env = [
            ("ARM_TENANT_ID", "tenant-1"),
            ("ARM_CLIENT_ID", "app-1"),
            ("ARM_CLIENT_SECRET", "arm-secret"),
        ];
        let settings =
            json!({"host": "https://accounts.azuredatabricks.net", "account_id": "acct"});
        let file = check::source(&FILE, json!({"path": "dir.json"}), &[]).unwrap();
        let c = check::target(&KIND, settings.clone(), &env, Some(file.as_ref())).unwrap();
        let c = c.as_any().downcast_ref::<DatabricksTargetConfig>().unwrap();
        match &c.sign_in {
            DatabricksSignIn::EntraApp {
                authority,
                tenant_id,
                client_id,
                client_secret,
            } => {
                assert_eq!(authority, "https://login.microsoftonline.com");
                assert_eq!(
                    (
                        tenant_id.as_str(),
                        client_id.as_str(),
                        client_secret.expose()
                    ),
                    ("tenant-1", "app-1", "arm-secret")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            !format!("{c:?}").contains("arm-secret"),
            "Debug never shows a secret"
        );
        let e = check::target(&KIND, settings.clone(), &[], Some(file.as_ref())).unwrap_err();
        let e = check::text(&e);
        assert!(
            e.contains("token: no credentials")
                && e.contains("ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET"),
            "{e}"
        );
        // Reusing the source's sign-in needs an Entra source.
        let mut reuse = settings.clone();
        reuse["azure_use_source"] = json!(true);
        let e = check::target(&KIND, reuse.clone(), &[], Some(file.as_ref())).unwrap_err();
        assert!(
            check::text(&e).contains("azure_use_source: the source is not Entra ID"),
            "{e:?}"
        );
        // With the ARM variables set as well, reusing the source's sign-in would silently lose.
        let entra = check::source(
            &ENTRA,
            json!({"auth": "azure_cli"}),
            &[("AZURE_TENANT_ID", "t")],
        )
        .unwrap();
        let e = check::target(&KIND, reuse.clone(), &env, Some(entra.as_ref())).unwrap_err();
        assert!(
            check::text(&e).contains("other Databricks credentials are set too"),
            "{e:?}"
        );
        let ok = check::target(&KIND, reuse, &[], Some(entra.as_ref())).unwrap();
        let ok = ok
            .as_any()
            .downcast_ref::<DatabricksTargetConfig>()
            .unwrap();
        assert_eq!(ok.sign_in, DatabricksSignIn::EntraSource);
    }
}
