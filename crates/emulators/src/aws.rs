//! AWS's credential services, for S3 state's sign-in paths: STS (`AssumeRole`,
//! `AssumeRoleWithWebIdentity`) with roles that enforce a trust policy, and the two metadata
//! endpoints a workload's own role comes from (the ECS / EKS Pod Identity container endpoint and
//! the EC2 instance metadata service, IMDSv2). moto (`scripts/servers.sh`) is the real S3 and STS
//! these credentials are used against; it trusts every caller, so refusals (a token for the wrong
//! audience, a caller the role does not trust, a wrong external id) and short credential lifetimes
//! are tested here.
//!
//! Web identity tokens are checked the way an IAM OIDC provider checks them: issued by the Entra
//! ID tenant the role trusts (the Graph emulator's token endpoints; STS asks its state instead of
//! fetching its signing keys) for one of the audiences the provider lists. Callers of
//! `AssumeRole` are named by the access key id in their SigV4 `Authorization` header: a static key
//! the role trusts, or temporary credentials this emulator issued to a trusted role (with their
//! session token, as STS requires). The signature itself is not verified (moto does not either;
//! the signing code is `object_store`'s).

use crate::graph::GraphState;
use crate::infra::{self, Infra};
use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// Who may assume a role.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Audiences of Entra ID tokens accepted for `AssumeRoleWithWebIdentity` (the OIDC
    /// provider's client id list); empty: none.
    pub web_audiences: Vec<String>,
    /// Accept any non-empty web identity token (a provider this emulator cannot check, such as
    /// a Kubernetes service account token in a file).
    pub any_web_token: bool,
    /// Callers of `AssumeRole`: static access key ids, or role names whose temporary
    /// credentials (from this emulator) may assume it.
    pub callers: Vec<String>,
    /// The external id the trust policy requires (`sts:ExternalId`).
    pub external_id: Option<String>,
}

struct Issued {
    secret: String,
    token: String,
    /// The role whose credentials these are.
    role: String,
}

/// The emulator's state.
pub struct AwsState {
    roles: Mutex<BTreeMap<String, Trust>>,
    issued: Mutex<BTreeMap<String, Issued>>,
    /// Lifetime of the credentials STS and the metadata endpoints give, in seconds.
    pub ttl_secs: AtomicU64,
    /// The Entra ID tenant web identity tokens must come from.
    entra: Option<Arc<GraphState>>,
    /// The workload's own role, served by the container and instance endpoints.
    workload_role: Mutex<Option<String>>,
    /// The `Authorization` value the container endpoint wants (EKS Pod Identity's token file).
    pub container_token: String,
    serial: AtomicU64,
    /// Accounting and faults.
    pub infra: Arc<Infra>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(t: u64) -> String {
    let (y, m, d, hh, mm, ss, _) = idsync_model::civil(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// STS's XML error body.
pub fn sts_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{}</Message></Error><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>",
        xml_escape(message)
    );
    (status, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

impl AwsState {
    /// An emulator whose web identity tokens come from `entra` (the Graph emulator's tenant).
    pub fn new(entra: Option<Arc<GraphState>>) -> Arc<Self> {
        Arc::new(AwsState {
            roles: Mutex::new(BTreeMap::new()),
            issued: Mutex::new(BTreeMap::new()),
            ttl_secs: AtomicU64::new(3600),
            entra,
            workload_role: Mutex::new(None),
            container_token: "emulator-pod-identity-token".into(),
            serial: AtomicU64::new(1),
            infra: Infra::new(sts_error),
        })
    }

    /// Adds (or replaces) a role and its trust policy.
    pub fn role(&self, arn: &str, trust: Trust) {
        lock(&self.roles).insert(arn.to_owned(), trust);
    }

    /// Names the role the container and instance endpoints hand out credentials for.
    pub fn set_workload_role(&self, name: &str) {
        *lock(&self.workload_role) = Some(name.to_owned());
    }

    /// Credentials for `role`: `(access key id, secret, session token, expiration)`.
    fn issue(&self, role: &str) -> (String, String, String, u64) {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let key = format!("ASIAEMULATOR{n:08}");
        let secret = format!("emulator-secret-{n:x}-{:x}", n.wrapping_mul(0x9e37_79b9));
        let token = format!("emulator-session-{n:x}");
        lock(&self.issued).insert(
            key.clone(),
            Issued {
                secret: secret.clone(),
                token: token.clone(),
                role: role.to_owned(),
            },
        );
        let exp = now() + self.ttl_secs.load(Ordering::Relaxed);
        (key, secret, token, exp)
    }

    /// The role that temporary credentials were issued to.
    pub fn role_of(&self, access_key_id: &str) -> Option<String> {
        lock(&self.issued)
            .get(access_key_id)
            .map(|i| i.role.clone())
    }

    /// Whether `access_key_id` with `secret` is a pair this emulator issued.
    pub fn issued_secret(&self, access_key_id: &str, secret: &str) -> bool {
        lock(&self.issued)
            .get(access_key_id)
            .is_some_and(|i| i.secret == secret)
    }
}

/// The access key id of a SigV4 `Authorization` header.
fn signer(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let cred = rest
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("Credential="))?;
    let key = cred.split('/').next()?;
    (!key.is_empty()).then(|| key.to_owned())
}

fn credentials_xml(
    action: &str,
    arn: &str,
    session: &str,
    c: (String, String, String, u64),
) -> Response {
    let (key, secret, token, exp) = c;
    let role_name = arn.rsplit('/').next().unwrap_or(arn);
    let body = format!(
        "<{action}Response xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><{action}Result><Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey><SessionToken>{token}</SessionToken><Expiration>{}</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROAEMULATOR:{session}</AssumedRoleId><Arn>{}</Arn></AssumedRoleUser></{action}Result><ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000001</RequestId></ResponseMetadata></{action}Response>",
        rfc3339(exp),
        xml_escape(&format!(
            "{}:assumed-role/{role_name}/{session}",
            arn.split(":role/")
                .next()
                .unwrap_or(arn)
                .replace(":iam:", ":sts:")
        )),
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

/// `POST /`: STS's query API.
async fn sts(
    State(st): State<Arc<AwsState>>,
    headers: HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    let field = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let arn = field("RoleArn");
    let session = field("RoleSessionName");
    if arn.is_empty() || session.is_empty() {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            "1 validation error detected: RoleArn and RoleSessionName are required",
        );
    }
    let trust = lock(&st.roles).get(arn).cloned();
    match field("Action") {
        "AssumeRoleWithWebIdentity" => {
            if headers.contains_key(header::AUTHORIZATION) {
                // STS takes the call unsigned; a signed one is not wrong, but idsync never signs it.
                return sts_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValue",
                    "AssumeRoleWithWebIdentity is not signed",
                );
            }
            let token = field("WebIdentityToken");
            if token.is_empty() {
                return sts_error(
                    StatusCode::BAD_REQUEST,
                    "ValidationError",
                    "1 validation error detected: WebIdentityToken is required",
                );
            }
            let Some(trust) = trust else {
                return sts_error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                );
            };
            if !trust.any_web_token {
                let verdict = match &st.entra {
                    None => Err("No OpenIDConnect provider found in your account"),
                    Some(entra) => {
                        let mut v = Err("Invalid identity token.");
                        for aud in &trust.web_audiences {
                            match entra.check_token(token, aud) {
                                Ok(()) => {
                                    v = Ok(());
                                    break;
                                }
                                Err("Invalid audience.") => v = Err("Incorrect token audience"),
                                Err(e) if v == Err("Invalid identity token.") => v = Err(e),
                                Err(_) => {}
                            }
                        }
                        if trust.web_audiences.is_empty() {
                            v = Err("Not authorized to perform sts:AssumeRoleWithWebIdentity");
                        }
                        v
                    }
                };
                match verdict {
                    Ok(()) => {}
                    Err(m @ "Not authorized to perform sts:AssumeRoleWithWebIdentity") => {
                        return sts_error(StatusCode::FORBIDDEN, "AccessDenied", m);
                    }
                    Err(m) => {
                        return sts_error(StatusCode::BAD_REQUEST, "InvalidIdentityToken", m);
                    }
                }
            }
            let c = st.issue(arn);
            credentials_xml("AssumeRoleWithWebIdentity", arn, session, c)
        }
        "AssumeRole" => {
            let Some(key) = signer(&headers) else {
                return sts_error(
                    StatusCode::FORBIDDEN,
                    "MissingAuthenticationToken",
                    "Request is missing Authentication Token",
                );
            };
            let caller = match lock(&st.issued).get(&key) {
                Some(i) => {
                    let sent = headers
                        .get("x-amz-security-token")
                        .and_then(|v| v.to_str().ok());
                    if sent != Some(i.token.as_str()) {
                        return sts_error(
                            StatusCode::FORBIDDEN,
                            "InvalidClientTokenId",
                            "The security token included in the request is invalid.",
                        );
                    }
                    i.role.clone()
                }
                None => key.clone(),
            };
            let trusted = trust.as_ref().is_some_and(|t| {
                t.callers
                    .iter()
                    .any(|c| *c == caller || caller.ends_with(&format!(":role/{c}")) || *c == key)
            });
            if !trusted {
                return sts_error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    &format!(
                        "User: {caller} is not authorized to perform: sts:AssumeRole on resource: {arn}"
                    ),
                );
            }
            let want = trust.and_then(|t| t.external_id);
            if want.is_some() && f.get("ExternalId") != want.as_ref() {
                return sts_error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    &format!(
                        "User: {caller} is not authorized to perform: sts:AssumeRole on resource: {arn}"
                    ),
                );
            }
            let c = st.issue(arn);
            credentials_xml("AssumeRole", arn, session, c)
        }
        other => sts_error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            &format!("Could not find operation {other}"),
        ),
    }
}

/// The workload role's credentials, in the container and instance endpoints' JSON.
fn workload_credentials(st: &AwsState) -> Response {
    let Some(role) = lock(&st.workload_role).clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (key, secret, token, exp) = st.issue(&format!("arn:aws:iam::000000000000:role/{role}"));
    axum::Json(serde_json::json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": key,
        "SecretAccessKey": secret,
        "Token": token,
        "Expiration": rfc3339(exp),
        "LastUpdated": rfc3339(now()),
    }))
    .into_response()
}

/// `GET /v2/credentials/{id}`: the container endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`),
/// which wants the Pod Identity token in `Authorization`.
async fn container(State(st): State<Arc<AwsState>>, headers: HeaderMap) -> Response {
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some(st.container_token.as_str())
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(
                serde_json::json!({"Message": "the authorization token is missing or wrong"}),
            ),
        )
            .into_response();
    }
    workload_credentials(&st)
}

const IMDS_TOKEN: &str = "emulator-imds-session";

/// `PUT /latest/api/token`: an IMDSv2 session token.
async fn imds_token(headers: HeaderMap) -> Response {
    if !headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    IMDS_TOKEN.into_response()
}

fn imds_session(headers: &HeaderMap) -> bool {
    headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        == Some(IMDS_TOKEN)
}

/// `GET /latest/meta-data/iam/security-credentials/`: the instance role's name.
async fn imds_role(State(st): State<Arc<AwsState>>, headers: HeaderMap) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match lock(&st.workload_role).clone() {
        Some(r) => r.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /latest/meta-data/iam/security-credentials/{role}`: its credentials.
async fn imds_credentials(
    State(st): State<Arc<AwsState>>,
    axum::extract::Path(role): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if lock(&st.workload_role).as_deref() != Some(role.as_str()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    workload_credentials(&st)
}

/// `GET /latest/meta-data/placement/availability-zone`: the instance's zone (`us-east-1a`).
async fn imds_zone(headers: HeaderMap) -> Response {
    if !imds_session(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    "us-east-1a".into_response()
}

/// The emulator's routes.
pub fn router(st: Arc<AwsState>) -> Router {
    Router::new()
        .route("/", post(sts))
        .route("/v2/credentials/{id}", get(container))
        .route("/latest/api/token", put(imds_token))
        .route(
            "/latest/meta-data/placement/availability-zone",
            get(imds_zone),
        )
        // Google's AWS credential files name it without the slash, object_store with.
        .route(
            "/latest/meta-data/iam/security-credentials/",
            get(imds_role),
        )
        .route("/latest/meta-data/iam/security-credentials", get(imds_role))
        .route(
            "/latest/meta-data/iam/security-credentials/{role}",
            get(imds_credentials),
        )
        .layer(axum::middleware::from_fn_with_state(
            st.infra.clone(),
            infra::layer,
        ))
        .with_state(st)
}
