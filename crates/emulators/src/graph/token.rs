//! The Microsoft identity platform's token endpoint, for the client-credentials grant: a client
//! secret (form or HTTP Basic), or a client assertion (a certificate-signed JWT, or a federated
//! token from a workload identity); the device code flow and refresh tokens for public clients;
//! the instance metadata endpoint of managed identities (and the `IDENTITY_ENDPOINT` of App
//! Service). The v1 endpoint (`resource=`) serves Azure Databricks tokens. Errors carry AADSTS
//! codes as the real endpoint's do.
//!
//! Certificate assertions are verified as Entra verifies them: the certificate is found by its
//! thumbprint (`x5t` or `x5t#S256`) among the app's, and the signature (RS256 or PS256) checked
//! with its public key. Federated tokens are checked for their audience and subject only: their
//! issuers' signing keys are not fetched.

use super::{GRAPH_AUDIENCE, GraphState};
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The Azure Databricks resource id (its tokens' audience).
pub const DATABRICKS_RESOURCE: &str = "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d";

fn aadsts(status: StatusCode, error: &str, code: u32, text: &str) -> Response {
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 00000000-0000-0000-0000-000000000000\r\nCorrelation ID: 00000000-0000-0000-0000-000000000000\r\nTimestamp: 2026-11-22 00:00:00Z"),
        "error_codes": [code],
        "timestamp": "2026-11-22 00:00:00Z",
        "trace_id": "00000000-0000-0000-0000-000000000000",
        "correlation_id": "00000000-0000-0000-0000-000000000000",
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

/// Decodes base64 (URL-safe or standard alphabet, padding optional).
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Encodes base64url without padding (JWT segments).
pub fn b64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The header and claims of a JWT, unverified.
fn jwt_parts(jwt: &str) -> Option<(Value, Value)> {
    let mut it = jwt.split('.');
    let h = serde_json::from_slice(&b64_decode(it.next()?)?).ok()?;
    let c = serde_json::from_slice(&b64_decode(it.next()?)?).ok()?;
    it.next()?;
    Some((h, c))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks the client's credentials. `Ok(())` or the AADSTS error to send.
fn authenticate(
    st: &GraphState,
    tenant_id: &str,
    f: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let t = st.tenant();
    if tenant_id != t.tenant_id {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant_id}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ));
    }
    // HTTP Basic client authentication (RFC 6749 §2.3.1) is accepted too.
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(b64_decode)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())));
    let client_id = f
        .get("client_id")
        .cloned()
        .or_else(|| basic.as_ref().map(|b| b.0.clone()))
        .unwrap_or_default();
    let Some(app) = t.apps.iter().find(|a| a.client_id == client_id) else {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant_id}'."
            ),
        ));
    };
    let secret = f
        .get("client_secret")
        .cloned()
        .or_else(|| basic.map(|b| b.1));
    if let Some(s) = secret {
        return if app.secrets.contains(&s) {
            Ok(())
        } else {
            Err(aadsts(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app.",
            ))
        };
    }
    let Some(assertion) = f.get("client_assertion") else {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    };
    if f.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_assertion_type'.",
        ));
    }
    let Some((head, claims)) = jwt_parts(assertion) else {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700027,
            "Client assertion failed signature validation (it is not a JWT).",
        ));
    };
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    // MSAL writes `exp` as a float (`time.time() + 600`); JWT's NumericDate allows it.
    if claims
        .get("exp")
        .and_then(Value::as_f64)
        .is_none_or(|e| e <= now() as f64)
    {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    if claim("iss") == client_id && claim("sub") == client_id {
        // A certificate assertion: for this token endpoint, signed by a registered certificate.
        // Entra wants the token endpoint of this tenant (v2 or v1) as the audience.
        let aud = claim("aud");
        if !aud.ends_with(&format!("/{tenant_id}/oauth2/v2.0/token"))
            && !aud.ends_with(&format!("/{tenant_id}/oauth2/token"))
        {
            return Err(aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                700021,
                "Client assertion audience claim does not match Realm issuer.",
            ));
        }
        return match verify_signature(assertion, &head, app) {
            Verdict::Valid => Ok(()),
            Verdict::UnknownKey => Err(aadsts(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion failed signature validation: the key was not found.",
            )),
            Verdict::BadSignature => Err(aadsts(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            )),
        };
    }
    // A federated token: its subject must match a federated credential of the app.
    if claim("aud") != "api://AzureADTokenExchange" {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700212,
            "No matching federated identity record found for presented assertion audience.",
        ));
    }
    if !app.federated_subjects.contains(&claim("sub")) {
        return Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            700213,
            &format!(
                "No matching federated identity record found for presented assertion subject '{}'.",
                claim("sub")
            ),
        ));
    }
    Ok(())
}

enum Verdict {
    Valid,
    UnknownKey,
    BadSignature,
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The RSAPublicKey (PKCS#1 DER) inside a certificate's subjectPublicKeyInfo.
fn rsa_public_key(cert: &[u8]) -> Option<&[u8]> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let (tag, _, after_version) = der(tbs)?;
    let mut rest = if tag == 0xa0 { after_version } else { tbs };
    // serialNumber, signature, issuer, validity, subject
    for _ in 0..5 {
        rest = der(rest)?.2;
    }
    let (_, spki, _) = der(rest)?;
    let (_, _, bits) = der(spki)?;
    let (tag, bits, _) = der(bits)?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, key))) => Some(key),
        _ => None,
    }
}

/// Finds the app's certificate the assertion names by thumbprint and checks its signature.
fn verify_signature(jwt: &str, head: &Value, app: &crate::tenant::App) -> Verdict {
    use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
    let thumb = |k: &str| head.get(k).and_then(Value::as_str).and_then(b64_decode);
    let (x5t, x5t_s256) = (thumb("x5t"), thumb("x5t#S256"));
    let Some((signed, sig)) = jwt.rsplit_once('.') else {
        return Verdict::BadSignature;
    };
    let Some(sig) = b64_decode(sig) else {
        return Verdict::BadSignature;
    };
    let alg: &dyn ring::signature::VerificationAlgorithm =
        match head.get("alg").and_then(Value::as_str) {
            Some("RS256") => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            Some("PS256") => &ring::signature::RSA_PSS_2048_8192_SHA256,
            _ => return Verdict::BadSignature,
        };
    let certs = app
        .certificates
        .iter()
        .flat_map(|p| pem::parse_many(p).unwrap_or_default())
        .filter(|b| b.tag() == "CERTIFICATE");
    for cert in certs {
        let der = cert.contents();
        let named = x5t.as_deref() == Some(digest(&SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
            || x5t_s256.as_deref() == Some(digest(&SHA256, der).as_ref());
        if !named {
            continue;
        }
        return match rsa_public_key(der) {
            Some(key)
                if ring::signature::UnparsedPublicKey::new(alg, key)
                    .verify(signed.as_bytes(), &sig)
                    .is_ok() =>
            {
                Verdict::Valid
            }
            _ => Verdict::BadSignature,
        };
    }
    Verdict::UnknownKey
}

/// True when `jwt` is signed (RS256) by the key of a certificate in `certificate_pem`.
pub fn verify_rs256(jwt: &str, certificate_pem: &str) -> bool {
    let Some((signed, sig)) = jwt.rsplit_once('.') else {
        return false;
    };
    let Some(sig) = b64_decode(sig) else {
        return false;
    };
    pem::parse_many(certificate_pem)
        .unwrap_or_default()
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .filter_map(|b| rsa_public_key(b.contents()).map(<[u8]>::to_vec))
        .any(|key| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                key,
            )
            .verify(signed.as_bytes(), &sig)
            .is_ok()
        })
}

/// Device code sign-ins in progress and refresh tokens handed out.
#[derive(Default)]
pub struct Sessions {
    /// device_code → (client id, scope, polls so far, when it expires).
    device_codes: BTreeMap<String, (String, String, u32, std::time::Instant)>,
    /// refresh token → client id.
    refresh: BTreeMap<String, String>,
}

/// Polls answered `authorization_pending` before the emulated person completes the sign-in.
const PENDING_POLLS: u32 = 1;

/// The audience of a v2 `scope` (one resource's `/.default`, or a delegated scope list such as
/// `https://graph.microsoft.com/.default offline_access`), or the error to send.
fn audience_of(scope: &str) -> Result<String, Response> {
    let scopes: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !matches!(*s, "offline_access" | "openid" | "profile" | "email"))
        .collect();
    match scopes.as_slice() {
        [one] if one.ends_with("/.default") => {
            let a = one.trim_end_matches("/.default");
            Ok(
                if a == GRAPH_AUDIENCE || a == format!("{GRAPH_AUDIENCE}/") {
                    GRAPH_AUDIENCE.to_owned()
                } else {
                    a.to_owned()
                },
            )
        }
        [_, _, ..] => Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            700022,
            "The provided value for the input parameter scope is not valid because it contains more than one resource.",
        )),
        _ => Err(aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            &format!(
                "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        )),
    }
}

fn issue(st: &GraphState, audience: &str, refresh_for: Option<&str>) -> Response {
    let (tok, ttl) = st.issue_token(audience);
    let mut body = json!({"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "access_token": tok});
    if let Some(client) = refresh_for {
        let r = format!(
            "emu-refresh.{:x}",
            st.unique().wrapping_mul(0x2545_f491_4f6c_dd1d)
        );
        super::lock(&st.sessions)
            .refresh
            .insert(r.clone(), client.to_owned());
        body["refresh_token"] = json!(r);
    }
    axum::Json(body).into_response()
}

/// `POST /{tenant}/oauth2/v2.0/devicecode`: starts a device code sign-in for a public client.
async fn devicecode(
    State(st): State<Arc<GraphState>>,
    Path(tenant): Path<String>,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    let client_id = f.get("client_id").cloned().unwrap_or_default();
    {
        let t = st.tenant();
        if tenant != t.tenant_id {
            return aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90002,
                &format!("Tenant '{tenant}' not found."),
            );
        }
        match t.apps.iter().find(|a| a.client_id == client_id) {
            None => {
                return aadsts(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    700016,
                    &format!(
                        "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
                    ),
                );
            }
            Some(a) if !a.public_client => {
                return aadsts(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
            Some(_) => {}
        }
    }
    let scope = f.get("scope").cloned().unwrap_or_default();
    if let Err(r) = audience_of(&scope) {
        return r;
    }
    let n = st.unique();
    let device_code = format!("emu-device.{:x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let user_code = format!("EMU{:06}", n % 1_000_000);
    super::lock(&st.sessions).device_codes.insert(
        device_code.clone(),
        (
            client_id,
            scope,
            0,
            std::time::Instant::now() + std::time::Duration::from_secs(900),
        ),
    );
    axum::Json(json!({
        "user_code": user_code,
        "device_code": device_code,
        "verification_uri": "https://microsoft.com/devicelogin",
        "expires_in": 900,
        "interval": 1,
        "message": format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate."),
    }))
    .into_response()
}

/// The device code grant: pending for the first polls, then the emulated person has signed in.
fn device_code_grant(st: &GraphState, f: &BTreeMap<String, String>) -> Response {
    let code = f.get("device_code").cloned().unwrap_or_default();
    let mut sessions = super::lock(&st.sessions);
    let Some((client, scope, polls, expires)) = sessions.device_codes.get_mut(&code) else {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "bad_verification_code",
            70019,
            "Verification code not recognised.",
        );
    };
    if f.get("client_id") != Some(client) {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70000,
            "The device code was issued to another client.",
        );
    }
    if *expires < std::time::Instant::now() {
        sessions.device_codes.remove(&code);
        return aadsts(
            StatusCode::BAD_REQUEST,
            "expired_token",
            70020,
            "The provided authorization code or refresh token has expired due to it being shared or saved.",
        );
    }
    *polls += 1;
    if *polls <= PENDING_POLLS {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        );
    }
    let (client, scope) = (client.clone(), scope.clone());
    sessions.device_codes.remove(&code);
    drop(sessions);
    match audience_of(&scope) {
        Ok(aud) => issue(st, &aud, Some(&client)),
        Err(r) => r,
    }
}

/// The refresh token grant: a new access token (and refresh token) for any resource.
fn refresh_grant(st: &GraphState, f: &BTreeMap<String, String>) -> Response {
    let token = f.get("refresh_token").cloned().unwrap_or_default();
    let client = super::lock(&st.sessions).refresh.get(&token).cloned();
    if client.is_none() || f.get("client_id") != client.as_ref() {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            9002313,
            "Invalid request. Request is malformed or invalid: the refresh token is not valid.",
        );
    }
    match audience_of(f.get("scope").map_or("", String::as_str)) {
        Ok(aud) => issue(st, &aud, client.as_deref()),
        Err(r) => r,
    }
}

/// The managed identity token, once the caller's identity is chosen: `client_id` picks a
/// user-assigned identity, none the system-assigned one (the first managed identity registered).
fn managed_identity_token(
    st: &GraphState,
    q: &BTreeMap<String, String>,
    numbers_as_strings: bool,
) -> Response {
    let err = |status: StatusCode, e: &str, d: &str| {
        (
            status,
            axum::Json(json!({"error": e, "error_description": d})),
        )
            .into_response()
    };
    let Some(resource) = q.get("resource").filter(|r| !r.is_empty()) else {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        );
    };
    let client = {
        let t = st.tenant();
        let mut ids = t.apps.iter().filter(|a| a.managed_identity);
        match q.get("client_id") {
            Some(c) => ids.find(|a| &a.client_id == c),
            None => ids.next(),
        }
        .map(|a| a.client_id.clone())
    };
    let Some(client) = client else {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found",
        );
    };
    let resource = resource.trim_end_matches('/').to_owned();
    let (tok, ttl) = st.issue_token(&resource);
    let exp = now() + ttl as i64;
    let body = if numbers_as_strings {
        json!({"access_token": tok, "client_id": client, "expires_in": ttl.to_string(),
            "expires_on": exp.to_string(), "ext_expires_in": ttl.to_string(),
            "not_before": now().to_string(), "resource": resource, "token_type": "Bearer"})
    } else {
        json!({"access_token": tok, "client_id": client, "expires_on": exp,
            "resource": resource, "token_type": "Bearer"})
    };
    axum::Json(body).into_response()
}

/// The header value the emulated App Service host expects in `X-IDENTITY-HEADER`.
pub const IDENTITY_HEADER: &str = "emulator-identity-header";

/// `GET /metadata/identity/oauth2/token`: the instance metadata endpoint (requires `Metadata:
/// true`, as IMDS does, against server-side request forgery).
async fn imds(
    State(st): State<Arc<GraphState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Response {
    // Any case: Google's credential configuration for Azure sends `Metadata: True`
    // (docs/apis/graph.md, managed identity).
    if !headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})),
        )
            .into_response();
    }
    managed_identity_token(&st, &q, true)
}

/// `GET /msi/token`: App Service's and Container Apps' identity endpoint (`IDENTITY_ENDPOINT`),
/// which wants the `IDENTITY_HEADER` secret.
async fn app_service_identity(
    State(st): State<Arc<GraphState>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Response {
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(IDENTITY_HEADER)
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "unauthorized", "error_description": "The X-IDENTITY-HEADER is missing or wrong"})),
        )
            .into_response();
    }
    managed_identity_token(&st, &q, false)
}

async fn token_v2(
    State(st): State<Arc<GraphState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    if tenant != st.tenant().tenant_id {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    match f.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some("urn:ietf:params:oauth:grant-type:device_code") => return device_code_grant(&st, &f),
        Some("refresh_token") => return refresh_grant(&st, &f),
        _ => {
            return aadsts(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
    }
    let audience = match audience_of(f.get("scope").map_or("", String::as_str)) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = authenticate(&st, &tenant, &f, &headers) {
        return r;
    }
    issue(&st, &audience, None)
}

async fn token_v1(
    State(st): State<Arc<GraphState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Form(f): Form<BTreeMap<String, String>>,
) -> Response {
    if f.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let Some(resource) = f.get("resource").cloned() else {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'resource'.",
        );
    };
    if let Err(r) = authenticate(&st, &tenant, &f, &headers) {
        return r;
    }
    let audience = resource.trim_end_matches('/').to_owned();
    let (tok, ttl) = st.issue_token(&audience);
    let exp = now() + ttl as i64;
    // The v1 endpoint sends numbers as strings.
    axum::Json(json!({"token_type": "Bearer", "expires_in": ttl.to_string(), "ext_expires_in": ttl.to_string(),
        "expires_on": exp.to_string(), "not_before": now().to_string(), "resource": resource, "access_token": tok}))
    .into_response()
}

async fn openid(
    State(st): State<Arc<GraphState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    let t = st.tenant();
    if tenant != t.tenant_id {
        return aadsts(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    let base = format!("{}/{tenant}", super::base(&st, &headers));
    axum::Json(json!({
        "issuer": format!("{base}/v2.0"),
        "token_endpoint": format!("{base}/oauth2/v2.0/token"),
        "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
        "jwks_uri": format!("{base}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "tenant_region_scope": "NA",
    }))
    .into_response()
}

/// The token endpoint's routes.
pub fn routes() -> Router<Arc<GraphState>> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route("/{tenant}/oauth2/v2.0/devicecode", post(devicecode))
        .route("/metadata/identity/oauth2/token", get(imds))
        .route("/msi/token", get(app_service_identity))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for s in [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "{\"aud\":\"https://storage.azure.com\"}",
        ] {
            assert_eq!(
                b64_decode(&b64url_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(b64url_encode(b"\xfb\xff"), "-_8");
    }

    #[test]
    fn base64url_decodes_with_and_without_padding() {
        assert_eq!(b64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(b64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(b64_decode("eyJ9").unwrap(), b"{\"}");
        assert!(b64_decode("a*b").is_none());
    }
}
