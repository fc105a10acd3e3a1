//! The Microsoft identity platform's token endpoint, for the client-credentials grant: a client
//! secret (form or HTTP Basic), or a client assertion (a certificate-signed JWT, or a federated
//! token from a workload identity). The v1 endpoint (`resource=`) serves Azure Databricks tokens.
//! Errors carry AADSTS codes as the real endpoint's do.
//!
//! Assertions are checked for their claims (issuer, subject, audience, expiry, certificate
//! thumbprint); their signatures are not verified.

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
    if claims
        .get("exp")
        .and_then(Value::as_i64)
        .is_none_or(|e| e <= now())
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
        if !claim("aud").ends_with("/oauth2/v2.0/token") && !claim("aud").ends_with("/oauth2/token")
        {
            return Err(aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_client",
                700021,
                "Client assertion audience claim does not match Realm issuer.",
            ));
        }
        let thumb = head
            .get("x5t#S256")
            .or_else(|| head.get("x5t"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !app.certificate_thumbprints.iter().any(|t| t == thumb) {
            return Err(aadsts(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                "Client assertion failed signature validation: the key was not found.",
            ));
        }
        return Ok(());
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

async fn token_v2(
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
    let scope = f.get("scope").cloned().unwrap_or_default();
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let audience = match scopes.as_slice() {
        [one] if one.ends_with("/.default") => one.trim_end_matches("/.default").to_owned(),
        [_, _, ..] => {
            return aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                700022,
                "The provided value for the input parameter scope is not valid because it contains more than one resource.",
            );
        }
        _ => {
            return aadsts(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                70011,
                &format!(
                    "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
                ),
            );
        }
    };
    if let Err(r) = authenticate(&st, &tenant, &f, &headers) {
        return r;
    }
    let audience = if audience == GRAPH_AUDIENCE || audience == format!("{GRAPH_AUDIENCE}/") {
        GRAPH_AUDIENCE.to_owned()
    } else {
        audience
    };
    let (tok, ttl) = st.issue_token(&audience);
    axum::Json(json!({"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "access_token": tok})).into_response()
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
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_decodes_with_and_without_padding() {
        assert_eq!(b64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(b64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(b64_decode("eyJ9").unwrap(), b"{\"}");
        assert!(b64_decode("a*b").is_none());
    }
}
