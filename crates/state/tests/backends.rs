//! The state conformance suite against each object store: the GCS emulator (in process, always),
//! Azurite and moto (started by `scripts/services.sh`; those tests are `#[ignore]`d for a bare
//! `cargo test` and run by `scripts/test.sh` with the services up).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use idsync_state::object::{self, StoreOptions};
use idsync_state::{StateError, StateStore, testing};

const KEY: &str = include_str!("../../../tests/fixtures/entra-test-client.pem");
const OTHER: &str = include_str!("../../../tests/fixtures/other-test-key.pem");

fn pem_block(pem: &str, tag: &str) -> String {
    let begin = format!("-----BEGIN {tag}-----");
    let end = format!("-----END {tag}-----");
    let a = pem.find(&begin).unwrap();
    let b = pem.find(&end).unwrap() + end.len();
    format!("{}\n", &pem[a..b])
}

/// A service account key file signed with `pem`'s key.
fn service_account(dir: &std::path::Path, pem: &str) -> String {
    let sa = serde_json::json!({
        "type": "service_account",
        "project_id": "idsync-test",
        "private_key_id": "k1",
        "private_key": pem_block(pem, "PRIVATE KEY"),
        "client_email": "idsync-state@idsync-test.iam.gserviceaccount.com",
    });
    // One file per key: the tests open stores with both at once.
    let p = dir.join(format!("sa-{}.json", pem.len()));
    std::fs::write(&p, sa.to_string()).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_with_a_service_account_key_passes_the_conformance_suite() {
    let gcs = idsync_emulators::Gcs::start_on(0, &["idsync-state"])
        .await
        .unwrap();
    gcs.state.require_signer(&pem_block(KEY, "CERTIFICATE"));
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        endpoint: Some(gcs.server.base_url.clone()),
        google_service_account: Some(service_account(dir.path(), KEY)),
        ..StoreOptions::default()
    };
    let s = object::open("gs://idsync-state/teams/ci", &opts).unwrap();
    testing::run(&s, "gcs").await.unwrap();
    assert_eq!(s.describe(), "gs://idsync-state/teams/ci");
    // What is stored is compressed (gzip), under the prefix.
    s.commit(&idsync_model::AgreementState::new("kept"))
        .await
        .unwrap();
    let stored = gcs
        .state
        .object("idsync-state", "teams/ci/kept.state")
        .unwrap();
    assert_eq!(&stored[..2], &[0x1f, 0x8b], "gzip");
    assert_eq!(
        s.list().await.unwrap(),
        ["kept"],
        "only this prefix's agreements"
    );

    // A key the emulator does not trust, and a bucket that does not exist: clear errors.
    let wrong = StoreOptions {
        google_service_account: Some(service_account(dir.path(), OTHER)),
        ..opts.clone()
    };
    let e = object::open("gs://idsync-state/teams/ci", &wrong)
        .unwrap()
        .load("kept")
        .await
        .unwrap_err();
    assert!(matches!(e, StateError::Backend { .. }), "{e}");
    assert!(e.to_string().contains("credentials"), "{e}");
    let e = object::open("gs://no-such-bucket/x", &opts)
        .unwrap()
        .load("kept")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");

    // Workload identity federation: an external_account file, its token exchanged at STS, then a
    // service account impersonated.
    let token = dir.path().join("oidc-token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJpZHN5bmMifQ.c2ln").unwrap();
    let base = &gcs.server.base_url;
    let ext = serde_json::json!({
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/entra",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("{base}/sts/v1/token"),
        "credential_source": {"file": token.display().to_string()},
        "service_account_impersonation_url": format!("{base}/iam/v1/projects/-/serviceAccounts/idsync@p.iam.gserviceaccount.com:generateAccessToken"),
    });
    let ext_path = dir.path().join("external.json");
    std::fs::write(&ext_path, ext.to_string()).unwrap();
    let fed = StoreOptions {
        endpoint: Some(base.clone()),
        google_application_credentials: Some(ext_path.display().to_string()),
        ..StoreOptions::default()
    };
    let s = object::open("gs://idsync-state/federated", &fed).unwrap();
    testing::run(&s, "gcs-federated").await.unwrap();
    let counts = gcs.state.infra.accounting.snapshot();
    assert_eq!(
        counts["POST /sts/v1/token"], 1,
        "one exchange, cached: {counts:?}"
    );
    // From Azure: a URL-sourced credential, as `create-cred-config --azure` writes it, reading
    // a managed identity's token from the instance metadata endpoint (the Graph emulator's),
    // then exchanged at STS and a service account impersonated.
    let graph =
        idsync_emulators::Graph::start(idsync_emulators::tenant::Tenant::new(Default::default()))
            .await
            .unwrap();
    let imds = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://AzureADTokenExchange",
        graph.server.base_url
    );
    let azure = |headers: serde_json::Value, format: serde_json::Value| {
        let mut e = ext.clone();
        e["credential_source"] =
            serde_json::json!({"url": imds, "headers": headers, "format": format});
        let path = dir.path().join("azure.json");
        std::fs::write(&path, e.to_string()).unwrap();
        StoreOptions {
            endpoint: Some(base.clone()),
            google_application_credentials: Some(path.display().to_string()),
            ..StoreOptions::default()
        }
    };
    let json_token =
        serde_json::json!({"type": "json", "subject_token_field_name": "access_token"});
    let from_azure = azure(serde_json::json!({"Metadata": "True"}), json_token.clone());
    gcs.state.infra.accounting.reset();
    let s = object::open("gs://idsync-state/from-azure", &from_azure).unwrap();
    testing::run(&s, "gcs-from-azure").await.unwrap();
    let counts = gcs.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /sts/v1/token"], 1, "{counts:?}");
    let imds_reads = graph.state.infra.accounting.snapshot();
    assert_eq!(
        imds_reads["GET /metadata/identity/oauth2/token"], 1,
        "one metadata read, cached with the token: {imds_reads:?}"
    );
    // Without the Metadata header the endpoint refuses, and the error names that step.
    let e = object::open(
        "gs://idsync-state/from-azure",
        &azure(serde_json::json!({}), json_token),
    )
    .unwrap()
    .load("x")
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("the credential source URL (host 127.0.0.1) answered 400"),
        "{e}"
    );
    // A JSON field that is not there, and an executable source: clear errors before any exchange.
    let wrong_field = azure(
        serde_json::json!({"Metadata": "True"}),
        serde_json::json!({"type": "json", "subject_token_field_name": "id_token"}),
    );
    let e = object::open("gs://idsync-state/from-azure", &wrong_field)
        .unwrap()
        .load("x")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no \"id_token\" text field"), "{e}");
    let mut exe = ext.clone();
    exe["credential_source"] = serde_json::json!({"executable": {"command": "/usr/bin/get-token", "timeout_millis": 5000}});
    let exe_path = dir.path().join("exe.json");
    std::fs::write(&exe_path, exe.to_string()).unwrap();
    let e = object::open(
        "gs://idsync-state/x",
        &StoreOptions {
            endpoint: Some(base.clone()),
            google_application_credentials: Some(exe_path.display().to_string()),
            ..StoreOptions::default()
        },
    )
    .map(|_| ())
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("executable-sourced external accounts are not supported"),
        "{e}"
    );
    // Plain http to another host is refused: the token would cross the network in clear.
    let mut far = ext.clone();
    far["credential_source"] = serde_json::json!({"url": "http://metadata.example.com/token"});
    std::fs::write(&exe_path, far.to_string()).unwrap();
    let e = object::open(
        "gs://idsync-state/x",
        &StoreOptions {
            endpoint: Some(base.clone()),
            google_application_credentials: Some(exe_path.display().to_string()),
            ..StoreOptions::default()
        },
    )
    .map(|_| ())
    .expect_err("refused")
    .to_string();
    assert!(e.contains("must be https"), "{e}");

    // An empty subject token is refused by STS, and says so.
    std::fs::write(&token, "").unwrap();
    let e = object::open("gs://idsync-state/federated", &fed)
        .unwrap()
        .load("x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Google STS refused"), "{e}");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJpZHN5bmMifQ.c2ln").unwrap();

    // The pool's principal may not impersonate this service account: that step is named, with
    // what to grant.
    *gcs.state.impersonable.lock().unwrap() =
        Some(["someone-else@p.iam.gserviceaccount.com".to_owned()].into());
    let e = object::open("gs://idsync-state/federated", &fed)
        .unwrap()
        .load("x")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("impersonating the service account was refused")
            && e.contains("iam.serviceAccounts.getAccessToken")
            && e.contains("roles/iam.workloadIdentityUser"),
        "{e}"
    );
    *gcs.state.impersonable.lock().unwrap() = None;

    // A long run: tokens that live 302 s are fetched again 2 s in (five minutes before they
    // expire), exchange and impersonation both, and the run goes on.
    gcs.state
        .ttl_secs
        .store(302, std::sync::atomic::Ordering::Relaxed);
    let s = object::open("gs://idsync-state/long-run", &fed).unwrap();
    common::across_a_refresh(
        &s,
        "gcs-long",
        || gcs.state.infra.accounting.snapshot()["POST /sts/v1/token"],
    )
    .await;
}

/// `IDSYNC_TEST_AZURITE`: Azurite's blob endpoint with the account (`http://127.0.0.1:PORT/devstoreaccount1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Azurite: run scripts/test.sh"]
async fn azurite_with_a_connection_string_and_a_key_passes_the_conformance_suite() {
    let endpoint = std::env::var("IDSYNC_TEST_AZURITE").expect("IDSYNC_TEST_AZURITE");
    let key =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let cs = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};BlobEndpoint={endpoint};"
    );
    let opts = StoreOptions {
        azure_connection_string: Some(idsync_model::Secret::new(cs)),
        ..StoreOptions::default()
    };
    let s = object::open("az://idsync-state/teams/ci", &opts).unwrap();
    testing::run(&s, "azurite").await.unwrap();
    assert_eq!(s.describe(), "az://idsync-state/teams/ci");

    // A container SAS in a connection string, and the account key from the environment
    // (AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY, set by scripts/servers.sh).
    let sas = std::env::var("IDSYNC_TEST_AZURITE_SAS").expect("IDSYNC_TEST_AZURITE_SAS");
    let with_sas = StoreOptions {
        azure_connection_string: Some(idsync_model::Secret::new(format!(
            "BlobEndpoint={endpoint};SharedAccessSignature={sas}"
        ))),
        ..StoreOptions::default()
    };
    let s = object::open("az://idsync-state/teams/sas", &with_sas).unwrap();
    testing::run(&s, "azurite-sas").await.unwrap();
    let from_env = StoreOptions {
        endpoint: Some(endpoint.clone()),
        ..StoreOptions::default()
    };
    let s = object::open("az://idsync-state/teams/env", &from_env).unwrap();
    testing::run(&s, "azurite-env").await.unwrap();

    // A wrong key, and a container that does not exist.
    let bad = StoreOptions {
        azure_connection_string: Some(idsync_model::Secret::new(format!(
            "AccountName=devstoreaccount1;AccountKey={};BlobEndpoint={endpoint};",
            "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
        ))),
        ..StoreOptions::default()
    };
    let e = object::open("az://idsync-state/teams/ci", &bad)
        .unwrap()
        .load("x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("credentials"), "{e}");
    assert!(
        !e.to_string().contains("d3Jvbmcta2V5"),
        "no key in errors: {e}"
    );
    let e = object::open("az://no-such-container/x", &opts)
        .unwrap()
        .load("x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

/// `IDSYNC_TEST_MOTO`: moto server's endpoint (`http://127.0.0.1:PORT`), S3 and STS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: run scripts/test.sh"]
async fn moto_with_keys_an_external_id_role_and_a_web_identity_passes_the_suite() {
    let endpoint = std::env::var("IDSYNC_TEST_MOTO").expect("IDSYNC_TEST_MOTO");
    // Static keys come from the environment (moto accepts any), as the AWS tools read them.
    assert!(
        std::env::var("AWS_ACCESS_KEY_ID").is_ok(),
        "set by scripts/test.sh"
    );
    let base = StoreOptions {
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        ..StoreOptions::default()
    };
    let s = object::open("s3://idsync-state/teams/ci", &base).unwrap();
    testing::run(&s, "moto").await.unwrap();

    // Cross-account: AssumeRole with an external id, through STS.
    let role = StoreOptions {
        role_arn: Some("arn:aws:iam::123456789012:role/idsync-state".into()),
        external_id: Some("idsync-external-id".into()),
        sts_endpoint: Some(endpoint.clone()),
        ..base.clone()
    };
    let s = object::open("s3://idsync-state/teams/role", &role).unwrap();
    testing::run(&s, "moto-role").await.unwrap();

    // Web identity: a token file (as on EKS, in CI, or an Entra ID token in Azure).
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJpZHN5bmMifQ.c2ln").unwrap();
    let web = StoreOptions {
        role_arn: Some("arn:aws:iam::123456789012:role/idsync-web".into()),
        web_identity_token_file: Some(token.display().to_string()),
        sts_endpoint: Some(endpoint.clone()),
        ..base.clone()
    };
    let s = object::open("s3://idsync-state/teams/web", &web).unwrap();
    testing::run(&s, "moto-web").await.unwrap();

    // From Azure without a token file: a managed identity's Entra ID token (the Graph emulator's
    // metadata endpoint) exchanged at STS (idsync's AWS emulator, which checks the audience), the
    // role's credentials used on moto. They live 302 s, so they are refreshed 2 s in: the suite
    // runs on both sides of that, on one store.
    let graph =
        idsync_emulators::Graph::start(idsync_emulators::tenant::Tenant::new(Default::default()))
            .await
            .unwrap();
    let aws = idsync_emulators::Aws::start(Some(graph.state.clone()))
        .await
        .unwrap();
    let role = "arn:aws:iam::123456789012:role/idsync-from-azure";
    aws.state.role(
        role,
        idsync_emulators::aws::Trust {
            web_audiences: vec!["api://idsync-state".into()],
            ..Default::default()
        },
    );
    aws.state
        .ttl_secs
        .store(302, std::sync::atomic::Ordering::Relaxed);
    let azure = StoreOptions {
        role_arn: Some(role.into()),
        web_identity: Some(std::sync::Arc::new(common::Imds {
            base: graph.server.base_url.clone(),
            audience: "api://idsync-state".into(),
        })),
        sts_endpoint: Some(aws.server.base_url.clone()),
        ..base.clone()
    };
    let s = object::open("s3://idsync-state/teams/azure", &azure).unwrap();
    common::across_a_refresh(
        &s,
        "moto-azure",
        || aws.state.infra.accounting.snapshot()["POST /"],
    )
    .await;

    let e = object::open("s3://no-such-bucket/x", &base)
        .unwrap()
        .load("x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}
