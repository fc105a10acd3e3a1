//! Kanidm's sync-account API (`docs/apis/kanidm-sync.md`): what a sync tool such as
//! `kanidm-ldap-sync` talks to, and what idsync's Kanidm target will. Its fidelity is proven against
//! Kanidm's own server library (`tests/kanidm`, `scripts/kanidm.sh`): the same conformance suite
//! (`crates/emulators/tests/kanidm.rs`) runs against both.
//!
//! - `GET /scim/v1/Sync` (sync token): the agreement's state, `"Refresh"` or
//!   `{"Active":{"cookie":"…"}}`.
//! - `POST /scim/v1/Sync` (sync token): a `ScimSyncRequest`, applied as Kanidm's
//!   `scim_sync_apply` does, in one transaction: the cookie check, stubs for every entry, the
//!   refresh cleanup, each entry's sync-owned attributes purged and set, the retain mode, the new
//!   cookie. Any error leaves everything as it was.
//! - `GET /v1/sync_account/{id}/_finalise`, `/_terminate` (admin token).
//! - Test-only: `GET /_idsync/entries` (the person and group entries), `POST
//!   /_idsync/force_refresh` (`kanidm system sync force-refresh`), `POST /_idsync/yield`
//!   (`kanidm system sync set-yield-attributes`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// The schema URN prefix of a synced entry's classes.
pub const SCHEMA_PREFIX: &str = "urn:ietf:params:scim:schemas:kanidm:sync:1:";
/// The sync token the emulator accepts.
pub const SYNC_TOKEN: &str = "emulated-kanidm-sync-token";
/// An admin session token (finalise, terminate).
pub const ADMIN_TOKEN: &str = "emulated-kanidm-admin-token";
/// The sync account's id.
pub const SYNC_ACCOUNT: &str = "b2b6c1a0-5d9f-4a2e-9f7c-0c1d2e3f4a5b";

/// An entry, as the test-only listing shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KEntry {
    /// Its UUID.
    pub uuid: String,
    /// `name` (Kanidm keeps it in lower case).
    pub name: Option<String>,
    /// Classes among account, person, posixaccount, group, posixgroup, sync_object.
    pub classes: BTreeSet<String>,
    /// `sync_external_id`.
    pub external_id: Option<String>,
    /// `displayname`.
    pub displayname: Option<String>,
    /// `description`.
    pub description: Option<String>,
    /// `mail`.
    pub mail: BTreeSet<String>,
    /// `member`, as UUIDs.
    pub members: BTreeSet<String>,
    /// Under the sync account's authority (`sync_parent_uuid`).
    pub synced: bool,
    /// `gidnumber`.
    #[serde(skip)]
    pub gidnumber: Option<u64>,
}

/// Which Kanidm release's answers to give where releases differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Release {
    /// 1.7 (the library the conformance suite checks against): every error body is the
    /// `OperationError` as a JSON string sent as `text/plain`; a duplicate value is
    /// `{"plugin":{"attrunique":"duplicate value detected"}}` with 500; an admin session on the
    /// sync API fails to read as a sync token (500 `"serdejsonerror"`).
    #[default]
    V1_7,
    /// Later releases (`server/core/src/https/errors.rs` on main): JSON bodies, and a duplicate
    /// value is 409 `{"error":"Attribute uniqueness error","conflicting_attributes":[…]}`.
    Current,
}

/// Everything the emulated server holds.
#[derive(Clone, Debug, Default)]
pub struct KanidmData {
    /// The release whose answers it gives.
    pub release: Release,
    /// The stored cookie; `None` when the next request must be a Refresh.
    pub cookie: Option<String>,
    /// Entries by UUID.
    pub entries: BTreeMap<String, KEntry>,
    /// Attributes yielded to Kanidm (`sync_yield_authority`).
    pub yielded: BTreeSet<String>,
    /// The sync account exists (not finalised or terminated).
    pub account: bool,
    /// Sync requests applied.
    pub applied: u64,
}

/// The emulator's state.
#[derive(Debug)]
pub struct KanidmState {
    data: Mutex<KanidmData>,
}

impl KanidmState {
    /// A server with a fresh sync account and no entries.
    pub fn new() -> Arc<Self> {
        Arc::new(KanidmState {
            data: Mutex::new(KanidmData {
                account: true,
                ..KanidmData::default()
            }),
        })
    }

    /// A copy of what it holds.
    pub fn data(&self) -> KanidmData {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KanidmData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers as `release` does.
    pub fn set_release(&self, release: Release) {
        self.lock().release = release;
    }

    /// Adds an entry made in Kanidm itself (not synced): a person, for conflict tests.
    pub fn add_local_person(&self, uuid: &str, name: &str) {
        let mut d = self.lock();
        d.entries.insert(
            uuid.to_owned(),
            KEntry {
                uuid: uuid.to_owned(),
                name: Some(name.to_lowercase()),
                classes: ["account", "person"].map(String::from).into(),
                displayname: Some(name.to_owned()),
                ..KEntry::default()
            },
        );
    }
}

/// A Kanidm `OperationError`, answered as Kanidm's server answers it
/// (`server/core/src/https/errors.rs`).
#[derive(Debug)]
enum Fail {
    NotAuthenticated,
    AccessDenied,
    InvalidSyncState,
    InvalidEntryState,
    /// An entry without `externalId` (Kanidm 1.7.4: 400 `emptyrequest`).
    EmptyRequest,
    /// A value that is not of its attribute's syntax (a name Kanidm does not take).
    InvalidSyntax(&'static str),
    Uniqueness(Vec<String>),
    NoMatchingEntries,
    /// A token that verifies but is not a sync token.
    NotASyncToken,
}

impl Fail {
    fn respond(self, release: Release) -> Response {
        let (status, body) = match self {
            Fail::NotAuthenticated => (StatusCode::UNAUTHORIZED, json!("notauthenticated")),
            Fail::AccessDenied => (StatusCode::FORBIDDEN, json!("accessdenied")),
            Fail::InvalidSyncState => {
                (StatusCode::INTERNAL_SERVER_ERROR, json!("invalidsyncstate"))
            }
            Fail::InvalidEntryState => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!("invalidentrystate"),
            ),
            Fail::Uniqueness(attrs) => match release {
                Release::V1_7 => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "plugin": { "attrunique": "duplicate value detected" } }),
                ),
                Release::Current => (
                    StatusCode::CONFLICT,
                    json!({ "error": "Attribute uniqueness error", "conflicting_attributes": attrs }),
                ),
            },
            Fail::NoMatchingEntries => (StatusCode::NOT_FOUND, json!("nomatchingentries")),
            Fail::EmptyRequest => (StatusCode::BAD_REQUEST, json!("emptyrequest")),
            Fail::InvalidSyntax(attr) => (
                StatusCode::BAD_REQUEST,
                json!({ "schemaviolation": { "invalidattributesyntax": attr } }),
            ),
            Fail::NotASyncToken => match release {
                Release::V1_7 => (StatusCode::INTERNAL_SERVER_ERROR, json!("serdejsonerror")),
                Release::Current => (StatusCode::FORBIDDEN, json!("accessdenied")),
            },
        };
        let content_type = match release {
            Release::V1_7 => "text/plain; charset=utf-8",
            Release::Current => "application/json",
        };
        let mut r = (
            status,
            [(header::CONTENT_TYPE, content_type)],
            body.to_string(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The sync token's identity, or why not.
fn sync_caller(h: &HeaderMap, d: &KanidmData) -> Result<(), Fail> {
    match bearer(h) {
        Some(SYNC_TOKEN) if d.account => Ok(()),
        // A token that is not a sync account's (an admin session).
        Some(ADMIN_TOKEN) => Err(Fail::NotASyncToken),
        _ => Err(Fail::NotAuthenticated),
    }
}

fn state_json(d: &KanidmData) -> Value {
    match &d.cookie {
        None => json!("Refresh"),
        Some(c) => json!({ "Active": { "cookie": c } }),
    }
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The attributes a class allows a sync account to set.
fn allowed(class: &str) -> &'static [&'static str] {
    match class {
        "account" => &[
            "name",
            "displayname",
            "account_expire",
            "account_valid_from",
            "mail",
        ],
        "person" => &[
            "name",
            "displayname",
            "mail",
            "legalname",
            "password_import",
            "totp_import",
        ],
        "posixaccount" => &["gidnumber", "loginshell"],
        "group" => &["name", "description", "member"],
        "posixgroup" => &["gidnumber"],
        _ => &[],
    }
}

const HEADER_KEYS: [&str; 4] = ["schemas", "id", "externalId", "meta"];

fn text_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// Whether Kanidm takes `name` (an `iname`), as Kanidm 1.7.4 answered it (probed against
/// `kanidmd_lib` 1.7.4; the conformance suite checks a few): after ASCII upper case is lowered, a
/// letter, then letters, digits, `.`, `_` and `-`, 64 characters at most, and not `root`.
pub fn valid_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let mut chars = n.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && n.len() <= 64
        && n != "root"
}

/// `POST /scim/v1/Sync`, on a copy of the data.
fn apply(d: &mut KanidmData, req: &Value) -> Result<(), Fail> {
    let from = &req["from_state"];
    let refresh = from == "Refresh";
    if !refresh {
        let cookie = from
            .pointer("/Active/cookie")
            .and_then(Value::as_str)
            .ok_or(Fail::InvalidSyncState)?;
        if d.cookie.as_deref() != Some(cookie) {
            return Err(Fail::InvalidSyncState);
        }
    }
    let entries = req["entries"].as_array().cloned().unwrap_or_default();
    // Phase 2: every id is a UUID; an entry under that UUID must be this account's; stubs.
    let mut ids = Vec::new();
    for e in &entries {
        let id = e["id"].as_str().ok_or(Fail::InvalidEntryState)?;
        if !is_uuid(id) {
            return Err(Fail::InvalidEntryState);
        }
        if e["externalId"].as_str().is_none() {
            return Err(Fail::EmptyRequest);
        }
        let id = id.to_lowercase();
        if let Some(existing) = d.entries.get(&id)
            && !existing.synced
        {
            return Err(Fail::InvalidEntryState);
        }
        let stub = d.entries.entry(id.clone()).or_insert_with(|| KEntry {
            uuid: id.clone(),
            synced: true,
            ..KEntry::default()
        });
        stub.external_id = e["externalId"].as_str().map(str::to_owned);
        stub.classes.insert("sync_object".into());
        ids.push(id);
    }
    // The refresh cleanup: what the request does not list goes.
    if refresh {
        let listed: BTreeSet<&String> = ids.iter().collect();
        let gone: Vec<String> = d
            .entries
            .values()
            .filter(|e| e.synced && !listed.contains(&e.uuid))
            .map(|e| e.uuid.clone())
            .collect();
        delete(d, &gone);
    }
    // Phase 3: each entry's sync-owned attributes purged, then set.
    for (e, id) in entries.iter().zip(&ids) {
        let mut classes = BTreeSet::new();
        for s in e["schemas"].as_array().into_iter().flatten() {
            let class = s
                .as_str()
                .and_then(|s| s.strip_prefix(SCHEMA_PREFIX))
                .ok_or(Fail::InvalidEntryState)?;
            if allowed(class).is_empty() {
                return Err(Fail::InvalidEntryState);
            }
            classes.insert(class.to_owned());
        }
        let mut next = KEntry {
            uuid: id.clone(),
            classes: classes.clone(),
            external_id: e["externalId"].as_str().map(str::to_owned),
            synced: true,
            ..KEntry::default()
        };
        next.classes.insert("sync_object".into());
        let current = d.entries.get(id).cloned().unwrap_or_default();
        // Yielded attributes keep the value Kanidm holds.
        for a in &d.yielded {
            match a.as_str() {
                "name" => next.name = current.name.clone(),
                "gidnumber" => next.gidnumber = current.gidnumber,
                "displayname" => next.displayname = current.displayname.clone(),
                "mail" => next.mail = current.mail.clone(),
                "description" => next.description = current.description.clone(),
                "member" => next.members = current.members.clone(),
                _ => {}
            }
        }
        for (k, v) in e.as_object().into_iter().flatten() {
            if HEADER_KEYS.contains(&k.as_str()) {
                continue;
            }
            if !classes.iter().any(|c| allowed(c).contains(&k.as_str())) || d.yielded.contains(k) {
                // Kanidm logs "Rejecting attribute … which is not sync owned" and fails
                // the request as an entry in an invalid state.
                return Err(Fail::InvalidEntryState);
            }
            match k.as_str() {
                "name" => {
                    let n = text_of(v).unwrap_or_default();
                    if !valid_name(&n) {
                        return Err(Fail::InvalidSyntax("name"));
                    }
                    next.name = Some(n.to_ascii_lowercase());
                }
                "displayname" => next.displayname = text_of(v),
                "description" => next.description = text_of(v),
                "gidnumber" => next.gidnumber = v.as_u64(),
                "mail" => {
                    next.mail = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m["value"].as_str().map(str::to_owned))
                        .collect();
                }
                "member" => {
                    let mut members = BTreeSet::new();
                    for m in v.as_array().into_iter().flatten() {
                        let Some(ext) = m["external_id"].as_str() else {
                            continue;
                        };
                        let found = if is_uuid(ext) {
                            Some(ext.to_lowercase())
                        } else {
                            d.entries
                                .values()
                                .find(|x| {
                                    x.external_id
                                        .as_deref()
                                        .is_some_and(|x| x.eq_ignore_ascii_case(ext))
                                })
                                .map(|x| x.uuid.clone())
                        };
                        // An external id that resolves to nothing is skipped, as Kanidm does.
                        members.extend(found);
                    }
                    next.members = members;
                }
                _ => {}
            }
        }
        d.entries.insert(id.clone(), next);
    }
    // Attribute uniqueness: name, sync_external_id (case-insensitive) and gidnumber across
    // every entry.
    let mut conflicts = Vec::new();
    let mut names = BTreeSet::new();
    let mut gids = BTreeSet::new();
    let mut externals = BTreeSet::new();
    for e in d.entries.values() {
        if let Some(x) = &e.external_id
            && !externals.insert(x.to_lowercase())
            && !conflicts.contains(&"sync_external_id".to_owned())
        {
            conflicts.push("sync_external_id".to_owned());
        }
        if let Some(n) = &e.name
            && !names.insert(n.clone())
            && !conflicts.contains(&"name".to_owned())
        {
            conflicts.push("name".to_owned());
        }
        if let Some(g) = e.gidnumber
            && !gids.insert(g)
            && !conflicts.contains(&"gidnumber".to_owned())
        {
            conflicts.push("gidnumber".to_owned());
        }
    }
    if !conflicts.is_empty() {
        return Err(Fail::Uniqueness(conflicts));
    }
    // Phase 4: retention.
    let retain = &req["retain"];
    if let Some(keep) = retain.get("Retain").and_then(Value::as_array) {
        let keep: BTreeSet<String> = keep
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_lowercase)
            .collect();
        let gone: Vec<String> = d
            .entries
            .values()
            .filter(|e| e.synced && !keep.contains(&e.uuid))
            .map(|e| e.uuid.clone())
            .collect();
        delete(d, &gone);
    } else if let Some(list) = retain.get("Delete").and_then(Value::as_array) {
        let mut gone = Vec::new();
        for u in list.iter().filter_map(Value::as_str).map(str::to_lowercase) {
            match d.entries.get(&u) {
                None => {}
                Some(e) if !e.synced => return Err(Fail::AccessDenied),
                Some(_) => gone.push(u),
            }
        }
        delete(d, &gone);
    } else if retain != "Ignore" {
        return Err(Fail::InvalidEntryState);
    }
    // Phase 5: the new state.
    let to = &req["to_state"];
    d.cookie = if to == "Refresh" {
        None
    } else {
        Some(
            to.pointer("/Active/cookie")
                .and_then(Value::as_str)
                .ok_or(Fail::InvalidSyncState)?
                .to_owned(),
        )
    };
    d.applied += 1;
    Ok(())
}

/// Deletes entries, and every reference to them (Kanidm's referential integrity).
fn delete(d: &mut KanidmData, gone: &[String]) {
    for u in gone {
        d.entries.remove(u);
    }
    for e in d.entries.values_mut() {
        for u in gone {
            e.members.remove(u);
        }
    }
}

/// The largest `POST /scim/v1/Sync` body Kanidm accepts: 32 MiB (`DEFAULT_SCIM_SYNC_BYTES`,
/// `server/core/src/https/v1_scim.rs`, at v1.7.4 and on main).
pub const MAX_SYNC_BYTES: usize = 32 * 1024 * 1024;

/// The emulator's routes.
pub fn router(st: Arc<KanidmState>) -> axum::Router {
    axum::Router::new()
        .route(
            "/scim/v1/Sync",
            get(get_state)
                .post(post_sync)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_SYNC_BYTES)),
        )
        .route("/v1/sync_account/{id}/_finalise", get(finalise))
        .route("/v1/sync_account/{id}/_terminate", get(terminate))
        .route("/_idsync/entries", get(entries))
        .route("/_idsync/force_refresh", post(force_refresh))
        .route("/_idsync/yield", post(set_yield))
        .with_state(st)
}

/// A handler's answer: JSON on success, the release's error answer otherwise.
fn answer(release: Release, r: Result<Value, Fail>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(f) => f.respond(release),
    }
}

async fn get_state(State(st): State<Arc<KanidmState>>, h: HeaderMap) -> Response {
    let d = st.lock();
    answer(d.release, sync_caller(&h, &d).map(|()| state_json(&d)))
}

async fn post_sync(
    State(st): State<Arc<KanidmState>>,
    h: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    let mut d = st.lock();
    let release = d.release;
    let r = sync_caller(&h, &d).and_then(|()| {
        // One transaction: the copy replaces the data only when every phase succeeded.
        let mut work = d.clone();
        apply(&mut work, &req)?;
        *d = work;
        Ok(Value::Null)
    });
    answer(release, r)
}

fn end(st: &KanidmState, h: &HeaderMap, id: &str, terminate: bool) -> Response {
    let mut d = st.lock();
    let release = d.release;
    answer(release, end_in(&mut d, h, id, terminate))
}

fn end_in(d: &mut KanidmData, h: &HeaderMap, id: &str, terminate: bool) -> Result<Value, Fail> {
    // Only an admin session ends an agreement; the sync token is not one (401).
    if bearer(h) != Some(ADMIN_TOKEN) {
        return Err(Fail::NotAuthenticated);
    }
    // The account by its UUID or its name.
    if (id != SYNC_ACCOUNT && id != "idsync") || !d.account {
        return Err(Fail::NoMatchingEntries);
    }
    if terminate {
        let gone: Vec<String> = d
            .entries
            .values()
            .filter(|e| e.synced)
            .map(|e| e.uuid.clone())
            .collect();
        delete(d, &gone);
    } else {
        for e in d.entries.values_mut().filter(|e| e.synced) {
            e.synced = false;
            e.external_id = None;
            e.classes.remove("sync_object");
        }
    }
    d.account = false;
    d.cookie = None;
    Ok(Value::Null)
}

async fn finalise(
    State(st): State<Arc<KanidmState>>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    end(&st, &h, &id, false)
}

async fn terminate(
    State(st): State<Arc<KanidmState>>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    end(&st, &h, &id, true)
}

async fn entries(State(st): State<Arc<KanidmState>>) -> Json<Vec<KEntry>> {
    Json(st.lock().entries.values().cloned().collect())
}

async fn force_refresh(State(st): State<Arc<KanidmState>>) -> Json<Value> {
    st.lock().cookie = None;
    Json(Value::Null)
}

async fn set_yield(
    State(st): State<Arc<KanidmState>>,
    Json(attrs): Json<Vec<String>>,
) -> Json<Value> {
    st.lock().yielded = attrs.into_iter().collect();
    Json(Value::Null)
}
