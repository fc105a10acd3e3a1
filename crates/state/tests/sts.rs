//! S3 state's role credentials from STS, against idsync's AWS emulator (STS with trust policies,
//! the container and instance metadata endpoints) and the Graph emulator as the Entra ID tenant
//! that issues web identity tokens: the exchange, its refresh before the credentials expire, a
//! role assumed on top of the workload's own role from `object_store`'s chain, and each refusal as
//! a message naming the step, with no token in it. The same paths against moto's S3 are in
//! `backends.rs` and the CLI tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::Imds;
use idsync_emulators::aws::Trust;
use idsync_emulators::tenant::Tenant;
use idsync_emulators::{Aws, Graph};
use idsync_state::StoreOptions;
use idsync_state::sts;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredentialProvider};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const ROLE: &str = "arn:aws:iam::210987654321:role/idsync-state";
const AUDIENCE: &str = "api://idsync-state";

fn no_caller() -> Result<AwsCredentialProvider, idsync_state::StateError> {
    panic!("a web identity needs no caller credentials")
}

fn opts(aws: &Aws) -> StoreOptions {
    StoreOptions {
        role_arn: Some(ROLE.into()),
        region: Some("eu-west-1".into()),
        sts_endpoint: Some(aws.server.base_url.clone()),
        ..StoreOptions::default()
    }
}

async fn emulators() -> (Graph, Aws) {
    let graph = Graph::start(Tenant::new(Default::default())).await.unwrap();
    let aws = Aws::start(Some(graph.state.clone())).await.unwrap();
    (graph, aws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_token_becomes_role_credentials_refreshed_before_they_expire() {
    let (graph, aws) = emulators().await;
    aws.state.role(
        ROLE,
        Trust {
            web_audiences: vec![AUDIENCE.into()],
            ..Trust::default()
        },
    );
    // Credentials that live 302 s: refreshed once fewer than five minutes are left, so after 2 s.
    aws.state.ttl_secs.store(302, Ordering::Relaxed);
    let o = StoreOptions {
        web_identity: Some(Arc::new(Imds {
            base: graph.server.base_url.clone(),
            audience: AUDIENCE.into(),
        })),
        ..opts(&aws)
    };
    let p = sts::provider(&o, no_caller).unwrap().unwrap();
    let first = p.get_credential().await.unwrap();
    assert_eq!(aws.state.role_of(&first.key_id).as_deref(), Some(ROLE));
    assert!(aws.state.issued_secret(&first.key_id, &first.secret_key));
    assert!(first.token.is_some(), "a session token");
    let again = p.get_credential().await.unwrap();
    assert_eq!(again.key_id, first.key_id, "cached while it is fresh");
    assert_eq!(aws.state.infra.accounting.snapshot()["POST /"], 1);

    // A long run outlives them: the next request gets new ones, from a new token.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = p.get_credential().await.unwrap();
    assert_ne!(later.key_id, first.key_id, "refreshed");
    assert_eq!(aws.state.role_of(&later.key_id).as_deref(), Some(ROLE));
    assert_eq!(aws.state.infra.accounting.snapshot()["POST /"], 2);
    assert_eq!(
        graph.state.infra.accounting.snapshot()["GET /metadata/identity/oauth2/token"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_step_and_never_the_token() {
    let (graph, aws) = emulators().await;
    aws.state.role(
        ROLE,
        Trust {
            web_audiences: vec![AUDIENCE.into()],
            ..Trust::default()
        },
    );
    let with = |audience: &str, base: &str| StoreOptions {
        web_identity: Some(Arc::new(Imds {
            base: base.to_owned(),
            audience: audience.to_owned(),
        })),
        ..opts(&aws)
    };
    let fail = |o: StoreOptions| async move {
        let p = sts::provider(&o, no_caller).unwrap().unwrap();
        p.get_credential()
            .await
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };

    // A token for an audience the role's OIDC provider does not list.
    let e = fail(with("api://someone-else", &graph.server.base_url)).await;
    assert!(e.contains("InvalidIdentityToken"), "{e}");
    assert!(e.contains("Incorrect token audience"), "{e}");
    assert!(e.contains("the web identity token"), "{e}");
    assert!(e.contains(ROLE) && e.contains("audience"), "{e}");
    assert!(!e.contains("emu."), "no token in the message: {e}");

    // A role whose trust policy does not name the provider.
    let other = "arn:aws:iam::210987654321:role/not-federated";
    aws.state.role(other, Trust::default());
    let mut o = with(AUDIENCE, &graph.server.base_url);
    o.role_arn = Some(other.into());
    let e = fail(o).await;
    assert!(e.contains("AccessDenied") && e.contains(other), "{e}");
    assert!(e.contains("trust policy"), "{e}");

    // The metadata endpoint does not answer: the sign-in step says so.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let e = fail(with(AUDIENCE, &closed)).await;
    assert!(
        e.contains("getting the web identity token") && e.contains("managed identity endpoint"),
        "{e}"
    );

    // Options that cannot go together are refused when the store is opened.
    let mut o = with(AUDIENCE, &graph.server.base_url);
    o.web_identity_token_file = Some("/var/run/token".into());
    let e = sts::provider(&o, no_caller).unwrap_err().to_string();
    assert!(e.contains("keep one"), "{e}");
    let mut o = with(AUDIENCE, &graph.server.base_url);
    o.role_arn = None;
    let e = sts::provider(&o, no_caller).unwrap_err().to_string();
    assert!(e.contains("need role_arn"), "{e}");
}

/// `object_store`'s chain as the S3 state builds it without a role: here from the container
/// endpoint (EKS Pod Identity) or the instance metadata service, both on the emulator.
fn chain(configure: impl FnOnce(AmazonS3Builder) -> AmazonS3Builder) -> AwsCredentialProvider {
    // As `object::open` does: reqwest is built without a default crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = AmazonS3Builder::new()
        .with_bucket_name("idsync-state")
        .with_region("eu-west-1");
    configure(b).build().unwrap().credentials().clone()
}

/// The role's credentials, or the error's text.
async fn credential(
    o: &StoreOptions,
    caller: impl FnOnce() -> Result<AwsCredentialProvider, idsync_state::StateError>,
) -> Result<std::sync::Arc<object_store::aws::AwsCredential>, String> {
    sts::provider(o, caller)
        .map_err(|e| e.to_string())?
        .expect("a role is configured")
        .get_credential()
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_is_assumed_on_top_of_the_container_or_instance_role() {
    let (_graph, aws) = emulators().await;
    aws.state.set_workload_role("idsync-pod");
    aws.state.role(
        ROLE,
        Trust {
            callers: vec!["idsync-pod".into()],
            external_id: Some("idsync-prod".into()),
            ..Trust::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, &aws.state.container_token).unwrap();
    let base = aws.server.base_url.clone();
    let container = {
        let (base, token_file) = (base.clone(), token_file.display().to_string());
        move || {
            Ok(chain(|b| {
                b.with_config(
                    AmazonS3ConfigKey::ContainerCredentialsFullUri,
                    format!("{base}/v2/credentials/pod"),
                )
                .with_config(
                    AmazonS3ConfigKey::ContainerAuthorizationTokenFile,
                    token_file,
                )
            }))
        }
    };
    let o = StoreOptions {
        external_id: Some("idsync-prod".into()),
        ..opts(&aws)
    };
    let c = credential(&o, container.clone()).await.unwrap();
    assert_eq!(aws.state.role_of(&c.key_id).as_deref(), Some(ROLE));
    let counts = aws.state.infra.accounting.snapshot();
    assert_eq!(counts["GET /v2/credentials/{id}"], 1, "{counts:?}");
    assert_eq!(counts["POST /"], 1, "{counts:?}");

    // The instance role, through IMDSv2.
    let instance = {
        let base = base.clone();
        move || {
            Ok(chain(|b| {
                b.with_config(AmazonS3ConfigKey::MetadataEndpoint, base)
            }))
        }
    };
    let c = credential(&o, instance).await.unwrap();
    assert_eq!(aws.state.role_of(&c.key_id).as_deref(), Some(ROLE));
    let counts = aws.state.infra.accounting.snapshot();
    assert_eq!(counts["PUT /latest/api/token"], 1, "{counts:?}");

    // A wrong external id, and a workload role the trust policy does not name.
    let wrong = StoreOptions {
        external_id: Some("guess".into()),
        ..opts(&aws)
    };
    let e = credential(&wrong, container.clone()).await.unwrap_err();
    assert!(e.contains("AccessDenied"), "{e}");
    assert!(
        e.contains("the caller's credentials") && e.contains("external id"),
        "{e}"
    );
    aws.state.set_workload_role("someone-else");
    let e = credential(&o, container.clone()).await.unwrap_err();
    assert!(
        e.contains("is not authorized to perform: sts:AssumeRole"),
        "{e}"
    );
    assert!(!e.contains("emulator-secret"), "{e}");

    // No credentials at all (the container endpoint refuses the token): the step is named.
    std::fs::write(&token_file, "wrong").unwrap();
    aws.state.set_workload_role("idsync-pod");
    let e = credential(&o, container).await.unwrap_err();
    assert!(e.contains("needs the caller's own AWS credentials"), "{e}");
}
