//! A stateful emulator of the lakeFS auth API (`/api/v1/auth/...`) as lakeFS Cloud and Enterprise
//! serve it: users, groups (with the id-vs-name quirk), memberships, policies; `prefix` / `after` /
//! `amount` pagination; HTTP Basic with an access-key pair; `{"message": ...}` errors. A switch
//! makes it answer 501 like open-source lakeFS without RBAC. Behaviour follows
//! `docs/apis/lakefs-auth.md`.

use crate::infra::{self, Infra};
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The access key id of the emulator's admin user.
pub const ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
/// Its secret access key.
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

/// A lakeFS user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LUser {
    /// Its id (the username).
    pub id: String,
    /// Unix seconds.
    pub creation_date: i64,
    /// Display name.
    pub friendly_name: Option<String>,
    /// Mail.
    pub email: Option<String>,
}

/// A lakeFS group: an id assigned by the auth service and a display name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LGroup {
    /// Assigned id.
    pub id: String,
    /// Display name (what `POST /auth/groups {"id": ...}` sent).
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Unix seconds.
    pub creation_date: i64,
    /// Member user ids.
    pub members: BTreeSet<String>,
    /// Attached policy ids.
    pub policies: BTreeSet<String>,
}

/// Everything the auth service holds.
#[derive(Clone, Debug, Default)]
pub struct LakefsData {
    /// Users by id.
    pub users: BTreeMap<String, LUser>,
    /// Groups by id.
    pub groups: BTreeMap<String, LGroup>,
    /// Policies by id (their JSON).
    pub policies: BTreeMap<String, Value>,
}

/// The emulator's state.
pub struct LakefsState {
    data: RwLock<LakefsData>,
    /// Accounting, faults, throttling.
    pub infra: Arc<Infra>,
    rbac: AtomicBool,
    counter: AtomicU64,
}

fn lakefs_error(status: StatusCode, _code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"message": message}))).into_response()
}

fn err(status: StatusCode, message: &str) -> Response {
    lakefs_error(status, "", message)
}

const NOW: i64 = 1_763_769_600;

impl LakefsState {
    /// A fresh auth service with its admin user and lakeFS's built-in policies.
    pub fn new() -> Arc<Self> {
        let mut d = LakefsData::default();
        d.users.insert(
            "admin".into(),
            LUser {
                id: "admin".into(),
                creation_date: NOW,
                friendly_name: None,
                email: None,
            },
        );
        for (id, action) in [
            ("FSFullAccess", "fs:*"),
            ("FSReadAll", "fs:Read*"),
            ("FSReadWriteAll", "fs:*Object*"),
            ("AuthFullAccess", "auth:*"),
            ("AuthManageOwnCredentials", "auth:*Credentials"),
            ("RepoManagementFullAccess", "ci:*"),
        ] {
            d.policies.insert(
                id.into(),
                json!({"id": id, "creation_date": NOW, "statement": [{"effect": "allow", "resource": "*", "action": [action]}]}),
            );
        }
        Arc::new(LakefsState {
            data: RwLock::new(d),
            infra: Infra::new(lakefs_error),
            rbac: AtomicBool::new(true),
            counter: AtomicU64::new(1),
        })
    }

    /// Reads the data.
    pub fn data(&self) -> RwLockReadGuard<'_, LakefsData> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the data directly (as an administrator in the UI would).
    pub fn data_mut(&self) -> RwLockWriteGuard<'_, LakefsData> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `false`: answer 501 for groups and policies, as open-source lakeFS (no RBAC) does.
    pub fn set_rbac(&self, on: bool) {
        self.rbac.store(on, Ordering::Relaxed);
    }

    /// The group with this display name, if any.
    pub fn group_by_name(&self, name: &str) -> Option<LGroup> {
        self.data()
            .groups
            .values()
            .find(|g| g.name == name)
            .cloned()
    }

    /// Makes a group as an administrator would (no request, no accounting): id `id`, display
    /// name `name`, no members, no policies.
    pub fn add_group(&self, id: &str, name: &str) {
        self.data_mut().groups.insert(
            id.to_owned(),
            LGroup {
                id: id.to_owned(),
                name: name.to_owned(),
                description: None,
                creation_date: NOW,
                members: BTreeSet::new(),
                policies: BTreeSet::new(),
            },
        );
    }
}

fn basic_ok(req: &Request) -> bool {
    let Some(v) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(b64) = v.strip_prefix("Basic ") else {
        return false;
    };
    let expected = format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}");
    crate::graph::token::b64_decode(b64).is_some_and(|b| b == expected.as_bytes())
}

async fn auth(State(st): State<Arc<LakefsState>>, req: Request, next: Next) -> Response {
    if !basic_ok(&req) {
        return err(StatusCode::UNAUTHORIZED, "error authenticating request");
    }
    let path = req.uri().path();
    let rbac_only = path.contains("/auth/groups")
        || path.contains("/auth/policies")
        || path.ends_with("/groups")
        || path.contains("/policies");
    if rbac_only && !st.rbac.load(Ordering::Relaxed) {
        return err(StatusCode::NOT_IMPLEMENTED, "Not Implemented");
    }
    next.run(req).await
}

#[derive(Deserialize, Default)]
struct Page {
    prefix: Option<String>,
    after: Option<String>,
    amount: Option<i64>,
}

fn paginate(items: Vec<(String, Value)>, p: &Page) -> Response {
    let amount = match p.amount {
        None => 100,
        Some(n) if n <= 0 => 100,
        Some(n) => n.min(1000) as usize,
    };
    let prefix = p.prefix.clone().unwrap_or_default();
    let after = p.after.clone().unwrap_or_default();
    let mut matching = items
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix) && (after.is_empty() || *k > after));
    let page: Vec<(String, Value)> = matching.by_ref().take(amount).collect();
    let has_more = matching.next().is_some();
    let next = if has_more {
        page.last().map(|(k, _)| k.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    let results: Vec<Value> = page.into_iter().map(|(_, v)| v).collect();
    axum::Json(json!({"pagination": {"has_more": has_more, "next_offset": next, "results": results.len(), "max_per_page": 0}, "results": results}))
        .into_response()
}

/// Reads a JSON body of type `T`, answering lakeFS's `{"message": ...}` 400 otherwise.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            &format!("request body has an error: {e}"),
        )
    })
}

fn user_json(u: &LUser) -> Value {
    let mut v = json!({"id": u.id, "creation_date": u.creation_date});
    if let Some(f) = &u.friendly_name {
        v["friendly_name"] = json!(f);
    }
    if let Some(e) = &u.email {
        v["email"] = json!(e);
    }
    v
}

fn group_list_json(g: &LGroup) -> Value {
    json!({"id": g.id, "name": g.name, "description": g.description, "creation_date": g.creation_date})
}

fn valid_name(kind: &str, id: &str) -> Result<(), Response> {
    if id.is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            &format!("{kind} id is required"),
        ));
    }
    if id.contains('%') {
        return Err(err(
            StatusCode::BAD_REQUEST,
            &format!("{kind} name cannot contain '%'"),
        ));
    }
    if id.contains('/') {
        return Err(err(
            StatusCode::BAD_REQUEST,
            &format!("validation error: {kind} id must not contain '/'"),
        ));
    }
    Ok(())
}

async fn current_user() -> Response {
    axum::Json(json!({"user": {"id": "admin", "creation_date": NOW}})).into_response()
}

async fn list_users(State(st): State<Arc<LakefsState>>, Query(p): Query<Page>) -> Response {
    let d = st.data();
    paginate(
        d.users
            .values()
            .map(|u| (u.id.clone(), user_json(u)))
            .collect(),
        &p,
    )
}

#[derive(Deserialize)]
struct UserCreation {
    id: String,
    #[serde(default)]
    invite_user: bool,
}

async fn create_user(State(st): State<Arc<LakefsState>>, bytes: axum::body::Bytes) -> Response {
    let b: UserCreation = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = valid_name("User", &b.id) {
        return r;
    }
    if b.invite_user {
        return err(StatusCode::NOT_IMPLEMENTED, "Not Implemented");
    }
    let mut d = st.data_mut();
    if d.users.contains_key(&b.id) {
        return err(StatusCode::CONFLICT, "Already exists");
    }
    let u = LUser {
        id: b.id.clone(),
        creation_date: NOW,
        friendly_name: None,
        email: None,
    };
    let v = user_json(&u);
    d.users.insert(b.id, u);
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

async fn get_user(State(st): State<Arc<LakefsState>>, Path(id): Path<String>) -> Response {
    match st.data().users.get(&id) {
        Some(u) => axum::Json(user_json(u)).into_response(),
        None => err(StatusCode::NOT_FOUND, "user not found"),
    }
}

async fn delete_user(State(st): State<Arc<LakefsState>>, Path(id): Path<String>) -> Response {
    let mut d = st.data_mut();
    if d.users.remove(&id).is_none() {
        return err(StatusCode::NOT_FOUND, "user not found");
    }
    for g in d.groups.values_mut() {
        g.members.remove(&id);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn user_groups(
    State(st): State<Arc<LakefsState>>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    let d = st.data();
    if !d.users.contains_key(&id) {
        return err(StatusCode::NOT_FOUND, "user not found");
    }
    paginate(
        d.groups
            .values()
            .filter(|g| g.members.contains(&id))
            .map(|g| (g.id.clone(), group_list_json(g)))
            .collect(),
        &p,
    )
}

async fn list_groups(State(st): State<Arc<LakefsState>>, Query(p): Query<Page>) -> Response {
    let d = st.data();
    paginate(
        d.groups
            .values()
            .map(|g| (g.id.clone(), group_list_json(g)))
            .collect(),
        &p,
    )
}

#[derive(Deserialize)]
struct GroupCreation {
    id: String,
    description: Option<String>,
}

async fn create_group(State(st): State<Arc<LakefsState>>, bytes: axum::body::Bytes) -> Response {
    let b: GroupCreation = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = valid_name("Group", &b.id) {
        return r;
    }
    let mut d = st.data_mut();
    if d.groups.values().any(|g| g.name == b.id) {
        return err(StatusCode::CONFLICT, "Already exists");
    }
    // The auth service assigns the id; what the client sent becomes the display name.
    let id = format!("g{:08x}", st.counter.fetch_add(1, Ordering::Relaxed));
    let g = LGroup {
        id: id.clone(),
        name: b.id,
        description: b.description,
        creation_date: NOW,
        members: BTreeSet::new(),
        policies: BTreeSet::new(),
    };
    let v = group_list_json(&g);
    d.groups.insert(id, g);
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

async fn get_group(State(st): State<Arc<LakefsState>>, Path(id): Path<String>) -> Response {
    match st.data().groups.get(&id) {
        // lakeFS's quirk: GET one answers the display name as `id`, and no `name`.
        Some(g) => axum::Json(
            json!({"id": g.name, "description": g.description, "creation_date": g.creation_date}),
        )
        .into_response(),
        None => err(StatusCode::NOT_FOUND, "group not found"),
    }
}

async fn delete_group(State(st): State<Arc<LakefsState>>, Path(id): Path<String>) -> Response {
    if st.data_mut().groups.remove(&id).is_none() {
        return err(StatusCode::NOT_FOUND, "group not found");
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn group_members(
    State(st): State<Arc<LakefsState>>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    let d = st.data();
    let Some(g) = d.groups.get(&id) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    paginate(
        g.members
            .iter()
            .map(|u| {
                (
                    u.clone(),
                    d.users
                        .get(u)
                        .map_or_else(|| json!({"id": u, "creation_date": NOW}), user_json),
                )
            })
            .collect(),
        &p,
    )
}

async fn add_member(
    State(st): State<Arc<LakefsState>>,
    Path((gid, uid)): Path<(String, String)>,
) -> Response {
    let mut d = st.data_mut();
    if !d.users.contains_key(&uid) {
        return err(StatusCode::NOT_FOUND, "user not found");
    }
    let Some(g) = d.groups.get_mut(&gid) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    g.members.insert(uid);
    StatusCode::CREATED.into_response()
}

async fn remove_member(
    State(st): State<Arc<LakefsState>>,
    Path((gid, uid)): Path<(String, String)>,
) -> Response {
    let mut d = st.data_mut();
    let Some(g) = d.groups.get_mut(&gid) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    if !g.members.remove(&uid) {
        return err(StatusCode::NOT_FOUND, "not found");
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn list_policies(State(st): State<Arc<LakefsState>>, Query(p): Query<Page>) -> Response {
    let d = st.data();
    paginate(
        d.policies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        &p,
    )
}

async fn create_policy(State(st): State<Arc<LakefsState>>, bytes: axum::body::Bytes) -> Response {
    let mut b: Value = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let id = b["id"].as_str().unwrap_or_default().to_owned();
    if let Err(r) = valid_name("Policy", &id) {
        return r;
    }
    if b["statement"].as_array().is_none_or(Vec::is_empty) {
        return err(
            StatusCode::BAD_REQUEST,
            "statement: minimum 1 item required",
        );
    }
    let mut d = st.data_mut();
    if d.policies.contains_key(&id) {
        return err(StatusCode::CONFLICT, "Already exists");
    }
    b["creation_date"] = json!(NOW);
    d.policies.insert(id, b.clone());
    (StatusCode::CREATED, axum::Json(b)).into_response()
}

async fn get_policy(State(st): State<Arc<LakefsState>>, Path(id): Path<String>) -> Response {
    match st.data().policies.get(&id) {
        Some(p) => axum::Json(p.clone()).into_response(),
        None => err(StatusCode::NOT_FOUND, "policy not found"),
    }
}

async fn group_policies(
    State(st): State<Arc<LakefsState>>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    let d = st.data();
    let Some(g) = d.groups.get(&id) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    paginate(
        g.policies
            .iter()
            .filter_map(|p| d.policies.get(p).map(|v| (p.clone(), v.clone())))
            .collect(),
        &p,
    )
}

async fn attach(
    State(st): State<Arc<LakefsState>>,
    Path((gid, pid)): Path<(String, String)>,
) -> Response {
    let mut d = st.data_mut();
    if !d.policies.contains_key(&pid) {
        return err(StatusCode::NOT_FOUND, "policy not found");
    }
    let Some(g) = d.groups.get_mut(&gid) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    g.policies.insert(pid);
    StatusCode::CREATED.into_response()
}

async fn detach(
    State(st): State<Arc<LakefsState>>,
    Path((gid, pid)): Path<(String, String)>,
) -> Response {
    let mut d = st.data_mut();
    let Some(g) = d.groups.get_mut(&gid) else {
        return err(StatusCode::NOT_FOUND, "group not found");
    };
    if !g.policies.remove(&pid) {
        return err(StatusCode::NOT_FOUND, "policy not found");
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_rbac(
    State(st): State<Arc<LakefsState>>,
    axum::Json(on): axum::Json<bool>,
) -> StatusCode {
    st.set_rbac(on);
    StatusCode::NO_CONTENT
}

/// The emulator's routes.
pub fn router(st: Arc<LakefsState>) -> Router {
    let api = Router::new()
        .route("/api/v1/user", get(current_user))
        .route("/api/v1/auth/users", get(list_users).post(create_user))
        .route("/api/v1/auth/users/{id}", get(get_user).delete(delete_user))
        .route("/api/v1/auth/users/{id}/groups", get(user_groups))
        .route("/api/v1/auth/groups", get(list_groups).post(create_group))
        .route(
            "/api/v1/auth/groups/{id}",
            get(get_group).delete(delete_group),
        )
        .route("/api/v1/auth/groups/{id}/members", get(group_members))
        .route(
            "/api/v1/auth/groups/{id}/members/{user}",
            put(add_member).delete(remove_member),
        )
        .route("/api/v1/auth/groups/{id}/policies", get(group_policies))
        .route(
            "/api/v1/auth/groups/{id}/policies/{policy}",
            put(attach).delete(detach),
        )
        .route(
            "/api/v1/auth/policies",
            get(list_policies).post(create_policy),
        )
        .route("/api/v1/auth/policies/{id}", get(get_policy))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    let admin = Router::new()
        .route("/_admin/rbac", post(admin_rbac))
        .merge(infra::admin_router(st.infra.clone()));
    api.merge(admin)
        .layer(middleware::from_fn_with_state(
            st.infra.clone(),
            infra::layer,
        ))
        .with_state(st)
}
