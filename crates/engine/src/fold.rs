//! Sources deliver changes; the engine folds them. [`fold`] applies a source's [`Change`]s to the
//! last applied snapshot under the scope rules, asks the source (through [`Lookup`]) only for what
//! the snapshot does not hold yet (members new to it, groups new to the scope, nested groups the
//! scope now reaches), and draws the scope again as a full read would. A source with a change feed
//! turns its feed into `Change`s and implements `Lookup`; it writes no scope logic of its own.
//!
//! The promise, which `idsync_runner::testing::source_conformance` holds every source to: folding
//! the changes since a full read into that read's snapshot equals a full read of the directory now.

use crate::scope::{
    EdgeGroups, Scope, Selection, cycle_notes, depths, select_owned, without_members,
};
use crate::source::SourceError;
use async_trait::async_trait;
use idsync_model::{Change, Group, Kind, Member, ServicePrincipal, Snapshot, User};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What a fold asks a source for: principals by id, as they are now.
#[async_trait]
pub trait Lookup: Send + Sync {
    /// These users (those not found are left out).
    async fn users(&self, ids: &[String]) -> Result<Vec<User>, SourceError>;
    /// These service principals (those not found are left out).
    async fn service_principals(
        &self,
        ids: &[String],
    ) -> Result<Vec<ServicePrincipal>, SourceError>;
    /// These groups, without their members, if the scope admits their type (security groups, or
    /// any with `include_non_security`); those not found are left out.
    async fn groups(&self, ids: &[String], scope: &Scope) -> Result<Vec<Group>, SourceError>;
    /// Reads `groups` with their direct members into `snap` (members the snapshot lacks with
    /// them), recording `level` as their depth, and the groups nested in them level by level down
    /// to the scope's search depth, skipping groups already in `snap` or in `depth`.
    async fn expand(
        &self,
        groups: Vec<Group>,
        level: u32,
        scope: &Scope,
        snap: &mut Snapshot,
        depth: &mut BTreeMap<String, u32>,
    ) -> Result<(), SourceError>;
}

/// What a fold makes of a base and its changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// The scoped snapshot now: the base itself (shared, not copied) when nothing changed.
    pub snapshot: Arc<Snapshot>,
    /// The search depth at which each selected group is found (1 = selected directly).
    pub depth: BTreeMap<String, u32>,
    /// Names and ids asked for that the directory does not have, and other remarks.
    pub notes: Vec<String>,
    /// The change feed held no change: `snapshot` is `base`.
    pub unchanged: bool,
}

/// Folds `changes` (in the order they happened) into `base` under `scope`.
///
/// No change at all costs nothing that grows with the tenant's memberships: the base is shared,
/// not copied, and only its depths and notes are drawn again (the base is a selection already,
/// and selecting a selection again gives it back).
///
/// - A user or service principal change counts when the snapshot holds it (or every user is in
///   scope); a removal always counts.
/// - A group's attributes change when the snapshot holds it; a group new to the snapshot whose
///   name or id the scope selects is read in full, with its nested groups down to the depth. A
///   member change to a group new to the snapshot counts as its selection when the scope selects
///   every group or that id, and so does any other change to it ([`Change::Touched`]).
/// - A member added to a held group that the snapshot lacks is read by id; a nested group is read
///   in full when it is within the depth.
/// - At the end the scope is drawn again as a full read draws it: a group renamed out of the
///   selection leaves (unless still nested within the depth), and so do members only it reached.
pub async fn fold(
    base: &Arc<Snapshot>,
    changes: &[Change],
    scope: &Scope,
    lookup: &dyn Lookup,
) -> Result<Folded, SourceError> {
    if changes.is_empty() {
        let (depth, mut notes) = depths(base, scope);
        notes.extend(cycle_notes(base));
        return Ok(Folded {
            snapshot: Arc::clone(base),
            depth,
            notes,
            unchanged: true,
        });
    }
    let base: &Snapshot = base;
    let mut snap = base.clone();
    // Groups that may be new to the scope: read by id below and checked with their real name.
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    let mut need: BTreeSet<Member> = BTreeSet::new();
    // Memberships added from a group of the snapshot to a group not in it.
    let mut new_edges: BTreeSet<(String, String)> = BTreeSet::new();
    let selected_by_id = |id: &str| scope.selects_all() || scope.group_ids.contains(id);
    for change in changes {
        // A change to a group kept beyond the depth (its name, its type) drops it: the end reads
        // it again if it is still at the edge.
        if let Change::UpsertGroup { id: group, .. } | Change::Touched { group } = change {
            snap.edge_groups.remove(group);
        }
        match change {
            Change::Remove(_) | Change::RemoveMember { .. } => snap.apply_change(change),
            Change::Touched { group } => {
                if !snap.groups.contains_key(group) && selected_by_id(group) {
                    candidates.insert(group.clone());
                }
            }
            Change::UpsertUser(u) => {
                if snap.users.contains_key(&u.id) || scope.all_users {
                    snap.apply_change(change);
                }
            }
            Change::UpsertServicePrincipal(sp) => {
                if snap.service_principals.contains_key(&sp.id) {
                    snap.apply_change(change);
                }
            }
            Change::UpsertGroup {
                id, display_name, ..
            } => {
                if snap.groups.contains_key(id) {
                    snap.apply_change(change);
                } else if scope.selects(id, display_name) || selected_by_id(id) {
                    candidates.insert(id.clone());
                }
            }
            Change::AddMember { group, member } => {
                if snap.groups.contains_key(group) {
                    if !snap.contains(member.kind, &member.id) {
                        if member.kind == Kind::Group {
                            new_edges.insert((group.clone(), member.id.to_string()));
                        }
                        need.insert(member.clone());
                    }
                    snap.apply_change(change);
                } else if selected_by_id(group) {
                    candidates.insert(group.clone());
                }
            }
            Change::ReplaceMembers { group, members } => {
                if snap.groups.contains_key(group) {
                    for m in members {
                        if !snap.contains(m.kind, &m.id) {
                            if m.kind == Kind::Group {
                                new_edges.insert((group.clone(), m.id.to_string()));
                            }
                            need.insert(m.clone());
                        }
                    }
                    snap.apply_change(change);
                } else if selected_by_id(group) {
                    candidates.insert(group.clone());
                }
            }
        }
    }
    // Members new to the snapshot, by id. Nested groups are read below, within the depth.
    let ids = |k: Kind| {
        need.iter()
            .filter(|m| m.kind == k)
            .map(|m| m.id.to_string())
            .collect::<Vec<_>>()
    };
    let users = ids(Kind::User);
    if !users.is_empty() {
        for u in lookup.users(&users).await? {
            snap.users
                .entry(u.id.clone())
                .or_insert_with(|| std::sync::Arc::new(u));
        }
    }
    let sps = ids(Kind::ServicePrincipal);
    if !sps.is_empty() {
        for sp in lookup.service_principals(&sps).await? {
            snap.service_principals.entry(sp.id.clone()).or_insert(sp);
        }
    }
    // Groups new to the scope, read by id and checked again with their real name and type.
    let before = depths(base, scope).0;
    let mut depth: BTreeMap<String, u32> = BTreeMap::new();
    let candidates: Vec<String> = candidates.into_iter().collect();
    if !candidates.is_empty() {
        let fresh: Vec<Group> = lookup
            .groups(&candidates, scope)
            .await?
            .into_iter()
            .filter(|g| scope.selects(&g.id, &g.display_name))
            .collect();
        lookup
            .expand(fresh, 1, scope, &mut snap, &mut depth)
            .await?;
    }
    // Nested groups the scope now reaches within the search depth and the snapshot lacks: through
    // a membership added in these changes, or under a group that moved up (a parent newly
    // selected). Read from the depth they are found at, level by level.
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    for _ in 0..scope.search_depth {
        let (now, _) = depths(&snap, scope);
        let mut wanted: BTreeMap<String, u32> = BTreeMap::new();
        for (p, &d) in &now {
            if d >= scope.search_depth {
                continue;
            }
            let moved_up = before.get(p).is_none_or(|&old| d < old);
            let Some(g) = snap.groups.get(p) else {
                continue;
            };
            for m in g.members.groups() {
                if snap.groups.contains_key(&*m.id) || attempted.contains(&*m.id) {
                    continue;
                }
                if moved_up || new_edges.contains(&(p.clone(), m.id.to_string())) {
                    let e = wanted.entry(m.id.to_string()).or_insert(d + 1);
                    *e = (*e).min(d + 1);
                }
            }
        }
        if wanted.is_empty() {
            break;
        }
        let mut by_level: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, level) in wanted {
            attempted.insert(id.clone());
            by_level.entry(level).or_default().push(id);
        }
        for (level, ids) in by_level {
            let found = lookup.groups(&ids, scope).await?;
            lookup
                .expand(found, level, scope, &mut snap, &mut depth)
                .await?;
        }
    }
    if scope.edge_groups == EdgeGroups::Empty {
        // Groups now one level beyond the depth whose attributes the snapshot lacks: read by id,
        // without members.
        let (now, _) = depths(&snap, scope);
        let mut missing: BTreeSet<String> = BTreeSet::new();
        for (gid, &d) in &now {
            if d != scope.search_depth {
                continue;
            }
            let Some(g) = snap.groups.get(gid) else {
                continue;
            };
            for m in g.members.groups() {
                if !now.contains_key(&*m.id)
                    && !snap.groups.contains_key(&*m.id)
                    && !snap.edge_groups.contains_key(&*m.id)
                {
                    missing.insert(m.id.to_string());
                }
            }
        }
        if !missing.is_empty() {
            let ids: Vec<String> = missing.into_iter().collect();
            for g in lookup.groups(&ids, scope).await? {
                snap.edge_groups.insert(g.id.clone(), without_members(&g));
            }
        }
    }
    let Selection {
        snapshot,
        depth,
        notes,
    } = select_owned(snap, scope);
    Ok(Folded {
        snapshot: Arc::new(snapshot),
        depth,
        notes,
        unchanged: false,
    })
}

/// A whole directory held in memory as a fold's [`Lookup`] (the memory source, tests).
pub struct DirectoryLookup<'a>(pub &'a Snapshot);

#[async_trait]
impl Lookup for DirectoryLookup<'_> {
    async fn users(&self, ids: &[String]) -> Result<Vec<User>, SourceError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.0.users.get(id).map(|u| User::clone(u)))
            .collect())
    }

    async fn service_principals(
        &self,
        ids: &[String],
    ) -> Result<Vec<ServicePrincipal>, SourceError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.0.service_principals.get(id).cloned())
            .collect())
    }

    async fn groups(&self, ids: &[String], scope: &Scope) -> Result<Vec<Group>, SourceError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.0.groups.get(id))
            .filter(|g| g.security_enabled || scope.include_non_security)
            .map(|g| Group {
                members: Default::default(),
                ..g.clone()
            })
            .collect())
    }

    async fn expand(
        &self,
        groups: Vec<Group>,
        mut level: u32,
        scope: &Scope,
        snap: &mut Snapshot,
        depth: &mut BTreeMap<String, u32>,
    ) -> Result<(), SourceError> {
        let dir = self.0;
        let mut frontier: Vec<String> = groups.into_iter().map(|g| g.id).collect();
        for id in &frontier {
            depth.insert(id.clone(), level);
        }
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for id in frontier {
                let Some(g) = dir.groups.get(&id) else {
                    continue;
                };
                for m in &g.members {
                    match m.kind {
                        Kind::User => {
                            if let Some(u) = dir.users.get(&*m.id) {
                                snap.users
                                    .entry(m.id.to_string())
                                    .or_insert_with(|| u.clone());
                            }
                        }
                        Kind::ServicePrincipal => {
                            if let Some(sp) = dir.service_principals.get(&*m.id) {
                                snap.service_principals
                                    .entry(m.id.to_string())
                                    .or_insert_with(|| sp.clone());
                            }
                        }
                        Kind::Group => {
                            let admitted = dir
                                .groups
                                .get(&*m.id)
                                .is_some_and(|c| c.security_enabled || scope.include_non_security);
                            if level < scope.search_depth
                                && admitted
                                && !depth.contains_key(&*m.id)
                                && !snap.groups.contains_key(&*m.id)
                            {
                                depth.insert(m.id.to_string(), level + 1);
                                next.push(m.id.to_string());
                            }
                        }
                    }
                }
                snap.incomplete_groups.remove(&g.id);
                snap.groups.insert(g.id.clone(), g.clone());
            }
            frontier = next;
            level += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::select;

    fn user(id: &str) -> User {
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

    fn dir(security: bool) -> Snapshot {
        let mut s = Snapshot::default();
        s.users.insert("u1".into(), std::sync::Arc::new(user("u1")));
        s.groups.insert(
            "g1".into(),
            Group {
                id: "g1".into(),
                display_name: "M365".into(),
                description: None,
                security_enabled: security,
                mail_enabled: true,
                members: [Member::user("u1")].into(),
            },
        );
        s
    }

    /// Found in review: a Graph delta item that carries only the property that changed (here
    /// `securityEnabled`) made a group selected by id or by "every group" enter the scope only at
    /// the next full read. The item is a `Touched` change, and the group is read.
    #[tokio::test]
    async fn a_group_touched_into_the_scope_is_read() {
        let scope = Scope::default();
        let base = Arc::new(select(&dir(false), &scope).snapshot);
        assert!(base.groups.is_empty());
        let now = dir(true);
        let touched = [Change::Touched { group: "g1".into() }];
        let folded = fold(&base, &touched, &scope, &DirectoryLookup(&now))
            .await
            .unwrap();
        assert_eq!(*folded.snapshot, select(&now, &scope).snapshot);
        assert!(folded.snapshot.groups.contains_key("g1"));
        // Not selected by id (a name-based scope): a touch alone reads nothing.
        let by_name = Scope {
            group_names: ["OTHER".to_owned()].into(),
            ..Scope::default()
        };
        let folded = fold(&base, &touched, &by_name, &DirectoryLookup(&now))
            .await
            .unwrap();
        assert!(folded.snapshot.groups.is_empty());
    }
}
