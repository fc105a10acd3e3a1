//! The Databricks account SCIM API (`{host}/api/2.0/accounts/{account_id}/scim/v2`) as a target:
//! the SCIM client of `targets::scim` in Databricks' [`Dialect`]. Users, service principals and
//! groups with nested members. Groups are listed without members
//! (since 2025-08), so each group is read once in `observe`, a few at a time. A user's userName
//! cannot change (a new userName is a new user); group names and display names can. Members are
//! added and removed by PATCH in chunks. Auth: a personal access / SCIM provisioning token, or
//! Databricks OAuth machine-to-machine (client id and secret), refreshed before it expires.

pub mod config;

use crate::entra_auth::{EntraAuth, EntraCredential};
use crate::http::{Auth, Http, HttpConfig, HttpError, TokenCache};
use crate::targets::Hints;
use crate::targets::scim::{Credentials, Dialect, Features, IntoDialect, ScimTarget};
use async_trait::async_trait;
use idsync_engine::TargetError;
use idsync_model::{Attr, Capabilities, Kind, Secret};
use std::time::Duration;

/// How idsync authenticates to the account.
#[derive(Clone, Debug)]
pub enum DatabricksAuth {
    /// A personal access token or SCIM provisioning token (`DATABRICKS_TOKEN`).
    Token(Secret),
    /// Databricks OAuth M2M: a service principal's OAuth client id and secret.
    OAuth {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
    },
    /// An Entra ID token for the Azure Databricks resource, by any Entra sign-in method (an app's
    /// secret from `ARM_TENANT_ID`, `ARM_CLIENT_ID`, `ARM_CLIENT_SECRET` as databricks-sdk names
    /// them, a certificate, workload or managed identity, the Azure CLI).
    Entra {
        /// Authority host (`https://login.microsoftonline.com`, a national cloud, an emulator).
        authority: String,
        /// Directory (tenant) id.
        tenant_id: String,
        /// How to sign in.
        credential: EntraCredential,
    },
}

/// The Azure Databricks resource id: the audience of Entra tokens for Databricks.
pub const AZURE_DATABRICKS_RESOURCE: &str = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d";

/// Where and how to reach the account.
#[derive(Clone, Debug)]
pub struct DatabricksConfig {
    /// The accounts host (`https://accounts.azuredatabricks.net`).
    pub host: String,
    /// The account id.
    pub account_id: String,
    /// Credentials.
    pub auth: DatabricksAuth,
    /// HTTP settings.
    pub http: HttpConfig,
    /// Members per PATCH.
    pub member_chunk: usize,
}

/// The Databricks account SCIM target: the SCIM client in Databricks' dialect.
pub type DatabricksTarget = ScimTarget;

/// Databricks' sign-in: a fixed token, or one fetched from Databricks OAuth or Entra ID (for the
/// Azure Databricks resource) and fetched again a minute before it expires.
#[derive(Debug)]
struct DatabricksCredentials {
    sign_in: SignIn,
    host: String,
    account_id: String,
    token: TokenCache,
}

/// How [`DatabricksCredentials`] gets its token.
#[derive(Debug)]
enum SignIn {
    Token(Secret),
    OAuth {
        client_id: String,
        client_secret: Secret,
    },
    Entra(Box<EntraAuth>),
}

#[async_trait]
impl Credentials for DatabricksCredentials {
    async fn auth(&self, http: &Http) -> Result<Auth, HttpError> {
        let (url, auth, body, service) = match &self.sign_in {
            SignIn::Token(t) => return Ok(Auth::Bearer(t.clone())),
            SignIn::OAuth {
                client_id,
                client_secret,
            } => (
                format!(
                    "{}/oidc/accounts/{}/v1/token",
                    self.host.trim_end_matches('/'),
                    self.account_id
                ),
                Auth::Basic(client_id.clone(), client_secret.clone()),
                "grant_type=client_credentials&scope=all-apis".to_owned(),
                "Databricks OAuth",
            ),
            SignIn::Entra(entra) => {
                return entra
                    .bearer(&format!("{AZURE_DATABRICKS_RESOURCE}/.default"))
                    .await;
            }
        };
        let token = self
            .token
            .get(http, &url, &auth, body, service, Duration::from_secs(60))
            .await?;
        Ok(Auth::Bearer(token))
    }
}

impl IntoDialect for DatabricksConfig {
    fn into_dialect(self) -> Result<(Dialect, HttpConfig), TargetError> {
        let hint = |e| crate::targets::target_error(e, &HINTS);
        let sign_in = match self.auth {
            DatabricksAuth::Token(t) => SignIn::Token(t),
            DatabricksAuth::OAuth {
                client_id,
                client_secret,
            } => SignIn::OAuth {
                client_id,
                client_secret,
            },
            DatabricksAuth::Entra {
                authority,
                tenant_id,
                credential,
            } => {
                let login = Http::new(HttpConfig {
                    service: "Entra ID".into(),
                    ..self.http.clone()
                })
                .map_err(hint)?;
                SignIn::Entra(Box::new(
                    EntraAuth::new(&authority, &tenant_id, credential, login)
                        .with_margin(Duration::from_secs(60)),
                ))
            }
        };
        let host = self.host.trim_end_matches('/').to_owned();
        let dialect = Dialect {
            service: "Databricks",
            base: format!("{host}/api/2.0/accounts/{}/scim/v2", self.account_id),
            content_type: "application/json",
            // PATCH, no ETags, no /Bulk; filters with `or`; lists of up to 1000 per page.
            features: Some(Features {
                patch: true,
                etag: false,
                filter: true,
                page: 100,
                list_page: 1000,
                bulk: None,
            }),
            capabilities: Capabilities {
                nested_groups: true,
                service_principals: true,
                service_principal_members: true,
                renamable: [Kind::Group].into(),
                deactivate: true,
                case_insensitive_keys: true,
                // externalId: the source's id, as Entra's own provisioning and the Databricks
                // script write it (docs/apis/databricks-scim.md).
                attributes: [Attr::Key, Attr::DisplayName, Attr::Active, Attr::ExternalId].into(),
                group_policies: false,
                max_members_per_write: self.member_chunk.max(1),
            },
            credentials: Box::new(DatabricksCredentials {
                sign_in,
                host,
                account_id: self.account_id,
                token: TokenCache::default(),
            }),
            // Groups are listed without members (since 2025-08): each is read once.
            list_attributes: |kind| match kind {
                Kind::User => "id,userName,displayName,active,externalId",
                Kind::ServicePrincipal => "id,applicationId,displayName,active,externalId",
                Kind::Group => "id,displayName,externalId",
            },
            typed_group_members: false,
            page_until_empty: true,
            hints: HINTS,
        };
        Ok((dialect, self.http))
    }
}

const HINTS: Hints = Hints {
    unauthorized: " Databricks rejected the credentials: check DATABRICKS_TOKEN (an account SCIM token or a token of an account admin) or the OAuth client id and secret, and DATABRICKS_ACCOUNT_ID.",
    forbidden: " Account SCIM writes need an account admin.",
    not_implemented: "",
};
