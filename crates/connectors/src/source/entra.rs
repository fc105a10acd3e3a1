//! Microsoft Entra ID as a source, through Microsoft Graph: a full read of the scope. Groups are
//! selected by name (`displayName eq '...'`, OData-escaped), by id, or by an fnmatch filter on their
//! names, then walked to the search depth; members are read from `/beta` (v1.0 leaves service
//! principals out) with a minimal `$select`, so users and service principals come with the member
//! lists and need no request of their own. Authentication here: a client secret, with the token
//! cached and renewed before it expires. Change feeds (delta) are not read yet: every run reads the
//! scope in full.

use crate::http::{Auth, ErrorKind, Http, HttpConfig, HttpError};
use async_trait::async_trait;
use futures::StreamExt;
use idsync_engine::scope::{Scope, fnmatch};
use idsync_engine::{Changes, Read, Source, SourceError};
use idsync_model::{Group, Member, ReadMode, Secret, ServicePrincipal, Snapshot, User, UserType};
use reqwest::Method;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Where and how to read Entra ID.
#[derive(Clone, Debug)]
pub struct EntraSourceConfig {
    /// Authority host (`https://login.microsoftonline.com`, a national cloud, an emulator).
    pub authority: String,
    /// Graph root (`https://graph.microsoft.com`).
    pub graph: String,
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: Secret,
    /// HTTP settings.
    pub http: HttpConfig,
}

/// The Entra ID source.
#[derive(Debug)]
pub struct EntraSource {
    cfg: EntraSourceConfig,
    http: Http,
    token: Mutex<Option<(Secret, Instant)>>,
}

const GROUP_SELECT: &str = "id,displayName,description,securityEnabled,mailEnabled";
const MEMBER_SELECT: &str = "id,displayName,description,securityEnabled,mailEnabled,userPrincipalName,mail,otherMails,accountEnabled,userType,onPremisesImmutableId,appId";

/// Escapes a string literal for an OData `$filter` (`'` becomes `''`), and percent-encodes it.
pub fn odata_literal(s: &str) -> String {
    let quoted = format!("'{}'", s.replace('\'', "''"));
    let mut out = String::new();
    for b in quoted.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'\'') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn source_error(e: HttpError) -> SourceError {
    let hint = match e.kind {
        ErrorKind::Unauthorized => {
            " Check the tenant id, client id and secret (ENTRA_* or AZURE_* variables), and that the secret has not expired."
        }
        ErrorKind::Forbidden => {
            " The app needs the Graph application permissions GroupMember.Read.All, User.Read.All and Application.Read.All (or Directory.Read.All), with admin consent."
        }
        _ => "",
    };
    SourceError::new(format!("{}{hint}", e.message))
}

fn text(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn group_of(v: &Value) -> Option<Group> {
    Some(Group {
        id: text(v, "id")?,
        display_name: text(v, "displayName").unwrap_or_default(),
        description: text(v, "description"),
        security_enabled: v
            .get("securityEnabled")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        mail_enabled: v
            .get("mailEnabled")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        members: BTreeSet::new(),
    })
}

fn user_of(v: &Value) -> Option<User> {
    let mut emails: Vec<String> = text(v, "mail").into_iter().collect();
    if let Some(other) = v.get("otherMails").and_then(Value::as_array) {
        emails.extend(other.iter().filter_map(|m| m.as_str().map(str::to_owned)));
    }
    Some(User {
        id: text(v, "id")?,
        user_name: text(v, "userPrincipalName").unwrap_or_default(),
        display_name: text(v, "displayName").unwrap_or_default(),
        emails,
        active: v
            .get("accountEnabled")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        user_type: if text(v, "userType").as_deref() == Some("Guest") {
            UserType::Guest
        } else {
            UserType::Member
        },
        external_id: text(v, "onPremisesImmutableId"),
        attributes: BTreeMap::new(),
    })
}

fn sp_of(v: &Value) -> Option<ServicePrincipal> {
    Some(ServicePrincipal {
        id: text(v, "id")?,
        app_id: text(v, "appId")?,
        display_name: text(v, "displayName").unwrap_or_default(),
        active: v
            .get("accountEnabled")
            .and_then(Value::as_bool)
            .unwrap_or(true),
    })
}

impl EntraSource {
    /// A source for this tenant.
    pub fn new(cfg: EntraSourceConfig) -> Result<Self, SourceError> {
        let http = Http::new(cfg.http.clone()).map_err(source_error)?;
        Ok(EntraSource {
            cfg,
            http,
            token: Mutex::new(None),
        })
    }

    /// A Graph token, fetched again five minutes before it expires (a long run never uses a stale
    /// one).
    async fn auth(&self) -> Result<Auth, SourceError> {
        let mut cached = self.token.lock().await;
        if let Some((t, exp)) = cached.as_ref()
            && *exp > Instant::now() + Duration::from_secs(300)
        {
            return Ok(Auth::Bearer(t.clone()));
        }
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.cfg.authority.trim_end_matches('/'),
            self.cfg.tenant_id
        );
        let form = |s: &str| {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect::<String>()
        };
        let body = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
            form(&self.cfg.client_id),
            form(self.cfg.client_secret.expose()),
            form("https://graph.microsoft.com/.default")
        );
        let a = self
            .http
            .send(
                Method::POST,
                &url,
                &Auth::None,
                &[],
                Some(("application/x-www-form-urlencoded", body.into_bytes())),
                true,
            )
            .await
            .map_err(source_error)?;
        let v: Value = a
            .json("Entra ID", "the token request")
            .map_err(source_error)?;
        let token = text(&v, "access_token")
            .ok_or_else(|| SourceError::new("Entra ID answered without an access_token"))?;
        let ttl = v
            .get("expires_in")
            .and_then(|x| {
                x.as_u64()
                    .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(3599);
        let secret = Secret::new(token);
        *cached = Some((secret.clone(), Instant::now() + Duration::from_secs(ttl)));
        Ok(Auth::Bearer(secret))
    }

    /// Every item of a collection, following nextLinks.
    async fn all(&self, first: String) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        let mut url = first;
        loop {
            let auth = self.auth().await?;
            let a = self
                .http
                .send(Method::GET, &url, &auth, &[], None, true)
                .await
                .map_err(source_error)?;
            let page: Value = a.json("Microsoft Graph", "a page").map_err(source_error)?;
            if let Some(items) = page.get("value").and_then(Value::as_array) {
                out.extend(items.iter().cloned());
            }
            match text(&page, "@odata.nextLink") {
                Some(next) => url = next,
                None => return Ok(out),
            }
        }
    }

    fn root(&self) -> String {
        self.cfg.graph.trim_end_matches('/').to_owned()
    }

    /// The groups the scope selects directly.
    async fn roots(
        &self,
        scope: &Scope,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Group>, SourceError> {
        let v1 = format!("{}/v1.0", self.root());
        let mut found: BTreeMap<String, Group> = BTreeMap::new();
        if scope.selects_all() || scope.group_filter.is_some() {
            for g in self
                .all(format!("{v1}/groups?$select={GROUP_SELECT}&$top=999"))
                .await?
                .iter()
                .filter_map(group_of)
            {
                if scope.selects_all()
                    || scope
                        .group_filter
                        .as_deref()
                        .is_some_and(|p| fnmatch(p, &g.display_name))
                {
                    found.insert(g.id.clone(), g);
                }
            }
        }
        for name in &scope.group_names {
            let url = format!(
                "{v1}/groups?$filter=displayName%20eq%20{}&$select={GROUP_SELECT}",
                odata_literal(name)
            );
            let hits: Vec<Group> = self.all(url).await?.iter().filter_map(group_of).collect();
            match hits.len() {
                0 => notes.push(format!(
                    "group {name:?} was asked for but does not exist in the source"
                )),
                1 => {}
                n => notes.push(format!(
                    "{n} groups are named {name:?}; all are read, and the mapping reports the clash"
                )),
            }
            for g in hits {
                found.insert(g.id.clone(), g);
            }
        }
        for id in &scope.group_ids {
            let url = format!("{v1}/groups/{id}?$select={GROUP_SELECT}");
            let auth = self.auth().await?;
            match self
                .http
                .send(Method::GET, &url, &auth, &[], None, true)
                .await
            {
                Ok(a) => {
                    let v: Value = a.json("Microsoft Graph", "a group").map_err(source_error)?;
                    if let Some(g) = group_of(&v) {
                        found.insert(g.id.clone(), g);
                    }
                }
                Err(e) if e.kind == ErrorKind::NotFound => notes.push(format!(
                    "group id {id} was asked for but does not exist in the source"
                )),
                Err(e) => return Err(source_error(e)),
            }
        }
        let mut out = Vec::new();
        for g in found.into_values() {
            if g.security_enabled || scope.include_non_security {
                out.push(g);
            } else {
                notes.push(format!("group {:?} is not security-enabled and is skipped (set include_non_security = true to sync it)", g.display_name));
            }
        }
        Ok(out)
    }

    async fn members(&self, gid: String) -> Result<(String, Vec<Value>), SourceError> {
        let url = format!(
            "{}/beta/groups/{gid}/members?$select={MEMBER_SELECT}&$top=999",
            self.root()
        );
        Ok((gid, self.all(url).await?))
    }
}

#[async_trait]
impl Source for EntraSource {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        let mut notes = Vec::new();
        let mut snap = Snapshot::default();
        let mut depth: BTreeMap<String, u32> = BTreeMap::new();
        let mut frontier: Vec<Group> = self.roots(scope, &mut notes).await?;
        for g in &frontier {
            depth.insert(g.id.clone(), 1);
        }
        let workers = self.cfg.http.max_concurrency.max(1);
        let mut level = 1u32;
        while !frontier.is_empty() {
            let ids: Vec<String> = frontier.iter().map(|g| g.id.clone()).collect();
            let reads = futures::stream::iter(ids.into_iter().map(|id| self.members(id)))
                .buffered(workers)
                .collect::<Vec<_>>()
                .await;
            let mut next = Vec::new();
            for (mut g, r) in frontier.into_iter().zip(reads) {
                let (_, members) = r?;
                for m in &members {
                    let Some(id) = text(m, "id") else { continue };
                    match m.get("@odata.type").and_then(Value::as_str) {
                        Some("#microsoft.graph.user") => {
                            if let Some(u) = user_of(m) {
                                snap.users.entry(id.clone()).or_insert(u);
                            }
                            g.members.insert(Member::user(id));
                        }
                        Some("#microsoft.graph.servicePrincipal") => {
                            if let Some(s) = sp_of(m) {
                                snap.service_principals.entry(id.clone()).or_insert(s);
                            }
                            g.members.insert(Member::service_principal(id));
                        }
                        Some("#microsoft.graph.group") => {
                            g.members.insert(Member::group(id.clone()));
                            if level < scope.search_depth
                                && !depth.contains_key(&id)
                                && let Some(child) = group_of(m)
                                    .filter(|c| c.security_enabled || scope.include_non_security)
                            {
                                depth.insert(id, level + 1);
                                next.push(child);
                            }
                        }
                        _ => {} // devices, contacts: not principals idsync syncs
                    }
                }
                snap.groups.insert(g.id.clone(), g);
            }
            frontier = next;
            level += 1;
        }
        if scope.all_users {
            let url = format!(
                "{}/v1.0/users?$select={MEMBER_SELECT}&$top=999",
                self.root()
            );
            for u in self.all(url).await?.iter().filter_map(user_of) {
                snap.users.entry(u.id.clone()).or_insert(u);
            }
        }
        Ok(Read {
            snapshot: snap,
            cursors: BTreeMap::new(),
            mode: ReadMode::Full,
            depth,
            notes,
        })
    }

    async fn read_changes(
        &self,
        _scope: &Scope,
        _base: &Snapshot,
        _cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        Ok(Changes::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::odata_literal;

    #[test]
    fn odata_literals_are_escaped() {
        assert_eq!(odata_literal("O'Brien"), "'O''Brien'");
        assert_eq!(odata_literal("a b&c"), "'a%20b%26c'");
        assert_eq!(odata_literal("Équipe"), "'%C3%89quipe'");
    }
}
