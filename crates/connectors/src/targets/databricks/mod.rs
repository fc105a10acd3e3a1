//! The Databricks account SCIM API (`{host}/api/2.0/accounts/{account_id}/scim/v2`) as a target:
//! users, service principals and groups with nested members. Groups are listed without members
//! (since 2025-08), so each group is read once in `observe`, a few at a time. A user's userName
//! cannot change (a new userName is a new user); group names and display names can. Members are
//! added and removed by PATCH in chunks. Auth: a personal access / SCIM provisioning token, or
//! Databricks OAuth machine-to-machine (client id and secret), refreshed before it expires.

pub mod config;

use crate::entra_auth::{EntraAuth, EntraCredential};
use crate::http::{Auth, ErrorKind, Http, HttpConfig, HttpError, TokenCache};
use crate::targets::scim::{
    ListResponse, SCHEMA_PATCH, id_of, member_ids, member_path, read_some, text,
};
use async_trait::async_trait;
use futures::StreamExt;
use idsync_engine::observe::{Interest, Partial};
use idsync_engine::{Outcome, Target, TargetError, TargetErrorKind};
use idsync_model::{
    Attr, AttrValue, Capabilities, Kind, MemberIds, Observed, ObservedPrincipal, Op, Principal,
    Secret,
};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
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

/// The Databricks account SCIM target.
#[derive(Debug)]
pub struct DatabricksTarget {
    http: Http,
    cfg: DatabricksConfig,
    token: TokenCache,
    entra: Option<EntraAuth>,
}

fn target_error(e: HttpError) -> TargetError {
    let (kind, hint) = match e.kind {
        ErrorKind::Unauthorized => (
            TargetErrorKind::Unauthorized,
            " Databricks rejected the credentials: check DATABRICKS_TOKEN (an account SCIM token or a token of an account admin) or the OAuth client id and secret, and DATABRICKS_ACCOUNT_ID.",
        ),
        ErrorKind::Forbidden => (
            TargetErrorKind::Forbidden,
            " Account SCIM writes need an account admin.",
        ),
        ErrorKind::NotFound => (TargetErrorKind::NotFound, ""),
        ErrorKind::Conflict => (TargetErrorKind::AlreadyExists, ""),
        ErrorKind::NotImplemented => (TargetErrorKind::NotImplemented, ""),
        ErrorKind::Throttled => (TargetErrorKind::Throttled, ""),
        ErrorKind::Unavailable => (TargetErrorKind::Unavailable, ""),
        ErrorKind::Protocol => (TargetErrorKind::Protocol, ""),
        ErrorKind::Invalid | ErrorKind::Gone => (TargetErrorKind::Invalid, ""),
    };
    TargetError::new(kind, format!("{}{hint}", e.message))
}

/// A user, service principal or group resource as a principal (`None` without an id or a key).
fn principal(kind: Kind, v: &Value) -> Option<ObservedPrincipal> {
    let id = text(v, "id")?;
    let key = match kind {
        Kind::User => "userName",
        Kind::ServicePrincipal => "applicationId",
        Kind::Group => "displayName",
    };
    let mut p = Principal::new(kind, text(v, key)?);
    if kind != Kind::Group {
        p.display_name = text(v, "displayName");
        p.active = v.get("active").and_then(Value::as_bool).unwrap_or(true);
    }
    Some(ObservedPrincipal {
        id,
        principal: p,
        policies: BTreeSet::new(),
    })
}

fn resource(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "Users",
        Kind::ServicePrincipal => "ServicePrincipals",
        Kind::Group => "Groups",
    }
}

impl DatabricksTarget {
    /// A target for this account.
    pub fn new(cfg: DatabricksConfig) -> Result<Self, TargetError> {
        let http = Http::new(cfg.http.clone()).map_err(target_error)?;
        let entra = match &cfg.auth {
            DatabricksAuth::Entra {
                authority,
                tenant_id,
                credential,
            } => {
                let login = Http::new(HttpConfig {
                    service: "Entra ID".into(),
                    ..cfg.http.clone()
                })
                .map_err(target_error)?;
                Some(
                    EntraAuth::new(authority, tenant_id, credential.clone(), login)
                        .with_margin(Duration::from_secs(60)),
                )
            }
            _ => None,
        };
        Ok(DatabricksTarget {
            http,
            cfg,
            token: TokenCache::default(),
            entra,
        })
    }

    fn base(&self) -> String {
        format!(
            "{}/api/2.0/accounts/{}/scim/v2",
            self.cfg.host.trim_end_matches('/'),
            self.cfg.account_id
        )
    }

    /// The bearer token: the configured one, or a token fetched (again) when it is within a minute
    /// of expiring: from Databricks OAuth, or from Entra ID for the Azure Databricks resource.
    async fn auth(&self) -> Result<Auth, TargetError> {
        let (url, auth, body, service) = match &self.cfg.auth {
            DatabricksAuth::Token(t) => return Ok(Auth::Bearer(t.clone())),
            DatabricksAuth::OAuth {
                client_id,
                client_secret,
            } => (
                format!(
                    "{}/oidc/accounts/{}/v1/token",
                    self.cfg.host.trim_end_matches('/'),
                    self.cfg.account_id
                ),
                Auth::Basic(client_id.clone(), client_secret.clone()),
                "grant_type=client_credentials&scope=all-apis".to_owned(),
                "Databricks OAuth",
            ),
            DatabricksAuth::Entra { .. } => {
                let entra = self.entra.as_ref().ok_or_else(|| {
                    TargetError::new(TargetErrorKind::Invalid, "no Entra credential".to_owned())
                })?;
                return entra
                    .bearer(&format!("{AZURE_DATABRICKS_RESOURCE}/.default"))
                    .await
                    .map_err(target_error);
            }
        };
        let token = self
            .token
            .get(
                &self.http,
                &url,
                &auth,
                body,
                service,
                Duration::from_secs(60),
            )
            .await
            .map_err(target_error)?;
        Ok(Auth::Bearer(token))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        idempotent: bool,
    ) -> Result<crate::http::Answer, TargetError> {
        let auth = self.auth().await?;
        let url = format!("{}{path}", self.base());
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.http
            .send(method, &url, &auth, &[], body, idempotent)
            .await
            .map_err(target_error)
    }

    /// Every resource of a type, page by page (`startIndex` is 1-based; an empty page ends it).
    async fn list(&self, kind: Kind, attributes: &str) -> Result<Vec<Value>, TargetError> {
        let mut out = Vec::new();
        let count = 1000;
        loop {
            let path = format!(
                "/{}?attributes={attributes}&startIndex={}&count={count}",
                resource(kind),
                out.len() + 1
            );
            let a = self.call(Method::GET, &path, None, true).await?;
            let page: ListResponse = a
                .json("Databricks", &format!("listing {}", resource(kind)))
                .map_err(target_error)?;
            // The server may cap `count` lower than asked: a short page is not the end; an empty
            // one is, and so is reaching totalResults.
            let n = page.resources.len();
            out.extend(page.resources);
            if n == 0 || page.total_results.is_some_and(|t| out.len() >= t) {
                return Ok(out);
            }
        }
    }

    async fn patch(&self, kind: Kind, id: &str, ops: Vec<Value>) -> Result<(), TargetError> {
        let body = json!({"schemas": [SCHEMA_PATCH], "Operations": ops});
        self.call(
            Method::PATCH,
            &format!("/{}/{id}", resource(kind)),
            Some(body),
            true,
        )
        .await
        .map(|_| ())
    }

    async fn group_members(&self, id: String) -> Result<(String, Vec<String>), TargetError> {
        let a = self
            .call(Method::GET, &format!("/Groups/{id}"), None, true)
            .await?;
        let g: Value = a
            .json("Databricks", "reading a group")
            .map_err(target_error)?;
        Ok((id, member_ids(&g)))
    }
}

#[async_trait]
impl Target for DatabricksTarget {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            nested_groups: true,
            service_principals: true,
            service_principal_members: true,
            renamable: [Kind::Group].into(),
            deactivate: true,
            case_insensitive_keys: true,
            attributes: [Attr::Key, Attr::DisplayName, Attr::Active].into(),
            group_policies: false,
            max_members_per_write: self.cfg.member_chunk.max(1),
        }
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        let mut o = Observed::default();
        let mut kinds = std::collections::BTreeMap::new();
        for (kind, attributes) in [
            (Kind::User, "id,userName,displayName,active"),
            (
                Kind::ServicePrincipal,
                "id,applicationId,displayName,active",
            ),
        ] {
            for v in self.list(kind, attributes).await? {
                if let Some(p) = principal(kind, &v) {
                    kinds.insert(p.id.clone(), kind);
                    o.insert(p);
                }
            }
        }
        let groups = self.list(Kind::Group, "id,displayName").await?;
        for v in &groups {
            if let Some(p) = principal(Kind::Group, v) {
                kinds.insert(p.id.clone(), Kind::Group);
                o.insert(p);
            }
        }
        let ids: Vec<String> = groups.iter().filter_map(|v| text(v, "id")).collect();
        let reads = futures::stream::iter(ids.into_iter().map(|id| self.group_members(id)))
            .buffered(self.cfg.http.max_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        for r in reads {
            let (gid, members) = r?;
            // Members of kinds the account listing did not return (a race with a deletion) are skipped.
            let set: MemberIds = members
                .into_iter()
                .filter_map(|m| kinds.get(&m).map(|k| (*k, m)))
                .collect();
            o.members.insert(gid, set);
        }
        Ok(o)
    }

    async fn observe_some(&self, want: &Interest) -> Result<Option<Partial>, TargetError> {
        let get = |path: String| async move { self.call(Method::GET, &path, None, true).await };
        let key_attr = |kind: Kind| match kind {
            Kind::User => "userName",
            Kind::ServicePrincipal => "applicationId",
            Kind::Group => "displayName",
        };
        let concurrency = self.cfg.http.max_concurrency;
        read_some(want, concurrency, 100, get, key_attr, principal).await
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        match op {
            Op::Create { principal: p, .. } => {
                let body = match p.kind {
                    Kind::User => {
                        json!({"userName": p.key, "displayName": p.display_name, "active": p.active})
                    }
                    Kind::ServicePrincipal => {
                        json!({"applicationId": p.key, "displayName": p.display_name, "active": p.active})
                    }
                    Kind::Group => json!({"displayName": p.key}),
                };
                let a = self
                    .call(
                        Method::POST,
                        &format!("/{}", resource(p.kind)),
                        Some(body),
                        false,
                    )
                    .await?;
                let v: Value = a.json("Databricks", "a create").map_err(target_error)?;
                let id = text(&v, "id").ok_or_else(|| {
                    TargetError::new(
                        TargetErrorKind::Protocol,
                        "Databricks created a principal without an id",
                    )
                })?;
                Ok(Outcome::Created(id))
            }
            Op::Update {
                target, changes, ..
            } => {
                let mut ops = Vec::new();
                for c in changes {
                    let (path, value) = match (c.attr, &c.to) {
                        (Attr::Key, AttrValue::Text(Some(v))) if target.kind == Kind::Group => {
                            ("displayName", json!(v))
                        }
                        (Attr::DisplayName, AttrValue::Text(v)) if target.kind != Kind::Group => {
                            ("displayName", json!(v))
                        }
                        (Attr::Active, AttrValue::Bool(b)) => ("active", json!(b)),
                        _ => continue,
                    };
                    ops.push(json!({"op": "replace", "path": path, "value": value}));
                }
                if !ops.is_empty() {
                    self.patch(target.kind, id_of(target)?, ops).await?;
                }
                Ok(Outcome::Done)
            }
            Op::Deactivate { target } => {
                self.patch(
                    target.kind,
                    id_of(target)?,
                    vec![json!({"op": "replace", "path": "active", "value": false})],
                )
                .await?;
                Ok(Outcome::Done)
            }
            Op::Delete { target, .. } => match self
                .call(
                    Method::DELETE,
                    &format!("/{}/{}", resource(target.kind), id_of(target)?),
                    None,
                    true,
                )
                .await
            {
                Err(e) if e.kind == TargetErrorKind::NotFound => Ok(Outcome::Done),
                other => other.map(|_| Outcome::Done),
            },
            Op::AddMembers { group, members } => {
                let gid = id_of(group)?;
                for chunk in members.chunks(self.cfg.member_chunk.max(1)) {
                    let value: Result<Vec<Value>, TargetError> = chunk
                        .iter()
                        .map(|m| Ok(json!({"value": id_of(m)?})))
                        .collect();
                    self.patch(
                        Kind::Group,
                        gid,
                        vec![json!({"op": "add", "path": "members", "value": value?})],
                    )
                    .await?;
                }
                Ok(Outcome::Done)
            }
            Op::RemoveMembers { group, members } => {
                let gid = id_of(group)?;
                for chunk in members.chunks(self.cfg.member_chunk.max(1)) {
                    let ops: Result<Vec<Value>, TargetError> = chunk
                        .iter()
                        .map(|m| Ok(json!({"op": "remove", "path": member_path(id_of(m)?)})))
                        .collect();
                    self.patch(Kind::Group, gid, ops?).await?;
                }
                Ok(Outcome::Done)
            }
            Op::AttachPolicies { .. } => Err(TargetError::new(
                TargetErrorKind::NotImplemented,
                "Databricks groups have no policies",
            )),
            Op::Adopt { .. } | Op::Forget { .. } => Ok(Outcome::Done),
        }
    }
}
