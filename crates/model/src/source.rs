//! What a source (Entra ID, LDAP, a file) says about people: users, service principals and
//! groups with typed, possibly nested, members. A [`Snapshot`] is one read of a source scope.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The three kinds of principal idsync synchronises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// A person (or a guest).
    User,
    /// An application identity (Entra service principal, Databricks service principal).
    ServicePrincipal,
    /// A group; its members are users, service principals and groups.
    Group,
}

impl Kind {
    /// All kinds, in the order creates are applied.
    pub const ALL: [Kind; 3] = [Kind::User, Kind::ServicePrincipal, Kind::Group];

    /// The name used in plans, state and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::ServicePrincipal => "servicePrincipal",
            Kind::Group => "group",
        }
    }

    /// Parses `user`, `servicePrincipal` (or `sp`, `service_principal`) and `group`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "user" | "users" => Some(Kind::User),
            "servicePrincipal" | "service_principal" | "sp" | "servicePrincipals" => {
                Some(Kind::ServicePrincipal)
            }
            "group" | "groups" => Some(Kind::Group),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a user is a member of the tenant or an invited guest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum UserType {
    /// A regular member of the directory.
    #[default]
    Member,
    /// An invited external user (Entra B2B). Usually mapped by mail, not by UPN.
    Guest,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A user as the source knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    /// Stable source id (Entra object id, LDAP entryUUID / objectGUID). Never changes.
    pub id: String,
    /// Login name (Entra userPrincipalName, LDAP uid / sAMAccountName).
    #[serde(alias = "userPrincipalName")]
    pub user_name: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Mail addresses, the primary one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// Whether the account is enabled (Entra accountEnabled).
    #[serde(
        default = "yes",
        skip_serializing_if = "is_true",
        alias = "accountEnabled"
    )]
    pub active: bool,
    /// Member or guest.
    #[serde(default, skip_serializing_if = "is_member")]
    pub user_type: UserType,
    /// The source's external id, if any (Entra onPremisesImmutableId, an HR id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Any other attribute a mapping template may use (`dn`, `employeeId`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

fn is_member(t: &UserType) -> bool {
    *t == UserType::Member
}

/// A service principal (an application's identity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePrincipal {
    /// Stable source id (the service principal's object id).
    pub id: String,
    /// The application (client) id; Databricks calls it applicationId.
    pub app_id: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Whether sign-in is enabled.
    #[serde(
        default = "yes",
        skip_serializing_if = "is_true",
        alias = "accountEnabled"
    )]
    pub active: bool,
}

/// A typed reference to a member of a group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// What the member is.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The member's stable source id. Shared: a snapshot read from the state holds each id once,
    /// however many groups the principal is in (a 36-character id in ten groups was ten strings).
    pub id: Id,
}

/// A principal's source id as a member holds it: shared, so that a snapshot read from the state
/// holds each id once however many groups hold the principal (a 36-character id in ten groups
/// was ten strings). Ordered, hashed and compared as the string it is. A target key is one too
/// ([`crate::target::Key`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Id(std::sync::Arc<str>);

impl Id {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether `self` and `other` are one shared id (not only equal).
    pub fn shares(&self, other: &Id) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One shared [`Id`] per distinct id: a source read that builds members through it names each
/// principal once, however many groups hold it.
#[derive(Debug, Default)]
pub struct Ids(crate::fnv::FnvSet<Id>);

impl Ids {
    /// The shared id for `id`.
    pub fn get(&mut self, id: &str) -> Id {
        if let Some(x) = self.0.get(id) {
            return x.clone();
        }
        let x = Id::from(id);
        self.0.insert(x.clone());
        x
    }
}

impl std::ops::Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Id {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id(s.into())
    }
}

impl From<String> for Id {
    fn from(s: String) -> Self {
        Id(s.into())
    }
}

impl From<&String> for Id {
    fn from(s: &String) -> Self {
        Id(s.as_str().into())
    }
}

impl From<Id> for String {
    fn from(id: Id) -> Self {
        id.0.to_string()
    }
}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Id {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Id {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Id> for String {
    fn eq(&self, other: &Id) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Id> for &str {
    fn eq(&self, other: &Id) -> bool {
        **self == *other.0
    }
}

impl Member {
    /// A member of `kind`.
    pub fn new(kind: Kind, id: impl AsRef<str>) -> Self {
        Member {
            kind,
            id: id.as_ref().into(),
        }
    }
    /// A user member.
    pub fn user(id: impl AsRef<str>) -> Self {
        Member::new(Kind::User, id)
    }
    /// A service principal member.
    pub fn service_principal(id: impl AsRef<str>) -> Self {
        Member::new(Kind::ServicePrincipal, id)
    }
    /// A nested group.
    pub fn group(id: impl AsRef<str>) -> Self {
        Member::new(Kind::Group, id)
    }
}

/// A group with its direct members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Group {
    /// Stable source id.
    pub id: String,
    /// Display name (not unique in Entra: duplicates are reported, not merged).
    pub display_name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Security-enabled (Entra). Non-security groups are synced only when asked.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub security_enabled: bool,
    /// Mail-enabled (Entra distribution lists, Microsoft 365 groups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mail_enabled: bool,
    /// Direct members, by type and source id.
    #[serde(default)]
    pub members: Members,
}

/// A group's direct members: an ordered set shared between the snapshots that hold the group
/// unchanged. A snapshot's copy (the fold of a change, the state's serialised form) copies a
/// pointer per group instead of every membership, and two sets that are one compare equal without
/// reading them, so the steps that compare the snapshot before a change with the one after (the cut
/// to the change, the state layer) cost the groups that changed, not the memberships of the tenant.
///
/// It reads like a `BTreeSet<Member>` (it dereferences to one). The methods that change it copy
/// the set first when another snapshot shares it, and only when they change something: removing a
/// member the set lacks, or inserting one it has, leaves the sharing intact.
#[derive(Clone, Default)]
pub struct Members(std::sync::Arc<BTreeSet<Member>>);

impl Members {
    /// The set, to change, copied first if another snapshot shares it.
    pub fn make_mut(&mut self) -> &mut BTreeSet<Member> {
        std::sync::Arc::make_mut(&mut self.0)
    }
    /// Adds a member; true when it was not there.
    pub fn insert(&mut self, m: Member) -> bool {
        if self.0.contains(&m) {
            return false;
        }
        self.make_mut().insert(m)
    }
    /// Removes a member; true when it was there.
    pub fn remove(&mut self, m: &Member) -> bool {
        if !self.0.contains(m) {
            return false;
        }
        self.make_mut().remove(m)
    }
    /// Removes every member.
    pub fn clear(&mut self) {
        if !self.0.is_empty() {
            *self = Members::default();
        }
    }
    /// Keeps the members `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&Member) -> bool) {
        if self.0.iter().all(&mut keep) {
            return;
        }
        self.make_mut().retain(keep);
    }
    /// Adds every member of `ms`.
    pub fn extend(&mut self, ms: impl IntoIterator<Item = Member>) {
        for m in ms {
            self.insert(m);
        }
    }
    /// The members of one kind, found without walking the others (the set is ordered by kind
    /// first).
    pub fn of_kind(&self, kind: Kind) -> std::collections::btree_set::Range<'_, Member> {
        use std::ops::Bound;
        let at = |kind| Member {
            kind,
            id: "".into(),
        };
        let end = match kind {
            Kind::User => Bound::Excluded(at(Kind::ServicePrincipal)),
            Kind::ServicePrincipal => Bound::Excluded(at(Kind::Group)),
            Kind::Group => Bound::Unbounded,
        };
        self.0.range((Bound::Included(at(kind)), end))
    }
    /// The nested groups among the members.
    pub fn groups(&self) -> std::collections::btree_set::Range<'_, Member> {
        self.of_kind(Kind::Group)
    }
    /// Whether `self` and `other` are the same shared set (equal without reading them).
    pub fn shares(&self, other: &Members) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Members {
    type Target = BTreeSet<Member>;
    fn deref(&self) -> &BTreeSet<Member> {
        &self.0
    }
}

impl PartialEq for Members {
    fn eq(&self, other: &Members) -> bool {
        self.shares(other) || *self.0 == *other.0
    }
}

impl Eq for Members {}

impl fmt::Debug for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<BTreeSet<Member>> for Members {
    fn from(set: BTreeSet<Member>) -> Self {
        Members(std::sync::Arc::new(set))
    }
}

impl<const N: usize> From<[Member; N]> for Members {
    fn from(ms: [Member; N]) -> Self {
        ms.into_iter().collect()
    }
}

impl From<Members> for BTreeSet<Member> {
    fn from(ms: Members) -> Self {
        std::sync::Arc::unwrap_or_clone(ms.0)
    }
}

impl FromIterator<Member> for Members {
    fn from_iter<I: IntoIterator<Item = Member>>(ms: I) -> Self {
        Members(std::sync::Arc::new(ms.into_iter().collect()))
    }
}

impl<'a> IntoIterator for &'a Members {
    type Item = &'a Member;
    type IntoIter = std::collections::btree_set::Iter<'a, Member>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for Members {
    type Item = Member;
    type IntoIter = std::collections::btree_set::IntoIter<Member>;
    fn into_iter(self) -> Self::IntoIter {
        BTreeSet::from(self).into_iter()
    }
}

impl Serialize for Members {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A group's members as stored: a list, built into the set at once (one sort, which finds a
/// stored list already in order, and one bulk build) rather than one ordered insert each. With
/// [`by_id`], a state of 100k users and 1M memberships loads in 0.48 s instead of 0.61-0.65 s
/// (`cargo bench -p idsync-state --bench state`).
impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<Member>::deserialize(d)?.into_iter().collect())
    }
}

/// A directory as a file holds it: lists, in the Graph-like camelCase shape. This is the fixture
/// format of the `file` source and the emulators, and how a snapshot is serialised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Directory {
    /// Users.
    #[serde(default)]
    pub users: Vec<User>,
    /// Service principals.
    #[serde(default)]
    pub service_principals: Vec<ServicePrincipal>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<Group>,
    /// Groups whose member list could not be read completely. Their members are never removed.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub incomplete_groups: BTreeSet<String>,
    /// Groups nested one level beyond the search depth, kept without members
    /// (`edge_groups = "empty"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge_groups: Vec<Group>,
}

/// One consistent read of a source scope, indexed by source id. Ordered, so that everything derived
/// from it is deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Directory", try_from = "Directory")]
pub struct Snapshot {
    /// Users by source id. Shared, as group members are ([`Members`]): a copy of the snapshot
    /// copies a pointer per user, and an unchanged user compares equal without reading it.
    pub users: BTreeMap<String, std::sync::Arc<User>>,
    /// Service principals by source id.
    pub service_principals: BTreeMap<String, ServicePrincipal>,
    /// Groups by source id.
    pub groups: BTreeMap<String, Group>,
    /// Groups whose members were not read completely (a failed or truncated read): the engine never
    /// removes members from them.
    pub incomplete_groups: BTreeSet<String>,
    /// Groups nested one level beyond the search depth in a group of the snapshot, by source id,
    /// without members: synced as empty groups when the scope asks for them
    /// (`edge_groups = "empty"`), and never in `groups`.
    pub edge_groups: BTreeMap<String, Group>,
}

/// A directory that cannot become a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryError(pub String);

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DirectoryError {}

/// Principals by id, built at once (they are stored in order), or the first id that two share.
fn by_id<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    what: &str,
) -> Result<BTreeMap<String, T>, DirectoryError> {
    let mut v: Vec<(String, T)> = items.into_iter().map(|t| (id(&t).to_owned(), t)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = v.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(DirectoryError(format!("duplicate {what} id {:?}", w[0].0)));
    }
    Ok(v.into_iter().collect())
}

impl TryFrom<Directory> for Snapshot {
    type Error = DirectoryError;
    fn try_from(d: Directory) -> Result<Self, DirectoryError> {
        if let Some(g) = d.edge_groups.iter().find(|g| !g.members.is_empty()) {
            return Err(DirectoryError(format!(
                "edge group {:?} has members (groups beyond the search depth are kept empty)",
                g.id
            )));
        }
        let edge_groups = by_id(d.edge_groups, |g| &g.id, "edge group")?;
        let groups = by_id(d.groups, |g| &g.id, "group")?;
        if let Some(id) = groups.keys().find(|id| edge_groups.contains_key(*id)) {
            return Err(DirectoryError(format!(
                "group {id:?} is both in the scope and beyond its depth"
            )));
        }
        Ok(Snapshot {
            users: by_id(
                d.users.into_iter().map(std::sync::Arc::new).collect(),
                |u| &u.id,
                "user",
            )?,
            service_principals: by_id(d.service_principals, |s| &s.id, "service principal")?,
            groups,
            incomplete_groups: d.incomplete_groups,
            edge_groups,
        })
    }
}

impl From<Snapshot> for Directory {
    fn from(s: Snapshot) -> Self {
        Directory {
            users: s
                .users
                .into_values()
                .map(std::sync::Arc::unwrap_or_clone)
                .collect(),
            service_principals: s.service_principals.into_values().collect(),
            groups: s.groups.into_values().collect(),
            incomplete_groups: s.incomplete_groups,
            edge_groups: s.edge_groups.into_values().collect(),
        }
    }
}

impl Snapshot {
    /// Number of principals of every kind.
    pub fn len(&self) -> usize {
        self.users.len() + self.service_principals.len() + self.groups.len()
    }

    /// True when the snapshot holds no principal at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a principal with this kind and id is in the snapshot.
    pub fn contains(&self, kind: Kind, id: &str) -> bool {
        match kind {
            Kind::User => self.users.contains_key(id),
            Kind::ServicePrincipal => self.service_principals.contains_key(id),
            Kind::Group => self.groups.contains_key(id),
        }
    }

    /// Total number of direct memberships.
    pub fn membership_count(&self) -> usize {
        self.groups.values().map(|g| g.members.len()).sum()
    }

    /// Applies one change from a source's change feed. Changes to groups the snapshot does not hold
    /// are ignored (they are out of scope); a member may reference a principal the snapshot does not
    /// hold yet: the source sends its upsert in the same change set.
    pub fn apply_change(&mut self, change: &Change) {
        match change {
            Change::UpsertUser(u) => {
                if self.users.get(&u.id).is_none_or(|was| **was != *u) {
                    self.users
                        .insert(u.id.clone(), std::sync::Arc::new(u.clone()));
                }
            }
            Change::UpsertServicePrincipal(sp) => {
                self.service_principals.insert(sp.id.clone(), sp.clone());
            }
            Change::UpsertGroup {
                id,
                display_name,
                description,
            } if self.edge_groups.contains_key(id) && !self.groups.contains_key(id) => {
                if let Some(g) = self.edge_groups.get_mut(id) {
                    g.display_name = display_name.clone();
                    g.description = description.clone();
                }
            }
            Change::UpsertGroup {
                id,
                display_name,
                description,
            } => {
                let g = self.groups.entry(id.clone()).or_insert_with(|| Group {
                    id: id.clone(),
                    display_name: display_name.clone(),
                    description: None,
                    security_enabled: true,
                    mail_enabled: false,
                    members: Members::default(),
                });
                g.display_name = display_name.clone();
                g.description = description.clone();
            }
            Change::ReplaceMembers { group, members } => {
                if let Some(g) = self.groups.get_mut(group) {
                    if *g.members != *members {
                        g.members = members.clone().into();
                    }
                    self.incomplete_groups.remove(group);
                }
            }
            Change::Remove(m) => {
                match m.kind {
                    Kind::User => {
                        self.users.remove(&*m.id);
                    }
                    Kind::ServicePrincipal => {
                        self.service_principals.remove(&*m.id);
                    }
                    Kind::Group => {
                        self.groups.remove(&*m.id);
                        self.incomplete_groups.remove(&*m.id);
                        self.edge_groups.remove(&*m.id);
                    }
                }
                for g in self.groups.values_mut() {
                    g.members.remove(m);
                }
            }
            Change::AddMember { group, member } => {
                if let Some(g) = self.groups.get_mut(group) {
                    g.members.insert(member.clone());
                }
            }
            Change::RemoveMember { group, member } => {
                if let Some(g) = self.groups.get_mut(group) {
                    g.members.remove(member);
                }
            }
            Change::Touched { .. } => {}
        }
    }

    /// A user to change, copied first if another snapshot shares it.
    pub fn user_mut(&mut self, id: &str) -> Option<&mut User> {
        self.users.get_mut(id).map(std::sync::Arc::make_mut)
    }

    /// Drops users and service principals that no group of the snapshot reaches any more (they left
    /// every synced group). Used when the scope is "principals reached through memberships".
    pub fn prune_unreachable(&mut self) {
        let mut reached: BTreeSet<&Member> = BTreeSet::new();
        for g in self.groups.values() {
            reached.extend(g.members.iter());
        }
        let users: BTreeSet<String> = self
            .users
            .keys()
            .filter(|id| !reached.contains(&Member::user(id.as_str())))
            .cloned()
            .collect();
        let sps: BTreeSet<String> = self
            .service_principals
            .keys()
            .filter(|id| !reached.contains(&Member::service_principal(id.as_str())))
            .cloned()
            .collect();
        for id in users {
            self.users.remove(&id);
        }
        for id in sps {
            self.service_principals.remove(&id);
        }
    }
}

/// One entry of a source's change feed (Graph delta, LDAP syncrepl, a demo's edits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "change")]
pub enum Change {
    /// A user was created or changed (all attributes given).
    UpsertUser(User),
    /// A service principal was created or changed.
    UpsertServicePrincipal(ServicePrincipal),
    /// A group was created or its attributes changed; members are unchanged.
    #[serde(rename_all = "camelCase")]
    UpsertGroup {
        /// Source id.
        id: String,
        /// New display name.
        display_name: String,
        /// New description.
        description: Option<String>,
    },
    /// A group's members were read in full (a group new to the scope, or after a reset).
    ReplaceMembers {
        /// Group source id.
        group: String,
        /// Its direct members.
        members: BTreeSet<Member>,
    },
    /// A principal was deleted in the source (or left the scope).
    Remove(Member),
    /// A member was added to a group.
    AddMember {
        /// Group source id.
        group: String,
        /// The member.
        member: Member,
    },
    /// A member was removed from a group.
    RemoveMember {
        /// Group source id.
        group: String,
        /// The member.
        member: Member,
    },
    /// A group changed in a way the feed does not spell out (a delta item with only some of its
    /// properties): a group new to the snapshot that the scope selects by id is read in full.
    Touched {
        /// Group source id.
        group: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_read_in_bulk_and_its_faults_named() {
        let json = r#"{"users": [
                {"id": "u2", "userName": "b@x"}, {"id": "u1", "userName": "a@x"}],
            "groups": [{"id": "g", "displayName": "G", "members": [
                {"type": "user", "id": "u2"}, {"type": "user", "id": "u1"},
                {"type": "user", "id": "u2"}]}],
            "edgeGroups": [{"id": "e", "displayName": "E"}]}"#;
        let s: Snapshot = serde_json::from_str(json).unwrap();
        assert_eq!(s.users.keys().collect::<Vec<_>>(), ["u1", "u2"]);
        let members: Vec<_> = s.groups["g"].members.iter().map(|m| &m.id).collect();
        assert_eq!(members, ["u1", "u2"], "in order, once each");
        assert!(s.edge_groups.contains_key("e"));
        let back: Snapshot = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        for (bad, says) in [
            (
                r#"{"users": [{"id": "u", "userName": "a"}, {"id": "u", "userName": "b"}]}"#,
                "duplicate user id \"u\"",
            ),
            (
                r#"{"groups": [{"id": "g", "displayName": "A"}, {"id": "g", "displayName": "B"}]}"#,
                "duplicate group id \"g\"",
            ),
            (
                r#"{"groups": [{"id": "g", "displayName": "A"}], "edgeGroups": [{"id": "g", "displayName": "A"}]}"#,
                "both in the scope and beyond its depth",
            ),
            (
                r#"{"edgeGroups": [{"id": "e", "displayName": "E", "members": [{"type": "user", "id": "u"}]}]}"#,
                "edge group \"e\" has members",
            ),
        ] {
            let e = serde_json::from_str::<Snapshot>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}

#[cfg(test)]
mod members_tests {
    use super::*;

    fn group(members: Members) -> Group {
        Group {
            id: "g".into(),
            display_name: "G".into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members,
        }
    }

    #[test]
    fn a_copied_snapshot_shares_its_member_sets_until_one_changes() {
        let mut base = Snapshot::default();
        base.groups.insert(
            "g".into(),
            group([Member::user("u1"), Member::user("u2")].into()),
        );
        let mut copy = base.clone();
        assert!(copy.groups["g"].members.shares(&base.groups["g"].members));
        // Changes that change nothing keep the set shared.
        let g = copy.groups.get_mut("g").unwrap();
        assert!(!g.members.insert(Member::user("u1")));
        assert!(!g.members.remove(&Member::user("u9")));
        g.members.retain(|_| true);
        g.members.extend([Member::user("u2")]);
        copy.apply_change(&Change::ReplaceMembers {
            group: "g".into(),
            members: [Member::user("u1"), Member::user("u2")].into(),
        });
        copy.apply_change(&Change::Remove(Member::user("u9")));
        assert!(copy.groups["g"].members.shares(&base.groups["g"].members));
        // A change copies the set: the base keeps its members.
        copy.apply_change(&Change::RemoveMember {
            group: "g".into(),
            member: Member::user("u1"),
        });
        assert!(!copy.groups["g"].members.shares(&base.groups["g"].members));
        assert_eq!(base.groups["g"].members.len(), 2);
        assert_eq!(
            copy.groups["g"].members.iter().collect::<Vec<_>>(),
            [&Member::user("u2")]
        );
        assert_ne!(copy, base);
        // Equal sets that are not shared still compare equal.
        let again: Members = [Member::user("u2")].into();
        assert_eq!(copy.groups["g"].members, again);
        assert!(!copy.groups["g"].members.shares(&again));
    }

    #[test]
    fn a_copied_snapshot_shares_its_users_until_one_changes() {
        let u: User =
            serde_json::from_str(r#"{"id":"u1","userName":"a@x","displayName":"A"}"#).unwrap();
        let mut base = Snapshot::default();
        base.users
            .insert("u1".into(), std::sync::Arc::new(u.clone()));
        let mut copy = base.clone();
        let shared =
            |a: &Snapshot, b: &Snapshot| std::sync::Arc::ptr_eq(&a.users["u1"], &b.users["u1"]);
        assert!(shared(&base, &copy));
        // The same user again (a change feed repeats what did not change): still shared.
        copy.apply_change(&Change::UpsertUser(u.clone()));
        assert!(shared(&base, &copy));
        let mut renamed = u;
        renamed.display_name = "B".into();
        copy.apply_change(&Change::UpsertUser(renamed));
        assert!(!shared(&base, &copy));
        assert_eq!(base.users["u1"].display_name, "A");
        copy.user_mut("u1").unwrap().display_name = "C".into();
        assert_eq!(
            (
                copy.users["u1"].display_name.as_str(),
                base.users["u1"].display_name.as_str()
            ),
            ("C", "A")
        );
        assert!(copy.user_mut("nobody").is_none());
    }

    #[test]
    fn ids_are_shared_through_the_table_and_compare_as_strings() {
        let mut ids = Ids::default();
        let a = ids.get("0b5e-ü");
        let b = ids.get(&String::from("0b5e-ü"));
        assert!(a.shares(&b));
        let c = Id::from("0b5e-ü");
        assert!(!a.shares(&c));
        assert_eq!(a, c);
        assert_eq!(a, "0b5e-ü");
        assert_eq!(a, String::from("0b5e-ü"));
        assert!(ids.get("a") < ids.get("b"));
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""0b5e-ü""#);
        assert_eq!(format!("{a} {a:?}"), r#"0b5e-ü "0b5e-ü""#);
        let mut by_id = BTreeMap::new();
        by_id.insert("0b5e-ü".to_owned(), 1);
        assert_eq!(by_id.get(&*a), Some(&1));
    }

    #[test]
    fn members_of_one_kind_are_found_by_range() {
        let ms: Members = [
            Member::group("a"),
            Member::user("b"),
            Member::service_principal("c"),
            Member::user(""),
            Member::group(""),
        ]
        .into();
        let ids = |k: Kind| ms.of_kind(k).map(|m| m.id.as_str()).collect::<Vec<_>>();
        assert_eq!(ids(Kind::User), ["", "b"]);
        assert_eq!(ids(Kind::ServicePrincipal), ["c"]);
        assert_eq!(ids(Kind::Group), ["", "a"]);
        assert_eq!(ms.groups().count(), 2);
        assert_eq!(Members::default().groups().count(), 0);
    }

    #[test]
    fn members_are_stored_as_a_list_and_read_back_as_the_set() {
        let g = group([Member::user("u2"), Member::group("g1"), Member::user("u1")].into());
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains(r#""members":[{"type":"user","id":"u1"},{"type":"user","id":"u2"},{"type":"group","id":"g1"}]"#), "{json}");
        let back: Group = serde_json::from_str(&json).unwrap();
        assert_eq!(back, g);
        let unordered: Group = serde_json::from_str(
            r#"{"id":"g","displayName":"G","members":[{"type":"group","id":"g1"},{"type":"user","id":"u1"},{"type":"user","id":"u1"}]}"#,
        )
        .unwrap();
        assert_eq!(unordered.members.len(), 2);
        let bare: Group = serde_json::from_str(r#"{"id":"g","displayName":"G"}"#).unwrap();
        assert!(bare.members.is_empty());
    }
}
