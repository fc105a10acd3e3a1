//! What a target (lakeFS, Databricks, a SCIM service, Kanidm) holds, and what idsync wants it to
//! hold: principals keyed by their natural key in the target, and memberships between them.

use crate::source::Kind;
use crate::state::PerKind;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The natural key of a principal in a target: `userName` for users, `applicationId` for service
/// principals, the group name (or id, for lakeFS) for groups. Compared after
/// [`Capabilities::fold`], so a case-insensitive target never sees two principals for one name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PKey {
    /// The principal's kind.
    pub kind: Kind,
    /// The folded key.
    pub key: Key,
}

/// A principal's key, shared: the desired state names a user once per group that holds it, and
/// a plan once per membership it adds (a million at a first sync of 100k users), each a pointer
/// to the one string rather than a copy of it. Ordered, hashed, compared and serialised as the
/// string it is.
pub type Key = crate::source::Id;

impl PKey {
    /// A key of this kind.
    pub fn new(kind: Kind, key: impl Into<Key>) -> Self {
        PKey {
            kind,
            key: key.into(),
        }
    }
}

impl fmt::Display for PKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind, self.key)
    }
}

/// The attributes idsync manages on a target principal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Principal {
    /// The principal's kind.
    pub kind: Kind,
    /// The natural key, exactly as written to the target.
    pub key: String,
    /// Display name (users, service principals; for groups the key is usually the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Mail addresses, primary first (users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// Active (users and service principals; always true for groups).
    pub active: bool,
    /// The source's identifier as the target stores it (SCIM externalId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Group description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Principal {
    /// A bare principal of this kind and key, active, with no other attribute.
    pub fn new(kind: Kind, key: impl Into<String>) -> Self {
        Principal {
            kind,
            key: key.into(),
            display_name: None,
            emails: Vec::new(),
            active: true,
            external_id: None,
            description: None,
        }
    }

    /// The value of one attribute, as plans show it.
    pub fn get(&self, attr: Attr) -> AttrValue {
        match attr {
            Attr::Key => AttrValue::Text(Some(self.key.clone())),
            Attr::DisplayName => AttrValue::Text(self.display_name.clone()),
            Attr::Emails => AttrValue::List(self.emails.clone()),
            Attr::Active => AttrValue::Bool(self.active),
            Attr::ExternalId => AttrValue::Text(self.external_id.clone()),
            Attr::Description => AttrValue::Text(self.description.clone()),
        }
    }

    /// Whether one attribute is equal in both, without copying anything (the diff's hot path).
    pub fn same(&self, other: &Principal, attr: Attr) -> bool {
        match attr {
            Attr::Key => self.key == other.key,
            Attr::DisplayName => self.display_name == other.display_name,
            Attr::Emails => self.emails == other.emails,
            Attr::Active => self.active == other.active,
            Attr::ExternalId => self.external_id == other.external_id,
            Attr::Description => self.description == other.description,
        }
    }

    /// Sets one attribute. A value of the wrong shape is ignored.
    pub fn set(&mut self, attr: Attr, value: &AttrValue) {
        match (attr, value) {
            (Attr::Key, AttrValue::Text(Some(v))) => self.key = v.clone(),
            (Attr::DisplayName, AttrValue::Text(v)) => self.display_name = v.clone(),
            (Attr::Emails, AttrValue::List(v)) => self.emails = v.clone(),
            (Attr::Active, AttrValue::Bool(v)) => self.active = *v,
            (Attr::ExternalId, AttrValue::Text(v)) => self.external_id = v.clone(),
            (Attr::Description, AttrValue::Text(v)) => self.description = v.clone(),
            _ => {}
        }
    }
}

/// A managed attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Attr {
    /// The natural key (a rename).
    Key,
    /// `displayName`.
    DisplayName,
    /// `emails`.
    Emails,
    /// `active`.
    Active,
    /// `externalId`.
    ExternalId,
    /// `description`.
    Description,
    // Group membership is not an attribute here: it has its own operations.
}

impl Attr {
    /// Every managed attribute.
    pub const ALL: [Attr; 6] = [
        Attr::Key,
        Attr::DisplayName,
        Attr::Emails,
        Attr::Active,
        Attr::ExternalId,
        Attr::Description,
    ];

    /// The attribute's name in config and plans.
    pub fn as_str(self) -> &'static str {
        match self {
            Attr::Key => "key",
            Attr::DisplayName => "displayName",
            Attr::Emails => "emails",
            Attr::Active => "active",
            Attr::ExternalId => "externalId",
            Attr::Description => "description",
        }
    }

    /// Parses an attribute name as config spells it.
    pub fn parse(s: &str) -> Option<Attr> {
        Attr::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attribute value, for plan output and updates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// A boolean.
    Bool(bool),
    /// An optional string.
    Text(Option<String>),
    /// A list of strings.
    List(Vec<String>),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Text(Some(s)) => write!(f, "{s:?}"),
            AttrValue::Text(None) => f.write_str("(none)"),
            AttrValue::List(v) => write!(f, "{v:?}"),
        }
    }
}

/// What a target can do. The engine plans within it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Groups may contain groups. If not, the engine flattens to transitive members.
    pub nested_groups: bool,
    /// The target has service principals.
    pub service_principals: bool,
    /// Groups may hold service principals (lakeFS groups hold only users).
    pub service_principal_members: bool,
    /// Kinds whose natural key can be changed in place. Databricks cannot rename a user: a new
    /// userName is a new user.
    pub renamable: BTreeSet<Kind>,
    /// Whether users and service principals can be deactivated (else only deleted).
    pub deactivate: bool,
    /// Keys compare case-insensitively (SCIM userName, Databricks group names).
    pub case_insensitive_keys: bool,
    /// Attributes the target stores; the engine neither diffs nor writes the others.
    pub attributes: BTreeSet<Attr>,
    /// Groups carry named policies (lakeFS).
    pub group_policies: bool,
    /// Most members one membership write may carry.
    pub max_members_per_write: usize,
}

impl Capabilities {
    /// A target that can do everything (the in-memory target's default).
    pub fn full() -> Self {
        Capabilities {
            nested_groups: true,
            service_principals: true,
            service_principal_members: true,
            renamable: Kind::ALL.into_iter().collect(),
            deactivate: true,
            case_insensitive_keys: false,
            attributes: Attr::ALL.into_iter().collect(),
            group_policies: false,
            max_members_per_write: 1000,
        }
    }

    /// Folds a key for comparison, per `case_insensitive_keys`.
    pub fn fold(&self, key: &str) -> String {
        if self.case_insensitive_keys {
            key.to_lowercase()
        } else {
            key.to_owned()
        }
    }

    /// Whether `key` folds to `folded`, without allocating.
    pub fn folds_to(&self, key: &str, folded: &str) -> bool {
        if self.case_insensitive_keys {
            key.chars().flat_map(char::to_lowercase).eq(folded.chars())
        } else {
            key == folded
        }
    }

    /// The folded [`PKey`] of a principal.
    pub fn pkey(&self, p: &Principal) -> PKey {
        PKey::new(p.kind, self.fold(&p.key))
    }

    /// Whether the target holds principals of this kind.
    pub fn supports(&self, kind: Kind) -> bool {
        kind != Kind::ServicePrincipal || self.service_principals
    }

    /// Whether a group may hold a member of this kind.
    pub fn member_allowed(&self, kind: Kind) -> bool {
        match kind {
            Kind::User => true,
            Kind::ServicePrincipal => self.service_principals && self.service_principal_members,
            Kind::Group => self.nested_groups,
        }
    }
}

/// Where a desired principal comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourceRef {
    /// Kind.
    pub kind: Kind,
    /// Stable source id.
    pub id: String,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

/// One principal idsync wants in the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredPrincipal {
    /// The source principal it is mapped from.
    pub source: SourceRef,
    /// Its attributes in the target.
    pub principal: Principal,
    /// Policies to attach to it (lakeFS groups).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub policies: BTreeSet<String>,
}

/// The target as idsync wants it, mapped from a snapshot. Memberships are direct (nested): the
/// engine flattens them for targets that do not nest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Principals by folded key.
    pub principals: BTreeMap<PKey, DesiredPrincipal>,
    /// Direct members of each group, by folded key.
    pub members: BTreeMap<PKey, BTreeSet<PKey>>,
    /// Groups whose member lists are incomplete: members are added, never removed.
    pub incomplete_groups: BTreeSet<PKey>,
    /// Groups beyond the search depth (`edge_groups = "empty"`): their members were never read,
    /// so whatever members they have in the target are left alone.
    pub edge_groups: BTreeSet<PKey>,
    /// Source principals that could not be mapped or collided with another on their key. Whatever
    /// idsync linked them to before is left alone.
    pub held_back: BTreeMap<SourceRef, HeldBack>,
    /// Memberships of groups outside the snapshot (not selected: beyond the depth): dropped.
    pub dangling_members: usize,
    /// Memberships of users or service principals the source does not have (deleted, unreadable).
    pub missing_members: usize,
}

/// Why a source principal is not in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBack {
    /// The key it maps to, when it has one (a duplicate key is a conflict).
    pub key: Option<PKey>,
    /// What went wrong.
    pub reason: String,
}

/// One principal as observed in the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedPrincipal {
    /// The target's own id (SCIM id, lakeFS id).
    pub id: String,
    /// Its attributes.
    pub principal: Principal,
    /// Policies attached (lakeFS groups).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub policies: BTreeSet<String>,
}

/// Members of one group by kind: target ids. Looked up with `&str`, so diffing a million
/// memberships allocates only for the changes.
pub type MemberIds = PerKind<BTreeSet<String>>;

impl MemberIds {
    /// Whether the member is there.
    pub fn contains(&self, kind: Kind, id: &str) -> bool {
        self.get(kind).contains(id)
    }

    /// Adds a member; false if it was there.
    pub fn insert(&mut self, kind: Kind, id: impl Into<String>) -> bool {
        self.get_mut(kind).insert(id.into())
    }

    /// Removes a member; false if it was not there.
    pub fn remove(&mut self, kind: Kind, id: &str) -> bool {
        self.get_mut(kind).remove(id)
    }

    /// Every member, users first.
    pub fn iter(&self) -> impl Iterator<Item = (Kind, &str)> {
        Kind::ALL
            .into_iter()
            .flat_map(move |k| self.get(k).iter().map(move |id| (k, id.as_str())))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        Kind::ALL.iter().map(|k| self.get(*k).len()).sum()
    }

    /// True when the group has no member.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(Kind, String)> for MemberIds {
    fn from_iter<I: IntoIterator<Item = (Kind, String)>>(iter: I) -> Self {
        let mut m = MemberIds::default();
        for (k, id) in iter {
            m.insert(k, id);
        }
        m
    }
}

/// The target as observed in one bulk read: principals by kind and target id, memberships by
/// group target id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Principals by kind, then target id.
    pub principals: PerKind<BTreeMap<String, ObservedPrincipal>>,
    /// Direct members of each group: group target id → members.
    pub members: BTreeMap<String, MemberIds>,
}

impl Observed {
    /// The observed principal with this kind and target id.
    pub fn get(&self, kind: Kind, id: &str) -> Option<&ObservedPrincipal> {
        self.principals.get(kind).get(id)
    }

    /// Adds a principal.
    pub fn insert(&mut self, p: ObservedPrincipal) {
        self.principals
            .get_mut(p.principal.kind)
            .insert(p.id.clone(), p);
    }

    /// Every principal with its kind and target id, in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = (Kind, &str, &ObservedPrincipal)> {
        Kind::ALL.into_iter().flat_map(move |k| {
            self.principals
                .get(k)
                .iter()
                .map(move |(id, p)| (k, id.as_str(), p))
        })
    }

    /// Number of principals.
    pub fn len(&self) -> usize {
        Kind::ALL
            .iter()
            .map(|k| self.principals.get(*k).len())
            .sum()
    }

    /// True when nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
