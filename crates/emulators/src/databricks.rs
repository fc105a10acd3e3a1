//! A stateful emulator of the Databricks account SCIM API
//! (`/api/2.0/accounts/{account_id}/scim/v2/{Users,Groups,ServicePrincipals}`): SCIM filters
//! (`eq`, `ne`, `co`, `sw`, `and`, `or`), `startIndex` / `count`, groups listed without members,
//! PATCH `add` / `remove` / `replace` including `members[value eq "..."]`, SCIM error bodies.
//! Auth: a personal access token, Databricks OAuth M2M (`/oidc/accounts/{id}/v1/token`), or an
//! Entra token for the Azure Databricks resource issued by the Graph emulator. Behaviour follows
//! `docs/apis/databricks-scim.md`.

use crate::graph::GraphState;
use crate::graph::token::{DATABRICKS_RESOURCE, b64_decode};
use crate::infra::{self, Infra};
use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The emulator's account id.
pub const ACCOUNT_ID: &str = "7a1c9e4f-3b2d-4c8e-9f10-2a3b4c5d6e7f";
/// A personal access token (or SCIM provisioning token) the emulator accepts.
pub const TOKEN: &str = "dapi-emulator-scim-token";
/// OAuth M2M client id.
pub const OAUTH_CLIENT_ID: &str = "5c2e6f1a-0b9d-4e3f-8a7c-6d5e4f3a2b1c";
/// OAuth M2M client secret.
pub const OAUTH_CLIENT_SECRET: &str = "dose-emulator-oauth-secret";

/// The three SCIM resource types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Type {
    /// Users.
    Users,
    /// Groups.
    Groups,
    /// Service principals.
    ServicePrincipals,
}

impl Type {
    fn parse(s: &str) -> Option<Type> {
        match s {
            "Users" => Some(Type::Users),
            "Groups" => Some(Type::Groups),
            "ServicePrincipals" => Some(Type::ServicePrincipals),
            _ => None,
        }
    }

    fn schema(self) -> &'static str {
        match self {
            Type::Users => "urn:ietf:params:scim:schemas:core:2.0:User",
            Type::Groups => "urn:ietf:params:scim:schemas:core:2.0:Group",
            Type::ServicePrincipals => "urn:ietf:params:scim:schemas:core:2.0:ServicePrincipal",
        }
    }

    /// The attribute that must be unique, and the conflict message.
    fn unique(self) -> (&'static str, &'static str) {
        match self {
            Type::Users => (
                "userName",
                "User with email {} already exists in this account",
            ),
            Type::Groups => ("displayName", "Group with name {} already exists."),
            Type::ServicePrincipals => (
                "applicationId",
                "Service principal with application ID {} already exists.",
            ),
        }
    }
}

/// Unique keys (ASCII-lowercased, and fully lowercased where that is ASCII: [`KeyIndex::add`]) →
/// the ids that took them; `stale` after outside changes.
#[derive(Debug, Default)]
struct KeyIndex {
    stale: bool,
    ids: std::collections::HashMap<(Type, String), Vec<String>>,
}

impl KeyIndex {
    /// Records `id` under `key` ASCII-lowercased, and also under its full lowercase when that
    /// is ASCII and differs (the Kelvin sign lowercases to `k`), so that a filter's ASCII values,
    /// compared by full lowercase, find every resource a scan would.
    fn add(&mut self, t: Type, key: &str, id: &str) {
        let ascii = key.to_ascii_lowercase();
        let full = key.to_lowercase();
        let extra = (full != ascii && full.is_ascii()).then_some(full);
        for k in std::iter::once(ascii).chain(extra) {
            let ids = self.ids.entry((t, k)).or_default();
            if !ids.iter().any(|i| i == id) {
                ids.push(id.to_owned());
            }
        }
    }
}

/// The emulator's state.
pub struct DatabricksState {
    data: RwLock<BTreeMap<Type, BTreeMap<String, Value>>>,
    /// Unique key (ASCII-lowercased) → the ids that took it, per type, so a create checks
    /// uniqueness without scanning 100k users. Entries may be stale (renamed, deleted): each is
    /// checked against the data. Rebuilt when the data was changed from outside (`data_mut`).
    keys: Mutex<KeyIndex>,
    /// Accounting, faults, throttling.
    pub infra: Arc<Infra>,
    next_id: AtomicU64,
    oauth_tokens: Mutex<BTreeSet<String>>,
    entra: Option<Arc<GraphState>>,
    /// Served over HTTPS: discovery documents say `https://`.
    pub(crate) tls: std::sync::atomic::AtomicBool,
}

/// The SCIM error body.
pub fn scim_error(status: StatusCode, scim_type: &str, detail: &str) -> Response {
    let mut body = json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "detail": detail, "status": status.as_u16().to_string()});
    if !scim_type.is_empty() && scim_type != "TooManyRequests" && scim_type != "serviceNotAvailable"
    {
        body["scimType"] = json!(scim_type);
    }
    (status, axum::Json(body)).into_response()
}

fn ci_eq(a: &Value, b: &str) -> bool {
    a.as_str().is_some_and(|s| s.eq_ignore_ascii_case(b))
}

impl DatabricksState {
    /// An empty account; Entra tokens for the Azure Databricks resource are accepted when the
    /// Graph emulator that issues them is given.
    pub fn new(entra: Option<Arc<GraphState>>) -> Arc<Self> {
        let data = [Type::Users, Type::Groups, Type::ServicePrincipals]
            .into_iter()
            .map(|t| (t, BTreeMap::new()))
            .collect();
        Arc::new(DatabricksState {
            data: RwLock::new(data),
            keys: Mutex::new(KeyIndex::default()),
            infra: Infra::new(scim_error),
            next_id: AtomicU64::new(100_000),
            oauth_tokens: Mutex::new(BTreeSet::new()),
            entra,
            tls: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads the resources.
    pub fn data(&self) -> RwLockReadGuard<'_, BTreeMap<Type, BTreeMap<String, Value>>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes resources directly (as an account admin in the console would).
    pub fn data_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<Type, BTreeMap<String, Value>>> {
        let guard = self.write();
        // Marked under the write lock: no handler can rebuild the index before the edit lands.
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).stale = true;
        guard
    }

    /// The write lock for the API's own handlers, which keep the key index themselves.
    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<Type, BTreeMap<String, Value>>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of another resource of type `t` holding `key` (case-insensitively), if any.
    fn holder(
        &self,
        d: &BTreeMap<Type, BTreeMap<String, Value>>,
        t: Type,
        key: &str,
        except: Option<&str>,
    ) -> Option<String> {
        let (attr, _) = t.unique();
        let k = self.keys(d);
        let ids = k.ids.get(&(t, key.to_ascii_lowercase()))?;
        ids.iter()
            .find(|id| {
                Some(id.as_str()) != except
                    && d.get(&t)
                        .and_then(|m| m.get(*id))
                        .is_some_and(|v| ci_eq(&v[attr], key))
            })
            .cloned()
    }

    /// The key index, rebuilt from `d` first if the data was changed from outside.
    fn keys(
        &self,
        d: &BTreeMap<Type, BTreeMap<String, Value>>,
    ) -> std::sync::MutexGuard<'_, KeyIndex> {
        let mut k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if k.stale {
            k.ids.clear();
            for (ty, m) in d {
                for (id, v) in m {
                    if let Some(name) = v[ty.unique().0].as_str() {
                        k.add(*ty, name, id);
                    }
                }
            }
            k.stale = false;
        }
        k
    }

    /// Records that resource `id` of type `t` now holds `key`.
    fn took(&self, t: Type, key: &str, id: &str) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(t, key, id);
    }

    /// The resources of type `t` a filter selects, in id order. A filter on the unique key alone
    /// with ASCII values (`userName eq "a" or userName eq "b"`: how idsync looks principals up) is
    /// answered from the key index, as the service's own index would; any other scans (at a
    /// million users a scan took a second of every incremental run).
    fn select<'d>(
        &self,
        d: &'d BTreeMap<Type, BTreeMap<String, Value>>,
        t: Type,
        filter: Option<&Filter>,
    ) -> Vec<&'d Value> {
        let Some(m) = d.get(&t) else {
            return Vec::new();
        };
        let any_of = filter.and_then(Filter::eq_any);
        let wanted = |v: &Value| match (&any_of, filter) {
            (Some((attr, values)), _) => attr_values(v, attr)
                .iter()
                .any(|s| values.contains(&s.to_lowercase())),
            (None, f) => f.is_none_or(|f| f.matches(v)),
        };
        match &any_of {
            Some((attr, values))
                if attr.eq_ignore_ascii_case(t.unique().0)
                    && values.iter().all(|v| v.is_ascii()) =>
            {
                // Candidates only: an entry may be stale (renamed, deleted), so each is checked.
                let ids: BTreeSet<String> = {
                    let k = self.keys(d);
                    values
                        .iter()
                        .filter_map(|v| k.ids.get(&(t, v.clone())))
                        .flatten()
                        .cloned()
                        .collect()
                };
                ids.iter()
                    .filter_map(|id| m.get(id))
                    .filter(|v| wanted(v))
                    .collect()
            }
            _ => m.values().filter(|v| wanted(v)).collect(),
        }
    }

    /// Creates a resource directly, returning its id.
    pub fn insert(&self, t: Type, mut v: Value) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        v["id"] = json!(id);
        self.data_mut().entry(t).or_default().insert(id.clone(), v);
        id
    }

    fn token_ok(&self, token: &str) -> bool {
        if token == TOKEN
            || self
                .oauth_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(token)
        {
            return true;
        }
        self.entra
            .as_ref()
            .is_some_and(|g| g.check_token(token, DATABRICKS_RESOURCE).is_ok())
    }
}

async fn auth(State(st): State<Arc<DatabricksState>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if st.token_ok(t) => next.run(req).await,
        _ => scim_error(StatusCode::UNAUTHORIZED, "", "Invalid access token."),
    }
}

// ------------------------------------------------------------------------------------------
// SCIM filters.

/// A parsed SCIM filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// `attr op value`.
    Cmp(String, String, String),
    /// Both.
    And(Box<Filter>, Box<Filter>),
    /// Either.
    Or(Box<Filter>, Box<Filter>),
}

fn scim_tokens(s: &str) -> Result<Vec<String>, String> {
    let cs: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cs.len() {
        match cs[i] {
            ' ' => i += 1,
            '(' | ')' => {
                out.push(cs[i].to_string());
                i += 1;
            }
            q @ ('"' | '\'') => {
                let mut v = String::from("\u{1}");
                i += 1;
                loop {
                    match cs.get(i) {
                        None => return Err("unterminated string in filter".into()),
                        Some('\\') if q == '"' => {
                            if let Some(c) = cs.get(i + 1) {
                                v.push(*c);
                            }
                            i += 2;
                        }
                        Some(c) if *c == q => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            v.push(*c);
                            i += 1;
                        }
                    }
                }
                out.push(v);
            }
            _ => {
                let start = i;
                while i < cs.len() && !matches!(cs[i], ' ' | '(' | ')') {
                    i += 1;
                }
                out.push(cs[start..i].iter().collect());
            }
        }
    }
    Ok(out)
}

/// Parses a SCIM filter (values in double quotes, single quotes, or bare).
pub fn parse_filter(s: &str) -> Result<Filter, String> {
    fn expr(t: &[String], at: &mut usize) -> Result<Filter, String> {
        let mut left = and(t, at)?;
        while t.get(*at).is_some_and(|w| w.eq_ignore_ascii_case("or")) {
            *at += 1;
            left = Filter::Or(Box::new(left), Box::new(and(t, at)?));
        }
        Ok(left)
    }
    fn and(t: &[String], at: &mut usize) -> Result<Filter, String> {
        let mut left = prim(t, at)?;
        while t.get(*at).is_some_and(|w| w.eq_ignore_ascii_case("and")) {
            *at += 1;
            left = Filter::And(Box::new(left), Box::new(prim(t, at)?));
        }
        Ok(left)
    }
    fn prim(t: &[String], at: &mut usize) -> Result<Filter, String> {
        if t.get(*at).map(String::as_str) == Some("(") {
            *at += 1;
            let e = expr(t, at)?;
            if t.get(*at).map(String::as_str) != Some(")") {
                return Err("missing ')' in filter".into());
            }
            *at += 1;
            return Ok(e);
        }
        let (Some(attr), Some(op), Some(val)) = (t.get(*at), t.get(*at + 1), t.get(*at + 2)) else {
            return Err("incomplete filter expression".into());
        };
        let op = op.to_ascii_lowercase();
        if !["eq", "ne", "co", "sw"].contains(&op.as_str()) {
            return Err(format!("Given filter operator is not supported: {op}"));
        }
        *at += 3;
        Ok(Filter::Cmp(
            attr.clone(),
            op,
            val.trim_start_matches('\u{1}').to_owned(),
        ))
    }
    let t = scim_tokens(s)?;
    // Databricks: "SCIM filter expressions are limited to 200 nodes"; deeper nesting is refused too.
    let nodes = t
        .iter()
        .filter(|w| w.eq_ignore_ascii_case("and") || w.eq_ignore_ascii_case("or"))
        .count()
        * 2
        + 1;
    let depth = t.iter().scan(0i32, |d, w| {
        *d += i32::from(w == "(") - i32::from(w == ")");
        Some(*d)
    });
    if nodes > 200 || depth.max().unwrap_or(0) > 32 {
        return Err("INVALID_FILTER: the filter has more than 200 nodes".into());
    }
    let mut at = 0;
    let f = expr(&t, &mut at)?;
    if at != t.len() {
        return Err(format!("unexpected '{}' in filter", t[at]));
    }
    Ok(f)
}

/// The value of a (possibly dotted, case-insensitive) attribute; multi-valued ones match any.
/// Walks the resource by reference: a group may hold 50,000 members, and a filter of 50 terms is
/// evaluated on every group of the account.
fn attr_values<'v>(v: &'v Value, path: &str) -> Vec<std::borrow::Cow<'v, str>> {
    let mut cur: Vec<&Value> = vec![v];
    for part in path.split('.') {
        let mut next = Vec::new();
        for c in cur {
            let items: Vec<&Value> = match c {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in items {
                if let Some(obj) = item.as_object()
                    && let Some((_, x)) = obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(part))
                {
                    next.push(x);
                }
            }
        }
        cur = next;
    }
    cur.into_iter()
        .flat_map(|x| match x {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        })
        .map(|x| match x {
            Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
            Value::Object(o) => std::borrow::Cow::Borrowed(
                o.get("value").and_then(Value::as_str).unwrap_or_default(),
            ),
            other => std::borrow::Cow::Owned(other.to_string()),
        })
        .collect()
}

/// Whether two strings are equal ignoring case, without allocating (a filter of 50 terms meets
/// every user of the account).
fn eq_fold(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
        || (!(a.is_ascii() && b.is_ascii())
            && a.chars()
                .flat_map(char::to_lowercase)
                .eq(b.chars().flat_map(char::to_lowercase)))
}

impl Filter {
    /// `attr eq "a" or attr eq "b" ...` on one attribute (how idsync looks keys up): the attribute
    /// and the values, lowercased, so that a list looks at each resource once, not once per term.
    fn eq_any(&self) -> Option<(&str, BTreeSet<String>)> {
        match self {
            Filter::Cmp(attr, op, val) if op == "eq" => {
                Some((attr.as_str(), BTreeSet::from([val.to_lowercase()])))
            }
            Filter::Or(a, b) => {
                let (x, mut xs) = a.eq_any()?;
                let (y, ys) = b.eq_any()?;
                x.eq_ignore_ascii_case(y).then(|| {
                    xs.extend(ys);
                    (x, xs)
                })
            }
            _ => None,
        }
    }

    /// Evaluates the filter on a resource (string comparisons are case-insensitive).
    pub fn matches(&self, v: &Value) -> bool {
        match self {
            Filter::Cmp(attr, op, val) => {
                let vals = attr_values(v, attr);
                let hit = |s: &std::borrow::Cow<'_, str>| match op.as_str() {
                    "eq" | "ne" => eq_fold(s, val),
                    "co" => s.to_lowercase().contains(&val.to_lowercase()),
                    _ => s.to_lowercase().starts_with(&val.to_lowercase()),
                };
                if op == "ne" {
                    !vals.iter().any(hit)
                } else {
                    vals.iter().any(hit)
                }
            }
            Filter::And(a, b) => a.matches(v) && b.matches(v),
            Filter::Or(a, b) => a.matches(v) || b.matches(v),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Handlers.

/// Reads a JSON object body, answering a SCIM error for anything else.
fn object_body(bytes: &[u8]) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(scim_error(
            StatusCode::BAD_REQUEST,
            "invalidSyntax",
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(scim_error(
            StatusCode::BAD_REQUEST,
            "invalidSyntax",
            &format!("Malformed JSON: {e}"),
        )),
    }
}

fn typ(s: &str) -> Result<Type, Response> {
    Type::parse(s)
        .ok_or_else(|| scim_error(StatusCode::NOT_FOUND, "", &format!("No resource type {s}")))
}

fn account(a: &str) -> Result<(), Response> {
    if a == ACCOUNT_ID {
        Ok(())
    } else {
        Err(scim_error(
            StatusCode::NOT_FOUND,
            "",
            &format!("Account {a} not found"),
        ))
    }
}

fn present(t: Type, v: &Value, in_list: bool) -> Value {
    let mut v = v.clone();
    v["schemas"] = json!([t.schema()]);
    if t == Type::Groups && in_list {
        // Groups are listed without members (since 2025-08): read a group to see them.
        if let Some(o) = v.as_object_mut() {
            o.remove("members");
        }
    }
    v
}

async fn list(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let filter = match q.get("filter").map(|f| parse_filter(f)) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(m)) => return scim_error(StatusCode::BAD_REQUEST, "invalidFilter", &m),
    };
    let start = q
        .get("startIndex")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let count = q
        .get("count")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(10_000)
        .min(10_000);
    let attributes: Option<Vec<String>> = q
        .get("attributes")
        .map(|a| a.split(',').map(|s| s.trim().to_owned()).collect());
    let d = st.data();
    let all = st.select(&d, t, filter.as_ref());
    let page: Vec<Value> = all
        .iter()
        .skip(start - 1)
        .take(count)
        .map(|v| {
            let mut p = present(t, v, true);
            if let (Some(attrs), Some(o)) = (&attributes, p.as_object_mut()) {
                o.retain(|k, _| {
                    k == "id" || k == "schemas" || attrs.iter().any(|a| a.eq_ignore_ascii_case(k))
                });
            }
            p
        })
        .collect();
    axum::Json(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"], "totalResults": all.len(), "startIndex": start, "itemsPerPage": page.len(), "Resources": page}))
        .into_response()
}

fn check_members(
    d: &BTreeMap<Type, BTreeMap<String, Value>>,
    members: &Value,
) -> Result<(), Response> {
    for m in members.as_array().into_iter().flatten() {
        let id = m["value"].as_str().unwrap_or_default();
        let exists = [Type::Users, Type::Groups, Type::ServicePrincipals]
            .iter()
            .any(|t| d.get(t).is_some_and(|x| x.contains_key(id)));
        if !exists {
            return Err(scim_error(
                StatusCode::NOT_FOUND,
                "",
                &format!("Member {id} not found in this account"),
            ));
        }
    }
    Ok(())
}

async fn create(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut body = match object_body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (key, msg) = t.unique();
    let Some(k) = body
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
    else {
        return scim_error(
            StatusCode::BAD_REQUEST,
            "invalidValue",
            &format!("{key} is required"),
        );
    };
    if t != Type::Groups && body.get("active").is_none() {
        body["active"] = json!(true);
    }
    if let Some(o) = body.as_object_mut() {
        o.remove("schemas");
    }
    // Check and insert under one lock: two concurrent creates of one name cannot both succeed.
    let mut d = st.write();
    if st.holder(&d, t, &k, None).is_some() {
        return scim_error(StatusCode::CONFLICT, "uniqueness", &msg.replace("{}", &k));
    }
    if t == Type::Groups
        && let Err(r) = check_members(&d, &body["members"])
    {
        return r;
    }
    let id = st.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    body["id"] = json!(id);
    st.took(t, &k, &id);
    d.entry(t).or_default().insert(id, body.clone());
    (StatusCode::CREATED, axum::Json(present(t, &body, false))).into_response()
}

async fn get_one(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t, id)): Path<(String, String, String)>,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match st.data().get(&t).and_then(|m| m.get(&id)) {
        Some(v) => axum::Json(present(t, v, false)).into_response(),
        None => scim_error(
            StatusCode::NOT_FOUND,
            "",
            &format!("Resource {id} not found"),
        ),
    }
}

async fn delete_one(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t, id)): Path<(String, String, String)>,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut d = st.write();
    if d.get_mut(&t).and_then(|m| m.remove(&id)).is_none() {
        return scim_error(
            StatusCode::NOT_FOUND,
            "",
            &format!("Resource {id} not found"),
        );
    }
    if let Some(groups) = d.get_mut(&Type::Groups) {
        for g in groups.values_mut() {
            if let Some(ms) = g.get_mut("members").and_then(Value::as_array_mut) {
                ms.retain(|m| m["value"] != json!(id));
            }
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn replace(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t, id)): Path<(String, String, String)>,
    bytes: axum::body::Bytes,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut body = match object_body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut d = st.write();
    let Some(cur) = d.get(&t).and_then(|m| m.get(&id)).cloned() else {
        return scim_error(
            StatusCode::NOT_FOUND,
            "",
            &format!("Resource {id} not found"),
        );
    };
    if t == Type::Users {
        // userName cannot change: any supplied change is ignored.
        body["userName"] = cur["userName"].clone();
    }
    let (key, msg) = t.unique();
    if let Some(k) = body.get(key).and_then(Value::as_str)
        && st.holder(&d, t, k, Some(&id)).is_some()
    {
        return scim_error(StatusCode::CONFLICT, "uniqueness", &msg.replace("{}", k));
    }
    if let Some(k) = body.get(key).and_then(Value::as_str) {
        st.took(t, k, &id);
    }
    if t == Type::Groups
        && let Err(r) = check_members(&d, &body["members"])
    {
        return r;
    }
    body["id"] = json!(id);
    if let Some(o) = body.as_object_mut() {
        o.remove("schemas");
    }
    d.entry(t).or_default().insert(id, body.clone());
    axum::Json(present(t, &body, false)).into_response()
}

/// Applies one PATCH operation to a resource.
fn patch_op(
    t: Type,
    res: &mut Value,
    op: &Value,
    d: &BTreeMap<Type, BTreeMap<String, Value>>,
) -> Result<(), Response> {
    let kind = op["op"].as_str().unwrap_or_default().to_ascii_lowercase();
    let path = op["path"].as_str().unwrap_or_default();
    let value = op.get("value").cloned();
    let bad = |m: &str| scim_error(StatusCode::BAD_REQUEST, "invalidValue", m);
    let member_filter = path
        .strip_prefix("members[")
        .and_then(|r| r.strip_suffix(']'));
    match (kind.as_str(), path) {
        ("add", "" | "members") => {
            let members = match (&value, path) {
                (Some(v), "members") => v.clone(),
                (Some(v), _) => v.get("members").cloned().unwrap_or(Value::Null),
                (None, _) => return Err(bad("add requires a value")),
            };
            if t != Type::Groups || !members.is_array() {
                // Attribute adds without a path: merge the object.
                if let (Some(Value::Object(o)), Some(r)) = (&value, res.as_object_mut()) {
                    for (k, v) in o {
                        if !(t == Type::Users && k == "userName") {
                            r.insert(k.clone(), v.clone());
                        }
                    }
                }
                return Ok(());
            }
            check_members(d, &members)?;
            let list = res
                .as_object_mut()
                .map(|o| o.entry("members").or_insert_with(|| json!([])));
            if let Some(Value::Array(list)) = list {
                // One pass over the members already there, each looked up among the (at most a
                // hundred) members added, with a cheap hash: groups of 100,000 are filled 100 at
                // a time, and a set of every member built per PATCH was most of the emulator's
                // time in a first sync at that size.
                let added: Vec<&str> = members
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| m["value"].as_str().unwrap_or_default())
                    .collect();
                let mut fresh: std::collections::HashMap<&str, bool, BuildFnv> =
                    std::collections::HashMap::with_capacity_and_hasher(
                        added.len(),
                        BuildFnv::default(),
                    );
                for id in &added {
                    fresh.insert(id, true);
                }
                let mut left = fresh.len();
                for x in list.iter() {
                    if left == 0 {
                        break;
                    }
                    if let Some(there) = x["value"].as_str().and_then(|id| fresh.get_mut(id))
                        && *there
                    {
                        *there = false;
                        left -= 1;
                    }
                }
                for id in added {
                    if fresh
                        .get_mut(id)
                        .is_some_and(|f| std::mem::replace(f, false))
                    {
                        list.push(json!({ "value": id }));
                    }
                }
            }
            Ok(())
        }
        ("remove", _) if member_filter.is_some() => {
            let f = parse_filter(member_filter.unwrap_or_default()).map_err(|m| bad(&m))?;
            if let Some(list) = res.get_mut("members").and_then(Value::as_array_mut) {
                match &f {
                    // The usual `members[value eq "id"]`: ids compared directly (groups of
                    // 50,000 lose members one at a time).
                    Filter::Cmp(attr, op, v)
                        if attr.eq_ignore_ascii_case("value") && op.eq_ignore_ascii_case("eq") =>
                    {
                        list.retain(|m| {
                            !m["value"]
                                .as_str()
                                .is_some_and(|s| s.eq_ignore_ascii_case(v))
                        });
                    }
                    _ => list.retain(|m| !f.matches(m)),
                }
            }
            Ok(())
        }
        ("remove", "members") => {
            // A value lists the members to remove; without one, all go.
            let drop: Option<Vec<Value>> = value
                .and_then(|v| v.as_array().cloned())
                .map(|a| a.iter().map(|m| m["value"].clone()).collect());
            if let Some(list) = res.get_mut("members").and_then(Value::as_array_mut) {
                match drop {
                    Some(ids) => list.retain(|m| !ids.contains(&m["value"])),
                    None => list.clear(),
                }
            }
            Ok(())
        }
        ("replace", "") => match value {
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    if !(t == Type::Users && k == "userName") {
                        res[k] = v;
                    }
                }
                Ok(())
            }
            _ => Err(bad("replace without a path needs an object value")),
        },
        ("replace", p) => {
            let Some(v) = value else {
                return Err(bad(&format!("replace of {p} requires a value")));
            };
            match p {
                "active" => {
                    // terraform sends [{"value": "false"}]; unwrap that form first.
                    let v = match &v {
                        Value::Array(a) if a.len() == 1 => {
                            a[0].get("value").cloned().unwrap_or(Value::Null)
                        }
                        other => other.clone(),
                    };
                    let b = match &v {
                        Value::Bool(b) => *b,
                        Value::String(s)
                            if s.eq_ignore_ascii_case("true")
                                || s.eq_ignore_ascii_case("false") =>
                        {
                            s.eq_ignore_ascii_case("true")
                        }
                        _ => return Err(bad("active must be a boolean")),
                    };
                    res["active"] = json!(b);
                }
                "userName" if t == Type::Users => {} // ignored: userName cannot change
                "members" => {
                    check_members(d, &v)?;
                    res["members"] = json!(
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(|m| json!({"value": m["value"]}))
                            .collect::<Vec<_>>()
                    );
                }
                other => res[other] = v,
            }
            Ok(())
        }
        (k, p) => Err(bad(&format!("unsupported PATCH operation {k} on '{p}'"))),
    }
}

async fn patch(
    State(st): State<Arc<DatabricksState>>,
    Path((acct, t, id)): Path<(String, String, String)>,
    bytes: axum::body::Bytes,
) -> Response {
    let t = match account(&acct).and_then(|()| typ(&t)) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let body = match object_body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(ops) = body.get("Operations").and_then(Value::as_array).cloned() else {
        return scim_error(
            StatusCode::BAD_REQUEST,
            "invalidSyntax",
            "Operations is required",
        );
    };
    let mut d = st.write();
    // All or nothing: the resource changes only when every operation applies. A member
    // operation fails before it changes anything and cannot rename, so member operations work on
    // the resource itself (taken out of the map meanwhile: groups of 100,000 are filled 100 at a
    // time); other patches work on a copy.
    let members_only = |op: &Value| {
        let path = op["path"].as_str().unwrap_or_default();
        path.starts_with("members")
            || (path.is_empty()
                && op["value"]
                    .as_object()
                    .is_some_and(|o| o.len() == 1 && o.contains_key("members")))
    };
    // Several member operations (a group's removals and additions in one PATCH) work in place
    // too, once each has been tried on an empty group: whether a member operation fails does not
    // depend on the members the group holds, so none can fail once it changed something. A copy
    // of a group of 100,000 members per PATCH made the emulator the slowest part of an
    // incremental run at that size.
    let in_place = t == Type::Groups && !ops.is_empty() && ops.iter().all(members_only);
    if in_place && ops.len() > 1 {
        for op in &ops {
            let mut probe = json!({ "members": [] });
            if let Err(r) = patch_op(t, &mut probe, op, &d) {
                return r;
            }
        }
    }
    let taken = if in_place {
        d.get_mut(&t).and_then(|m| m.remove(&id))
    } else {
        d.get(&t).and_then(|m| m.get(&id)).cloned()
    };
    let Some(mut res) = taken else {
        return scim_error(
            StatusCode::NOT_FOUND,
            "",
            &format!("Resource {id} not found"),
        );
    };
    for op in &ops {
        if let Err(r) = patch_op(t, &mut res, op, &d) {
            if in_place {
                d.entry(t).or_default().insert(id, res);
            }
            return r;
        }
    }
    // A member operation cannot change the unique key; any other may (a group's displayName, a
    // service principal's applicationId).
    let (key, msg) = t.unique();
    if !in_place && let Some(k) = res[key].as_str().map(str::to_owned) {
        if st.holder(&d, t, &k, Some(&id)).is_some() {
            return scim_error(StatusCode::CONFLICT, "uniqueness", &msg.replace("{}", &k));
        }
        st.took(t, &k, &id);
    }
    d.entry(t).or_default().insert(id, res);
    // The API reference shows an empty response for PATCH (docs.databricks.com/api/scim/v1/
    // patch-account-group: `{}`); the Python SDK discards it.
    StatusCode::NO_CONTENT.into_response()
}

// OAuth M2M.

async fn oauth_discovery(
    State(st): State<Arc<DatabricksState>>,
    Path(acct): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(r) = account(&acct) {
        return r;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let scheme = if st.tls.load(Ordering::Relaxed) {
        "https"
    } else {
        "http"
    };
    let base = format!("{scheme}://{host}/oidc/accounts/{acct}");
    axum::Json(json!({"issuer": base, "token_endpoint": format!("{base}/v1/token"), "authorization_endpoint": format!("{base}/v1/authorize")})).into_response()
}

async fn oauth_token(
    State(st): State<Arc<DatabricksState>>,
    Path(acct): Path<String>,
    headers: axum::http::HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = account(&acct) {
        return r;
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(b64_decode)
        .and_then(|b| String::from_utf8(b).ok());
    let creds = basic.or_else(|| {
        Some(format!(
            "{}:{}",
            f.get("client_id")?,
            f.get("client_secret")?
        ))
    });
    if creds.as_deref() != Some(&format!("{OAUTH_CLIENT_ID}:{OAUTH_CLIENT_SECRET}")) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "invalid_client", "error_description": "Client authentication failed"}))).into_response();
    }
    if f.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "unsupported_grant_type", "error_description": "grant_type must be client_credentials"}))).into_response();
    }
    let tok = format!("dbx-oauth-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    st.oauth_tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tok.clone());
    axum::Json(json!({"access_token": tok, "token_type": "Bearer", "expires_in": 3600, "scope": f.get("scope").cloned().unwrap_or_else(|| "all-apis".into())})).into_response()
}

/// The emulator's routes.
pub fn router(st: Arc<DatabricksState>) -> Router {
    let base = "/api/2.0/accounts/{acct}/scim/v2/{type}";
    let api = Router::new()
        .route(base, get(list).post(create))
        .route(
            &format!("{base}/{{id}}"),
            get(get_one).put(replace).patch(patch).delete(delete_one),
        )
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    let oauth = Router::new()
        .route(
            "/oidc/accounts/{acct}/.well-known/oauth-authorization-server",
            get(oauth_discovery),
        )
        .route("/oidc/accounts/{acct}/v1/token", post(oauth_token));
    let admin = infra::admin_router(st.infra.clone());
    api.merge(oauth)
        .merge(admin)
        .layer(middleware::from_fn_with_state(
            st.infra.clone(),
            infra::layer,
        ))
        .with_state(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scim_filters() {
        let u = json!({"userName": "Jane.Doe@corp.example", "displayName": "Jane \"JD\" Doe", "emails": [{"value": "jane@corp.example"}], "active": true});
        for (f, want) in [
            ("userName eq \"jane.doe@corp.example\"", true),
            ("userName eq 'Jane.Doe@corp.example'", true),
            ("userName eq Jane.Doe@corp.example", true),
            ("displayName eq \"Jane \\\"JD\\\" Doe\"", true),
            ("displayName co \"JD\"", true),
            ("displayName sw \"jane\" and active eq true", true),
            ("emails.value eq \"jane@corp.example\"", true),
            (
                "userName ne \"jane.doe@corp.example\" or displayName sw \"X\"",
                false,
            ),
        ] {
            assert_eq!(parse_filter(f).unwrap().matches(&u), want, "{f}");
        }
        assert!(
            parse_filter("userName gt \"a\"")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(parse_filter("userName eq \"open").is_err());
    }

    #[test]
    fn a_filter_on_the_key_finds_what_a_scan_finds() {
        let st = DatabricksState::new(None);
        let names = [
            "Jane@corp.example",
            "jane@CORP.example",
            "\u{212A}im@corp.example",
            "Émile@corp.example",
            "bob@corp.example",
        ];
        for n in names {
            let id = st.next_id.fetch_add(1, Ordering::Relaxed).to_string();
            st.took(Type::Users, n, &id);
            st.write()
                .entry(Type::Users)
                .or_default()
                .insert(id.clone(), json!({"id": id, "userName": n}));
        }
        // A rename the index has not seen, and an edit from outside (the index is rebuilt).
        let renamed = st.select(&st.data(), Type::Users, None)[4]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        st.write()
            .get_mut(&Type::Users)
            .unwrap()
            .get_mut(&renamed)
            .unwrap()["userName"] = json!("robert@corp.example");
        for f in [
            "userName eq \"jane@corp.example\"",
            "userName eq \"kim@corp.example\" or userName eq \"nobody\"",
            "userName eq \"émile@corp.example\"",
            "userName eq \"bob@corp.example\" or userName eq \"JANE@corp.example\"",
            "displayName eq \"jane@corp.example\"",
        ] {
            let f = parse_filter(f).unwrap();
            let d = st.data();
            let scan: Vec<&Value> = d[&Type::Users].values().filter(|v| f.matches(v)).collect();
            assert_eq!(st.select(&d, Type::Users, Some(&f)), scan, "{f:?}");
        }
        let kim = parse_filter("userName eq \"kim@corp.example\"").unwrap();
        assert_eq!(st.select(&st.data(), Type::Users, Some(&kim)).len(), 1);
        let bob = parse_filter("userName eq \"bob@corp.example\"").unwrap();
        assert!(st.select(&st.data(), Type::Users, Some(&bob)).is_empty());
        drop(st.data_mut());
        let jane = parse_filter("userName eq \"jane@corp.example\"").unwrap();
        assert_eq!(st.select(&st.data(), Type::Users, Some(&jane)).len(), 2);
    }
}

/// FNV-1a, for the emulator's lookups of short ids.
#[derive(Default)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf2_9ce4_8422_2325;
        }
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type BuildFnv = std::hash::BuildHasherDefault<Fnv>;
