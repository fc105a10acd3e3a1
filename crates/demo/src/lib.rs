//! `idsync demo`: the whole job with no cloud account. It starts emulators of Microsoft Graph (with
//! its token endpoint), the lakeFS auth API, the Databricks account SCIM API and Kanidm's
//! sync-account API on 127.0.0.1, loads an embedded directory into the Graph one, and runs
//! idsync's real Entra source and real lakeFS, Databricks and Kanidm targets against them: a full sync, a few edits in the directory, an
//! incremental sync that reads only those edits (Graph delta), and a last run that finds nothing to
//! do. State lives in a local folder you can inspect afterwards. Every run goes through
//! [`idsync_runner::run_agreement`], as `idsync sync` does.

use idsync_connectors::entra_auth::EntraCredential;
use idsync_connectors::http::HttpConfig;
use idsync_connectors::sources::entra::{EntraSource, EntraSourceConfig};
use idsync_connectors::targets::databricks::{DatabricksAuth, DatabricksConfig, DatabricksTarget};
use idsync_connectors::targets::kanidm::{KANIDM_MAX_BYTES, KanidmConfig, KanidmTarget};
use idsync_connectors::targets::lakefs::config::DEFAULT_POLICIES;
use idsync_connectors::targets::lakefs::{LakefsConfig, LakefsTarget};
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
use idsync_emulators::{Databricks, Graph, Kanidm, Lakefs};
use idsync_engine::{Mapping, Policy, Scope, Target, TargetIdentity};
use idsync_model::{Directory, Member, Secret, Snapshot};
use idsync_runner::{Agreement, Mode, ReadCache, Reporter, RunOptions, exit};
use idsync_state::{LocalStore, StateStore};
use std::path::Path;
use std::time::Duration;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DemoError {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Attaches what the demo was doing to an error.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DemoError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Doing<T> for Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, DemoError> {
        self.map_err(|e| DemoError {
            what: what(),
            source: e.into(),
        })
    }
}

fn id(t: &Tenant, name: &str) -> String {
    t.users
        .values()
        .find(|u| u.user_name == name)
        .map(|u| u.id.clone())
        .or_else(|| {
            t.groups
                .values()
                .find(|g| g.display_name == name)
                .map(|g| g.id.clone())
        })
        .unwrap_or_default()
}

/// Edits in the directory, as an administrator makes them in Entra ID.
fn edit(g: &Graph) {
    let mut t = g.state.tenant_mut();
    let bob = id(&t, "bob@company.com");
    if let Some(mut u) = t.users.get(&bob).cloned() {
        u.active = false;
        t.upsert_user(u);
    }
    let (alpha, frank) = (id(&t, "TEAM_ALPHA"), id(&t, "frank@company.com"));
    t.add_member(&alpha, Member::user(frank));
    let (eta, kevin) = (id(&t, "TEAM_ETA"), id(&t, "kevin@company.com"));
    t.remove_member(&eta, &Member::user(kevin));
    if let Some(mut grp) = t.groups.get(&eta).cloned() {
        grp.display_name = "TEAM_ETA_PLATFORM".into();
        t.upsert_group(grp);
    }
}

/// The directory the demo starts from.
pub const DIRECTORY: &str = include_str!("directory.json");

/// Runs the demo, with its state in `dir` (emptied of a previous demo's state first), showing what
/// it does through `p`. Returns the worst exit code of its runs.
pub async fn run(dir: &Path, p: &mut dyn Reporter) -> Result<u8, DemoError> {
    let state_dir = dir.join("state");
    if state_dir.is_dir() {
        std::fs::remove_dir_all(&state_dir)
            .doing(|| format!("clearing {}", state_dir.display()))?;
    }
    std::fs::create_dir_all(dir).doing(|| format!("creating {}", dir.display()))?;

    let directory: Directory =
        serde_json::from_str(DIRECTORY).doing(|| "the embedded directory".into())?;
    let directory: Snapshot = directory
        .try_into()
        .doing(|| "the embedded directory".into())?;
    let graph = Graph::start(Tenant::new(directory))
        .await
        .doing(|| "starting the Graph emulator".into())?;
    let lake = Lakefs::start_on(0)
        .await
        .doing(|| "starting the lakeFS emulator".into())?;
    let dbx = Databricks::start_on(0, None)
        .await
        .doing(|| "starting the Databricks emulator".into())?;
    let kanidm_server = Kanidm::start_on(0)
        .await
        .doing(|| "starting the Kanidm emulator".into())?;

    let http = |service: &str| HttpConfig {
        max_concurrency: 4,
        ..HttpConfig::new(service)
    };
    let source = EntraSource::new(EntraSourceConfig {
        authority: graph.server.base_url.clone(),
        graph: graph.server.base_url.clone(),
        tenant_id: graph.state.tenant().tenant_id.clone(),
        credential: EntraCredential::ClientSecret {
            client_id: DEFAULT_CLIENT_ID.into(),
            secret: Secret::new(DEFAULT_CLIENT_SECRET),
        },
        http: http("Microsoft Graph"),
    })
    .doing(|| "the Entra source".into())?;
    let lakefs = LakefsTarget::new(LakefsConfig {
        endpoint: lake.server.base_url.clone(),
        access_key_id: idsync_emulators::lakefs::ACCESS_KEY_ID.into(),
        secret_access_key: Secret::new(idsync_emulators::lakefs::SECRET_ACCESS_KEY),
        http: http("lakeFS"),
        default_user_group: None,
    })
    .doing(|| "the lakeFS target".into())?;
    let databricks = DatabricksTarget::new(DatabricksConfig {
        host: dbx.server.base_url.clone(),
        account_id: idsync_emulators::databricks::ACCOUNT_ID.into(),
        auth: DatabricksAuth::Token(Secret::new(idsync_emulators::databricks::TOKEN)),
        http: http("Databricks"),
        member_chunk: 100,
    })
    .doing(|| "the Databricks target".into())?;
    let kanidm = KanidmTarget::new(KanidmConfig {
        url: kanidm_server.server.base_url.clone(),
        token: Secret::new(idsync_emulators::kanidm::SYNC_TOKEN),
        http: http("Kanidm"),
        max_request_bytes: KANIDM_MAX_BYTES,
        yield_attributes: Default::default(),
        admin: None,
    })
    .doing(|| "the Kanidm target".into())?;

    let scope = Scope {
        group_names: ["TEAM_ALPHA", "TEAM_EPSILON", "TEAM_ZETA"]
            .map(String::from)
            .into(),
        search_depth: 2,
        ..Scope::default()
    };
    let store = LocalStore::open(&state_dir.display().to_string());
    let dbx_mapping = Mapping::defaults();
    let mut lake_mapping = Mapping::defaults();
    lake_mapping.group_policies = DEFAULT_POLICIES.iter().map(|p| (*p).to_owned()).collect();
    // Kanidm's names: a letter, then letters, digits, `.`, `_` and `-`; no `@`.
    let kanidm_mapping = Mapping {
        user_name: Mapping::user_template("{userName|localpart}")
            .doing(|| "the Kanidm mapping".into())?,
        guest_user_name: Some(
            Mapping::user_template("{mail|slug}").doing(|| "the Kanidm mapping".into())?,
        ),
        group_name: Mapping::group_template("{displayName|slug}")
            .doing(|| "the Kanidm mapping".into())?,
        group_description: Some(
            Mapping::group_template("{description}").doing(|| "the Kanidm mapping".into())?,
        ),
        ..Mapping::defaults()
    };
    let policy = Policy::default();
    let opts = RunOptions {
        full_sync: false,
        mode: Mode::Sync,
        approve_deletions: 0,
        allow_empty_source: false,
        workers: 4,
        lease: Duration::from_secs(300),
        reconcile: Some(Duration::from_secs(24 * 3600)),
        now: None,
        stop: None,
        only: Vec::new(),
    };

    p.heading("idsync demo: an Entra ID tenant synced into lakeFS, the Databricks account and Kanidm, all emulated on 127.0.0.1");
    p.note(&format!(
        "Microsoft Graph and its token endpoint: {}",
        graph.server.base_url
    ));
    p.note(&format!("lakeFS auth API: {}", lake.api_url()));
    p.note(&format!("Databricks account SCIM: {}", dbx.scim_url()));
    p.note(&format!(
        "Kanidm sync-account API: {}/scim/v1/Sync",
        kanidm_server.server.base_url
    ));
    p.note("scope: groups TEAM_ALPHA, TEAM_EPSILON, TEAM_ZETA with --group-search-depth 2, so TEAM_ETA (nested in TEAM_ZETA) is found too");
    p.note("Databricks nests groups and has service principals; lakeFS groups hold only users, so nested groups are flattened; Kanidm nests groups and has no service principals, and takes each run as one transaction");
    p.note(&format!("state: {}", state_dir.display()));

    let mut worst = exit::OK;
    let steps: [(&str, bool); 3] = [
        (
            "Step 1 of 3: full sync (no state yet, so the whole scope is read)",
            false,
        ),
        (
            "Step 2 of 3: incremental sync after edits in Entra ID (only the changes are read, from Graph delta)",
            true,
        ),
        ("Step 3 of 3: run again with no change", false),
    ];
    for (title, change) in steps {
        p.heading(title);
        if change {
            edit(&graph);
            for line in [
                "bob@company.com is disabled",
                "frank@company.com joins TEAM_ALPHA",
                "kevin@company.com leaves TEAM_ETA, his only group: he drops out of the scope and is kept, as deprovision = \"none\"",
                "the nested TEAM_ETA is renamed TEAM_ETA_PLATFORM (renamed in place in Databricks; lakeFS cannot rename a group, so a new one is made)",
            ] {
                p.note(line);
            }
        }
        let mut cache = ReadCache::default();
        let agreements = [
            Agreement {
                name: "databricks",
                target: &databricks as &dyn Target,
                identity: TargetIdentity::new("databricks", dbx.scim_url()),
                describe: format!("Databricks account (emulated, {})", dbx.server.base_url),
                mapping: &dbx_mapping,
                policy: &policy,
            },
            Agreement {
                name: "lakefs",
                target: &lakefs as &dyn Target,
                identity: TargetIdentity::new("lakefs", lake.api_url()),
                describe: format!("lakeFS (emulated, {})", lake.server.base_url),
                mapping: &lake_mapping,
                policy: &policy,
            },
            Agreement {
                name: "kanidm",
                target: &kanidm as &dyn Target,
                identity: TargetIdentity::new("kanidm", kanidm_server.server.base_url.clone()),
                describe: format!("Kanidm (emulated, {})", kanidm_server.server.base_url),
                mapping: &kanidm_mapping,
                policy: &policy,
            },
        ];
        for a in &agreements {
            let out =
                idsync_runner::run_agreement(a, &store, &source, &scope, &mut cache, &opts, p)
                    .await
                    .doing(|| format!("target {}", a.name))?;
            worst = worst.max(out.code);
        }
    }
    p.heading("Done");
    for name in store.list().await.doing(|| "listing the state".into())? {
        if let Some(st) = store
            .load(&name)
            .await
            .doing(|| "reading the state".into())?
        {
            p.note(&format!(
                "{name}: state version {}, {} principals owned",
                st.version,
                st.owned_count()
            ));
        }
    }
    let count = |c: std::collections::BTreeMap<String, u64>| {
        (
            c.values().sum::<u64>(),
            c.iter()
                .filter(|(k, _)| !k.starts_with("GET "))
                .map(|(_, v)| v)
                .sum::<u64>(),
        )
    };
    let (gr, _) = count(graph.state.infra.accounting.snapshot());
    let (lr, lw) = count(lake.state.infra.accounting.snapshot());
    let (dr, dw) = count(dbx.state.infra.accounting.snapshot());
    let k = kanidm.requests().unwrap_or_default();
    p.note(&format!(
        "requests: Microsoft Graph {gr}; lakeFS {lr} ({lw} writes); Databricks {dr} ({dw} writes); Kanidm {} ({} writes: one sync request per run that changed something)",
        k.reads + k.writes,
        k.writes
    ));
    p.note(&format!(
        "inspect the state: idsync state show --state {}",
        state_dir.display()
    ));
    Ok(worst)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_directory_is_valid() {
        let d: idsync_model::Directory = serde_json::from_str(super::DIRECTORY).unwrap();
        let s: idsync_model::Snapshot = d.try_into().unwrap();
        assert_eq!(s.groups.len(), 5);
    }
}
