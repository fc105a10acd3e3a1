//! State in an Azure Blob container reached with an Entra ID sign-in, end to end through the real
//! binary: a service principal (client id, secret, tenant: the seed's "Service Principal"),
//! workload identity (a federated token file, as on AKS) and a managed identity. Tokens come from
//! the Graph emulator (over HTTPS, as Azure's clients require of an authority), the container is
//! Azurite over HTTPS with OAuth, which reads each token's issuer, audience and lifetime. The
//! sign-in is `object_store`'s own; `[state] ca_bundle` makes both emulators' certificates trusted.
//!
//! Needs Azurite over HTTPS: `#[ignore]`d for a bare `cargo test`, run by `scripts/servers.sh`
//! (`IDSYNC_TEST_AZURITE_TLS`, `IDSYNC_TEST_AZURITE_CA`, with the container `idsync-state`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{Sandbox, code, text};
use idsync_emulators::tenant::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT_ID, Tenant,
};
use idsync_emulators::{Graph, Tls};

/// Variables that would give `object_store` another credential than the one under test.
const AZURE_VARS: &[&str] = &[
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_MSI_ENDPOINT",
    "AZURE_IDENTITY_ENDPOINT",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_USE_AZURE_CLI",
];

/// An unsigned JWT, as a federated token file holds one (the emulator checks its claims).
fn federated_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let part = |v: serde_json::Value| {
        idsync_emulators::graph::token::b64url_encode(v.to_string().as_bytes())
    };
    format!(
        "{}.{}.c2ln",
        part(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        part(serde_json::json!({"iss": "https://oidc.example/cluster",
            "sub": "system:serviceaccount:idsync:idsync",
            "aud": "api://AzureADTokenExchange", "exp": now + 3600, "iat": now}))
    )
}

async fn run(s: Sandbox, mut env: Vec<(String, String)>) -> (Sandbox, std::process::Output) {
    env.push((
        "AZURE_STORAGE_ACCOUNT_NAME".into(),
        "devstoreaccount1".into(),
    ));
    common::run_isolated(s, &["sync"], AZURE_VARS, env).await
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Azurite over HTTPS: run scripts/servers.sh"]
async fn a_service_principal_workload_identity_and_managed_identity_reach_azure_state() {
    let azurite = std::env::var("IDSYNC_TEST_AZURITE_TLS").expect("IDSYNC_TEST_AZURITE_TLS");
    let ca = std::fs::read_to_string(std::env::var("IDSYNC_TEST_AZURITE_CA").unwrap()).unwrap();
    let tls = Tls::generate().unwrap();
    let graph = Graph::start_with(Tenant::new(Default::default()), 0, Some(&tls))
        .await
        .unwrap();
    let g = graph.server.base_url.clone();
    assert!(g.starts_with("https://"), "{g}");

    let s = Sandbox::new("");
    s.write("trust.pem", &format!("{ca}\n{}", tls.cert_pem));
    s.write("federated-token", &federated_token());
    // A fresh prefix per run: Azurite keeps its blobs for the whole script.
    let prefix = format!("entra-{}-{}", std::process::id(), graph.server.addr.port());
    let cfg = s.read("idsync.toml").replace(
        "[state]\nurl = \"state\"",
        &format!(
            "[state]\nurl = \"az://idsync-state/{prefix}\"\nendpoint = \"{azurite}\"\nca_bundle = \"trust.pem\""
        ),
    );
    s.write("idsync.toml", &cfg);

    // A service principal: client id, secret and tenant, as the seed names them.
    let sp = vars(&[
        ("AZURE_CLIENT_ID", DEFAULT_CLIENT_ID),
        ("AZURE_CLIENT_SECRET", DEFAULT_CLIENT_SECRET),
        ("AZURE_TENANT_ID", DEFAULT_TENANT_ID),
        ("AZURE_AUTHORITY_HOST", &g),
    ]);
    let (s, o) = run(s, sp).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let counts = graph.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /{tenant}/oauth2/v2.0/token"], 1, "{counts:?}");

    // Workload identity: the federated token file, exchanged at the same endpoint.
    let token_file = s.path("federated-token").display().to_string();
    let wi = vars(&[
        ("AZURE_CLIENT_ID", DEFAULT_CLIENT_ID),
        ("AZURE_TENANT_ID", DEFAULT_TENANT_ID),
        ("AZURE_FEDERATED_TOKEN_FILE", &token_file),
        ("AZURE_AUTHORITY_HOST", &g),
    ]);
    let (s, o) = run(s, wi).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("in sync"), "{}", text(&o));
    let counts = graph.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /{tenant}/oauth2/v2.0/token"], 2, "{counts:?}");

    // A managed identity, through the metadata endpoint.
    let mi = vars(&[(
        "AZURE_MSI_ENDPOINT",
        &format!("{g}/metadata/identity/oauth2/token"),
    )]);
    let (s, o) = run(s, mi).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let counts = graph.state.infra.accounting.snapshot();
    assert_eq!(
        counts["GET /metadata/identity/oauth2/token"], 1,
        "{counts:?}"
    );

    // A wrong secret: Entra ID refuses it, the run stops, and the secret is not in the message.
    let wrong = vars(&[
        ("AZURE_CLIENT_ID", DEFAULT_CLIENT_ID),
        ("AZURE_CLIENT_SECRET", "not-the-secret-value"),
        ("AZURE_TENANT_ID", DEFAULT_TENANT_ID),
        ("AZURE_AUTHORITY_HOST", &g),
    ]);
    let (s, o) = run(s, wrong).await;
    let t = text(&o);
    assert_ne!(code(&o), 0, "{t}");
    assert!(!t.contains("not-the-secret-value"), "{t}");
    assert!(
        t.contains("token request") && t.contains("AADSTS7000215"),
        "the sign-in step and Entra ID's code: {t}"
    );
    drop(s);
}
