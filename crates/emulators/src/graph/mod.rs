//! A stateful emulator of Microsoft Graph (v1.0 and beta: users, groups, service principals,
//! members, transitive members, delta queries, `$batch`) and of the Microsoft identity platform's
//! token endpoint. Behaviour follows `docs/apis/graph.md`; where an official client disagrees,
//! the client wins.

pub mod batch;
pub mod odata;
pub mod resources;
pub mod token;

use crate::infra::{self, Infra};
use crate::tenant::{Event, Tenant};
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use idsync_model::{Group, Kind, Member, ServicePrincipal, User};
use odata::{Filter, decode_token, encode_token, parse_filter};
use resources::{Collection, check_select, project};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Knobs a test can turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Settings {
    /// Lifetime of access tokens.
    pub token_ttl_secs: u64,
    /// Objects per delta page.
    pub delta_page_size: usize,
    /// Members of one group per delta page entry: larger groups are split across pages.
    pub member_chunk: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            token_ttl_secs: 3599,
            delta_page_size: 100,
            member_chunk: 100,
        }
    }
}

struct Issued {
    expires: Instant,
    audience: String,
}

/// A delta round being paged through.
struct Round {
    items: Vec<Value>,
    delta_token: String,
    used: Instant,
}

/// Rounds kept at most, and for how long after their last page was read: a client may fetch a
/// page again (its response was lost), so a round outlives its last page for a while.
const MAX_ROUNDS: usize = 64;
const ROUND_TTL: Duration = Duration::from_secs(600);

/// The emulator's state.
pub struct GraphState {
    tenant: RwLock<Tenant>,
    /// Accounting, faults, throttling.
    pub infra: Arc<Infra>,
    tokens: Mutex<BTreeMap<String, Issued>>,
    settings: Mutex<Settings>,
    rounds: Mutex<BTreeMap<String, Round>>,
    counter: AtomicU64,
    router: OnceLock<Router>,
    /// Device code sign-ins and refresh tokens.
    pub(crate) sessions: Mutex<token::Sessions>,
    /// Served over HTTPS: links it builds say `https://`.
    pub(crate) tls: std::sync::atomic::AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GraphState {
    /// A fresh emulator state around `tenant`.
    pub fn new(tenant: Tenant) -> Arc<Self> {
        Arc::new(GraphState {
            tenant: RwLock::new(tenant),
            infra: Infra::new(graph_error),
            tokens: Mutex::new(BTreeMap::new()),
            settings: Mutex::new(Settings::default()),
            rounds: Mutex::new(BTreeMap::new()),
            counter: AtomicU64::new(1),
            router: OnceLock::new(),
            sessions: Mutex::new(token::Sessions::default()),
            tls: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads the tenant.
    pub fn tenant(&self) -> RwLockReadGuard<'_, Tenant> {
        self.tenant.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the tenant (changes show up in delta rounds).
    pub fn tenant_mut(&self) -> RwLockWriteGuard<'_, Tenant> {
        self.tenant.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings.
    pub fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Changes the settings.
    pub fn set_settings(&self, s: Settings) {
        *lock(&self.settings) = s;
    }

    pub(crate) fn unique(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Issues an access token for an audience: opaque (`emu.`), or a JWT for Azure Storage.
    pub fn issue_token(&self, audience: &str) -> (String, u64) {
        let ttl = self.settings().token_ttl_secs;
        lock(&self.tokens).retain(|_, i| i.expires > Instant::now());
        let serial = self.unique().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let tok = if is_storage_audience(audience) {
            // Azure Storage (and Azurite, which tests stand in for it with) reads the token's
            // claims: a JWT with the v1 issuer, as Entra ID issues for storage. Its signature is
            // not a real one (Azurite does not verify it; this emulator knows its own tokens).
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let tenant = self.tenant().tenant_id.clone();
            let part = |v: serde_json::Value| token::b64url_encode(v.to_string().as_bytes());
            format!(
                "{}.{}.{}",
                part(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
                part(
                    serde_json::json!({"aud": audience, "iss": format!("https://sts.windows.net/{tenant}/"),
                    "iat": now, "nbf": now, "exp": now + ttl, "tid": tenant, "ver": "1.0",
                    "uti": format!("{serial:x}")})
                ),
                part(serde_json::json!("emulator: not signed"))
            )
        } else {
            format!("emu.{}.{serial:x}", audience.len())
        };
        lock(&self.tokens).insert(
            tok.clone(),
            Issued {
                expires: Instant::now() + Duration::from_secs(ttl),
                audience: audience.to_owned(),
            },
        );
        (tok, ttl)
    }

    /// Whether a bearer token is valid for an audience: `Err(message)` when not.
    pub fn check_token(&self, token: &str, audience: &str) -> Result<(), &'static str> {
        let tokens = lock(&self.tokens);
        match tokens.get(token) {
            None => Err("Invalid access token."),
            Some(i) if i.expires <= Instant::now() => {
                Err("Lifetime validation failed, the token is expired.")
            }
            Some(i) if i.audience != audience => Err("Invalid audience."),
            Some(_) => Ok(()),
        }
    }
}

/// Azure Storage's resource ids (`https://storage.azure.com`, an account's blob endpoint).
fn is_storage_audience(audience: &str) -> bool {
    let a = audience.trim_end_matches('/');
    a == "https://storage.azure.com"
        || (a.starts_with("https://") && a.ends_with(".blob.core.windows.net"))
}

/// The Graph error body, with the request-id headers Graph sends.
pub fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    let id = format!(
        "{:016x}",
        Instant::now().elapsed().as_nanos() ^ 0x5eed_5eed_5eed
    );
    let body = json!({"error": {"code": code, "message": message,
        "innerError": {"date": "2026-11-22T00:00:00", "request-id": id, "client-request-id": id}}});
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

fn bad(code: &str, message: &str) -> Response {
    graph_error(StatusCode::BAD_REQUEST, code, message)
}

fn not_found(what: &str, id: &str) -> Response {
    graph_error(
        StatusCode::NOT_FOUND,
        "Request_ResourceNotFound",
        &format!(
            "Resource '{id}' does not exist or one of its queried reference-property objects are not present. ({what})"
        ),
    )
}

/// The audience Graph tokens are issued for.
pub const GRAPH_AUDIENCE: &str = "https://graph.microsoft.com";

async fn auth(State(st): State<Arc<GraphState>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        None => graph_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token is empty.",
        ),
        Some(t) => match st.check_token(t, GRAPH_AUDIENCE) {
            Ok(()) => next.run(req).await,
            Err(m) => graph_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", m),
        },
    }
}

/// The parsed query options of a request.
#[derive(Debug, Default)]
struct Options {
    select: Option<Vec<String>>,
    filter: Option<Filter>,
    top: usize,
    count: bool,
    skip: Option<String>,
    delta: Option<String>,
    raw: Vec<(String, String)>,
}

fn eventual(h: &HeaderMap) -> bool {
    h.get("consistencylevel")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("eventual"))
}

fn options(
    q: Vec<(String, String)>,
    headers: &HeaderMap,
    c: Option<Collection>,
) -> Result<Options, Response> {
    let mut o = Options {
        top: 100,
        ..Options::default()
    };
    for (k, v) in &q {
        match k.to_ascii_lowercase().as_str() {
            "$select" => {
                let s: Vec<String> = v
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect();
                if let Some(c) = c {
                    check_select(c, &s).map_err(|m| bad("Request_BadRequest", &m))?;
                }
                o.select = Some(s);
            }
            "$filter" => {
                let f = parse_filter(v)
                    .map_err(|m| bad("BadRequest", &format!("Invalid filter clause: {m}")))?;
                let count_true = q.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("$count") && v.eq_ignore_ascii_case("true")
                });
                if f.advanced() && !(eventual(headers) && count_true) {
                    return Err(bad(
                        "Request_UnsupportedQuery",
                        "Unsupported query: 'ne' requires the ConsistencyLevel: eventual header and $count=true.",
                    ));
                }
                o.filter = Some(f);
            }
            "$top" => {
                let n: usize = v.parse().unwrap_or(0);
                if !(1..=999).contains(&n) {
                    return Err(bad(
                        "Request_BadRequest",
                        &format!(
                            "Invalid page size specified: '{v}'. Must be between 1 and 999 inclusive."
                        ),
                    ));
                }
                o.top = n;
            }
            "$count" => o.count = v.eq_ignore_ascii_case("true") && eventual(headers),
            "$skiptoken" => o.skip = Some(v.clone()),
            "$deltatoken" => o.delta = Some(v.clone()),
            "$skip" => {
                return Err(bad(
                    "Request_BadRequest",
                    "'$skip' is not supported by this API; follow @odata.nextLink.",
                ));
            }
            "$expand" | "$orderby" | "$search" => {
                return Err(bad(
                    "Request_UnsupportedQuery",
                    &format!("The emulator does not support {k}."),
                ));
            }
            _ => {}
        }
    }
    o.raw = q;
    Ok(o)
}

/// The scheme and host the client used, for absolute links.
pub(crate) fn base(st: &GraphState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let scheme = if st.tls.load(Ordering::Relaxed) {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'$' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The same URL with every original option and a new `$skiptoken`, as Graph's nextLink.
fn next_link(
    st: &GraphState,
    headers: &HeaderMap,
    uri: &Uri,
    raw: &[(String, String)],
    skip: &str,
) -> String {
    let mut q: Vec<String> = raw
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("$skiptoken") && !k.eq_ignore_ascii_case("$deltatoken")
        })
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    q.push(format!("$skiptoken={skip}"));
    format!("{}{}?{}", base(st, headers), uri.path(), q.join("&"))
}

fn context(st: &GraphState, headers: &HeaderMap, uri: &Uri, what: &str) -> String {
    let version = if uri.path().starts_with("/beta/") {
        "beta"
    } else {
        "v1.0"
    };
    format!("{}/{version}/$metadata#{what}", base(st, headers))
}

fn full_json(t: &Tenant, c: Collection, id: &str) -> Option<Value> {
    match c {
        Collection::Users => t.users.get(id).map(resources::user),
        Collection::Groups => t.groups.get(id).map(resources::group),
        Collection::ServicePrincipals => t
            .service_principals
            .get(id)
            .map(resources::service_principal),
    }
}

/// The selected properties of one object, built directly (no full JSON).
fn rendered(t: &Tenant, c: Collection, id: &str, select: Option<&[String]>) -> Option<Value> {
    match c {
        Collection::Users => t
            .users
            .get(id)
            .map(|u| resources::render(c, select, |k| resources::user_field(u, k))),
        Collection::Groups => t
            .groups
            .get(id)
            .map(|g| resources::render(c, select, |k| resources::group_field(g, k))),
        Collection::ServicePrincipals => t
            .service_principals
            .get(id)
            .map(|s| resources::render(c, select, |k| resources::sp_field(s, k))),
    }
}

fn ids_after<'t>(
    t: &'t Tenant,
    c: Collection,
    after: Option<&str>,
) -> Box<dyn Iterator<Item = &'t String> + 't> {
    let range = |after: Option<&str>| -> (Bound<String>, Bound<String>) {
        (
            after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_owned())),
            Bound::Unbounded,
        )
    };
    match c {
        Collection::Users => Box::new(t.users.range(range(after)).map(|(k, _)| k)),
        Collection::Groups => Box::new(t.groups.range(range(after)).map(|(k, _)| k)),
        Collection::ServicePrincipals => {
            Box::new(t.service_principals.range(range(after)).map(|(k, _)| k))
        }
    }
}

async fn list(
    st: &GraphState,
    c: Collection,
    q: Vec<(String, String)>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let o = match options(q, headers, Some(c)) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let after = match o.skip.as_deref().map(decode_token) {
        None => None,
        Some(Some(a)) => Some(a),
        Some(None) => return bad("Request_BadRequest", "The skip token is not valid."),
    };
    let t = st.tenant();
    let mut page = Vec::with_capacity(o.top.min(1000));
    let mut last = None;
    let mut more = false;
    for id in ids_after(&t, c, after.as_deref()) {
        if let Some(f) = &o.filter {
            // Filtering needs the whole object; without a filter only what is selected is built.
            if full_json(&t, c, id).is_none_or(|full| !f.matches(&full)) {
                continue;
            }
        }
        if page.len() == o.top {
            more = true;
            break;
        }
        let Some(v) = rendered(&t, c, id, o.select.as_deref()) else {
            continue;
        };
        page.push(v);
        last = Some(id.clone());
    }
    let mut body = json!({"@odata.context": context(st, headers, uri, c.segment()), "value": page});
    if o.count {
        let n = ids_after(&t, c, None)
            .filter(|id| {
                full_json(&t, c, id)
                    .is_some_and(|f| o.filter.as_ref().is_none_or(|flt| flt.matches(&f)))
            })
            .count();
        body["@odata.count"] = json!(n);
    }
    if let (true, Some(last)) = (more, last) {
        body["@odata.nextLink"] = json!(next_link(st, headers, uri, &o.raw, &encode_token(&last)));
    }
    axum::Json(body).into_response()
}

async fn get_one(
    st: &GraphState,
    c: Collection,
    id: &str,
    q: Vec<(String, String)>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let o = match options(q, headers, Some(c)) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let t = st.tenant();
    match full_json(&t, c, id) {
        None => not_found(c.type_name(), id),
        Some(full) => {
            let mut v = project(c, &full, o.select.as_deref());
            v["@odata.context"] = json!(context(
                st,
                headers,
                uri,
                &format!("{}/$entity", c.segment())
            ));
            axum::Json(v).into_response()
        }
    }
}

fn cast_kind(cast: &str) -> Option<Kind> {
    match cast {
        "microsoft.graph.user" => Some(Kind::User),
        "microsoft.graph.group" => Some(Kind::Group),
        "microsoft.graph.servicePrincipal" => Some(Kind::ServicePrincipal),
        _ => None,
    }
}

/// Direct or transitive members of a group, optionally cast, honouring the v1.0 known issue
/// (service principals are not listed as members in v1.0; beta lists them).
#[allow(clippy::too_many_arguments)]
async fn members(
    st: &GraphState,
    gid: &str,
    cast: Option<&str>,
    transitive: bool,
    count_only: bool,
    q: Vec<(String, String)>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let only = match cast {
        None => None,
        Some(c) => match cast_kind(c) {
            Some(k) => Some(k),
            None => {
                return bad(
                    "Request_BadRequest",
                    &format!("'{c}' is not a type this collection can be cast to."),
                );
            }
        },
    };
    let o = match options(q, headers, None) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let beta = uri.path().starts_with("/beta/");
    let t = st.tenant();
    let Some(g) = t.groups.get(gid) else {
        return not_found("group", gid);
    };
    // Borrowed, not copied, for every page: a group of 100,000 members is read in 101 pages.
    let closure: BTreeSet<Member>;
    let all: &BTreeSet<Member> = if transitive {
        closure = t.transitive_members(gid);
        &closure
    } else {
        &g.members
    };
    let visible = |m: &&Member| {
        (beta || m.kind != Kind::ServicePrincipal)
            && only.is_none_or(|k| m.kind == k)
            && t.contains(m.kind, &m.id)
    };
    if count_only {
        if !eventual(headers) {
            return bad("Request_BadRequest", "$count is not currently supported.");
        }
        let n = all.iter().filter(visible).count();
        return ([(header::CONTENT_TYPE, "text/plain")], n.to_string()).into_response();
    }
    let after: Option<Member> = match o.skip.as_deref().map(decode_token) {
        None => None,
        Some(Some(s)) => s.split_once('|').and_then(|(k, id)| {
            Some(Member {
                kind: Kind::parse(k)?,
                id: id.into(),
            })
        }),
        Some(None) => return bad("Request_BadRequest", "The skip token is not valid."),
    };
    let mut page = Vec::new();
    let mut last = None;
    let mut more = false;
    let start = after.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
    for m in all.range((start, Bound::Unbounded)).filter(visible) {
        let c = Collection::of(m.kind);
        if let Some(f) = &o.filter
            && full_json(&t, c, &m.id).is_none_or(|full| !f.matches(&full))
        {
            continue;
        }
        if page.len() == o.top {
            more = true;
            break;
        }
        // Properties a member's type does not have are left out, as Graph does.
        let Some(mut v) = rendered(&t, c, &m.id, o.select.as_deref()) else {
            continue;
        };
        v["@odata.type"] = json!(format!("#{}", c.type_name()));
        page.push(v);
        last = Some(m.clone());
    }
    let mut body =
        json!({"@odata.context": context(st, headers, uri, "directoryObjects"), "value": page});
    if o.count {
        body["@odata.count"] = json!(all.iter().filter(visible).count());
    }
    if let (true, Some(m)) = (more, last) {
        body["@odata.nextLink"] = json!(next_link(
            st,
            headers,
            uri,
            &o.raw,
            &encode_token(&format!("{}|{}", m.kind, m.id))
        ));
    }
    axum::Json(body).into_response()
}

fn member_ref(m: &Member, removed: bool) -> Value {
    let mut v =
        json!({"@odata.type": format!("#{}", Collection::of(m.kind).type_name()), "id": m.id});
    if removed {
        v["@removed"] = json!({"reason": "deleted"});
    }
    v
}

/// Delta: a new round (no token), `$deltatoken=latest`, a token's changes, or a page of a round.
async fn delta(
    st: &GraphState,
    c: Collection,
    q: Vec<(String, String)>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let o = match options(q, headers, Some(c)) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let settings = st.settings();
    let resource = c.segment();
    // A page of a round in progress.
    if let Some(skip) = &o.skip {
        let Some((round_id, offset)) = decode_token(skip).and_then(|s| {
            let (r, off) = s.split_once('|')?;
            Some((r.to_owned(), off.parse::<usize>().ok()?))
        }) else {
            return bad("Request_BadRequest", "The skip token is not valid.");
        };
        return delta_page(
            st,
            &round_id,
            offset,
            headers,
            uri,
            &o.raw,
            settings.delta_page_size,
        );
    }
    // A delta token carries the options of the round that issued it (Graph: "don't repeat them");
    // a `$select` on the request replaces them.
    let token_filter: Option<String> = o
        .delta
        .as_deref()
        .filter(|d| *d != "latest")
        .and_then(decode_token)
        .and_then(|p| {
            p.split('|')
                .nth(5)
                .and_then(decode_token)
                .filter(|f| !f.is_empty())
        });
    let filter_text: Option<String> = o
        .raw
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("$filter"))
        .map(|(_, v)| v.clone())
        .or(token_filter);
    let filter: Option<Filter> = match filter_text.as_deref().map(parse_filter) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(m)) => return bad("BadRequest", &format!("Invalid filter clause: {m}")),
    };
    let token_select: Option<Vec<String>> = o
        .delta
        .as_deref()
        .filter(|d| *d != "latest")
        .and_then(decode_token)
        .and_then(|p| {
            let f: Vec<&str> = p.split('|').collect();
            (f.len() == 6 && !f[4].is_empty()).then(|| f[4].split(',').map(str::to_owned).collect())
        });
    let select = o.select.clone().or(token_select);
    let (items, seq, epoch) = {
        let t = st.tenant();
        let select = select.clone();
        let tracks_members = c == Collection::Groups
            && select
                .as_ref()
                .is_none_or(|s| s.iter().any(|p| p == "members"));
        let since: Option<u64> = match o.delta.as_deref() {
            None => None,
            Some("latest") => {
                let token = encode_token(&format!(
                    "d1|{}|{}|{resource}|{}|{}",
                    t.epoch,
                    t.seq(),
                    select.as_deref().unwrap_or_default().join(","),
                    encode_token(filter_text.as_deref().unwrap_or_default())
                ));
                let link = format!("{}{}?$deltatoken={token}", base(st, headers), uri.path());
                return axum::Json(json!({"@odata.context": context(st, headers, uri, resource), "@odata.deltaLink": link, "value": []})).into_response();
            }
            Some(tok) => {
                let parts = decode_token(tok);
                let parsed = parts.as_deref().and_then(|p| {
                    let f: Vec<&str> = p.split('|').collect();
                    (f.len() == 6 && f[0] == "d1" && f[3] == resource)
                        .then(|| (f[1].parse::<u64>().ok(), f[2].parse::<u64>().ok()))
                });
                match parsed {
                    Some((Some(epoch), Some(seq))) if epoch == t.epoch && seq <= t.seq() => {
                        Some(seq)
                    }
                    Some((Some(_), Some(_))) => {
                        return graph_error(
                            StatusCode::GONE,
                            "syncStateNotFound",
                            "The sync state generation is expired. Please resync with an empty token (a full round).",
                        );
                    }
                    _ => return bad("Request_BadRequest", "The delta token is not valid."),
                }
            }
        };
        let proj = |full: &Value| {
            let sel: Option<Vec<String>> = select
                .as_ref()
                .map(|s| s.iter().filter(|p| *p != "members").cloned().collect());
            project(c, full, sel.as_deref())
        };
        let mut items: Vec<Value> = Vec::new();
        match since {
            None => {
                for id in ids_after(&t, c, None) {
                    let Some(full) = full_json(&t, c, id) else {
                        continue;
                    };
                    if filter.as_ref().is_some_and(|f| !f.matches(&full)) {
                        continue;
                    }
                    if tracks_members {
                        let ms: Vec<Value> = t.groups[id]
                            .members
                            .iter()
                            .map(|m| member_ref(m, false))
                            .collect();
                        let chunks: Vec<&[Value]> = if ms.is_empty() {
                            vec![&[][..]]
                        } else {
                            ms.chunks(settings.member_chunk.max(1)).collect()
                        };
                        for chunk in chunks {
                            let mut v = proj(&full);
                            v["members@delta"] = json!(chunk);
                            items.push(v);
                        }
                    } else {
                        items.push(proj(&full));
                    }
                }
            }
            Some(seq) => {
                // Objects changed since `seq`, in first-change order; members as net changes.
                let mut order: Vec<String> = Vec::new();
                let mut removed: BTreeSet<String> = BTreeSet::new();
                let mut member_changes: BTreeMap<String, BTreeMap<Member, bool>> = BTreeMap::new();
                let mut seen: BTreeSet<String> = BTreeSet::new();
                let mut touch = |id: &str, order: &mut Vec<String>| {
                    if seen.insert(id.to_owned()) {
                        order.push(id.to_owned());
                    }
                };
                for e in t.events_since(seq) {
                    match (c, e) {
                        (Collection::Users, Event::User(id))
                        | (Collection::ServicePrincipals, Event::ServicePrincipal(id))
                        | (Collection::Groups, Event::Group(id)) => {
                            touch(id, &mut order);
                            removed.remove(id);
                        }
                        (Collection::Users, Event::UserRemoved(id))
                        | (Collection::ServicePrincipals, Event::ServicePrincipalRemoved(id))
                        | (Collection::Groups, Event::GroupRemoved(id)) => {
                            touch(id, &mut order);
                            removed.insert(id.clone());
                        }
                        (Collection::Groups, Event::MemberAdded(g, m)) if tracks_members => {
                            touch(g, &mut order);
                            member_changes
                                .entry(g.clone())
                                .or_default()
                                .insert(m.clone(), true);
                        }
                        (Collection::Groups, Event::MemberRemoved(g, m)) if tracks_members => {
                            touch(g, &mut order);
                            member_changes
                                .entry(g.clone())
                                .or_default()
                                .insert(m.clone(), false);
                        }
                        _ => {}
                    }
                }
                for id in order {
                    if removed.contains(&id) || full_json(&t, c, &id).is_none() {
                        // Users and service principals are soft-deleted (restorable): "changed"; groups here are
                        // deleted for good: "deleted".
                        let reason = if c == Collection::Groups {
                            "deleted"
                        } else {
                            "changed"
                        };
                        items.push(json!({"id": id, "@removed": {"reason": reason}}));
                        continue;
                    }
                    let Some(full) = full_json(&t, c, &id) else {
                        continue;
                    };
                    if filter.as_ref().is_some_and(|f| !f.matches(&full)) {
                        continue;
                    }
                    let mut v = proj(&full);
                    if let Some(mc) = member_changes.get(&id) {
                        let ms: Vec<Value> =
                            mc.iter().map(|(m, added)| member_ref(m, !added)).collect();
                        v["members@delta"] = json!(ms);
                    }
                    items.push(v);
                }
            }
        }
        (items, t.seq(), t.epoch)
    };
    let select = select.unwrap_or_default().join(",");
    let delta_token = encode_token(&format!(
        "d1|{epoch}|{seq}|{resource}|{select}|{}",
        encode_token(filter_text.as_deref().unwrap_or_default())
    ));
    let round_id = format!("r{}", st.unique());
    {
        let mut rounds = lock(&st.rounds);
        rounds.retain(|_, r| r.used.elapsed() < ROUND_TTL);
        while rounds.len() >= MAX_ROUNDS {
            let oldest = rounds
                .iter()
                .min_by_key(|(_, r)| r.used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => rounds.remove(&k),
                None => break,
            };
        }
        rounds.insert(
            round_id.clone(),
            Round {
                items,
                delta_token,
                used: Instant::now(),
            },
        );
    }
    delta_page(
        st,
        &round_id,
        0,
        headers,
        uri,
        &o.raw,
        settings.delta_page_size,
    )
}

fn delta_page(
    st: &GraphState,
    round_id: &str,
    offset: usize,
    headers: &HeaderMap,
    uri: &Uri,
    raw: &[(String, String)],
    size: usize,
) -> Response {
    let mut rounds = lock(&st.rounds);
    let Some(round) = rounds.get_mut(round_id) else {
        return graph_error(
            StatusCode::GONE,
            "syncStateNotFound",
            "The delta round is no longer available; start a new round.",
        );
    };
    round.used = Instant::now();
    let end = offset.saturating_add(size.max(1)).min(round.items.len());
    let page: Vec<Value> = round.items.get(offset..end).unwrap_or_default().to_vec();
    let resource = uri.path().rsplit('/').nth(1).unwrap_or_default().to_owned();
    let mut body = json!({"@odata.context": context(st, headers, uri, &resource), "value": page});
    if end < round.items.len() {
        body["@odata.nextLink"] = json!(next_link(
            st,
            headers,
            uri,
            raw,
            &encode_token(&format!("{round_id}|{end}"))
        ));
    } else {
        body["@odata.deltaLink"] = json!(format!(
            "{}{}?$deltatoken={}",
            base(st, headers),
            uri.path(),
            round.delta_token
        ));
    }
    axum::Json(body).into_response()
}

type Q = Query<Vec<(String, String)>>;

async fn users(State(st): State<Arc<GraphState>>, Query(q): Q, h: HeaderMap, uri: Uri) -> Response {
    list(&st, Collection::Users, q, &h, &uri).await
}
async fn groups(
    State(st): State<Arc<GraphState>>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    list(&st, Collection::Groups, q, &h, &uri).await
}
async fn sps(State(st): State<Arc<GraphState>>, Query(q): Q, h: HeaderMap, uri: Uri) -> Response {
    list(&st, Collection::ServicePrincipals, q, &h, &uri).await
}
async fn user_one(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    get_one(&st, Collection::Users, &id, q, &h, &uri).await
}
async fn group_one(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    get_one(&st, Collection::Groups, &id, q, &h, &uri).await
}
async fn sp_one(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    get_one(&st, Collection::ServicePrincipals, &id, q, &h, &uri).await
}
async fn users_delta(
    State(st): State<Arc<GraphState>>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    delta(&st, Collection::Users, q, &h, &uri).await
}
async fn groups_delta(
    State(st): State<Arc<GraphState>>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    delta(&st, Collection::Groups, q, &h, &uri).await
}
async fn sps_delta(
    State(st): State<Arc<GraphState>>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    delta(&st, Collection::ServicePrincipals, q, &h, &uri).await
}
async fn count(State(st): State<Arc<GraphState>>, h: HeaderMap, uri: Uri) -> Response {
    if !eventual(&h) {
        return bad("Request_BadRequest", "$count is not currently supported.");
    }
    let t = st.tenant();
    let n = if uri.path().contains("/users/") {
        t.users.len()
    } else if uri.path().contains("/groups/") {
        t.groups.len()
    } else {
        t.service_principals.len()
    };
    ([(header::CONTENT_TYPE, "text/plain")], n.to_string()).into_response()
}
async fn group_members(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, None, false, false, q, &h, &uri).await
}
async fn group_members_count(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, None, false, true, q, &h, &uri).await
}
async fn group_members_cast(
    State(st): State<Arc<GraphState>>,
    Path((id, cast)): Path<(String, String)>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, Some(&cast), false, false, q, &h, &uri).await
}
async fn group_members_cast_count(
    State(st): State<Arc<GraphState>>,
    Path((id, cast)): Path<(String, String)>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, Some(&cast), false, true, q, &h, &uri).await
}
async fn group_transitive(
    State(st): State<Arc<GraphState>>,
    Path(id): Path<String>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, None, true, false, q, &h, &uri).await
}
async fn group_transitive_cast(
    State(st): State<Arc<GraphState>>,
    Path((id, cast)): Path<(String, String)>,
    Query(q): Q,
    h: HeaderMap,
    uri: Uri,
) -> Response {
    members(&st, &id, Some(&cast), true, false, q, &h, &uri).await
}

// ------------------------------------------------------------------------------------------
// Admin: mutate the tenant as an administrator would, and read the accounting.

async fn admin_settings(
    State(st): State<Arc<GraphState>>,
    axum::Json(s): axum::Json<Settings>,
) -> StatusCode {
    st.set_settings(s);
    StatusCode::NO_CONTENT
}
async fn admin_expire(State(st): State<Arc<GraphState>>) -> StatusCode {
    st.tenant_mut().expire_delta_tokens();
    StatusCode::NO_CONTENT
}
async fn admin_user(
    State(st): State<Arc<GraphState>>,
    axum::Json(u): axum::Json<User>,
) -> StatusCode {
    st.tenant_mut().upsert_user(u);
    StatusCode::NO_CONTENT
}
async fn admin_sp(
    State(st): State<Arc<GraphState>>,
    axum::Json(s): axum::Json<ServicePrincipal>,
) -> StatusCode {
    st.tenant_mut().upsert_service_principal(s);
    StatusCode::NO_CONTENT
}
async fn admin_group(
    State(st): State<Arc<GraphState>>,
    axum::Json(g): axum::Json<Group>,
) -> StatusCode {
    st.tenant_mut().upsert_group(g);
    StatusCode::NO_CONTENT
}
async fn admin_delete(
    State(st): State<Arc<GraphState>>,
    Path((kind, id)): Path<(String, String)>,
) -> StatusCode {
    match Kind::parse(&kind) {
        Some(k) if st.tenant_mut().remove(k, &id) => StatusCode::NO_CONTENT,
        _ => StatusCode::NOT_FOUND,
    }
}
async fn admin_add_member(
    State(st): State<Arc<GraphState>>,
    Path(gid): Path<String>,
    axum::Json(m): axum::Json<Member>,
) -> StatusCode {
    let mut t = st.tenant_mut();
    if !t.groups.contains_key(&gid) || !t.contains(m.kind, &m.id) {
        return StatusCode::NOT_FOUND;
    }
    t.add_member(&gid, m);
    StatusCode::NO_CONTENT
}
async fn admin_remove_member(
    State(st): State<Arc<GraphState>>,
    Path((gid, kind, id)): Path<(String, String, String)>,
) -> StatusCode {
    match Kind::parse(&kind) {
        Some(k) if st.tenant_mut().remove_member(&gid, &Member::new(k, &id)) => {
            StatusCode::NO_CONTENT
        }
        _ => StatusCode::NOT_FOUND,
    }
}

/// A request no route matched. A trailing slash names the same resource on Graph
/// (`/v1.0/groups/delta/?$select=...`, as the Databricks script sends it): it is served without
/// it (the request is counted twice in the accounting). Anything else gets Graph's JSON error, a
/// 400 `BadRequest` "Resource not found for the segment '...'", with its request id.
async fn unmatched(State(st): State<Arc<GraphState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let trimmed = path.trim_end_matches('/');
    if !trimmed.is_empty() && trimmed.len() < path.len() {
        let target = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_owned(),
        };
        if let (Some(router), Ok(uri)) = (st.router.get().cloned(), target.parse::<Uri>()) {
            let (mut parts, body) = req.into_parts();
            parts.uri = uri;
            return tower::ServiceExt::oneshot(router, Request::from_parts(parts, body))
                .await
                .unwrap_or_else(|e| match e {});
        }
    }
    let segment = trimmed.rsplit('/').next().unwrap_or_default();
    graph_error(
        StatusCode::BAD_REQUEST,
        "BadRequest",
        &format!("Resource not found for the segment '{segment}'."),
    )
}

/// The emulator's routes (Graph under `/v1.0` and `/beta`, the token endpoint, `/_admin`).
pub fn router(st: Arc<GraphState>) -> Router {
    let mut api = Router::new();
    for v in ["/v1.0", "/beta"] {
        api = api
            .route(&format!("{v}/users"), get(users))
            .route(&format!("{v}/users/delta"), get(users_delta))
            // msgraph-sdk calls the delta function with OData's call syntax: `delta()`.
            .route(&format!("{v}/users/delta()"), get(users_delta))
            .route(&format!("{v}/users/$count"), get(count))
            .route(&format!("{v}/users/{{id}}"), get(user_one))
            .route(&format!("{v}/groups"), get(groups))
            .route(&format!("{v}/groups/delta"), get(groups_delta))
            .route(&format!("{v}/groups/delta()"), get(groups_delta))
            .route(&format!("{v}/groups/$count"), get(count))
            .route(&format!("{v}/groups/{{id}}"), get(group_one))
            .route(&format!("{v}/groups/{{id}}/members"), get(group_members))
            .route(
                &format!("{v}/groups/{{id}}/members/$count"),
                get(group_members_count),
            )
            .route(
                &format!("{v}/groups/{{id}}/members/{{cast}}"),
                get(group_members_cast),
            )
            .route(
                &format!("{v}/groups/{{id}}/members/{{cast}}/$count"),
                get(group_members_cast_count),
            )
            .route(
                &format!("{v}/groups/{{id}}/transitiveMembers"),
                get(group_transitive),
            )
            .route(
                &format!("{v}/groups/{{id}}/transitiveMembers/{{cast}}"),
                get(group_transitive_cast),
            )
            .route(&format!("{v}/servicePrincipals"), get(sps))
            .route(&format!("{v}/servicePrincipals/delta"), get(sps_delta))
            .route(&format!("{v}/servicePrincipals/delta()"), get(sps_delta))
            .route(&format!("{v}/servicePrincipals/$count"), get(count))
            .route(&format!("{v}/servicePrincipals/{{id}}"), get(sp_one))
            .route(&format!("{v}/$batch"), post(batch::batch));
    }
    let api = api.route_layer(middleware::from_fn_with_state(st.clone(), auth));
    let admin = Router::new()
        .merge(infra::admin_router(st.infra.clone()))
        .route("/_admin/settings", put(admin_settings))
        .route("/_admin/expire-delta-tokens", post(admin_expire))
        .route("/_admin/users", post(admin_user))
        .route("/_admin/servicePrincipals", post(admin_sp))
        .route("/_admin/groups", post(admin_group))
        .route("/_admin/groups/{id}/members", post(admin_add_member))
        .route(
            "/_admin/groups/{id}/members/{kind}/{mid}",
            delete(admin_remove_member),
        )
        .route("/_admin/{kind}/{id}", delete(admin_delete));
    let app = api
        .merge(token::routes())
        .merge(admin)
        .fallback(unmatched)
        .layer(middleware::from_fn_with_state(
            st.infra.clone(),
            infra::layer,
        ))
        .with_state(st.clone());
    let _ = st.router.set(app.clone());
    app
}
