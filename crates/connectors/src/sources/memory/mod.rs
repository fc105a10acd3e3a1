//! An in-memory directory with a change feed: every edit is appended to a log, and a cursor is a
//! position in it. `idsync demo` runs on it, and tests use it to drive the incremental path
//! (cursors stored only after an apply, expiry falling back to a full read) without a network.
//!
//! Reading changes hands the log since the cursor to the engine's fold ([`idsync_engine::fold`]),
//! which asks this directory for what the snapshot lacks, as a Graph delta client asks Graph: the
//! result is what a full read of the directory gives.

use async_trait::async_trait;
use idsync_engine::fold::DirectoryLookup;
use idsync_engine::scope::{self, Scope};
use idsync_engine::{Changes, Read, Source, SourceError};
use idsync_model::{Change, ReadMode, Snapshot};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The cursor's name in the agreement state.
pub const CURSOR: &str = "memory";

#[derive(Debug, Default)]
struct Inner {
    dir: Snapshot,
    log: Vec<Change>,
    epoch: u64,
}

/// An in-memory source.
#[derive(Debug, Default)]
pub struct MemorySource {
    inner: Mutex<Inner>,
}

impl MemorySource {
    /// A source holding `dir`.
    pub fn new(dir: Snapshot) -> Self {
        MemorySource {
            inner: Mutex::new(Inner {
                dir,
                log: Vec::new(),
                epoch: 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Edits the directory; the change shows up in the feed.
    pub fn edit(&self, change: Change) {
        let mut i = self.lock();
        i.dir.apply_change(&change);
        i.log.push(change);
    }

    /// Invalidates every cursor handed out so far, like an expired delta token.
    pub fn expire_cursors(&self) {
        let mut i = self.lock();
        i.epoch += 1;
        i.log.clear();
    }

    /// The whole directory as it is now.
    pub fn directory(&self) -> Snapshot {
        self.lock().dir.clone()
    }

    fn cursor(i: &Inner) -> BTreeMap<String, String> {
        BTreeMap::from([(CURSOR.to_owned(), format!("{}:{}", i.epoch, i.log.len()))])
    }
}

#[async_trait]
impl Source for MemorySource {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        let i = self.lock();
        let sel = scope::select(&i.dir, scope);
        Ok(Read {
            snapshot: sel.snapshot.into(),
            cursors: Self::cursor(&i),
            mode: ReadMode::Full,
            depth: sel.depth,
            notes: sel.notes,
            unchanged: false,
        })
    }

    async fn read_changes(
        &self,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        let Some(cursor) = cursors.get(CURSOR) else {
            return Ok(Changes::Unsupported);
        };
        let parsed = cursor
            .split_once(':')
            .and_then(|(e, p)| Some((e.parse::<u64>().ok()?, p.parse::<usize>().ok()?)));
        // The log since the cursor and the directory now, taken under the lock and folded after.
        let taken = {
            let i = self.lock();
            match parsed {
                Some((epoch, pos)) if epoch == i.epoch && pos <= i.log.len() => {
                    Some((i.log[pos..].to_vec(), i.dir.clone(), Self::cursor(&i)))
                }
                _ => None,
            }
        };
        let Some((log, dir, cursors)) = taken else {
            return Ok(Changes::Expired(format!(
                "the change-feed cursor {cursor:?} has expired"
            )));
        };
        let sel = idsync_engine::fold(base, &log, scope, &DirectoryLookup(&dir)).await?;
        Ok(Changes::Read(Read {
            snapshot: sel.snapshot,
            cursors,
            mode: ReadMode::Incremental,
            depth: sel.depth,
            notes: sel.notes,
            unchanged: sel.unchanged,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Directory, Group, Member, User};

    fn u(id: &str) -> User {
        User {
            id: id.into(),
            user_name: format!("{id}@x"),
            display_name: id.into(),
            emails: vec![],
            active: true,
            user_type: Default::default(),
            external_id: None,
            attributes: Default::default(),
        }
    }

    fn g(id: &str, name: &str, m: Vec<Member>) -> Group {
        Group {
            id: id.into(),
            display_name: name.into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: m.into_iter().collect(),
        }
    }

    /// The source conformance check, through the engine's fold: nested groups reached within the
    /// depth through a new membership, a group renamed out of the selection, a new selected group
    /// with a nested group, a deleted user and a new service principal member.
    #[tokio::test]
    async fn folding_its_changes_equals_a_full_read() {
        let mut sp = idsync_model::ServicePrincipal {
            id: "sp1".into(),
            app_id: "app-1".into(),
            display_name: "SP".into(),
            active: true,
        };
        let dir: Snapshot = Directory {
            users: vec![u("a"), u("b"), u("c"), u("d"), u("e")],
            service_principals: vec![sp.clone()],
            groups: vec![
                g("g1", "ONE", vec![Member::user("a"), Member::user("b")]),
                g("g2", "TWO", vec![Member::user("c"), Member::group("g4")]),
                g("g4", "FOUR", vec![Member::user("e")]),
                g("g5", "FIVE", vec![Member::user("d")]),
            ],
            incomplete_groups: Default::default(),
            edge_groups: Default::default(),
        }
        .try_into()
        .unwrap();
        let src = MemorySource::new(dir);
        let scope = Scope {
            group_names: ["ONE", "TWO", "NEW"].map(String::from).into(),
            search_depth: 2,
            ..Scope::default()
        };
        idsync_runner::testing::source_conformance(&src, &scope, || async {
            // g5 nests under ONE: within the depth, read with its members.
            src.edit(Change::AddMember {
                group: "g1".into(),
                member: Member::group("g5"),
            });
            // TWO is renamed out of the selection: it, FOUR and c leave.
            src.edit(Change::UpsertGroup {
                id: "g2".into(),
                display_name: "TWO_OLD".into(),
                description: None,
            });
            // A new selected group with the service principal, renamed.
            src.edit(Change::UpsertGroup {
                id: "g6".into(),
                display_name: "NEW".into(),
                description: Some("new".into()),
            });
            src.edit(Change::AddMember {
                group: "g6".into(),
                member: Member::service_principal("sp1"),
            });
            sp.display_name = "SP renamed".into();
            src.edit(Change::UpsertServicePrincipal(sp.clone()));
            // b is deleted.
            src.edit(Change::Remove(Member::user("b")));
        })
        .await
        .unwrap();
    }

    /// With `edge_groups = "empty"`, the groups one level beyond the depth follow the changes as
    /// a full read draws them: an edge group that becomes selected (read in full, its own nested
    /// group now at the edge), a membership that adds an edge group, an edge group renamed, one
    /// deleted.
    #[tokio::test]
    async fn folding_keeps_the_edge_groups_a_full_read_draws() {
        let dir: Snapshot = Directory {
            users: vec![u("a"), u("b"), u("c"), u("d")],
            service_principals: vec![],
            groups: vec![
                g(
                    "g1",
                    "ONE",
                    vec![Member::user("a"), Member::group("g2"), Member::group("g5")],
                ),
                g("g2", "TWO", vec![Member::user("b"), Member::group("g3")]),
                g("g3", "THREE", vec![Member::user("c")]),
                g("g4", "FOUR", vec![Member::user("d")]),
                g("g5", "FIVE", vec![]),
            ],
            incomplete_groups: Default::default(),
            edge_groups: Default::default(),
        }
        .try_into()
        .unwrap();
        let src = MemorySource::new(dir);
        let scope = Scope {
            group_names: ["ONE", "SIX"].map(String::from).into(),
            search_depth: 1,
            edge_groups: idsync_engine::scope::EdgeGroups::Empty,
            ..Scope::default()
        };
        let first = src.read_full(&scope).await.unwrap();
        assert_eq!(
            first.snapshot.edge_groups.keys().collect::<Vec<_>>(),
            ["g2", "g5"]
        );
        idsync_runner::testing::source_conformance(&src, &scope, || async {
            // TWO is renamed into the selection: read with its members; THREE is now the edge.
            src.edit(Change::UpsertGroup {
                id: "g2".into(),
                display_name: "SIX".into(),
                description: None,
            });
            // FOUR nests under ONE, beyond the depth, then is renamed.
            src.edit(Change::AddMember {
                group: "g1".into(),
                member: Member::group("g4"),
            });
            src.edit(Change::UpsertGroup {
                id: "g4".into(),
                display_name: "FOUR (renamed)".into(),
                description: Some("d".into()),
            });
            // FIVE is deleted.
            src.edit(Change::Remove(Member::group("g5")));
        })
        .await
        .unwrap();
        let now = src.read_full(&scope).await.unwrap();
        assert_eq!(
            now.snapshot.edge_groups.keys().collect::<Vec<_>>(),
            ["g3", "g4"]
        );
        assert_eq!(
            now.snapshot.edge_groups["g4"].display_name,
            "FOUR (renamed)"
        );
    }

    /// The incremental read must equal a full read of the same directory, for the edits the feed
    /// handles.
    #[tokio::test]
    async fn incremental_equals_full_after_edits() {
        let dir: Snapshot = Directory {
            users: vec![u("a"), u("b"), u("c"), u("d")],
            service_principals: vec![],
            groups: vec![
                g("g1", "ONE", vec![Member::user("a"), Member::user("b")]),
                g("g2", "TWO", vec![Member::user("c")]),
            ],
            incomplete_groups: Default::default(),
            edge_groups: Default::default(),
        }
        .try_into()
        .unwrap();
        let src = MemorySource::new(dir);
        let scope = Scope {
            group_names: ["ONE".to_string(), "NEW".to_string()].into(),
            ..Scope::default()
        };
        let first = src.read_full(&scope).await.unwrap();
        src.edit(Change::RemoveMember {
            group: "g1".into(),
            member: Member::user("b"),
        });
        src.edit(Change::AddMember {
            group: "g1".into(),
            member: Member::user("d"),
        });
        let mut a = u("a");
        a.display_name = "Alice".into();
        src.edit(Change::UpsertUser(a));
        src.edit(Change::UpsertUser(u("zz"))); // not in scope
        src.edit(Change::UpsertGroup {
            id: "g3".into(),
            display_name: "NEW".into(),
            description: None,
        });
        src.edit(Change::AddMember {
            group: "g3".into(),
            member: Member::user("c"),
        });
        let Changes::Read(inc) = src
            .read_changes(&scope, &first.snapshot, &first.cursors)
            .await
            .unwrap()
        else {
            panic!("expected changes")
        };
        let full = src.read_full(&scope).await.unwrap();
        assert_eq!(inc.snapshot, full.snapshot);
        assert_eq!(inc.cursors, full.cursors);
        src.expire_cursors();
        assert!(matches!(
            src.read_changes(&scope, &full.snapshot, &full.cursors)
                .await
                .unwrap(),
            Changes::Expired(_)
        ));
    }
}
