//! The deployment examples' configurations (issue #16, item 8) pass `idsync validate` with the
//! environment their deployment gives them, and fail without it; each variable the test supplies
//! is one the example's files name, so the two cannot drift apart. The manifests themselves are
//! checked by tests/examples/check.py (scripts/examples.sh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::Path;
use std::process::Command;

const WEBHOOK: &str = "https://hooks.slack.com/services/T000/B000/xxxx";

/// Each example, and the variables its deployment sets (name, a stand-in value).
const EXAMPLES: &[(&str, &[(&str, &str)])] = &[
    (
        "kubernetes",
        &[
            // Set by the AKS workload identity webhook (serviceaccount.yaml).
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_STORAGE_ACCOUNT_NAME", "examplestate"),
            ("LAKEFS_SECRET_ACCESS_KEY", "stand-in"),
            ("IDSYNC_WEBHOOK_URL", WEBHOOK),
        ],
    ),
    (
        "databricks",
        &[
            ("AZURE_CLIENT_SECRET", "stand-in"),
            ("DATABRICKS_CLIENT_SECRET", "stand-in"),
            ("IDSYNC_WEBHOOK_URL", WEBHOOK),
        ],
    ),
    (
        "ci",
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/entra-token"),
            ("LAKEFS_SECRET_ACCESS_KEY", "stand-in"),
            ("IDSYNC_WEBHOOK_URL", WEBHOOK),
            ("AWS_ACCESS_KEY_ID", "stand-in"),
            ("AWS_SECRET_ACCESS_KEY", "stand-in"),
        ],
    ),
];

fn validate(dir: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_idsync"));
    c.arg("validate").current_dir(dir).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        c.env("PATH", path);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn each_example_validates_with_what_its_deployment_provides() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for (name, env) in EXAMPLES {
        let dir = root.join(name);
        let files: String = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .collect();
        for (var, _) in *env {
            assert!(
                files.contains(var),
                "{name}: {var} is not set anywhere in the example's files"
            );
        }
        let o = validate(&dir, env);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{name}: {out}");
        assert!(out.starts_with("configuration OK"), "{name}: {out}");
        assert!(!out.contains("warning"), "{name}: {out}");
        // Without its environment, the example is incomplete: the secrets are not in the file.
        let o = validate(&dir, &[]);
        assert!(!o.status.success(), "{name} validated without its secrets");
    }
}
