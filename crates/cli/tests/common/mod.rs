//! The CLI tests' sandbox: a temporary folder, a configuration, and the real binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A folder with a configuration, a directory file and the real binary to run in it.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

/// The sample directory every sandbox starts with.
pub const DIRECTORY: &str = r#"{
  "users": [
    { "id": "u1", "userName": "alice@corp.example", "displayName": "Alice", "emails": ["alice@corp.example"] },
    { "id": "u2", "userName": "bob@corp.example", "displayName": "Bob", "emails": ["bob@corp.example"] },
    { "id": "u3", "userName": "chloé@corp.example", "displayName": "Chloé O'Hara", "emails": ["chloé@corp.example"] },
    { "id": "u4", "userName": "kevin@corp.example", "displayName": "Kevin" }
  ],
  "servicePrincipals": [ { "id": "s1", "appId": "app-1", "displayName": "ci" } ],
  "groups": [
    { "id": "g1", "displayName": "Data \"Eng\"", "members": [
      { "type": "user", "id": "u1" }, { "type": "user", "id": "u2" }, { "type": "servicePrincipal", "id": "s1" }, { "type": "group", "id": "g2" } ] },
    { "id": "g2", "displayName": "Platform", "members": [ { "type": "user", "id": "u4" } ] },
    { "id": "g3", "displayName": "Équipe", "members": [ { "type": "user", "id": "u3" } ] }
  ]
}"#;

impl Sandbox {
    pub fn new(extra_config: &str) -> Sandbox {
        let s = Sandbox {
            dir: tempfile::tempdir().unwrap(),
        };
        s.write("directory.json", DIRECTORY);
        s.write(
            "idsync.toml",
            &format!(
                r#"
[state]
url = "state"

[source]
kind = "file"
path = "directory.json"

[scope]
search_depth = 2

[targets.dbx]
kind = "file"
profile = "databricks"
path = "dbx.json"
{extra_config}
"#
            ),
        );
        s
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    pub fn write(&self, f: &str, text: &str) {
        std::fs::write(self.path(f), text).unwrap();
    }

    pub fn read(&self, f: &str) -> String {
        std::fs::read_to_string(self.path(f)).unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().unwrap()
    }

    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_idsync"));
        c.args(args).current_dir(self.dir.path());
        for var in [
            "DRY_RUN",
            "GROUP_FILTER",
            "SCIM_TOKEN",
            "IDSYNC_STATE",
            "IDSYNC_CONFIG",
            "ENTRA_TENANT_ID",
            "AZURE_TENANT_ID",
            "ARM_TENANT_ID",
            "ENTRA_APPLICATION_ID",
            "AZURE_CLIENT_ID",
            "ARM_CLIENT_ID",
            "ENTRA_CLIENT_SECRET_VALUE",
            "AZURE_CLIENT_SECRET",
            "ARM_CLIENT_SECRET",
            "LAKEFS_ENDPOINT",
            "LAKEFS_ACCESS_KEY_ID",
            "LAKEFS_SECRET_ACCESS_KEY",
            "LAKEFS_DEFAULT_POLICIES",
            "LAKEFS_DEFAULT_USER_GROUP",
            "LDAP_BIND_PASSWORD",
            "DATABRICKS_HOST",
            "DATABRICKS_ACCOUNT_ID",
            "DATABRICKS_TOKEN",
            "DATABRICKS_CLIENT_ID",
            "DATABRICKS_CLIENT_SECRET",
        ] {
            c.env_remove(var);
        }
        c.env("NO_COLOR", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}

/// The exit code.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Standard output and error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The agreement's state, through `idsync state export` (the stored document is compressed).
pub fn state_of(s: &Sandbox, agreement: &str) -> serde_json::Value {
    let o = s.run(&["state", "export", agreement]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Runs the binary off the async runtime (the emulators serve on it), with the variables in
/// `remove` taken out of its environment (credentials the path under test must not see) and `env`
/// added.
pub async fn run_isolated(
    s: Sandbox,
    args: &'static [&'static str],
    remove: &'static [&'static str],
    env: Vec<(String, String)>,
) -> (Sandbox, Output) {
    tokio::task::spawn_blocking(move || {
        let mut c = s.command(args, &[]);
        for v in remove {
            c.env_remove(v);
        }
        for (k, v) in &env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (s, o)
    })
    .await
    .unwrap()
}

/// The `[targets.lake]` table for a lakeFS emulator (its secret goes in the environment:
/// `LAKEFS_SECRET_ACCESS_KEY`).
pub fn lakefs_target(l: &idsync_emulators::Lakefs) -> String {
    format!(
        "\n[targets.lake]\nkind = \"lakefs\"\nendpoint = \"{}\"\naccess_key_id = \"{}\"\n",
        l.server.base_url,
        idsync_emulators::lakefs::ACCESS_KEY_ID
    )
}

/// A lakeFS emulator that answers every request 150 ms late (an apply long enough to be
/// interrupted), and its target table.
pub async fn slow_lakefs() -> (idsync_emulators::Lakefs, String) {
    let l = idsync_emulators::Lakefs::start_on(0).await.unwrap();
    l.state.infra.set_faults(idsync_emulators::infra::Faults {
        latency_ms: 150,
        ..idsync_emulators::infra::Faults::default()
    });
    let table = lakefs_target(&l);
    (l, table)
}
