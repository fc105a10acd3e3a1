//! idsync-kanidm-harness: Kanidm's real server library behind Kanidm's sync-account HTTP API.
//!
//! What it is: a small HTTP server that runs `kanidmd_lib` 1.7.4 (Kanidm's server library, the
//! in-memory test instance from `kanidmd_lib::testkit`) and exposes the routes a sync tool
//! (kanidm-ldap-sync / kanidm-ipa-sync) and an admin use for a sync agreement:
//!
//!   GET  /scim/v1/Sync                     sync token  -> ScimSyncState
//!   POST /scim/v1/Sync                     sync token, ScimSyncRequest -> null
//!   GET  /v1/sync_account/{id}/_finalise   admin token -> null
//!   GET  /v1/sync_account/{id}/_terminate  admin token -> null
//!
//! Every route does what kanidmd_core 1.7.4 does for it (server/core/src/https/v1_scim.rs and
//! server/core/src/actors/v1_scim.rs): the same transaction, the same library calls, commit only
//! on success, and errors mapped to HTTP the way server/core/src/https/errors.rs (tag v1.7.4)
//! maps them. Three extra, unauthenticated, harness-only routes let tests look and poke:
//!
//!   GET  /_idsync/entries        live person/group entries (not Kanidm's builtins), as JSON
//!   POST /_idsync/force_refresh  purge the sync account's sync_cookie (`kanidm system sync force-refresh`)
//!   POST /_idsync/yield          body ["attr", ...]: set the sync account's sync_yield_authority
//!
//! Why: idsync ships an emulator of Kanidm's sync endpoint. Its conformance tests run the same
//! scenarios against this harness (the real apply logic) and against the emulator, and compare.
//!
//! Usage: idsync-kanidm-harness [--port N]    (default 0: any free port; binds 127.0.0.1 only)
//! Once listening it prints exactly one line to stdout and flushes:
//!   {"url":"http://127.0.0.1:PORT","sync_token":"...","admin_token":"...","sync_account":"<uuid>"}
//! then serves until killed. Logs go to stderr only (RUST_LOG, default "warn").

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use kanidm_proto::internal::COOKIE_BEARER_TOKEN;
use kanidm_proto::scim_v1::{ScimSyncRequest, ScimSyncState};
use kanidm_proto::v1::{AuthCredential, AuthIssueSession, AuthMech, AuthRequest, AuthStep};
use kanidmd_lib::idm::AuthState;
use kanidmd_lib::idm::delayed::DelayedAction;
use kanidmd_lib::idm::event::AuthEvent;
use kanidmd_lib::idm::scim::{
    GenerateScimSyncTokenEvent, ScimSyncFinaliseEvent, ScimSyncTerminateEvent, ScimSyncUpdateEvent,
};
use kanidmd_lib::idm::server::IdmServerTransaction;
use kanidmd_lib::prelude::*;
use kanidmd_lib::testkit::{TestConfiguration, setup_idm_test};

use sketching::tracing;
use sketching::tracing_subscriber;

/// kanidmd_core's body limit for POST /scim/v1/Sync (DEFAULT_SCIM_SYNC_BYTES in v1_scim.rs).
const DEFAULT_SCIM_SYNC_BYTES: usize = 1024 * 1024 * 32;

/// Name of the sync account this harness creates.
const SYNC_ACCOUNT_NAME: &str = "idsync";

/// Kanidm's builtin entries live in this UUID range; /_idsync/entries leaves them out.
const BUILTIN_UUID_PREFIX: &str = "00000000-0000-0000-0000-";

/// Classes reported by /_idsync/entries.
const REPORTED_CLASSES: [&str; 6] = [
    "account",
    "person",
    "posixaccount",
    "group",
    "posixgroup",
    "sync_object",
];

#[derive(Clone)]
struct AppState {
    idms: Arc<IdmServer>,
    sync_uuid: Uuid,
}

#[tokio::main]
async fn main() {
    let port = parse_port();

    // Logging to stderr. This must come first: testkit's setup calls sketching::test_init(),
    // which installs a printer writing to *stdout* unless a global subscriber already exists.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter)
        .try_init()
        .expect("failed to install the stderr log subscriber");

    // 1. Kanidm's in-memory server, as its own tests get it.
    let (idms, idms_delayed, idms_audit) = setup_idm_test(TestConfiguration::default()).await;
    let idms = Arc::new(idms);

    // Like kanidmd_core, drain the delayed-action queue (it records auth sessions: without it the
    // admin token would stop validating once AUTH_TOKEN_GRACE_WINDOW, 5 min, has passed) and the
    // audit queue.
    tokio::spawn(run_delayed_actions(idms.clone(), idms_delayed));
    tokio::spawn(async move {
        let mut idms_audit = idms_audit;
        while let Some(event) = idms_audit.audit_rx().recv().await {
            tracing::info!(?event, "audit event");
        }
    });

    // 2. Recover admin's password and create the sync account (as `kanidm system sync create`).
    let sync_uuid = Uuid::new_v4();
    let admin_password = {
        let ct = duration_from_epoch_now();
        let mut idms_prox_write = idms.proxy_write(ct).await.expect("proxy_write");
        let password = idms_prox_write
            .recover_account("admin", None)
            .expect("recover_account(admin)");
        idms_prox_write
            .qs_write
            .internal_create(vec![kanidmd_lib::entry_init!(
                (Attribute::Class, EntryClass::Object.to_value()),
                (Attribute::Class, EntryClass::SyncAccount.to_value()),
                (Attribute::Name, Value::new_iname(SYNC_ACCOUNT_NAME)),
                (Attribute::Uuid, Value::Uuid(sync_uuid))
            )])
            .expect("create the sync account");
        idms_prox_write.commit().expect("commit account setup");
        password
    };

    // 3. Authenticate admin by password, privileged (read-write), for a bearer token.
    let admin_jws = {
        let ct = duration_from_epoch_now();
        let mut idms_auth = idms.auth().await.expect("auth transaction");
        let internal = || ClientAuthInfo::new(Source::Internal, None, None, None);

        let init = AuthEvent::from_message(
            None,
            AuthRequest {
                step: AuthStep::Init2 {
                    username: "admin".to_string(),
                    issue: AuthIssueSession::Token,
                    privileged: true,
                },
            },
        )
        .expect("auth init event");
        let sessionid = idms_auth
            .auth(&init, ct, internal())
            .await
            .expect("auth init")
            .sessionid;

        let begin = AuthEvent::from_message(
            Some(sessionid),
            AuthRequest {
                step: AuthStep::Begin(AuthMech::Password),
            },
        )
        .expect("auth begin event");
        idms_auth
            .auth(&begin, ct, internal())
            .await
            .expect("auth begin");

        let cred = AuthEvent::from_message(
            Some(sessionid),
            AuthRequest {
                step: AuthStep::Cred(AuthCredential::Password(admin_password)),
            },
        )
        .expect("auth cred event");
        let result = idms_auth
            .auth(&cred, ct, internal())
            .await
            .expect("auth cred");
        idms_auth.commit().expect("commit auth");

        match result.state {
            AuthState::Success(jws, _) => *jws,
            other => panic!("admin password authentication did not succeed: {other:?}"),
        }
    };
    let admin_token = admin_jws.to_string();

    // 4. Generate the sync token as admin (POST /v1/sync_account/{id}/_sync_token).
    let sync_token = {
        let ct = duration_from_epoch_now();
        let mut idms_prox_write = idms.proxy_write(ct).await.expect("proxy_write");
        let ident = idms_prox_write
            .validate_client_auth_info_to_ident(
                ClientAuthInfo::new(Source::Internal, None, Some(admin_jws), None),
                ct,
            )
            .expect("admin token to identity");
        let gte = GenerateScimSyncTokenEvent {
            ident,
            target: sync_uuid,
            label: "idsync harness".to_string(),
        };
        let token = idms_prox_write
            .scim_sync_generate_token(&gte, ct)
            .expect("scim_sync_generate_token");
        idms_prox_write.commit().expect("commit sync token");
        token.to_string()
    };

    // 5. Serve.
    let state = AppState {
        idms: idms.clone(),
        sync_uuid,
    };
    let app = Router::new()
        .route(
            "/scim/v1/Sync",
            post(scim_sync_post)
                .layer(DefaultBodyLimit::max(DEFAULT_SCIM_SYNC_BYTES))
                .get(scim_sync_get),
        )
        .route(
            "/v1/sync_account/:id/_finalise",
            get(sync_account_id_finalise_get),
        )
        .route(
            "/v1/sync_account/:id/_terminate",
            get(sync_account_id_terminate_get),
        )
        .route("/_idsync/entries", get(harness_entries))
        .route("/_idsync/force_refresh", post(harness_force_refresh))
        .route("/_idsync/yield", post(harness_yield))
        // kanidmd_core's handler_404.
        .fallback(|| async { (StatusCode::NOT_FOUND, "Route not found") })
        .with_state(state);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local_addr");

    fn json_str(s: &str) -> String {
        serde_json::to_string(s).expect("string to JSON")
    }
    let line = format!(
        "{{\"url\":{},\"sync_token\":{},\"admin_token\":{},\"sync_account\":{}}}",
        json_str(&format!("http://{addr}")),
        json_str(&sync_token),
        json_str(&admin_token),
        json_str(&sync_uuid.to_string()),
    );
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}").expect("write to stdout");
        stdout.flush().expect("flush stdout");
    }
    eprintln!("idsync-kanidm-harness: listening on http://{addr}");

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .expect("HTTP server failed");
}

fn parse_port() -> u16 {
    fn usage() -> ! {
        eprintln!("usage: idsync-kanidm-harness [--port N]");
        std::process::exit(2)
    }
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = if arg == "--port" {
            args.next()
        } else if let Some(v) = arg.strip_prefix("--port=") {
            Some(v.to_string())
        } else {
            usage()
        };
        port = value
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage());
    }
    port
}

// ---------------------------------------------------------------------------------------------
// Background queues (kanidmd_core server/core/src/lib.rs and actors/internal.rs do the same).

async fn run_delayed_actions(idms: Arc<IdmServer>, mut idms_delayed: IdmServerDelayed) {
    let mut buffer: Vec<DelayedAction> = Vec::with_capacity(32);
    // recv_many answers 0 only once the channel is closed.
    while idms_delayed.recv_many(&mut buffer).await > 0 {
        let batch: Vec<DelayedAction> = std::mem::take(&mut buffer);
        buffer.reserve(32);
        for action in batch {
            process_delayed_action(&idms, action).await;
        }
    }
}

async fn process_delayed_action(idms: &IdmServer, action: DelayedAction) {
    let ct = duration_from_epoch_now();
    let res = match idms.proxy_write(ct).await {
        Ok(mut idms_prox_write) => idms_prox_write
            .process_delayedaction(&action, ct)
            .and_then(|_| idms_prox_write.commit()),
        Err(err) => Err(err),
    };
    if let Err(err) = res {
        tracing::error!(?err, "delayed action failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication, as kanidmd_core's VerifiedClientInformation extractor
// (server/core/src/https/extractors/mod.rs): "Authorization: Bearer <jws>" (scheme compared
// case-insensitively, a value that does not parse as a JWS is dropped), "Basic" kept aside,
// other schemes ignored; only without an Authorization header is the "bearer" cookie used.
// It never rejects: a missing or bad token surfaces as the library's NotAuthenticated (401).

fn client_auth_info(headers: &HeaderMap, peer: SocketAddr) -> ClientAuthInfo {
    let (basic_authz, bearer_token) = match headers.get(header::AUTHORIZATION) {
        Some(value) => match value.to_str().ok().and_then(|s| s.split_once(' ')) {
            Some((scheme, data)) => match scheme.to_lowercase().as_str() {
                "basic" => (Some(data.to_string()), None),
                "bearer" => (None, parse_token(data)),
                _ => (None, None),
            },
            None => (None, None),
        },
        None => (None, bearer_cookie(headers).and_then(parse_token)),
    };
    ClientAuthInfo::new(Source::Https(peer.ip()), None, bearer_token, basic_authz)
}

/// Parses a compact JWS (the type is inferred from ClientAuthInfo::new: compact_jwt's JwsCompact).
fn parse_token<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.parse().ok()
}

/// The last "bearer=" cookie over all Cookie headers (no percent-decoding: JWS text needs none).
fn bearer_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_BEARER_TOKEN)
        .map(|(_, value)| value)
        .last()
}

// ---------------------------------------------------------------------------------------------
// Errors: server/core/src/https/errors.rs at tag v1.7.4, `WebError::OperationError` arm.
// The body is the OperationError serialized by serde_json as a *String* response, so the
// Content-Type is text/plain; charset=utf-8 (JSON bodies with application/json came in v1.11;
// AttributeUniqueness -> 409 came in v1.9 and that variant does not exist in 1.7.4: a duplicate
// value fails here as Plugin(AttrUnique(..)) -> 500).

fn web_error(err: OperationError) -> Response {
    let (code, www_authenticate) = match &err {
        OperationError::NotAuthenticated | OperationError::SessionExpired => {
            (StatusCode::UNAUTHORIZED, true)
        }
        OperationError::SystemProtectedObject | OperationError::AccessDenied => {
            (StatusCode::FORBIDDEN, false)
        }
        OperationError::NoMatchingEntries => (StatusCode::NOT_FOUND, false),
        OperationError::PasswordQuality(_)
        | OperationError::EmptyRequest
        | OperationError::InvalidAttribute(_)
        | OperationError::InvalidAttributeName(_)
        | OperationError::SchemaViolation(_)
        | OperationError::CU0003WebauthnUserNotVerified
        | OperationError::VL0001ValueSshPublicKeyString => (StatusCode::BAD_REQUEST, false),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, false),
    };
    let body = serde_json::to_string(&err).unwrap_or(err.to_string());
    if www_authenticate {
        (code, [("WWW-Authenticate", "Bearer")], body).into_response()
    } else {
        (code, body).into_response()
    }
}

/// Success as `Json(value)` (200, application/json), failure through `web_error`.
fn respond<T>(res: Result<T, OperationError>) -> Response
where
    Json<T>: IntoResponse,
{
    match res {
        Ok(value) => Json(value).into_response(),
        Err(err) => web_error(err),
    }
}

// ---------------------------------------------------------------------------------------------
// Kanidm's routes.

/// GET /scim/v1/Sync: QueryServerReadV1::handle_scim_sync_status.
async fn scim_sync_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let client_auth_info = client_auth_info(&headers, peer);
    respond(scim_sync_status(&state.idms, client_auth_info).await)
}

async fn scim_sync_status(
    idms: &IdmServer,
    client_auth_info: ClientAuthInfo,
) -> Result<ScimSyncState, OperationError> {
    let ct = duration_from_epoch_now();
    let mut idms_prox_read = idms.proxy_read().await?;
    let ident = idms_prox_read.validate_sync_client_auth_info_to_ident(client_auth_info, ct)?;
    idms_prox_read.scim_sync_get_state(&ident)
}

/// POST /scim/v1/Sync: a body that is not a ScimSyncRequest gets axum's JsonRejection response
/// before any authentication (as in kanidmd_core), otherwise
/// QueryServerWriteV1::handle_scim_sync_apply.
async fn scim_sync_post(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    payload: Result<Json<ScimSyncRequest>, JsonRejection>,
) -> Response {
    let changes = match payload {
        Ok(Json(changes)) => changes,
        Err(rejection) => {
            tracing::error!(?rejection, "Unable to process JSON");
            return rejection.into_response();
        }
    };
    let client_auth_info = client_auth_info(&headers, peer);
    respond(scim_sync_apply(&state.idms, client_auth_info, changes).await)
}

async fn scim_sync_apply(
    idms: &IdmServer,
    client_auth_info: ClientAuthInfo,
    changes: ScimSyncRequest,
) -> Result<(), OperationError> {
    let ct = duration_from_epoch_now();
    let mut idms_prox_write = idms.proxy_write(ct).await?;
    let ident = idms_prox_write.validate_sync_client_auth_info_to_ident(client_auth_info, ct)?;
    let sse = ScimSyncUpdateEvent { ident };
    // Dropping the transaction without commit rolls everything back.
    idms_prox_write
        .scim_sync_apply(&sse, &changes, ct)
        .and_then(|r| idms_prox_write.commit().map(|_| r))
}

/// GET /v1/sync_account/{id}/_finalise: QueryServerWriteV1::handle_sync_account_finalise.
async fn sync_account_id_finalise_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let client_auth_info = client_auth_info(&headers, peer);
    respond(sync_account_end(&state.idms, client_auth_info, &id, EndMode::Finalise).await)
}

/// GET /v1/sync_account/{id}/_terminate: QueryServerWriteV1::handle_sync_account_terminate.
async fn sync_account_id_terminate_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let client_auth_info = client_auth_info(&headers, peer);
    respond(sync_account_end(&state.idms, client_auth_info, &id, EndMode::Terminate).await)
}

#[derive(Clone, Copy)]
enum EndMode {
    Finalise,
    Terminate,
}

async fn sync_account_end(
    idms: &IdmServer,
    client_auth_info: ClientAuthInfo,
    uuid_or_name: &str,
    mode: EndMode,
) -> Result<(), OperationError> {
    let ct = duration_from_epoch_now();
    let mut idms_prox_write = idms.proxy_write(ct).await?;
    let ident = idms_prox_write
        .validate_client_auth_info_to_ident(client_auth_info, ct)
        .inspect_err(|err| tracing::error!(?err, "Invalid identity"))?;
    let target = idms_prox_write
        .qs_write
        .name_to_uuid(uuid_or_name)
        .inspect_err(|err| tracing::error!(?err, "Error resolving id to target"))?;
    let res = match mode {
        EndMode::Finalise => {
            idms_prox_write.scim_sync_finalise(&ScimSyncFinaliseEvent { ident, target })
        }
        EndMode::Terminate => {
            idms_prox_write.scim_sync_terminate(&ScimSyncTerminateEvent { ident, target })
        }
    };
    res.and_then(|r| idms_prox_write.commit().map(|_| r))
}

// ---------------------------------------------------------------------------------------------
// Harness-only routes (no authentication; internal operations that bypass access control).

/// GET /_idsync/entries
async fn harness_entries(State(state): State<AppState>) -> Response {
    respond(list_entries(&state.idms).await)
}

async fn list_entries(idms: &IdmServer) -> Result<Vec<serde_json::Value>, OperationError> {
    let mut idms_prox_read = idms.proxy_read().await?;
    // filter! hides recycled and tombstoned entries: live entries only.
    let entries = idms_prox_read
        .qs_read
        .internal_search(kanidmd_lib::filter!(f_or(vec![
            f_eq(Attribute::Class, EntryClass::Person.to_partialvalue()),
            f_eq(Attribute::Class, EntryClass::Group.to_partialvalue()),
        ])))?;

    let mut out: Vec<(String, serde_json::Value)> = entries
        .iter()
        .map(|e| (e.get_uuid().to_string(), e))
        .filter(|(uuid, _)| !uuid.starts_with(BUILTIN_UUID_PREFIX))
        .map(|(uuid, e)| {
            let mut classes: Vec<String> = e
                .get_ava_iter_iutf8(Attribute::Class)
                .map(|it| {
                    it.filter(|c| REPORTED_CLASSES.contains(c))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            classes.sort();
            let mut mail: Vec<String> = e
                .get_ava_iter_mail(Attribute::Mail)
                .map(|it| it.map(str::to_string).collect())
                .unwrap_or_default();
            mail.sort();
            let mut members: Vec<String> = e
                .get_ava_refer(Attribute::Member)
                .map(|set| set.iter().map(|u| u.to_string()).collect())
                .unwrap_or_default();
            members.sort();
            let json = serde_json::json!({
                "uuid": &uuid,
                "name": e.get_ava_single_proto_string(Attribute::Name),
                "classes": classes,
                "external_id": e.get_ava_single_proto_string(Attribute::SyncExternalId),
                "displayname": e.get_ava_single_proto_string(Attribute::DisplayName),
                "description": e.get_ava_single_proto_string(Attribute::Description),
                "mail": mail,
                "members": members,
                "synced": e.attribute_pres(Attribute::SyncParentUuid),
            });
            (uuid, json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, json)| json).collect())
}

/// POST /_idsync/force_refresh: purge sync_cookie, so the next GET /scim/v1/Sync says Refresh.
async fn harness_force_refresh(State(state): State<AppState>) -> Response {
    respond(force_refresh(&state.idms, state.sync_uuid).await)
}

async fn force_refresh(idms: &IdmServer, sync_uuid: Uuid) -> Result<(), OperationError> {
    let ct = duration_from_epoch_now();
    let mut idms_prox_write = idms.proxy_write(ct).await?;
    let modlist = ModifyList::new_list(vec![m_purge(Attribute::SyncCookie)]);
    idms_prox_write
        .qs_write
        .internal_modify_uuid(sync_uuid, &modlist)
        .and_then(|_| idms_prox_write.commit())
}

/// POST /_idsync/yield: body a JSON array of attribute names; sync_yield_authority becomes
/// exactly that set (purge, then present each, values parsed by schema as the real _attr PUT does).
async fn harness_yield(
    State(state): State<AppState>,
    payload: Result<Json<Vec<String>>, JsonRejection>,
) -> Response {
    match payload {
        Ok(Json(attrs)) => respond(set_yield(&state.idms, state.sync_uuid, &attrs).await),
        Err(rejection) => rejection.into_response(),
    }
}

async fn set_yield(
    idms: &IdmServer,
    sync_uuid: Uuid,
    attrs: &[String],
) -> Result<(), OperationError> {
    let ct = duration_from_epoch_now();
    let mut idms_prox_write = idms.proxy_write(ct).await?;
    let mut mods = vec![m_purge(Attribute::SyncYieldAuthority)];
    for attr in attrs {
        let value = idms_prox_write
            .qs_write
            .clone_value(&Attribute::SyncYieldAuthority, attr)?;
        mods.push(Modify::Present(Attribute::SyncYieldAuthority, value));
    }
    idms_prox_write
        .qs_write
        .internal_modify_uuid(sync_uuid, &ModifyList::new_list(mods))
        .and_then(|_| idms_prox_write.commit())
}
