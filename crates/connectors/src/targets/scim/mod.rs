//! Any SCIM 2.0 service provider (RFC 7643/7644) as a target: users and groups, nested groups when
//! the provider takes them (`nested_groups`), members added and removed by PATCH in chunks
//! (`member_chunk`: 100 for AWS IAM Identity Center).
//!
//! What the provider supports is read from `/ServiceProviderConfig` once: PATCH (else resources are
//! replaced with PUT after a read), `/Bulk` (then a group's member chunks go in one request, up to
//! its `maxOperations`), ETags (then every write carries `If-Match` with the version
//! observed or last written, so a change made meanwhile by someone else fails the write instead of
//! being overwritten), filters and the page size. Values in filters are escaped. Everything is
//! observed in bulk, paginated; group members come with the group listing when the provider
//! returns them, else one read per group.

pub mod config;

use crate::http::{Auth, ErrorKind, Http, HttpConfig, HttpError, percent_encode};
use async_trait::async_trait;
use futures::StreamExt;
use idsync_engine::observe::{Interest, Partial};
use idsync_engine::{Outcome, Target, TargetError, TargetErrorKind};
use idsync_model::{
    Attr, AttrValue, Capabilities, Kind, MemberIds, Observed, ObservedPrincipal, Op, PRef,
    Principal, Secret,
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// The PATCH message schema.
pub(crate) const SCHEMA_PATCH: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const SCHEMA_USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const SCHEMA_GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const SCHEMA_BULK: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";

/// A SCIM list response page.
#[derive(Deserialize)]
pub(crate) struct ListResponse {
    #[serde(rename = "Resources", default)]
    pub resources: Vec<Value>,
    #[serde(rename = "totalResults", default)]
    pub total_results: Option<usize>,
}

pub(crate) fn text(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}

/// Group members' ids as a SCIM group resource lists them.
pub(crate) fn member_ids(v: &Value) -> Vec<String> {
    v.get("members")
        .and_then(Value::as_array)
        .map(|ms| ms.iter().filter_map(|m| text(m, "value")).collect())
        .unwrap_or_default()
}

/// Keys looked up in one filtered list: `k eq "a" or k eq "b" ...` stays far below Databricks'
/// 200 filter nodes and any URL limit.
const KEYS_PER_FILTER: usize = 50;

/// Reads the principals an [`Interest`] names from a SCIM-shaped API, in few requests: one filtered
/// list per kind and 50 keys (`{attr} eq "a" or {attr} eq "b" ...`) covers the keys asked and the
/// keys the picture holds for the ids asked; an id that no key found is read by `GET /{type}/{id}`
/// (404: gone); a group whose members are needed and that the list gave without them is read by
/// id. `get` sends one GET to a path under the base; `parse` turns a resource into a principal;
/// `key_attr` names the key attribute of a kind.
///
/// `Ok(None)` when the provider cannot answer that way (it refuses the filter, or a list holds
/// more than one page): the engine then observes in bulk. `page` is the most resources the
/// provider returns in one list.
pub(crate) async fn read_some<G, F>(
    want: &Interest,
    concurrency: usize,
    page: usize,
    get: G,
    key_attr: fn(Kind) -> &'static str,
    parse: impl Fn(Kind, &Value) -> Option<ObservedPrincipal>,
) -> Result<Option<Partial>, TargetError>
where
    G: Fn(String) -> F,
    F: std::future::Future<Output = Result<crate::http::Answer, TargetError>>,
{
    let read = |path: String| {
        let answer = get(path);
        async move {
            match answer.await {
                Ok(a) => a
                    .json::<Value>("the SCIM provider", "reading principals")
                    .map(Some)
                    .map_err(target_error),
                Err(e) if e.kind == TargetErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }
    };
    let resource = |kind: Kind| match kind {
        Kind::User => "Users",
        Kind::ServicePrincipal => "ServicePrincipals",
        Kind::Group => "Groups",
    };
    // Keys to look up, per kind: those asked, and those the picture holds for the ids asked.
    let mut keys: BTreeMap<Kind, BTreeSet<&str>> = BTreeMap::new();
    for (kind, key) in &want.keys {
        keys.entry(*kind).or_default().insert(key);
    }
    for (kind, id) in &want.ids {
        if let Some(key) = want.hints.get(id) {
            keys.entry(*kind).or_default().insert(key);
        }
    }
    let mut paths: Vec<(Kind, String)> = Vec::new();
    // Each key finds one principal, or a few: half a page of keys leaves room for duplicates.
    let per_filter = (page / 2).clamp(1, KEYS_PER_FILTER);
    for (kind, set) in &keys {
        let set: Vec<&str> = set.iter().copied().collect();
        for chunk in set.chunks(per_filter) {
            let filter = chunk
                .iter()
                .map(|k| format!("{} eq {}", key_attr(*kind), scim_string(k)))
                .collect::<Vec<_>>()
                .join(" or ");
            let path = format!(
                "/{}?filter={}&count={page}",
                resource(*kind),
                percent_encode(&filter, b""),
            );
            paths.push((*kind, path));
        }
    }
    let lists = futures::stream::iter(paths.into_iter().map(|(kind, path)| {
        let read = &read;
        async move { Ok::<_, TargetError>((kind, read(path).await?)) }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    let asked_keys: BTreeSet<(Kind, String)> = want
        .keys
        .iter()
        .map(|(k, key)| (*k, key.to_lowercase()))
        .collect();
    let mut out = Partial::default();
    let mut found: BTreeSet<(Kind, String)> = BTreeSet::new();
    let mut members_of: BTreeSet<String> = BTreeSet::new();
    for r in lists {
        let (kind, list) = match r {
            Ok(r) => r,
            // A provider that refuses `or` filters (or filters at all): observe in bulk.
            Err(e)
                if matches!(
                    e.kind,
                    TargetErrorKind::Invalid | TargetErrorKind::NotImplemented
                ) =>
            {
                tracing::info!(error = %e, "the provider refused a filtered list; observing in bulk");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let Some(list) = list else { continue };
        let page: ListResponse = serde_json::from_value(list).map_err(|e| {
            TargetError::new(
                TargetErrorKind::Protocol,
                format!(
                    "the SCIM provider answered a filtered list that is not a ListResponse: {e}"
                ),
            )
        })?;
        // More than one page: the holders of a key could be on the next; observe in bulk.
        if page.total_results.is_some_and(|t| t > page.resources.len()) {
            return Ok(None);
        }
        for v in &page.resources {
            let Some(p) = parse(kind, v) else { continue };
            if !found.insert((kind, p.id.clone())) {
                continue;
            }
            let by_key = asked_keys.contains(&(kind, p.principal.key.to_lowercase()));
            if kind == Kind::Group && (by_key || want.members.contains(&p.id)) {
                if v.get("members").is_some() {
                    out.members.insert(p.id.clone(), member_ids(v));
                } else {
                    members_of.insert(p.id.clone());
                }
            }
            out.principals.push(p);
        }
    }
    // Ids no key found (renamed or deleted behind idsync's back), and groups still without members.
    let by_id: Vec<(Kind, String)> = want
        .ids
        .iter()
        .filter(|(k, id)| !found.contains(&(*k, id.clone())))
        .cloned()
        .chain(members_of.iter().map(|g| (Kind::Group, g.clone())))
        .collect();
    let reads = futures::stream::iter(by_id.into_iter().map(|(kind, id)| {
        let path = format!("/{}/{}", resource(kind), percent_encode(&id, b""));
        let read = &read;
        async move { Ok::<_, TargetError>((kind, read(path).await?)) }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    for r in reads {
        let (kind, v) = r?;
        let Some(v) = v else { continue };
        let Some(p) = parse(kind, &v) else { continue };
        if kind == Kind::Group && (members_of.contains(&p.id) || want.members.contains(&p.id)) {
            out.members.insert(p.id.clone(), member_ids(&v));
        }
        if found.insert((kind, p.id.clone())) {
            out.principals.push(p);
        }
    }
    Ok(Some(out))
}

pub(crate) fn id_of(r: &PRef) -> Result<&str, TargetError> {
    r.id.as_deref().ok_or_else(|| {
        TargetError::new(
            TargetErrorKind::Invalid,
            format!("{r} has no id in the target"),
        )
    })
}

/// A SCIM filter string literal: quotes and backslashes escaped (RFC 7644 §3.4.2.2, JSON string).
pub(crate) fn scim_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The PATCH path that selects one member.
pub(crate) fn member_path(id: &str) -> String {
    format!("members[value eq {}]", scim_string(id))
}

/// Where and how to reach the provider.
#[derive(Clone, Debug)]
pub struct ScimConfig {
    /// The SCIM base URL (`https://example.com/scim/v2`).
    pub url: String,
    /// The bearer token.
    pub token: Option<Secret>,
    /// HTTP settings.
    pub http: HttpConfig,
    /// Members per PATCH.
    pub member_chunk: usize,
    /// The provider keeps groups in groups (else nested groups are flattened).
    pub nested_groups: bool,
}

/// What the provider said it supports.
#[derive(Clone, Debug)]
struct Features {
    patch: bool,
    etag: bool,
    /// Lists can be filtered (`filter.supported`).
    filter: bool,
    page: usize,
    /// Operations per `/Bulk` request, when the provider offers it.
    bulk: Option<usize>,
}

/// A SCIM 2.0 target.
#[derive(Debug)]
pub struct ScimTarget {
    http: Http,
    cfg: ScimConfig,
    features: tokio::sync::OnceCell<Features>,
    /// Resource id → the version (ETag) last seen, when the provider has ETags.
    versions: Mutex<BTreeMap<String, String>>,
}

fn target_error(e: HttpError) -> TargetError {
    let (kind, hint) = match e.kind {
        ErrorKind::Unauthorized => (
            TargetErrorKind::Unauthorized,
            " The SCIM provider rejected the token: check SCIM_TOKEN (or the target's token) and that it has not expired.",
        ),
        ErrorKind::Forbidden => (
            TargetErrorKind::Forbidden,
            " The token may not write users and groups.",
        ),
        ErrorKind::NotFound => (TargetErrorKind::NotFound, ""),
        ErrorKind::Conflict => (TargetErrorKind::AlreadyExists, ""),
        ErrorKind::NotImplemented => (TargetErrorKind::NotImplemented, ""),
        ErrorKind::Throttled => (TargetErrorKind::Throttled, ""),
        ErrorKind::Unavailable => (TargetErrorKind::Unavailable, ""),
        ErrorKind::Protocol => (TargetErrorKind::Protocol, ""),
        ErrorKind::Invalid | ErrorKind::Gone if e.status == Some(412) => (
            TargetErrorKind::Invalid,
            " The resource changed in the provider since it was observed (ETag): the next run sees the change and plans again.",
        ),
        ErrorKind::Invalid | ErrorKind::Gone => (TargetErrorKind::Invalid, ""),
    };
    TargetError::new(kind, format!("{}{hint}", e.message))
}

/// A user or group resource as a principal (`None` without an id or a key).
fn principal(kind: Kind, v: &Value) -> Option<ObservedPrincipal> {
    let id = text(v, "id")?;
    let mut p = match kind {
        Kind::Group => Principal::new(Kind::Group, text(v, "displayName")?),
        _ => {
            let mut p = Principal::new(Kind::User, text(v, "userName")?);
            p.display_name = text(v, "displayName");
            p.active = v.get("active").and_then(Value::as_bool).unwrap_or(true);
            let mut emails: Vec<(bool, String)> = v
                .get("emails")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e.get("primary").and_then(Value::as_bool).unwrap_or(false),
                        text(e, "value")?,
                    ))
                })
                .collect();
            emails.sort_by_key(|(primary, _)| !primary);
            p.emails = emails.into_iter().map(|(_, e)| e).collect();
            p
        }
    };
    p.external_id = text(v, "externalId");
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

impl ScimTarget {
    /// A target for this provider.
    pub fn new(cfg: ScimConfig) -> Result<Self, TargetError> {
        let http = Http::new(cfg.http.clone()).map_err(target_error)?;
        Ok(ScimTarget {
            http,
            cfg,
            features: tokio::sync::OnceCell::new(),
            versions: Mutex::new(BTreeMap::new()),
        })
    }

    fn auth(&self) -> Auth {
        self.cfg.token.clone().map_or(Auth::None, Auth::Bearer)
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
        idempotent: bool,
    ) -> Result<crate::http::Answer, TargetError> {
        let url = format!("{}{path}", self.cfg.url.trim_end_matches('/'));
        let body = body.map(|b| ("application/scim+json", b.to_string().into_bytes()));
        let headers: Vec<(&str, &str)> = if_match.map(|v| ("If-Match", v)).into_iter().collect();
        self.http
            .send(method, &url, &self.auth(), &headers, body, idempotent)
            .await
            .map_err(target_error)
    }

    /// `/ServiceProviderConfig`, read once; a provider without one gets cautious defaults.
    async fn features(&self) -> Result<&Features, TargetError> {
        self.features
            .get_or_try_init(|| async {
                match self
                    .call(Method::GET, "/ServiceProviderConfig", None, None, true)
                    .await
                {
                    Ok(a) => {
                        let v: Value = a
                            .json("the SCIM provider", "/ServiceProviderConfig")
                            .map_err(target_error)?;
                        let on = |k: &str| v.pointer(k).and_then(Value::as_bool).unwrap_or(false);
                        let max = v
                            .pointer("/filter/maxResults")
                            .and_then(Value::as_u64)
                            .map_or(100, |m| m.clamp(1, 1000) as usize);
                        let bulk = on("/bulk/supported").then(|| {
                            v.pointer("/bulk/maxOperations")
                                .and_then(Value::as_u64)
                                .map_or(10, |m| m.clamp(1, 1000) as usize)
                        });
                        Ok(Features {
                            patch: on("/patch/supported"),
                            etag: on("/etag/supported"),
                            filter: on("/filter/supported"),
                            page: max,
                            bulk,
                        })
                    }
                    Err(e) if e.kind == TargetErrorKind::NotFound => {
                        tracing::warn!("the SCIM provider has no /ServiceProviderConfig; assuming PATCH, no ETags, pages of 100");
                        Ok(Features {
                            patch: true,
                            etag: false,
                            filter: true,
                            page: 100,
                            bulk: None,
                        })
                    }
                    Err(e) => Err(e),
                }
            })
            .await
    }

    /// Remembers a resource's version from a write's answer (`ETag`, or `meta.version`).
    fn remember(&self, id: &str, a: &crate::http::Answer) {
        let from_header = a
            .headers
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let from_body = serde_json::from_slice::<Value>(&a.body).ok().and_then(|v| {
            v.pointer("/meta/version")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        match from_header.or(from_body) {
            Some(v) => {
                self.versions().insert(id.to_owned(), v);
            }
            None => {
                self.versions().remove(id);
            }
        }
    }

    /// The version to send as `If-Match`, read from the provider when none is known.
    async fn version(&self, kind: Kind, id: &str) -> Result<Option<String>, TargetError> {
        if !self.features().await?.etag {
            return Ok(None);
        }
        if let Some(v) = self.versions().get(id).cloned() {
            return Ok(Some(v));
        }
        let a = self
            .call(
                Method::GET,
                &format!("/{}/{}", resource(kind), percent_encode(id, b"")),
                None,
                None,
                true,
            )
            .await?;
        self.remember(id, &a);
        Ok(self.versions().get(id).cloned())
    }

    /// Every resource of a type, page by page (`startIndex` is 1-based).
    async fn list(&self, kind: Kind, attributes: &str) -> Result<Vec<Value>, TargetError> {
        let count = self.features().await?.page;
        let mut out = Vec::new();
        loop {
            let path = format!(
                "/{}?attributes={attributes}&startIndex={}&count={count}",
                resource(kind),
                out.len() + 1
            );
            let a = self.call(Method::GET, &path, None, None, true).await?;
            let page: ListResponse = a
                .json("the SCIM provider", &format!("listing {}", resource(kind)))
                .map_err(target_error)?;
            let n = page.resources.len();
            out.extend(page.resources);
            if n == 0 || page.total_results.is_none_or(|t| out.len() >= t) {
                return Ok(out);
            }
        }
    }

    /// Applies PATCH operations to one resource: a PATCH where supported, else a read, the
    /// operations applied to it here, and a PUT. Either way with `If-Match` when there are ETags.
    async fn modify(&self, kind: Kind, id: &str, ops: Vec<Value>) -> Result<(), TargetError> {
        let path = format!("/{}/{}", resource(kind), percent_encode(id, b""));
        let version = self.version(kind, id).await?;
        let a = if self.features().await?.patch {
            let body = json!({"schemas": [SCHEMA_PATCH], "Operations": ops});
            self.call(Method::PATCH, &path, Some(body), version.as_deref(), true)
                .await?
        } else {
            let current = self.call(Method::GET, &path, None, None, true).await?;
            let mut v: Value = current
                .json("the SCIM provider", "reading a resource")
                .map_err(target_error)?;
            apply_ops(&mut v, &ops);
            if let Some(m) = v.as_object_mut() {
                m.remove("meta");
            }
            let version = version.or_else(|| {
                current
                    .headers
                    .get(reqwest::header::ETAG)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
            self.call(Method::PUT, &path, Some(v), version.as_deref(), true)
                .await?
        };
        self.remember(id, &a);
        Ok(())
    }
}

impl ScimTarget {
    /// Several PATCHes of one resource (member chunks): in `/Bulk` requests where the provider
    /// offers them (the first operation carrying the version, `failOnErrors` 1), else one by one.
    async fn modify_all(
        &self,
        kind: Kind,
        id: &str,
        patches: Vec<Vec<Value>>,
    ) -> Result<(), TargetError> {
        let f = self.features().await?.clone();
        let Some(max) = f.bulk.filter(|_| f.patch && patches.len() > 1) else {
            for ops in patches {
                self.modify(kind, id, ops).await?;
            }
            return Ok(());
        };
        let path = format!("/{}/{}", resource(kind), percent_encode(id, b""));
        for batch in patches.chunks(max) {
            let version = self.version(kind, id).await?;
            let operations: Vec<Value> = batch
                .iter()
                .enumerate()
                .map(|(i, ops)| {
                    let mut op = json!({"method": "PATCH", "path": path,
                        "data": {"schemas": [SCHEMA_PATCH], "Operations": ops}});
                    if let (0, Some(v)) = (i, &version) {
                        op["version"] = json!(v);
                    }
                    op
                })
                .collect();
            let body =
                json!({"schemas": [SCHEMA_BULK], "failOnErrors": 1, "Operations": operations});
            let a = self
                .call(Method::POST, "/Bulk", Some(body), None, false)
                .await?;
            let v: Value = a
                .json("the SCIM provider", "a /Bulk request")
                .map_err(target_error)?;
            let results = v
                .get("Operations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for r in &results {
                let status = r
                    .get("status")
                    .and_then(|s| {
                        s.as_str()
                            .map(str::to_owned)
                            .or_else(|| s.as_u64().map(|n| n.to_string()))
                    })
                    .unwrap_or_default();
                if !status.starts_with('2') {
                    let detail = r
                        .pointer("/response/detail")
                        .and_then(Value::as_str)
                        .unwrap_or("no detail");
                    let hint = if status == "412" {
                        " The resource changed in the provider since it was observed (ETag): the next run sees the change and plans again."
                    } else {
                        ""
                    };
                    return Err(TargetError::new(
                        TargetErrorKind::Invalid,
                        format!(
                            "the SCIM provider refused a /Bulk operation on {path} ({status}: {detail}).{hint}"
                        ),
                    ));
                }
            }
            if results.len() < batch.len() {
                return Err(TargetError::new(
                    TargetErrorKind::Protocol,
                    format!(
                        "the SCIM provider answered {} of {} /Bulk operations",
                        results.len(),
                        batch.len()
                    ),
                ));
            }
            match results
                .last()
                .and_then(|r| r.get("version"))
                .and_then(Value::as_str)
            {
                Some(v) => {
                    self.versions().insert(id.to_owned(), v.to_owned());
                }
                None => {
                    self.versions().remove(id);
                }
            }
        }
        Ok(())
    }
}

/// The PATCH operations idsync sends (replace a top-level attribute, add members, remove one
/// member), applied to a resource's JSON: for providers without PATCH.
fn apply_ops(v: &mut Value, ops: &[Value]) {
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        match op.get("op").and_then(Value::as_str) {
            Some("replace") => v[path] = op["value"].clone(),
            Some("add") if path == "members" => {
                let list = v["members"].as_array().cloned().unwrap_or_default();
                let mut list: Vec<Value> = list;
                for m in op["value"].as_array().into_iter().flatten() {
                    if !list.iter().any(|x| x["value"] == m["value"]) {
                        list.push(m.clone());
                    }
                }
                v["members"] = Value::Array(list);
            }
            Some("remove") => {
                // members[value eq "ID"]
                let id: Option<String> = path
                    .strip_prefix("members[value eq ")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|lit| serde_json::from_str(lit).ok());
                if let (Some(id), Some(list)) = (id, v["members"].as_array_mut()) {
                    list.retain(|m| m["value"].as_str() != Some(id.as_str()));
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Target for ScimTarget {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            nested_groups: self.cfg.nested_groups,
            service_principals: false,
            service_principal_members: false,
            renamable: [Kind::User, Kind::Group].into(),
            deactivate: true,
            case_insensitive_keys: true,
            attributes: [
                Attr::Key,
                Attr::DisplayName,
                Attr::Active,
                Attr::Emails,
                Attr::ExternalId,
            ]
            .into(),
            group_policies: false,
            max_members_per_write: self.cfg.member_chunk.max(1),
        }
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        let etag = self.features().await?.etag;
        let mut o = Observed::default();
        let mut kinds = BTreeMap::new();
        let remember = |v: &Value, id: &str| {
            if etag && let Some(ver) = v.pointer("/meta/version").and_then(Value::as_str) {
                self.versions().insert(id.to_owned(), ver.to_owned());
            }
        };
        for v in self
            .list(
                Kind::User,
                "id,userName,displayName,active,emails,externalId,meta",
            )
            .await?
        {
            let Some(p) = principal(Kind::User, &v) else {
                continue;
            };
            remember(&v, &p.id);
            kinds.insert(p.id.clone(), Kind::User);
            o.insert(p);
        }
        let groups = self
            .list(Kind::Group, "id,displayName,externalId,members,meta")
            .await?;
        for v in &groups {
            let Some(p) = principal(Kind::Group, v) else {
                continue;
            };
            remember(v, &p.id);
            kinds.insert(p.id.clone(), Kind::Group);
            o.insert(p);
        }
        // Members: from the listing when the provider includes them, else one read per group.
        let members_of = member_ids;
        let listed = groups.iter().any(|v| v.get("members").is_some());
        let mut lists: Vec<(String, Vec<String>)> = Vec::new();
        if listed || groups.is_empty() {
            for v in &groups {
                if let Some(id) = text(v, "id") {
                    lists.push((id, members_of(v)));
                }
            }
        } else {
            let ids: Vec<String> = groups.iter().filter_map(|v| text(v, "id")).collect();
            let reads = futures::stream::iter(ids.into_iter().map(|id| async move {
                let a = self
                    .call(
                        Method::GET,
                        &format!("/Groups/{}", percent_encode(&id, b"")),
                        None,
                        None,
                        true,
                    )
                    .await?;
                let v: Value = a
                    .json("the SCIM provider", "reading a group")
                    .map_err(target_error)?;
                Ok::<_, TargetError>((id, members_of(&v)))
            }))
            .buffered(self.cfg.http.max_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
            for r in reads {
                lists.push(r?);
            }
        }
        for (gid, members) in lists {
            // Members the listings did not return (deleted meanwhile, dangling) are skipped.
            let set: MemberIds = members
                .into_iter()
                .filter_map(|m| kinds.get(&m).map(|k| (*k, m)))
                .collect();
            o.members.insert(gid, set);
        }
        Ok(o)
    }

    async fn observe_some(&self, want: &Interest) -> Result<Option<Partial>, TargetError> {
        let etag = self.features().await?.etag;
        let get =
            |path: String| async move { self.call(Method::GET, &path, None, None, true).await };
        let key_attr = |kind: Kind| match kind {
            Kind::Group => "displayName",
            _ => "userName",
        };
        let parse = |kind: Kind, v: &Value| {
            let p = principal(kind, v)?;
            if etag && let Some(ver) = v.pointer("/meta/version").and_then(Value::as_str) {
                self.versions().insert(p.id.clone(), ver.to_owned());
            }
            Some(p)
        };
        let features = self.features().await?;
        if !features.filter {
            return Ok(None);
        }
        let concurrency = self.cfg.http.max_concurrency;
        read_some(want, concurrency, features.page, get, key_attr, parse).await
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        match op {
            Op::Create { principal: p, .. } => {
                let mut body = match p.kind {
                    Kind::User => {
                        let emails: Vec<Value> = p
                            .emails
                            .iter()
                            .enumerate()
                            .map(|(i, e)| json!({"value": e, "type": "work", "primary": i == 0}))
                            .collect();
                        json!({"schemas": [SCHEMA_USER], "userName": p.key,
                            "displayName": p.display_name, "active": p.active, "emails": emails})
                    }
                    Kind::Group => json!({"schemas": [SCHEMA_GROUP], "displayName": p.key}),
                    Kind::ServicePrincipal => {
                        return Err(TargetError::new(
                            TargetErrorKind::NotImplemented,
                            "SCIM 2.0 has no service principals",
                        ));
                    }
                };
                if let Some(x) = &p.external_id {
                    body["externalId"] = json!(x);
                }
                let a = self
                    .call(
                        Method::POST,
                        &format!("/{}", resource(p.kind)),
                        Some(body),
                        None,
                        false,
                    )
                    .await?;
                let v: Value = a
                    .json("the SCIM provider", "a create")
                    .map_err(target_error)?;
                let id = text(&v, "id").ok_or_else(|| {
                    TargetError::new(
                        TargetErrorKind::Protocol,
                        "the SCIM provider created a resource without an id",
                    )
                })?;
                self.remember(&id, &a);
                Ok(Outcome::Created(id))
            }
            Op::Update {
                target, changes, ..
            } => {
                let mut ops = Vec::new();
                for c in changes {
                    let (path, value) = match (c.attr, &c.to, target.kind) {
                        (Attr::Key, AttrValue::Text(Some(v)), Kind::Group) => {
                            ("displayName", json!(v))
                        }
                        (Attr::Key, AttrValue::Text(Some(v)), _) => ("userName", json!(v)),
                        (Attr::DisplayName, AttrValue::Text(v), Kind::User) => {
                            ("displayName", json!(v))
                        }
                        (Attr::Active, AttrValue::Bool(b), Kind::User) => ("active", json!(b)),
                        (Attr::ExternalId, AttrValue::Text(v), _) => ("externalId", json!(v)),
                        (Attr::Emails, AttrValue::List(es), Kind::User) => (
                            "emails",
                            json!(es.iter().enumerate().map(|(i, e)| json!({"value": e, "type": "work", "primary": i == 0})).collect::<Vec<_>>()),
                        ),
                        _ => continue,
                    };
                    ops.push(json!({"op": "replace", "path": path, "value": value}));
                }
                if !ops.is_empty() {
                    self.modify(target.kind, id_of(target)?, ops).await?;
                }
                Ok(Outcome::Done)
            }
            Op::Deactivate { target } => {
                self.modify(
                    target.kind,
                    id_of(target)?,
                    vec![json!({"op": "replace", "path": "active", "value": false})],
                )
                .await?;
                Ok(Outcome::Done)
            }
            Op::Delete { target, .. } => {
                let id = id_of(target)?;
                let version = self.version(target.kind, id).await.unwrap_or(None);
                match self
                    .call(
                        Method::DELETE,
                        &format!("/{}/{}", resource(target.kind), percent_encode(id, b"")),
                        None,
                        version.as_deref(),
                        true,
                    )
                    .await
                {
                    Err(e) if e.kind == TargetErrorKind::NotFound => Ok(Outcome::Done),
                    other => other.map(|_| Outcome::Done),
                }
            }
            Op::AddMembers { group, members } => {
                let mut patches = Vec::new();
                for chunk in members.chunks(self.cfg.member_chunk.max(1)) {
                    let value: Result<Vec<Value>, TargetError> = chunk
                        .iter()
                        .map(|m| {
                            let mut v = json!({"value": id_of(m)?});
                            if m.kind == Kind::Group {
                                v["type"] = json!("Group");
                            }
                            Ok(v)
                        })
                        .collect();
                    patches.push(vec![
                        json!({"op": "add", "path": "members", "value": value?}),
                    ]);
                }
                self.modify_all(Kind::Group, id_of(group)?, patches).await?;
                Ok(Outcome::Done)
            }
            Op::RemoveMembers { group, members } => {
                let mut patches = Vec::new();
                for chunk in members.chunks(self.cfg.member_chunk.max(1)) {
                    let ops: Result<Vec<Value>, TargetError> = chunk
                        .iter()
                        .map(|m| Ok(json!({"op": "remove", "path": member_path(id_of(m)?)})))
                        .collect();
                    patches.push(ops?);
                }
                self.modify_all(Kind::Group, id_of(group)?, patches).await?;
                Ok(Outcome::Done)
            }
            Op::AttachPolicies { .. } => Err(TargetError::new(
                TargetErrorKind::NotImplemented,
                "SCIM groups have no policies",
            )),
            Op::Adopt { .. } | Op::Forget { .. } => Ok(Outcome::Done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_filters_escape_quotes_and_backslashes() {
        assert_eq!(member_path("a\"b\\c"), r#"members[value eq "a\"b\\c"]"#);
    }

    #[test]
    fn operations_apply_to_a_resource_for_providers_without_patch() {
        let mut g =
            json!({"id": "g", "displayName": "old", "members": [{"value": "u1"}, {"value": "u2"}]});
        apply_ops(
            &mut g,
            &[
                json!({"op": "replace", "path": "displayName", "value": "new"}),
                json!({"op": "add", "path": "members", "value": [{"value": "u3"}, {"value": "u1"}]}),
                json!({"op": "remove", "path": member_path("u2")}),
            ],
        );
        assert_eq!(g["displayName"], "new");
        assert_eq!(g["members"], json!([{"value": "u1"}, {"value": "u3"}]));
    }
}
