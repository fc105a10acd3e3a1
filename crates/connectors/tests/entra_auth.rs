//! Every Entra sign-in method against the Graph emulator's token endpoints: client secret, client
//! certificate (a signed assertion, verified by the emulator), workload identity (a federated token
//! file), managed identity (IMDS and App Service), the Azure CLI (a stand-in `az`), and the device
//! code flow with its refresh token. Tokens are cached per scope and fetched again near expiry.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use idsync_connectors::entra_auth::{ClientCertificate, EntraAuth, EntraCredential, GRAPH_SCOPE};
use idsync_connectors::http::{Http, HttpConfig, percent_encode};
use idsync_connectors::sources::entra::{EntraSource, EntraSourceConfig};
use idsync_emulators::Graph;
use idsync_emulators::graph::token::IDENTITY_HEADER;
use idsync_emulators::tenant::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_MANAGED_IDENTITY_ID, Tenant,
};
use idsync_engine::{Scope, Source};
use idsync_model::{Directory, Secret, Snapshot};
use std::path::Path;
use std::time::Duration;

const PEM: &str = "../../tests/fixtures/entra-test-client.pem";
const PEM_PKCS1: &str = "../../tests/fixtures/entra-test-client-pkcs1.pem";

fn directory() -> Snapshot {
    let d: Directory = serde_json::from_str(include_str!("../../demo/src/directory.json")).unwrap();
    d.try_into().unwrap()
}

async fn graph() -> Graph {
    Graph::start(Tenant::new(directory())).await.unwrap()
}

fn http() -> Http {
    Http::new(HttpConfig {
        base_backoff: Duration::from_millis(5),
        max_attempts: 2,
        ..HttpConfig::new("Entra ID")
    })
    .unwrap()
}

fn auth(g: &Graph, credential: EntraCredential) -> EntraAuth {
    let tenant = g.state.tenant().tenant_id.clone();
    EntraAuth::new(&g.server.base_url, &tenant, credential, http())
}

fn certificate(path: &str) -> EntraCredential {
    EntraCredential::Certificate {
        client_id: DEFAULT_CLIENT_ID.into(),
        certificate: ClientCertificate::load(Path::new(path)).unwrap(),
    }
}

/// Reads the whole demo scope with `credential`: proof that the token is one Graph accepts.
async fn read_with(g: &Graph, credential: EntraCredential) -> Result<usize, String> {
    let src = EntraSource::new(EntraSourceConfig {
        authority: g.server.base_url.clone(),
        graph: g.server.base_url.clone(),
        tenant_id: g.state.tenant().tenant_id.clone(),
        credential,
        http: HttpConfig {
            max_attempts: 2,
            ..HttpConfig::new("Microsoft Graph")
        },
    })
    .unwrap();
    let scope = Scope {
        group_names: ["TEAM_ALPHA".to_owned()].into(),
        ..Scope::default()
    };
    src.read_full(&scope)
        .await
        .map(|r| r.snapshot.users.len())
        .map_err(|e| e.message)
}

/// An unsigned JWT, as a federated token file holds one (the emulator checks its claims).
fn federated_token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        part(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        part(
            serde_json::json!({"iss": "https://oidc.example/cluster", "sub": sub,
            "aud": "api://AzureADTokenExchange", "exp": now + 3600, "iat": now})
        )
    )
}

#[tokio::test]
async fn client_secret_signs_in_and_a_wrong_one_says_so_without_echoing_it() {
    let g = graph().await;
    let ok = EntraCredential::ClientSecret {
        client_id: DEFAULT_CLIENT_ID.into(),
        secret: Secret::new(DEFAULT_CLIENT_SECRET),
    };
    assert!(read_with(&g, ok).await.unwrap() > 0);
    let bad = auth(
        &g,
        EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new("not-the-secret-XYZZY"),
        },
    );
    let e = bad.token(GRAPH_SCOPE).await.unwrap_err();
    assert!(e.message.contains("client secret"), "{}", e.message);
    assert!(e.message.contains("AADSTS7000215"), "{}", e.message);
    assert!(!e.message.contains("XYZZY"), "{}", e.message);
}

#[tokio::test]
async fn a_certificate_signs_assertions_that_the_emulator_verifies() {
    let g = graph().await;
    // PKCS#8 and PKCS#1 keys both sign; the emulator checks the signature with the certificate's
    // public key.
    assert!(read_with(&g, certificate(PEM)).await.unwrap() > 0);
    assert!(read_with(&g, certificate(PEM_PKCS1)).await.unwrap() > 0);

    // A tampered assertion: same header and claims, a signature over something else.
    let cert = ClientCertificate::load(Path::new(PEM)).unwrap();
    let tenant = g.state.tenant().tenant_id.clone();
    let url = format!("{}/{tenant}/oauth2/v2.0/token", g.server.base_url);
    let good = cert.assertion(DEFAULT_CLIENT_ID, &url).unwrap();
    let other = cert.assertion(DEFAULT_CLIENT_ID, &url).unwrap();
    let good_parts: Vec<&str> = good.expose().split('.').collect();
    let other_sig = other.expose().rsplit('.').next().unwrap();
    assert_ne!(good_parts[2], other_sig, "each assertion has its own jti");
    let tampered = format!("{}.{}.{other_sig}", good_parts[0], good_parts[1]);
    let post = |assertion: String| {
        let url = url.clone();
        async move {
            let form: Vec<String> = [
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
                ("scope", GRAPH_SCOPE),
            ]
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v, b"")))
            .collect();
            reqwest::Client::new()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.join("&"))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(post(good.expose().to_owned()).await.status(), 200);
    let r = post(tampered).await;
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(body.contains("AADSTS700027"), "{body}");

    // A certificate the app does not hold: found by thumbprint nowhere.
    g.state.tenant_mut().apps[0].certificates.clear();
    let e = auth(&g, certificate(PEM))
        .token(GRAPH_SCOPE)
        .await
        .unwrap_err();
    assert!(e.message.contains("client certificate"), "{}", e.message);
    assert!(e.message.contains("key was not found"), "{}", e.message);
}

#[tokio::test]
async fn workload_identity_reads_the_token_file_at_each_fetch() {
    let g = graph().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(
        &file,
        federated_token("system:serviceaccount:idsync:idsync"),
    )
    .unwrap();
    let cred = EntraCredential::WorkloadIdentity {
        client_id: DEFAULT_CLIENT_ID.into(),
        token_file: file.clone(),
    };
    assert!(read_with(&g, cred.clone()).await.unwrap() > 0);

    // The platform rotates the file: a subject the app does not trust is refused, a missing file
    // is named.
    std::fs::write(&file, federated_token("system:serviceaccount:other:thief")).unwrap();
    let e = auth(&g, cred.clone()).token(GRAPH_SCOPE).await.unwrap_err();
    assert!(e.message.contains("AADSTS700213"), "{}", e.message);
    std::fs::remove_file(&file).unwrap();
    let e = auth(&g, cred).token(GRAPH_SCOPE).await.unwrap_err();
    assert!(e.message.contains("federated token file"), "{}", e.message);
}

#[tokio::test]
async fn managed_identity_through_imds_and_the_app_service_endpoint() {
    let g = graph().await;
    let imds = |client_id: Option<&str>| EntraCredential::ManagedIdentity {
        client_id: client_id.map(str::to_owned),
        endpoint: g.server.base_url.clone(),
        identity_header: None,
    };
    // System-assigned and user-assigned identities both read Graph.
    assert!(read_with(&g, imds(None)).await.unwrap() > 0);
    assert!(
        read_with(&g, imds(Some(DEFAULT_MANAGED_IDENTITY_ID)))
            .await
            .unwrap()
            > 0
    );
    let counts = g.state.infra.accounting.snapshot();
    assert_eq!(
        counts["GET /metadata/identity/oauth2/token"], 2,
        "{counts:?}"
    );
    let e = auth(&g, imds(Some("no-such-identity")))
        .token(GRAPH_SCOPE)
        .await
        .unwrap_err();
    assert!(e.message.contains("Identity not found"), "{}", e.message);

    // App Service / Container Apps: IDENTITY_ENDPOINT and IDENTITY_HEADER.
    let app_service = |header: &str| EntraCredential::ManagedIdentity {
        client_id: None,
        endpoint: format!("{}/msi/token", g.server.base_url),
        identity_header: Some(Secret::new(header)),
    };
    assert!(read_with(&g, app_service(IDENTITY_HEADER)).await.unwrap() > 0);
    let e = auth(&g, app_service("wrong-header-PLUGH"))
        .token(GRAPH_SCOPE)
        .await
        .unwrap_err();
    assert!(e.message.contains("401"), "{}", e.message);
    assert!(!e.message.contains("PLUGH"), "{}", e.message);
}

#[cfg(unix)]
#[tokio::test]
async fn azure_cli_tokens_come_from_az_and_its_advice_is_passed_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let args = dir.path().join("args");
    let az = dir.path().join("az");
    let script = format!(
        "#!/bin/sh\necho \"$@\" > '{}'\nif [ -e '{}/logged-out' ]; then echo \"ERROR: Please run 'az login' to setup account.\" >&2; exit 1; fi\nexp=$(( $(date +%s) + 3600 ))\nprintf '{{\"accessToken\": \"cli-token-SECRET\", \"expiresOn\": \"2026-11-22 21:00:00.000000\", \"expires_on\": %s, \"tokenType\": \"Bearer\"}}' $exp\n",
        args.display(),
        dir.path().display()
    );
    std::fs::write(&az, script).unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = EntraAuth::new(
        "http://127.0.0.1:9",
        "tenant-1",
        EntraCredential::AzureCli {
            program: az.clone(),
        },
        http(),
    );
    let t = a.token(GRAPH_SCOPE).await.unwrap();
    assert_eq!(t.expose(), "cli-token-SECRET");
    assert_eq!(
        std::fs::read_to_string(&args).unwrap().trim(),
        "account get-access-token --output json --resource https://graph.microsoft.com --tenant tenant-1"
    );
    // Cached: az is not run again while the token is fresh.
    std::fs::remove_file(&args).unwrap();
    a.token(GRAPH_SCOPE).await.unwrap();
    assert!(!args.exists());

    std::fs::write(dir.path().join("logged-out"), "").unwrap();
    let fresh = EntraAuth::new(
        "http://127.0.0.1:9",
        "tenant-1",
        EntraCredential::AzureCli { program: az },
        http(),
    );
    let e = fresh.token(GRAPH_SCOPE).await.unwrap_err();
    assert!(e.message.contains("az login"), "{}", e.message);
    assert!(e.message.contains("Azure CLI"), "{}", e.message);
    let missing = EntraAuth::new(
        "http://127.0.0.1:9",
        "tenant-1",
        EntraCredential::AzureCli {
            program: dir.path().join("no-such-az"),
        },
        http(),
    );
    let e = missing.token(GRAPH_SCOPE).await.unwrap_err();
    assert!(e.message.contains("install the Azure CLI"), "{}", e.message);
}

#[tokio::test]
async fn device_code_signs_in_once_then_refreshes() {
    let g = graph().await;
    // A margin longer than the token's life: every call needs a new token, so the second one
    // must come from the refresh token, not from a second sign-in.
    let a = auth(
        &g,
        EntraCredential::DeviceCode {
            client_id: DEFAULT_CLIENT_ID.into(),
        },
    )
    .with_margin(Duration::from_secs(7200));
    let first = a.token(GRAPH_SCOPE).await.unwrap();
    let second = a.token(GRAPH_SCOPE).await.unwrap();
    assert_ne!(first.expose(), second.expose());
    let counts = g.state.infra.accounting.snapshot();
    assert_eq!(
        counts["POST /{tenant}/oauth2/v2.0/devicecode"], 1,
        "{counts:?}"
    );
    // One pending poll, the sign-in, one refresh.
    assert_eq!(counts["POST /{tenant}/oauth2/v2.0/token"], 3, "{counts:?}");

    // An app that does not allow public client flows is refused.
    g.state.tenant_mut().apps[0].public_client = false;
    let e = auth(
        &g,
        EntraCredential::DeviceCode {
            client_id: DEFAULT_CLIENT_ID.into(),
        },
    )
    .token(GRAPH_SCOPE)
    .await
    .unwrap_err();
    assert!(e.message.contains("device code"), "{}", e.message);
    assert!(e.message.contains("AADSTS7000218"), "{}", e.message);
}

#[tokio::test]
async fn tokens_are_cached_per_scope_and_renewed_before_expiry() {
    let g = graph().await;
    let a = auth(
        &g,
        EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new(DEFAULT_CLIENT_SECRET),
        },
    );
    let t1 = a.token(GRAPH_SCOPE).await.unwrap();
    assert_eq!(a.token(GRAPH_SCOPE).await.unwrap().expose(), t1.expose());
    let dbx = a
        .token("2ff814a6-3304-4ab8-85cb-cd0e6f879c1d/.default")
        .await
        .unwrap();
    assert_ne!(dbx.expose(), t1.expose());
    let counts = g.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /{tenant}/oauth2/v2.0/token"], 2, "{counts:?}");

    // Tokens that live less than the margin are fetched again at each call.
    let mut s = g.state.settings();
    s.token_ttl_secs = 60;
    g.state.set_settings(s);
    let short = auth(
        &g,
        EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new(DEFAULT_CLIENT_SECRET),
        },
    );
    let a1 = short.token(GRAPH_SCOPE).await.unwrap();
    let a2 = short.token(GRAPH_SCOPE).await.unwrap();
    assert_ne!(a1.expose(), a2.expose());
}
