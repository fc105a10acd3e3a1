//! Microsoft Entra ID as a source, through Microsoft Graph: a full read of the scope. Groups are
//! selected by name (`displayName eq '...'`, OData-escaped), by id, or by an fnmatch filter on their
//! names, then walked to the search depth; members are read from `/beta` (v1.0 leaves service
//! principals out) with a minimal `$select`, so users and service principals come with the member
//! lists and need no request of their own. Authentication: any [`EntraCredential`], the token
//! cached and renewed before it expires.
//!
//! Incremental reads follow Graph's delta queries for groups (with `members@delta`, member by
//! member), users and service principals: renames, disables and deletions, members joining and
//! leaving, groups entering the scope (read in full). An expired token makes the caller read in
//! full. The cursors are stored by the caller only after a successful apply.

pub mod config;

use crate::entra_auth::{EntraAuth, EntraCredential, GRAPH_SCOPE};
use crate::http::{Auth, ErrorKind, Http, HttpConfig, HttpError, percent_encode};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use idsync_engine::Lookup;
use idsync_engine::scope::{EdgeGroups, Scope};
use idsync_engine::{Changes, Read, Source, SourceError, SourceErrorKind};
use idsync_model::{
    Change, Group, Id, Ids, Kind, Member, ReadMode, ServicePrincipal, Snapshot, User, UserType,
};
use reqwest::Method;
use serde_json::Value;
use std::collections::BTreeMap;

/// Where and how to read Entra ID.
#[derive(Clone, Debug)]
pub struct EntraSourceConfig {
    /// Authority host (`https://login.microsoftonline.com`, a national cloud, an emulator).
    pub authority: String,
    /// Graph root (`https://graph.microsoft.com`).
    pub graph: String,
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// How to sign in.
    pub credential: EntraCredential,
    /// HTTP settings.
    pub http: HttpConfig,
}

/// The Entra ID source.
#[derive(Debug)]
pub struct EntraSource {
    cfg: EntraSourceConfig,
    http: Http,
    auth: EntraAuth,
}

const GROUP_SELECT: &str = "id,displayName,description,securityEnabled,mailEnabled";
const MEMBER_SELECT: &str = "id,displayName,description,securityEnabled,mailEnabled,userPrincipalName,mail,otherMails,accountEnabled,userType,onPremisesImmutableId,appId";

/// Escapes a string literal for an OData `$filter` (`'` becomes `''`), and percent-encodes it.
pub fn odata_literal(s: &str) -> String {
    percent_encode(&format!("'{}'", s.replace('\'', "''")), b"'")
}

fn source_error(e: HttpError) -> SourceError {
    let hint = match e.kind {
        ErrorKind::Unauthorized => {
            " Check the tenant id and the credentials of the sign-in method (ENTRA_* or AZURE_* variables): a client id, and a secret or certificate that has not expired, or a federated credential or managed identity granted to the app."
        }
        ErrorKind::Forbidden => {
            " The app needs the Graph application permissions GroupMember.Read.All, User.Read.All and Application.Read.All (or Directory.Read.All), with admin consent."
        }
        _ => "",
    };
    let kind = match e.kind {
        ErrorKind::Unauthorized => SourceErrorKind::Unauthorized,
        ErrorKind::Forbidden => SourceErrorKind::Forbidden,
        ErrorKind::NotFound | ErrorKind::Gone => SourceErrorKind::NotFound,
        ErrorKind::Throttled => SourceErrorKind::Throttled,
        ErrorKind::Unavailable => SourceErrorKind::Unavailable,
        ErrorKind::Protocol => SourceErrorKind::Protocol,
        ErrorKind::Invalid | ErrorKind::Conflict | ErrorKind::NotImplemented => {
            SourceErrorKind::Invalid
        }
    };
    SourceError::of(kind, format!("{}{hint}", e.message))
}

/// A page's items. A page without a `value` list is never read as an empty one: that would
/// take every member of a group for gone. A 200 that carries an error says which.
fn items(page: &mut Value, what: &str) -> Result<Vec<Value>, SourceError> {
    match page.get_mut("value").map(Value::take) {
        Some(Value::Array(items)) => Ok(items),
        other => {
            let why = match page.pointer("/error/message").and_then(Value::as_str) {
                Some(m) => format!("an error in a successful answer: {m:?}"),
                None if other.is_some() => "`value` that is not a list".to_owned(),
                None => "no `value` list".to_owned(),
            };
            Err(SourceError::of(
                SourceErrorKind::Protocol,
                format!(
                    "Microsoft Graph answered {what} with {why}; nothing was read from it, and nothing is applied from this read"
                ),
            ))
        }
    }
}

/// Follows a nextLink only to where the first request went (the token goes with it), and only
/// once: a page that links back to one already read would loop forever.
fn follow(
    next: Option<String>,
    root: &str,
    seen: &mut std::collections::HashSet<String>,
) -> Result<Option<String>, SourceError> {
    let Some(next) = next else { return Ok(None) };
    let origin = |u: &str| -> String {
        let rest = u.split_once("://").map_or(u, |(_, r)| r);
        let host = rest.split('/').next().unwrap_or_default();
        format!("{}://{host}", u.split("://").next().unwrap_or_default()).to_ascii_lowercase()
    };
    if origin(&next) != origin(root) {
        return Err(SourceError::of(
            SourceErrorKind::Protocol,
            format!(
                "Microsoft Graph sent a nextLink to {:?}, not to {:?}: idsync does not send its token elsewhere; nothing is applied from this read",
                origin(&next),
                origin(root)
            ),
        ));
    }
    if !seen.insert(next.clone()) {
        return Err(SourceError::of(
            SourceErrorKind::Protocol,
            "Microsoft Graph sent a nextLink to a page it had already sent (a loop); nothing is applied from this read",
        ));
    }
    Ok(Some(next))
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
        members: Default::default(),
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
        let login = Http::new(HttpConfig {
            service: "Entra ID".into(),
            ..cfg.http.clone()
        })
        .map_err(source_error)?;
        let auth = EntraAuth::new(
            &cfg.authority,
            &cfg.tenant_id,
            cfg.credential.clone(),
            login,
        );
        Ok(EntraSource { cfg, http, auth })
    }

    /// A Graph token, fetched again five minutes before it expires (a long run never uses a stale
    /// one).
    async fn auth(&self) -> Result<Auth, SourceError> {
        self.auth.bearer(GRAPH_SCOPE).await.map_err(source_error)
    }

    /// Every item of a collection, following nextLinks.
    async fn all(&self, first: String) -> Result<Vec<Value>, SourceError> {
        self.all_of(first, Some).await
    }

    /// Every item of a collection, following nextLinks, each made into what `of` makes of it as
    /// soon as its page is read (items it makes nothing of are left out): the parsed JSON of a
    /// page is dropped before the next one is read.
    async fn all_of<T>(
        &self,
        first: String,
        of: impl Fn(Value) -> Option<T>,
    ) -> Result<Vec<T>, SourceError> {
        let mut out = Vec::new();
        let mut url = first;
        let mut seen = std::collections::HashSet::new();
        loop {
            let mut page: Value = self
                .http
                .persist(
                    |e: &SourceError| {
                        matches!(
                            e.kind,
                            SourceErrorKind::Unavailable
                                | SourceErrorKind::Throttled
                                | SourceErrorKind::Protocol
                        )
                    },
                    || async {
                        let auth = self.auth().await?;
                        let a = self
                            .http
                            .send(Method::GET, &url, &auth, &[], None, true)
                            .await
                            .map_err(source_error)?;
                        a.json("Microsoft Graph", "a page").map_err(source_error)
                    },
                )
                .await?;
            let got = items(&mut page, "a page")?;
            idsync_engine::progress::add(idsync_engine::progress::Phase::Read, got.len());
            out.extend(got.into_iter().filter_map(&of));
            match follow(text(&page, "@odata.nextLink"), &self.cfg.graph, &mut seen)? {
                Some(next) => url = next,
                None => return Ok(out),
            }
        }
    }

    fn root(&self) -> String {
        self.cfg.graph.trim_end_matches('/').to_owned()
    }

    /// Group names per `displayName in (...)` filter.
    const NAMES_PER_FILTER: usize = 15;
    /// Name look-ups in flight at once.
    const NAME_READS_IN_FLIGHT: usize = 4;

    /// The groups the scope selects directly.
    async fn roots(
        &self,
        scope: &Scope,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Group>, SourceError> {
        let v1 = format!("{}/v1.0", self.root());
        let mut found: BTreeMap<String, Group> = BTreeMap::new();
        if scope.selects_all() || scope.has_name_pattern() {
            for g in self
                .all(format!("{v1}/groups?$select={GROUP_SELECT}&$top=999"))
                .await?
                .iter()
                .filter_map(group_of)
            {
                if scope.selects(&g.id, &g.display_name) {
                    found.insert(g.id.clone(), g);
                }
            }
        }
        // Names 15 to a `displayName in (...)` (Graph's `in` works wherever `eq` does), a few
        // requests at a time: 500 names are 34 requests, not 500 one after another.
        let names: Vec<&String> = scope.group_names.iter().collect();
        let urls: Vec<String> = names
            .chunks(Self::NAMES_PER_FILTER)
            .map(|chunk| {
                let list: Vec<String> = chunk.iter().map(|n| odata_literal(n)).collect();
                format!(
                    "{v1}/groups?$filter=displayName%20in%20({})&$select={GROUP_SELECT}&$top=999",
                    list.join(",")
                )
            })
            .collect();
        let pages: Vec<Vec<Value>> = futures::stream::iter(urls.into_iter().map(|u| self.all(u)))
            .buffer_unordered(Self::NAME_READS_IN_FLIGHT)
            .try_collect()
            .await?;
        // Directory names compare without case, as Graph's filter does.
        let mut by_name: BTreeMap<String, Vec<Group>> = BTreeMap::new();
        for g in pages.iter().flatten().filter_map(group_of) {
            by_name
                .entry(g.display_name.to_lowercase())
                .or_default()
                .push(g);
        }
        for name in &scope.group_names {
            let hits = by_name
                .get(&name.to_lowercase())
                .cloned()
                .unwrap_or_default();
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

    /// Groups by id (15 to a `$filter=id in (...)`), security-enabled unless the scope takes
    /// others; ids that no longer exist are skipped.
    async fn groups_by_id(&self, ids: &[String], scope: &Scope) -> Result<Vec<Group>, SourceError> {
        let select = GROUP_SELECT.trim_start_matches("id,");
        Ok(self
            .by_ids("groups", ids, select)
            .await?
            .iter()
            .filter_map(group_of)
            .filter(|g| g.security_enabled || scope.include_non_security)
            .collect())
    }

    /// One group's members, page by page.
    async fn members(&self, gid: &str, seen: &Seen) -> Result<Vec<Obj>, SourceError> {
        let url = format!(
            "{}/beta/groups/{}/members?$select={MEMBER_SELECT}&$top=999",
            self.root(),
            percent_encode(gid, b"")
        );
        self.all_of(url, |m| Obj::read(&m, seen)).await
    }

    /// One `$batch` of member reads. A group with more members than one page continues with its
    /// nextLink; an item that failed inside the batch (429, 5xx, a body that is not a page) is
    /// read again on its own, after the item's `Retry-After`, with the client's retries.
    async fn members_batch(
        &self,
        gids: Vec<String>,
        seen: &Seen,
    ) -> Result<Vec<Vec<Obj>>, SourceError> {
        if gids.len() == 1 {
            return Ok(vec![self.members(&gids[0], seen).await?]);
        }
        let requests: Vec<Value> = gids
            .iter()
            .enumerate()
            .map(|(i, g)| {
                serde_json::json!({
                    "id": i.to_string(),
                    "method": "GET",
                    "url": format!("/groups/{}/members?$select={MEMBER_SELECT}&$top=999", percent_encode(g, b"")),
                })
            })
            .collect();
        let body = serde_json::json!({ "requests": requests }).to_string();
        let auth = self.auth().await?;
        let a = self
            .http
            .send(
                Method::POST,
                &format!("{}/beta/$batch", self.root()),
                &auth,
                &[],
                Some(("application/json", body.into_bytes())),
                true, // only GETs inside
            )
            .await
            .map_err(source_error)?;
        // Each item is taken in as it is parsed: the answer's text stays, but never more than one
        // member page of it as JSON values (up to 20 of them were 20-30 MB at once).
        let answers = batch_answers(&a.body, seen)
            .map_err(|e| source_error(a.not_json("Microsoft Graph", "a $batch request", &e)))?;
        drop(a);
        let mut answers: BTreeMap<usize, BatchItem> = answers.0.into_iter().collect();
        // Items that failed inside the batch wait once, for the longest Retry-After among them,
        // then are read on their own, concurrently, with the client's retries.
        let mut out: Vec<Option<Vec<Obj>>> = Vec::with_capacity(gids.len());
        let mut nexts: Vec<(usize, String)> = Vec::new();
        let mut failed: Vec<usize> = Vec::new();
        let mut wait = 0u64;
        for (i, gid) in gids.iter().enumerate() {
            match answers.remove(&i) {
                Some(BatchItem::Page { objs, next }) => {
                    if let Some(next) = follow(next, &self.cfg.graph, &mut Default::default())? {
                        nexts.push((i, next));
                    }
                    out.push(Some(objs));
                }
                answer => {
                    let (status, after) = match answer {
                        Some(BatchItem::Failed { status, after }) => (status, after),
                        _ => (None, 0),
                    };
                    tracing::debug!(group = %gid, ?status, after, "a $batch item failed; reading it alone");
                    wait = wait.max(after);
                    failed.push(i);
                    out.push(None);
                }
            }
        }
        // The batch's answer is dropped before a large group's further pages are read. Each
        // group's pages follow one another (a nextLink is only known from the page before), but
        // the groups' chains run together: one after another, the largest groups of a tenant
        // (often in one batch) made the whole read wait for the sum of their pages.
        let chains = futures::future::try_join_all(nexts.into_iter().map(|(i, next)| async move {
            Ok::<_, SourceError>((i, self.all_of(next, |m| Obj::read(&m, seen)).await?))
        }))
        .await?;
        for (i, more) in chains {
            if let Some(items) = out[i].as_mut() {
                items.extend(more);
            }
        }
        if !failed.is_empty() {
            let wait = wait.min(self.cfg.http.max_backoff.as_secs());
            if wait > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            }
            let reads =
                futures::future::join_all(failed.iter().map(|&i| self.members(&gids[i], seen)))
                    .await;
            for (&i, r) in failed.iter().zip(reads) {
                out[i] = Some(r?);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

/// One item of a `$batch` of member reads, as the read keeps it.
enum BatchItem {
    /// A member page: what the snapshot keeps of its members, and the link to the next page.
    Page {
        objs: Vec<Obj>,
        next: Option<String>,
    },
    /// Anything else (a 429 or 5xx inside the batch, a body that is not a page): read again
    /// alone, after `after` seconds.
    Failed { status: Option<u64>, after: u64 },
}

impl BatchItem {
    /// An item from its JSON, by its id (the group's place in the batch); `None` without one.
    fn of(mut r: Value, seen: &Seen) -> Option<(usize, BatchItem)> {
        let i = r.get("id")?.as_str()?.parse().ok()?;
        let page = r.get("status").and_then(Value::as_u64) == Some(200)
            && r.pointer("/body/value").is_some_and(Value::is_array);
        if !page {
            let status = r.get("status").and_then(Value::as_u64);
            let after = r
                .get("headers")
                .and_then(|h| {
                    h.as_object()?
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                        .and_then(|(_, v)| v.as_str()?.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            return Some((i, BatchItem::Failed { status, after }));
        }
        let body = r.get_mut("body")?;
        let next = body
            .get("@odata.nextLink")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let items = match body.get_mut("value").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        idsync_engine::progress::add(idsync_engine::progress::Phase::Read, items.len());
        let objs = items.iter().filter_map(|m| Obj::read(m, seen)).collect();
        Some((i, BatchItem::Page { objs, next }))
    }
}

/// A `$batch` answer's items, each turned into a [`BatchItem`] as soon as it is parsed. A
/// `responses` that is not a list holds no item (each group is then read alone).
struct BatchAnswers(Vec<(usize, BatchItem)>);

/// Reads a `$batch` answer into [`BatchAnswers`] for a read that has `seen` so far.
struct BatchSeed<'a>(&'a Seen);

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = BatchAnswers;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<BatchAnswers, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Items<'a>(&'a Seen);
        impl<'de> Visitor<'de> for Items<'_> {
            type Value = Vec<(usize, BatchItem)>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the list of a $batch's responses")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                let mut out = Vec::new();
                while let Some(r) = seq.next_element::<Value>()? {
                    out.extend(BatchItem::of(r, self.0));
                }
                Ok(out)
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Vec::new())
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
        }
        impl<'de> serde::de::DeserializeSeed<'de> for Items<'_> {
            type Value = Vec<(usize, BatchItem)>;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
        }
        struct Answer<'a>(&'a Seen);
        impl<'de> Visitor<'de> for Answer<'_> {
            type Value = BatchAnswers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a $batch answer (an object with `responses`)")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<BatchAnswers, M::Error> {
                let mut out = Vec::new();
                while let Some(key) = m.next_key::<String>()? {
                    if key == "responses" {
                        out = m.next_value_seed(Items(self.0))?;
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(BatchAnswers(out))
            }
        }
        d.deserialize_map(Answer(self.0))
    }
}

/// A `$batch` answer's text as [`BatchAnswers`] (the whole text: nothing may follow the answer).
fn batch_answers(text: &[u8], seen: &Seen) -> Result<BatchAnswers, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let answers = serde::de::DeserializeSeed::deserialize(BatchSeed(seen), &mut de)?;
    de.end()?;
    Ok(answers)
}

/// Requests in one `$batch`: Graph's limit.
const BATCH_MAX: usize = 20;

/// `$batch` member reads in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// Cursor names in the agreement state.
const CURSOR_GROUPS: &str = "graph.groups";
const CURSOR_USERS: &str = "graph.users";
const CURSOR_SPS: &str = "graph.servicePrincipals";
const GROUP_DELTA_SELECT: &str = "displayName,description,securityEnabled,mailEnabled,members";
const USER_DELTA_SELECT: &str =
    "displayName,userPrincipalName,mail,otherMails,accountEnabled,userType,onPremisesImmutableId";
const SP_DELTA_SELECT: &str = "appId,displayName,accountEnabled";

/// A member from its directory object, its id shared through `ids`; `None` for what idsync does
/// not sync (devices, contacts).
fn member_of(m: &Value, ids: &mut Ids) -> Option<Member> {
    let kind = kind_of(m)?;
    let id = m.get("id").and_then(Value::as_str)?;
    Some(Member {
        kind,
        id: ids.get(id),
    })
}

/// What a member is, by its `@odata.type`.
fn kind_of(m: &Value) -> Option<Kind> {
    Some(match m.get("@odata.type").and_then(Value::as_str)? {
        "#microsoft.graph.user" => Kind::User,
        "#microsoft.graph.servicePrincipal" => Kind::ServicePrincipal,
        "#microsoft.graph.group" => Kind::Group,
        _ => return None,
    })
}

/// A member as Graph lists it, reduced to what a snapshot keeps of it as soon as its page is
/// read: a page of 999 members is a megabyte of text and several once parsed, and a group of
/// 100,000 members is a hundred pages.
enum Obj {
    User(Box<User>),
    /// A user this read already has in full (from another group's page): its id alone. A user
    /// is in about ten groups, and the largest groups' pages wait together for their last one:
    /// 420,000 full copies of users at once at 100k users.
    Known(Id),
    /// A service principal; `sp` is `None` when Graph's object lacks what one needs (its
    /// `appId`): it is still a member.
    Sp {
        id: String,
        sp: Option<Box<ServicePrincipal>>,
    },
    /// A group, without its members.
    Group(Box<Group>),
}

/// What one read has taken in so far, shared by its pages read at once: one shared id per
/// principal, and the users already read in full.
#[derive(Default)]
struct Seen(std::sync::Mutex<SeenIds>);

#[derive(Default)]
struct SeenIds {
    ids: Ids,
    users: idsync_model::fnv::FnvSet<Id>,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeenIds> {
        // Nothing panics while holding it; a poisoned set is still a set.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared id of `id`.
    fn id(&self, id: &str) -> Id {
        self.lock().ids.get(id)
    }
}

impl Obj {
    /// What idsync syncs of a directory object (not devices or contacts), `None` without an id.
    fn of(m: &Value) -> Option<Obj> {
        Some(match kind_of(m)? {
            Kind::User => Obj::User(Box::new(user_of(m)?)),
            Kind::ServicePrincipal => Obj::Sp {
                id: text(m, "id")?,
                sp: sp_of(m).map(Box::new),
            },
            Kind::Group => Obj::Group(Box::new(group_of(m)?)),
        })
    }

    /// [`Obj::of`], for a read that has `seen` so far: a user it has in full is its id alone.
    /// A user is marked only once it is read in full.
    fn read(m: &Value, seen: &Seen) -> Option<Obj> {
        if kind_of(m)? == Kind::User {
            let id = m.get("id").and_then(Value::as_str)?;
            let mut s = seen.lock();
            if let Some(known) = s.users.get(id) {
                return Some(Obj::Known(known.clone()));
            }
            let u = user_of(m)?;
            let shared = s.ids.get(&u.id);
            s.users.insert(shared);
            return Some(Obj::User(Box::new(u)));
        }
        Obj::of(m)
    }

    fn kind(&self) -> Kind {
        match self {
            Obj::User(_) | Obj::Known(_) => Kind::User,
            Obj::Sp { .. } => Kind::ServicePrincipal,
            Obj::Group(_) => Kind::Group,
        }
    }

    fn id(&self) -> &str {
        match self {
            Obj::User(u) => &u.id,
            Obj::Known(id) => id,
            Obj::Sp { id, .. } => id,
            Obj::Group(g) => &g.id,
        }
    }
}

/// Adds a batch of groups with the members read for them; nested groups still within the search
/// depth go to `next`.
#[allow(clippy::too_many_arguments)] // One caller: the walk's state, each borrowed apart.
fn take_members(
    groups: Vec<Group>,
    reads: Vec<Vec<Obj>>,
    level: u32,
    scope: &Scope,
    snap: &mut Snapshot,
    depth: &mut BTreeMap<String, u32>,
    next: &mut Vec<Group>,
    seen: &Seen,
) {
    for (mut g, members) in groups.into_iter().zip(reads) {
        // Built into the set at once (one sort, one bulk build): inserted one by one, a set's
        // nodes are left part empty.
        let mut list = Vec::with_capacity(members.len());
        for m in members {
            let member = Member {
                kind: m.kind(),
                id: match &m {
                    Obj::Known(id) => id.clone(),
                    _ => seen.id(m.id()),
                },
            };
            match m {
                Obj::User(u) => {
                    if !snap.users.contains_key(&u.id) {
                        snap.users.insert(u.id.clone(), std::sync::Arc::new(*u));
                    }
                }
                Obj::Known(_) => {}
                Obj::Sp { sp, .. } => {
                    if let Some(sp) = sp {
                        snap.service_principals.entry(sp.id.clone()).or_insert(*sp);
                    }
                }
                Obj::Group(child) => {
                    let admitted = || {
                        Some((*child).clone())
                            .filter(|c| c.security_enabled || scope.include_non_security)
                    };
                    if level < scope.search_depth
                        && !depth.contains_key(&*member.id)
                        && !snap.groups.contains_key(&*member.id)
                        && let Some(child) = admitted()
                    {
                        depth.insert(member.id.to_string(), level + 1);
                        next.push(child);
                    } else if level == scope.search_depth
                        && scope.edge_groups == EdgeGroups::Empty
                        && !depth.contains_key(&*member.id)
                        && let Some(edge) = admitted()
                    {
                        // One level beyond the depth: kept without members.
                        snap.edge_groups.insert(member.id.to_string(), edge);
                    }
                }
            }
            list.push(member);
        }
        if g.members.is_empty() {
            g.members = list.into_iter().collect();
        } else {
            g.members.extend(list);
        }
        snap.incomplete_groups.remove(&g.id);
        snap.groups.insert(g.id.clone(), g);
    }
}

impl EntraSource {
    /// Reads `frontier` and walks nested groups down to the search depth, adding what it finds.
    async fn expand(
        &self,
        mut frontier: Vec<Group>,
        mut level: u32,
        scope: &Scope,
        snap: &mut Snapshot,
        depth: &mut BTreeMap<String, u32>,
    ) -> Result<(), SourceError> {
        for g in &frontier {
            depth.insert(g.id.clone(), level);
        }
        // Members name each principal through one shared id (a user is in about ten groups),
        // and a user read in full once is its id alone on the pages after.
        let seen = Seen::default();
        let seen = &seen;
        while !frontier.is_empty() {
            let mut next = Vec::new();
            // Each `$batch` of 20 groups is taken into the snapshot as soon as it is read, in
            // whatever order the batches finish (a group's depth is its level either way): members as JSON are ten times the size of what they become, so only the
            // batches in flight are ever held (all 1M memberships at once were a gigabyte).
            // A `$batch` answer is up to 20 × 999 members (20 MB once parsed): a few in flight
            // keep the read fast without holding a gigabyte of JSON at 64 workers.
            let workers = self.cfg.http.max_concurrency.clamp(1, BATCHES_IN_FLIGHT);
            let mut chunks: Vec<Vec<Group>> = Vec::new();
            let mut rest = frontier.into_iter().peekable();
            while rest.peek().is_some() {
                chunks.push(rest.by_ref().take(BATCH_MAX).collect());
            }
            let mut reads = futures::stream::iter(chunks.into_iter().map(|chunk| async move {
                let ids: Vec<String> = chunk.iter().map(|g| g.id.clone()).collect();
                let members = self.members_batch(ids, seen).await?;
                Ok::<_, SourceError>((chunk, members))
            }))
            .buffer_unordered(workers);
            while let Some(read) = reads.next().await {
                let (chunk, members) = read?;
                take_members(chunk, members, level, scope, snap, depth, &mut next, seen);
            }
            frontier = next;
            level += 1;
        }
        Ok(())
    }

    /// A deltaLink that starts from now (`$deltatoken=latest`).
    async fn latest(&self, path: &str, select: &str) -> Result<String, SourceError> {
        let url = format!(
            "{}/{path}/delta?$deltatoken=latest&$select={select}",
            self.root()
        );
        let auth = self.auth().await?;
        let a = self
            .http
            .send(Method::GET, &url, &auth, &[], None, true)
            .await
            .map_err(source_error)?;
        let v: Value = a
            .json("Microsoft Graph", "a delta token")
            .map_err(source_error)?;
        text(&v, "@odata.deltaLink").ok_or_else(|| {
            SourceError::new("Microsoft Graph answered a delta request without a deltaLink")
        })
    }

    /// The changes since a deltaLink, page by page, and the next deltaLink. `Ok(None)`: the token
    /// expired (410, `syncStateNotFound`, `resyncRequired`).
    async fn changes(&self, link: &str) -> Result<Option<(Vec<Value>, String)>, SourceError> {
        let mut items = Vec::new();
        let mut url = link.to_owned();
        let mut seen = std::collections::HashSet::new();
        loop {
            let auth = self.auth().await?;
            let a = match self
                .http
                .send(Method::GET, &url, &auth, &[], None, true)
                .await
            {
                Ok(a) => a,
                Err(e)
                    if e.kind == ErrorKind::Gone
                        || matches!(
                            e.code.as_deref(),
                            Some("syncStateNotFound" | "resyncRequired")
                        ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(source_error(e)),
            };
            let mut page: Value = a
                .json("Microsoft Graph", "a delta page")
                .map_err(source_error)?;
            let got = self::items(&mut page, "a delta page")?;
            idsync_engine::progress::add(idsync_engine::progress::Phase::Read, got.len());
            items.extend(got);
            if let Some(next) = follow(text(&page, "@odata.nextLink"), &self.cfg.graph, &mut seen)?
            {
                url = next;
            } else if let Some(delta) = text(&page, "@odata.deltaLink") {
                return Ok(Some((items, delta)));
            } else {
                return Err(SourceError::new(
                    "Microsoft Graph ended a delta round without a deltaLink",
                ));
            }
        }
    }

    /// Users or service principals by id, 15 at a time (the most an `in` filter takes).
    async fn by_ids(
        &self,
        path: &str,
        ids: &[String],
        select: &str,
    ) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(15) {
            let list: Vec<String> = chunk.iter().map(|i| odata_literal(i)).collect();
            let url = format!(
                "{}/v1.0/{path}?$filter=id%20in%20({})&$select=id,{select}",
                self.root(),
                list.join(",")
            );
            out.extend(self.all(url).await?);
        }
        Ok(out)
    }
}

/// Graph's delta items as changes: a group's new name, its members added and removed, users and
/// service principals changed or deleted. A delta item may carry only the properties that changed,
/// so a group's attributes count only when its name came with it.
fn delta_changes(groups: &[Value], users: &[Value], sps: &[Value]) -> Vec<Change> {
    let mut out = Vec::new();
    let mut ids = Ids::default();
    for item in groups {
        let Some(id) = text(item, "id") else { continue };
        if item.get("@removed").is_some() {
            out.push(Change::Remove(Member::group(id)));
            continue;
        }
        let Some(g) = group_of(item) else { continue };
        // Whatever else it says, the group changed: new to the snapshot and selected by id (or
        // every group selected), it is read in full.
        out.push(Change::Touched { group: id.clone() });
        if item.get("displayName").is_some() {
            out.push(Change::UpsertGroup {
                id: id.clone(),
                display_name: g.display_name.clone(),
                description: g.description.clone(),
            });
        }
        for m in item
            .get("members@delta")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(member) = member_of(m, &mut ids) else {
                continue;
            };
            let group = id.clone();
            out.push(if m.get("@removed").is_some() {
                Change::RemoveMember { group, member }
            } else {
                Change::AddMember { group, member }
            });
        }
    }
    for item in users {
        let Some(id) = text(item, "id") else { continue };
        if item.get("@removed").is_some() {
            out.push(Change::Remove(Member::user(id)));
        } else if let Some(u) = user_of(item) {
            out.push(Change::UpsertUser(u));
        }
    }
    for item in sps {
        let Some(id) = text(item, "id") else { continue };
        if item.get("@removed").is_some() {
            out.push(Change::Remove(Member::service_principal(id)));
        } else if let Some(sp) = sp_of(item) {
            out.push(Change::UpsertServicePrincipal(sp));
        }
    }
    out
}

#[async_trait]
impl Lookup for EntraSource {
    async fn users(&self, ids: &[String]) -> Result<Vec<User>, SourceError> {
        Ok(self
            .by_ids("users", ids, USER_DELTA_SELECT)
            .await?
            .iter()
            .filter_map(user_of)
            .collect())
    }

    async fn service_principals(
        &self,
        ids: &[String],
    ) -> Result<Vec<ServicePrincipal>, SourceError> {
        Ok(self
            .by_ids("servicePrincipals", ids, SP_DELTA_SELECT)
            .await?
            .iter()
            .filter_map(sp_of)
            .collect())
    }

    async fn groups(&self, ids: &[String], scope: &Scope) -> Result<Vec<Group>, SourceError> {
        self.groups_by_id(ids, scope).await
    }

    async fn expand(
        &self,
        groups: Vec<Group>,
        level: u32,
        scope: &Scope,
        snap: &mut Snapshot,
        depth: &mut BTreeMap<String, u32>,
    ) -> Result<(), SourceError> {
        EntraSource::expand(self, groups, level, scope, snap, depth).await
    }
}

impl EntraSource {
    /// A full read of the scope.
    async fn read_all(&self, scope: &Scope) -> Result<Read, SourceError> {
        // Cursors first: a change made while the scope is read is replayed next time, not lost.
        let cursors = BTreeMap::from([
            (
                CURSOR_GROUPS.to_owned(),
                self.latest("beta/groups", GROUP_DELTA_SELECT).await?,
            ),
            (
                CURSOR_USERS.to_owned(),
                self.latest("v1.0/users", USER_DELTA_SELECT).await?,
            ),
            (
                CURSOR_SPS.to_owned(),
                self.latest("v1.0/servicePrincipals", SP_DELTA_SELECT)
                    .await?,
            ),
        ]);
        let mut notes = Vec::new();
        let mut snap = Snapshot::default();
        let mut depth: BTreeMap<String, u32> = BTreeMap::new();
        let roots = self.roots(scope, &mut notes).await?;
        self.expand(roots, 1, scope, &mut snap, &mut depth).await?;
        if scope.all_users {
            // A user's own properties: Graph refuses a $select with a group's or an app's (400).
            let url = format!(
                "{}/v1.0/users?$select=id,{USER_DELTA_SELECT}&$top=999",
                self.root()
            );
            for u in self.all(url).await?.iter().filter_map(user_of) {
                snap.users
                    .entry(u.id.clone())
                    .or_insert(std::sync::Arc::new(u));
            }
        }
        // Beyond the depth means the scope does not reach it by any path (as `select` draws it).
        snap.edge_groups.retain(|id, _| !depth.contains_key(id));
        notes.extend(idsync_engine::scope::cycle_notes(&snap));
        Ok(Read {
            snapshot: snap.into(),
            cursors,
            mode: ReadMode::Full,
            depth,
            notes,
            unchanged: false,
        })
    }
}

#[async_trait]
impl Source for EntraSource {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        let read = self.read_all(scope).await;
        // The read's connections are not needed until the next run's (their buffers would be
        // kept through the plan and the apply).
        self.http.close_idle();
        read
    }

    async fn read_changes(
        &self,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        let (Some(gl), Some(ul), Some(sl)) = (
            cursors.get(CURSOR_GROUPS),
            cursors.get(CURSOR_USERS),
            cursors.get(CURSOR_SPS),
        ) else {
            return Ok(Changes::Unsupported);
        };
        let expired =
            || Changes::Expired("the Graph delta token expired (Graph keeps them 7 days)".into());
        let Some((groups, gl2)) = self.changes(gl).await? else {
            return Ok(expired());
        };
        let Some((users, ul2)) = self.changes(ul).await? else {
            return Ok(expired());
        };
        let Some((sps, sl2)) = self.changes(sl).await? else {
            return Ok(expired());
        };

        let changes = delta_changes(&groups, &users, &sps);
        let idsync_engine::Folded {
            snapshot,
            depth,
            notes,
            unchanged,
        } = idsync_engine::fold(base, &changes, scope, self).await?;
        let cursors = BTreeMap::from([
            (CURSOR_GROUPS.to_owned(), gl2),
            (CURSOR_USERS.to_owned(), ul2),
            (CURSOR_SPS.to_owned(), sl2),
        ]);
        Ok(Changes::Read(Read {
            snapshot,
            cursors,
            mode: ReadMode::Incremental,
            depth,
            notes,
            unchanged,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::odata_literal;

    /// Undoes percent-encoding, as a server does before it parses a query.
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Whatever a group's name holds, the `$filter` idsync sends reads back as that name:
        /// the OData parser of the Graph emulator sees one comparison with the exact value.
        #[test]
        fn any_name_survives_an_odata_filter(s in "\\PC*") {
            let sent = format!("displayName eq {}", odata_literal(&s));
            let parsed = idsync_emulators::graph::odata::parse_filter(&percent_decode(&sent));
            proptest::prop_assert_eq!(
                parsed,
                Ok(idsync_emulators::graph::odata::Filter::Eq(
                    "displayName".into(),
                    serde_json::Value::String(s.clone())
                ))
            );
        }
    }

    #[test]
    fn a_user_read_in_full_once_is_its_shared_id_on_the_pages_after() {
        use super::{Obj, Seen};
        let seen = Seen::default();
        let ada = serde_json::json!({
            "@odata.type": "#microsoft.graph.user", "id": "u1",
            "userPrincipalName": "ada@example.com", "accountEnabled": true,
        });
        assert!(matches!(Obj::read(&ada, &seen), Some(Obj::User(u)) if u.id == "u1"));
        let again = Obj::read(&ada, &seen);
        let Some(Obj::Known(id)) = &again else {
            panic!("the second time, the id alone");
        };
        assert!(id.shares(&seen.id("u1")), "the one shared id");
        assert_eq!(
            again.as_ref().map(|o| (o.kind(), o.id())),
            Some((super::Kind::User, "u1"))
        );
        // A user without an id is left out, every time.
        let idless = serde_json::json!({"@odata.type": "#microsoft.graph.user", "userPrincipalName": "x@example.com"});
        assert!(Obj::read(&idless, &seen).is_none());
        assert!(Obj::read(&idless, &seen).is_none());
        // Groups and service principals are read in full every time.
        let g = serde_json::json!({"@odata.type": "#microsoft.graph.group", "id": "g1", "displayName": "G"});
        assert!(matches!(Obj::read(&g, &seen), Some(Obj::Group(_))));
        assert!(matches!(Obj::read(&g, &seen), Some(Obj::Group(_))));
    }

    #[test]
    fn a_batch_answer_is_taken_item_by_item_and_failures_are_kept_apart() {
        use super::{BatchItem, Obj, Seen, batch_answers};
        let seen = Seen::default();
        let text = r##"{
            "nextLink": null,
            "responses": [
                {"id": "1", "status": 429, "headers": {"Retry-After": " 7 "}, "body": {}},
                {"id": "0", "status": 200, "body": {
                    "@odata.nextLink": "https://graph.example/beta/groups/g/members?$skiptoken=x",
                    "value": [
                        {"@odata.type": "#microsoft.graph.user", "id": "u1",
                         "userPrincipalName": "zoë@example.com", "accountEnabled": true},
                        {"@odata.type": "#microsoft.graph.device", "id": "d1"},
                        {"@odata.type": "#microsoft.graph.group", "id": "g2", "displayName": "\"x\""}
                    ]}},
                {"id": "2", "status": 200, "body": {"error": {"message": "no"}}},
                {"status": 200, "body": {"value": []}},
                {"id": "3", "status": 200, "body": {"value": []}}
            ]
        }"##;
        let answers = batch_answers(text.as_bytes(), &seen).unwrap();
        let by_id: std::collections::BTreeMap<usize, BatchItem> = answers.0.into_iter().collect();
        assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
        match &by_id[&0] {
            BatchItem::Page { objs, next } => {
                let ids: Vec<&str> = objs.iter().map(Obj::id).collect();
                assert_eq!(ids, ["u1", "g2"], "the device is not synced");
                assert!(next.as_deref().is_some_and(|n| n.ends_with("skiptoken=x")));
            }
            BatchItem::Failed { .. } => panic!("a page"),
        }
        assert!(matches!(
            by_id[&1],
            BatchItem::Failed {
                status: Some(429),
                after: 7
            }
        ));
        assert!(
            matches!(
                by_id[&2],
                BatchItem::Failed {
                    status: Some(200),
                    after: 0
                }
            ),
            "a body that is not a page is read again alone"
        );
        assert!(matches!(&by_id[&3], BatchItem::Page { objs, next: None } if objs.is_empty()));
        // A `responses` that is not a list holds no item; an answer that is not an object, or
        // is cut short, is an error.
        for odd in [
            r#"{"responses": null}"#,
            r#"{"responses": {"a": 1}}"#,
            r#"{}"#,
        ] {
            let a = batch_answers(odd.as_bytes(), &seen).unwrap();
            assert!(a.0.is_empty(), "{odd}");
        }
        for bad in [
            "<html>",
            r#"{"responses": [{"id": "0", "status": 200"#,
            "[]",
            r#"{"responses": []} <html>"#,
        ] {
            assert!(batch_answers(bad.as_bytes(), &seen).is_err(), "{bad}");
        }
    }

    #[test]
    fn members_are_kept_as_what_the_snapshot_needs() {
        use super::{Kind, Obj};
        let of = |v: serde_json::Value| Obj::of(&v).map(|o| (o.kind(), o.id().to_owned()));
        let user = serde_json::json!({
            "@odata.type": "#microsoft.graph.user", "id": "u1",
            "userPrincipalName": "ada@example.com", "accountEnabled": false,
        });
        match Obj::of(&user) {
            Some(Obj::User(u)) => {
                assert_eq!(
                    (u.id.as_str(), u.user_name.as_str()),
                    ("u1", "ada@example.com")
                );
                assert!(!u.active);
            }
            _ => panic!("a user"),
        }
        // A service principal without its appId is still a member, kept out of the principals.
        let sp =
            serde_json::json!({"@odata.type": "#microsoft.graph.servicePrincipal", "id": "s1"});
        assert!(matches!(Obj::of(&sp), Some(Obj::Sp { sp: None, .. })));
        assert_eq!(of(sp), Some((Kind::ServicePrincipal, "s1".into())));
        let group = serde_json::json!({
            "@odata.type": "#microsoft.graph.group", "id": "g1", "displayName": "G",
            "securityEnabled": false,
        });
        match Obj::of(&group) {
            Some(Obj::Group(g)) => assert!(!g.security_enabled && g.members.is_empty()),
            _ => panic!("a group"),
        }
        // What idsync does not sync, and objects without an id, are left out.
        assert_eq!(
            of(serde_json::json!({"@odata.type": "#microsoft.graph.device", "id": "d"})),
            None
        );
        assert_eq!(
            of(serde_json::json!({"@odata.type": "#microsoft.graph.user"})),
            None
        );
        assert_eq!(of(serde_json::json!({"id": "x"})), None);
    }

    #[test]
    fn odata_literals_are_escaped() {
        assert_eq!(odata_literal("O'Brien"), "'O''Brien'");
        assert_eq!(odata_literal("a b&c"), "'a%20b%26c'");
        assert_eq!(odata_literal("Équipe"), "'%C3%89quipe'");
    }
}
