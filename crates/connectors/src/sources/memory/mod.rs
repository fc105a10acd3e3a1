//! An in-memory directory with a change feed: every edit is appended to a log, and a cursor is a
//! position in it. `idsync demo` runs on it, and tests use it to drive the incremental path
//! (cursors stored only after an apply, expiry falling back to a full read) without a network.
//!
//! Reading changes works the way a Graph delta client does: events are applied to the snapshot
//! last applied; a member new to the snapshot is fetched; a group created with a selected name is
//! read in full; users and service principals that left every synced group drop out. A group
//! renamed out of a name-based selection stays until the next full read.

use async_trait::async_trait;
use idsync_engine::scope::{self, Scope};
use idsync_engine::{Changes, Read, Source, SourceError};
use idsync_model::{Change, Kind, Member, ReadMode, Snapshot};
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

fn selected_by_name(scope: &Scope, id: &str, name: &str) -> bool {
    scope.selects(id, name)
}

/// Adds a principal the snapshot does not hold yet, from the directory: a nested group only within
/// the search depth, with its own members fetched too.
fn pull(snap: &mut Snapshot, dir: &Snapshot, scope: &Scope, m: &Member, depth: u32) {
    match m.kind {
        Kind::User => {
            if let Some(u) = dir.users.get(&m.id) {
                snap.users.entry(m.id.clone()).or_insert_with(|| u.clone());
            }
        }
        Kind::ServicePrincipal => {
            if let Some(s) = dir.service_principals.get(&m.id) {
                snap.service_principals
                    .entry(m.id.clone())
                    .or_insert_with(|| s.clone());
            }
        }
        Kind::Group => {
            if depth >= scope.search_depth || snap.groups.contains_key(&m.id) {
                return;
            }
            if let Some(g) = dir.groups.get(&m.id) {
                if !(g.security_enabled || scope.include_non_security) {
                    return;
                }
                snap.groups.insert(g.id.clone(), g.clone());
                for child in &g.members {
                    pull(snap, dir, scope, child, depth + 1);
                }
            }
        }
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
        })
    }

    async fn read_changes(
        &self,
        scope: &Scope,
        base: &Snapshot,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        let i = self.lock();
        let Some(cursor) = cursors.get(CURSOR) else {
            return Ok(Changes::Unsupported);
        };
        let parsed = cursor
            .split_once(':')
            .and_then(|(e, p)| Some((e.parse::<u64>().ok()?, p.parse::<usize>().ok()?)));
        let pos = match parsed {
            Some((epoch, pos)) if epoch == i.epoch && pos <= i.log.len() => pos,
            _ => {
                return Ok(Changes::Expired(format!(
                    "the change-feed cursor {cursor:?} has expired"
                )));
            }
        };
        let mut snap = base.clone();
        // Depth of groups already in the snapshot is not recorded; nested pulls start at depth 1.
        for ev in &i.log[pos..] {
            match ev {
                Change::UpsertUser(u) => {
                    if snap.users.contains_key(&u.id) || scope.all_users {
                        snap.apply_change(ev);
                    }
                }
                Change::UpsertServicePrincipal(s) => {
                    if snap.service_principals.contains_key(&s.id) {
                        snap.apply_change(ev);
                    }
                }
                Change::UpsertGroup {
                    id, display_name, ..
                } => {
                    if snap.groups.contains_key(id) {
                        snap.apply_change(ev);
                    } else if selected_by_name(scope, id, display_name) {
                        // New to the scope: read it in full.
                        pull(
                            &mut snap,
                            &i.dir,
                            &Scope {
                                search_depth: u32::MAX,
                                ..scope.clone()
                            },
                            &Member::group(id.as_str()),
                            0,
                        );
                        if let Some(g) = i.dir.groups.get(id) {
                            for m in &g.members {
                                pull(&mut snap, &i.dir, scope, m, 1);
                            }
                        }
                    }
                }
                Change::AddMember { group, member } => {
                    if snap.groups.contains_key(group) {
                        snap.apply_change(ev);
                        pull(&mut snap, &i.dir, scope, member, 1);
                    }
                }
                Change::ReplaceMembers { group, members } => {
                    if snap.groups.contains_key(group) {
                        snap.apply_change(ev);
                        for m in members {
                            pull(&mut snap, &i.dir, scope, m, 1);
                        }
                    }
                }
                Change::Remove(_) | Change::RemoveMember { .. } => snap.apply_change(ev),
            }
        }
        if !scope.all_users {
            snap.prune_unreachable();
        }
        let depth = snap.groups.keys().map(|g| (g.clone(), 1)).collect();
        Ok(Changes::Read(Read {
            snapshot: snap.into(),
            cursors: Self::cursor(&i),
            mode: ReadMode::Incremental,
            depth,
            notes: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Directory, Group, User};

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
