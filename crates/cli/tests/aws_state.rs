//! State in an S3 bucket (moto) reached from where idsync runs, end to end through the real
//! binary: from Azure, a managed identity's Entra ID token exchanged at STS for a role
//! (`web_identity = "entra"`); and a role assumed on top of the workload's own role (the EKS Pod
//! Identity container endpoint, the EC2 instance role) taken from `object_store`'s chain. STS and
//! the metadata endpoints are idsync's AWS emulator (it enforces trust policies; moto trusts
//! everyone), the Entra ID tenant the Graph emulator.
//!
//! Needs moto: `#[ignore]`d for a bare `cargo test`, run by `scripts/servers.sh`
//! (`IDSYNC_TEST_MOTO`, with the bucket `idsync-state`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::{Sandbox, code, text};
use idsync_emulators::aws::Trust;
use idsync_emulators::tenant::Tenant;
use idsync_emulators::{Aws, Graph};

const ROLE: &str = "arn:aws:iam::210987654321:role/idsync-state";
const AUDIENCE: &str = "api://idsync-state";

/// Variables that would give the chain other credentials than the one under test.
const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
];

fn sandbox(graph: &Graph, aws: &Aws, moto: &str, prefix: &str, state_extra: &str) -> Sandbox {
    let s = Sandbox {
        dir: tempfile::tempdir().unwrap(),
    };
    // A fresh prefix per run: moto keeps its objects between test runs.
    let prefix = format!("{prefix}-{}-{}", std::process::id(), aws.server.addr.port());
    let g = &graph.server.base_url;
    let tenant = graph.state.tenant().tenant_id.clone();
    s.write(
        "idsync.toml",
        &format!(
            r#"
[state]
url = "s3://idsync-state/{prefix}"
endpoint = "{moto}"
region = "us-east-1"
role_arn = "{ROLE}"
sts_endpoint = "{sts}"
{state_extra}

[source]
kind = "entra"
tenant_id = "{tenant}"
authority_host = "{g}"
graph_url = "{g}"
auth = "managed_identity"
managed_identity_endpoint = "{g}"

[scope]
groups = ["TEAM_ALPHA"]

[targets.dbx]
kind = "file"
profile = "databricks"
path = "dbx.json"
"#,
            sts = aws.server.base_url,
        ),
    );
    s
}

async fn run(
    s: Sandbox,
    args: &'static [&'static str],
    env: Vec<(String, String)>,
) -> (Sandbox, std::process::Output) {
    common::run_isolated(s, args, AWS_VARS, env).await
}

async fn emulators() -> (Graph, Aws, String) {
    let moto = std::env::var("IDSYNC_TEST_MOTO").expect("IDSYNC_TEST_MOTO");
    let dir: idsync_model::Directory =
        serde_json::from_str(include_str!("../../demo/src/directory.json")).unwrap();
    let graph = Graph::start(Tenant::new(dir.try_into().unwrap()))
        .await
        .unwrap();
    let aws = Aws::start(Some(graph.state.clone())).await.unwrap();
    (graph, aws, moto)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: run scripts/servers.sh"]
async fn from_azure_a_managed_identity_reaches_s3_state_through_sts() {
    let (graph, aws, moto) = emulators().await;
    aws.state.role(
        ROLE,
        Trust {
            web_audiences: vec![AUDIENCE.into()],
            ..Trust::default()
        },
    );
    let extra = format!("web_identity = \"entra\"\naudience = \"{AUDIENCE}\"");
    let s = sandbox(&graph, &aws, &moto, "from-azure", &extra);
    let (s, o) = run(s, &["sync"], vec![]).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let counts = aws.state.infra.accounting.snapshot();
    assert_eq!(counts["POST /"], 1, "one exchange for the run: {counts:?}");
    let imds = graph.state.infra.accounting.snapshot();
    // Two tokens from the metadata endpoint: Graph's, and the one for the role's audience.
    assert_eq!(imds["GET /metadata/identity/oauth2/token"], 2, "{imds:?}");

    // The state commands sign in the same way, without needing the targets' secrets.
    let (s, o) = run(s, &["state", "show", "dbx"], vec![]).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let (s, o) = run(s, &["sync"], vec![]).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("in sync"), "{}", text(&o));

    // The role's OIDC provider lists another audience: the run stops before touching anything,
    // naming STS's refusal and what to check, and no token.
    aws.state.role(
        ROLE,
        Trust {
            web_audiences: vec!["api://another-app".into()],
            ..Trust::default()
        },
    );
    let (s, o) = run(s, &["sync"], vec![]).await;
    let t = text(&o);
    assert_ne!(code(&o), 0, "{t}");
    assert!(
        t.contains("InvalidIdentityToken") && t.contains("audience"),
        "{t}"
    );
    assert!(t.contains(ROLE), "{t}");
    assert!(!t.contains("emu."), "no token in the message: {t}");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: run scripts/servers.sh"]
async fn a_role_is_assumed_on_top_of_the_container_and_the_instance_role() {
    let (graph, aws, moto) = emulators().await;
    aws.state.set_workload_role("idsync-pod");
    aws.state.role(
        ROLE,
        Trust {
            callers: vec!["idsync-pod".into()],
            external_id: Some("idsync-prod".into()),
            ..Trust::default()
        },
    );
    let s = sandbox(
        &graph,
        &aws,
        &moto,
        "chained",
        "external_id = \"idsync-prod\"",
    );
    s.write("pod-identity-token", &aws.state.container_token);
    let base = aws.server.base_url.clone();

    // EKS Pod Identity: the container endpoint with its token file, no keys anywhere.
    let pod = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_owned(),
            format!("{base}/v2/credentials/pod"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".to_owned(),
            s.path("pod-identity-token").display().to_string(),
        ),
    ];
    let (s, o) = run(s, &["sync"], pod).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let counts = aws.state.infra.accounting.snapshot();
    assert_eq!(counts["GET /v2/credentials/{id}"], 1, "{counts:?}");
    assert_eq!(counts["POST /"], 1, "{counts:?}");

    // An EC2 instance role, through IMDSv2.
    let instance = vec![("AWS_METADATA_ENDPOINT".to_owned(), base.clone())];
    let (s, o) = run(s, &["sync"], instance.clone()).await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("in sync"), "{}", text(&o));
    let counts = aws.state.infra.accounting.snapshot();
    assert_eq!(counts["PUT /latest/api/token"], 1, "{counts:?}");
    assert_eq!(counts["POST /"], 2, "{counts:?}");

    // The role trusts someone else: the refusal names the caller, the role and what to check.
    aws.state.set_workload_role("someone-else");
    let (s, o) = run(s, &["sync"], instance).await;
    let t = text(&o);
    assert_ne!(code(&o), 0, "{t}");
    assert!(t.contains("AccessDenied") && t.contains(ROLE), "{t}");
    assert!(t.contains("external id"), "{t}");
    assert!(!t.contains("emulator-secret"), "{t}");
    drop(s);
}
