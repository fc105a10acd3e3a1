//! `idsync demo`: the whole job on an embedded directory, with no cloud account. A full sync into
//! two targets (one that nests groups like Databricks, one that holds only users like lakeFS), a
//! few edits in the directory, an incremental sync that reads only those edits, and a last run that
//! finds nothing to do. State and targets live in a local folder you can inspect afterwards.

use crate::output::Printer;
use crate::run::{self, Agreement, Mode, ReadCache, RunOptions};
use anyhow::{Context, Result};
use idsync_connectors::source::memory::MemorySource;
use idsync_connectors::target::file::{FileTarget, Profile};
use idsync_engine::{Mapping, Policy, Scope, Target};
use idsync_model::{Change, Directory, Member, Snapshot};
use idsync_state::{LocalStore, StateStore};
use std::path::Path;
use std::time::Duration;

const DIRECTORY: &str = include_str!("directory.json");

/// Edits made to the directory between two steps.
type Edit = fn(&MemorySource, &Snapshot);

fn id(dir: &Snapshot, name: &str) -> String {
    dir.users
        .values()
        .find(|u| u.user_name == name)
        .map(|u| u.id.clone())
        .or_else(|| {
            dir.groups
                .values()
                .find(|g| g.display_name == name)
                .map(|g| g.id.clone())
        })
        .unwrap_or_default()
}

/// Runs the demo in `dir` (emptied of a previous demo's files first).
pub async fn run(dir: &Path, verbose: bool) -> Result<u8> {
    let mut p = Printer::stdout(verbose);
    for f in ["state", "databricks.json", "lakefs.json"] {
        let path = dir.join(f);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("clearing {}", path.display()))?;
        } else if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("clearing {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let directory: Directory = serde_json::from_str(DIRECTORY).context("the embedded directory")?;
    let directory: Snapshot = directory.try_into().context("the embedded directory")?;
    let source = MemorySource::new(directory.clone());
    let scope = Scope {
        group_names: ["TEAM_ALPHA", "TEAM_EPSILON", "TEAM_ZETA"]
            .map(String::from)
            .into(),
        search_depth: 2,
        ..Scope::default()
    };
    let store = LocalStore::new(&dir.join("state").display().to_string());
    let dbx_path = dir.join("databricks.json");
    let lake_path = dir.join("lakefs.json");
    let dbx_mapping = Mapping::defaults();
    let mut lake_mapping = Mapping::defaults();
    lake_mapping.group_policies = ["AuthManageOwnCredentials", "FSReadAll"]
        .map(String::from)
        .into();
    let policy = Policy::default();
    let opts = RunOptions {
        full_sync: false,
        mode: Mode::Sync,
        approve_deletions: 0,
        allow_empty_source: false,
        workers: 4,
        lease: Duration::from_secs(300),
    };

    p.heading("idsync demo: an embedded Entra-like directory synced into a Databricks-like and a lakeFS-like target");
    p.note("scope: groups TEAM_ALPHA, TEAM_EPSILON, TEAM_ZETA with --group-search-depth 2, so TEAM_ETA (nested in TEAM_ZETA) is found too");
    p.note("the Databricks-like target nests groups and has service principals; the lakeFS-like one holds only users, so nested groups are flattened");
    p.note(&format!("state and targets: {}", dir.display()));

    let mut worst = run::exit::OK;
    let steps: [(&str, Option<Edit>); 3] = [
        (
            "Step 1 of 3: full sync (no state yet, so the whole scope is read)",
            None,
        ),
        (
            "Step 2 of 3: incremental sync after edits in the directory",
            Some(edit),
        ),
        ("Step 3 of 3: run again with no change", None),
    ];
    for (title, change) in steps {
        p.heading(title);
        if let Some(change) = change {
            change(&source, &directory);
            for line in [
                "bob@company.com is disabled",
                "frank@company.com joins TEAM_ALPHA",
                "kevin@company.com leaves TEAM_ETA, his only group: he drops out of the scope and is kept, as deprovision = \"none\"",
                "the nested TEAM_ETA is renamed TEAM_ETA_PLATFORM (renamed in place where the target can rename a group; a new group where it cannot)",
            ] {
                p.note(line);
            }
        }
        let mut cache = ReadCache::default();
        // Each step opens the targets afresh, as a new process would.
        let dbx = FileTarget::open(&dbx_path, Profile::Databricks)?;
        let lake = FileTarget::open(&lake_path, Profile::Lakefs)?;
        let agreements = [
            Agreement {
                name: "databricks",
                target: &dbx as &dyn Target,
                mapping: &dbx_mapping,
                policy: &policy,
                describe: format!("file {} (Databricks-like)", dbx_path.display()),
            },
            Agreement {
                name: "lakefs",
                target: &lake as &dyn Target,
                mapping: &lake_mapping,
                policy: &policy,
                describe: format!("file {} (lakeFS-like)", lake_path.display()),
            },
        ];
        for a in &agreements {
            let out =
                run::run_agreement(a, &store, &source, &scope, &mut cache, &opts, &mut p).await?;
            worst = worst.max(out.code);
        }
    }
    p.heading("Done");
    for name in store.list()? {
        if let Some(st) = store.load(&name)? {
            p.note(&format!(
                "{name}: state version {}, {} principals owned, cursor {:?}",
                st.version,
                st.owned_count(),
                st.cursors
                    .values()
                    .next()
                    .map(String::as_str)
                    .unwrap_or("-")
            ));
        }
    }
    p.note(&format!(
        "inspect: idsync state show --state {}",
        dir.join("state").display()
    ));
    Ok(worst)
}

fn edit(source: &MemorySource, dir: &Snapshot) {
    let user = |name: &str| dir.users.get(&id(dir, name)).cloned();
    if let Some(mut bob) = user("bob@company.com") {
        bob.active = false;
        source.edit(Change::UpsertUser(bob));
    }
    source.edit(Change::AddMember {
        group: id(dir, "TEAM_ALPHA"),
        member: Member::user(id(dir, "frank@company.com")),
    });
    source.edit(Change::RemoveMember {
        group: id(dir, "TEAM_ETA"),
        member: Member::user(id(dir, "kevin@company.com")),
    });
    source.edit(Change::UpsertGroup {
        id: id(dir, "TEAM_ETA"),
        display_name: "TEAM_ETA_PLATFORM".into(),
        description: None,
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_directory_is_valid() {
        let d: idsync_model::Directory = serde_json::from_str(super::DIRECTORY).unwrap();
        let s: idsync_model::Snapshot = d.try_into().unwrap();
        assert_eq!(s.groups.len(), 5);
        assert!(!super::id(&s, "TEAM_ETA").is_empty());
    }
}
