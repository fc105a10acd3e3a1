//! An emulated directory: users, service principals and groups with typed members, an event log
//! of every change (the basis of delta queries), and the app registrations that may sign in.

use idsync_model::{Directory, Group, Kind, Member, ServicePrincipal, Snapshot, User};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// An application registered in the tenant, allowed to get tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct App {
    /// Application (client) id.
    pub client_id: String,
    /// Client secrets (values) it may present.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Subjects of federated credentials (`sub` of an external token) it trusts.
    #[serde(default)]
    pub federated_subjects: Vec<String>,
    /// Certificates (PEM) whose private keys may sign its client assertions.
    #[serde(default)]
    pub certificates: Vec<String>,
    /// A managed identity of the emulated host: the instance metadata endpoint issues its tokens.
    #[serde(default)]
    pub managed_identity: bool,
    /// Public client flows (device code) allowed.
    #[serde(default)]
    pub public_client: bool,
}

/// One change, as delta queries report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A user was created or changed.
    User(String),
    /// A user was deleted.
    UserRemoved(String),
    /// A service principal was created or changed.
    ServicePrincipal(String),
    /// A service principal was deleted.
    ServicePrincipalRemoved(String),
    /// A group's own properties changed (or it was created).
    Group(String),
    /// A group was deleted.
    GroupRemoved(String),
    /// A member joined a group.
    MemberAdded(String, Member),
    /// A member left a group.
    MemberRemoved(String, Member),
}

/// The directory and its history.
#[derive(Clone, Debug, Default)]
pub struct Tenant {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Registered apps.
    pub apps: Vec<App>,
    /// Users by id.
    pub users: BTreeMap<String, User>,
    /// Service principals by id.
    pub service_principals: BTreeMap<String, ServicePrincipal>,
    /// Groups by id (with their direct members).
    pub groups: BTreeMap<String, Group>,
    /// Every change since the tenant was loaded, with its sequence number (1-based).
    log: Vec<Event>,
    /// Bumped to invalidate every delta token handed out so far.
    pub epoch: u64,
}

/// The tenant id used when none is given.
pub const DEFAULT_TENANT_ID: &str = "0d0e5a1c-1d5c-4c5e-9a6e-1d5c0d0e5a1c";
/// The client id of the default app registration.
pub const DEFAULT_CLIENT_ID: &str = "9f3c1e2a-6b7d-4c8e-9f0a-1b2c3d4e5f60";
/// The client secret of the default app registration.
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-client-secret";
/// The repository's test client certificate and key (`tests/fixtures/entra-test-client.pem`; it
/// protects nothing).
const TEST_CLIENT_PEM: &str = include_str!("../../../tests/fixtures/entra-test-client.pem");

/// The certificate (PEM, without its key) of the default app registration: the repository's
/// test certificate.
pub fn default_certificate() -> String {
    let at = TEST_CLIENT_PEM
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or(TEST_CLIENT_PEM.len());
    TEST_CLIENT_PEM[at..].to_owned()
}
/// The client id of the emulated host's user-assigned managed identity. The host also has a
/// system-assigned one: [`DEFAULT_SYSTEM_IDENTITY_ID`].
pub const DEFAULT_MANAGED_IDENTITY_ID: &str = "5e1f0c3a-8d2b-4f6e-a1c9-7b3d5e0f2a41";
/// The client id of the emulated host's system-assigned managed identity.
pub const DEFAULT_SYSTEM_IDENTITY_ID: &str = "3a7c9e1b-2d4f-4a6c-8e0b-9d1f3b5a7c20";

impl Tenant {
    /// A tenant holding `dir`, with the default app registration.
    pub fn new(dir: Snapshot) -> Self {
        Tenant {
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            apps: vec![
                App {
                    client_id: DEFAULT_CLIENT_ID.to_owned(),
                    secrets: vec![DEFAULT_CLIENT_SECRET.to_owned()],
                    federated_subjects: vec!["system:serviceaccount:idsync:idsync".to_owned()],
                    certificates: vec![default_certificate()],
                    managed_identity: false,
                    public_client: true,
                },
                App {
                    client_id: DEFAULT_SYSTEM_IDENTITY_ID.to_owned(),
                    secrets: Vec::new(),
                    federated_subjects: Vec::new(),
                    certificates: Vec::new(),
                    managed_identity: true,
                    public_client: false,
                },
                App {
                    client_id: DEFAULT_MANAGED_IDENTITY_ID.to_owned(),
                    secrets: Vec::new(),
                    federated_subjects: Vec::new(),
                    certificates: Vec::new(),
                    managed_identity: true,
                    public_client: false,
                },
            ],
            users: dir
                .users
                .into_iter()
                .map(|(k, u)| (k, std::sync::Arc::unwrap_or_clone(u)))
                .collect(),
            service_principals: dir.service_principals,
            groups: dir.groups,
            log: Vec::new(),
            epoch: 1,
        }
    }

    /// Loads a tenant fixture: a directory (the `file` source's format: `users`,
    /// `servicePrincipals`, `groups` with typed members), optionally with the tenant's `tenantId`
    /// and its `apps` (which replace the default app registrations). JSON, or YAML when the file
    /// is named `.yaml` / `.yml`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        Tenant::parse(&text, yaml).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a tenant fixture (see [`Tenant::from_file`]).
    pub fn parse(text: &str, yaml: bool) -> Result<Self, String> {
        let mut v: serde_json::Value = if yaml {
            serde_norway::from_str(text).map_err(|e| format!("not YAML: {e}"))?
        } else {
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?
        };
        let Some(obj) = v.as_object_mut() else {
            return Err("a tenant fixture is a mapping of users, servicePrincipals, groups (and optionally tenantId, apps)".into());
        };
        let tenant_id = match obj.remove("tenantId") {
            None => None,
            Some(serde_json::Value::String(t)) if !t.is_empty() => Some(t),
            Some(_) => return Err("tenantId must be a non-empty string".into()),
        };
        let apps: Option<Vec<App>> = obj
            .remove("apps")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| format!("apps: {e}"))?;
        let dir: Directory =
            serde_json::from_value(v).map_err(|e| format!("not a directory: {e}"))?;
        let snap = Snapshot::try_from(dir).map_err(|e| e.to_string())?;
        // Graph has no dangling members: a fixture naming one has a typo.
        for g in snap.groups.values() {
            for m in &g.members {
                let known = match m.kind {
                    Kind::User => snap.users.contains_key(&*m.id),
                    Kind::ServicePrincipal => snap.service_principals.contains_key(&*m.id),
                    Kind::Group => snap.groups.contains_key(&*m.id),
                };
                if !known {
                    return Err(format!(
                        "group {:?} has a member {} {:?} that the fixture does not define",
                        g.display_name, m.kind, m.id
                    ));
                }
            }
        }
        let mut t = Tenant::new(snap);
        if let Some(id) = tenant_id {
            t.tenant_id = id;
        }
        if let Some(apps) = apps {
            t.apps = apps;
        }
        Ok(t)
    }

    /// The current sequence number (the number of changes so far).
    pub fn seq(&self) -> u64 {
        self.log.len() as u64
    }

    /// Changes after `seq`.
    pub fn events_since(&self, seq: u64) -> &[Event] {
        let start = usize::try_from(seq)
            .unwrap_or(usize::MAX)
            .min(self.log.len());
        &self.log[start..]
    }

    /// Whether a principal exists.
    pub fn contains(&self, kind: Kind, id: &str) -> bool {
        match kind {
            Kind::User => self.users.contains_key(id),
            Kind::ServicePrincipal => self.service_principals.contains_key(id),
            Kind::Group => self.groups.contains_key(id),
        }
    }

    /// Creates or replaces a user.
    pub fn upsert_user(&mut self, u: User) {
        self.log.push(Event::User(u.id.clone()));
        self.users.insert(u.id.clone(), u);
    }

    /// Creates or replaces a service principal.
    pub fn upsert_service_principal(&mut self, s: ServicePrincipal) {
        self.log.push(Event::ServicePrincipal(s.id.clone()));
        self.service_principals.insert(s.id.clone(), s);
    }

    /// Creates a group or changes its properties; an existing group keeps its members.
    pub fn upsert_group(&mut self, mut g: Group) {
        if let Some(old) = self.groups.get(&g.id) {
            g.members = old.members.clone();
        } else {
            let members = std::mem::take(&mut g.members);
            self.log.push(Event::Group(g.id.clone()));
            self.groups.insert(g.id.clone(), g.clone());
            for m in members {
                self.add_member(&g.id, m);
            }
            return;
        }
        self.log.push(Event::Group(g.id.clone()));
        self.groups.insert(g.id.clone(), g);
    }

    /// Deletes a principal, and its memberships.
    pub fn remove(&mut self, kind: Kind, id: &str) -> bool {
        let existed = match kind {
            Kind::User => self.users.remove(id).is_some(),
            Kind::ServicePrincipal => self.service_principals.remove(id).is_some(),
            Kind::Group => self.groups.remove(id).is_some(),
        };
        if !existed {
            return false;
        }
        let m = Member {
            kind,
            id: id.into(),
        };
        let holders: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.members.contains(&m))
            .map(|(gid, _)| gid.clone())
            .collect();
        for gid in holders {
            self.remove_member(&gid, &m);
        }
        self.log.push(match kind {
            Kind::User => Event::UserRemoved(id.to_owned()),
            Kind::ServicePrincipal => Event::ServicePrincipalRemoved(id.to_owned()),
            Kind::Group => Event::GroupRemoved(id.to_owned()),
        });
        true
    }

    /// Adds a member; false when the group does not exist or already has it.
    pub fn add_member(&mut self, group: &str, m: Member) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if !g.members.insert(m.clone()) {
            return false;
        }
        self.log.push(Event::MemberAdded(group.to_owned(), m));
        true
    }

    /// Removes a member; false when it was not there.
    pub fn remove_member(&mut self, group: &str, m: &Member) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if !g.members.remove(m) {
            return false;
        }
        self.log
            .push(Event::MemberRemoved(group.to_owned(), m.clone()));
        true
    }

    /// Invalidates every delta token handed out so far (as Graph does after 7 days).
    pub fn expire_delta_tokens(&mut self) {
        self.epoch += 1;
    }

    /// Transitive members of a group (cycle-safe), groups included.
    pub fn transitive_members(&self, group: &str) -> BTreeSet<Member> {
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::from([group.to_owned()]);
        let mut stack = vec![group.to_owned()];
        while let Some(g) = stack.pop() {
            let Some(grp) = self.groups.get(&g) else {
                continue;
            };
            for m in &grp.members {
                out.insert(m.clone());
                if m.kind == Kind::Group && seen.insert(m.id.to_string()) {
                    stack.push(m.id.to_string());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn yaml_and_json_fixtures_load_with_their_tenant_and_apps() {
        let t =
            Tenant::from_file(std::path::Path::new("../../examples/emulator/tenant.yaml")).unwrap();
        assert_eq!(t.tenant_id, "11111111-2222-3333-4444-555555555555");
        assert_eq!(t.apps.len(), 1);
        assert_eq!(t.apps[0].secrets, ["fixture-secret"]);
        assert_eq!(t.users.len(), 3);
        let g = t
            .groups
            .values()
            .find(|g| g.display_name == "O'Brien Équipe")
            .unwrap();
        assert!(g.members.contains(&Member::group("g-nested")));
        assert!(g.members.contains(&Member::service_principal("sp-1")));

        // The same directory as JSON, without tenantId and apps: the defaults.
        let json = serde_json::to_string(&Directory::from(Snapshot {
            users: t
                .users
                .iter()
                .map(|(k, u)| (k.clone(), std::sync::Arc::new(u.clone())))
                .collect(),
            service_principals: t.service_principals.clone(),
            groups: t.groups.clone(),
            incomplete_groups: Default::default(),
            edge_groups: Default::default(),
        }))
        .unwrap();
        let j = Tenant::parse(&json, false).unwrap();
        assert_eq!(j.tenant_id, DEFAULT_TENANT_ID);
        assert_eq!(j.groups, t.groups);
        assert_eq!(j.apps[0].client_id, DEFAULT_CLIENT_ID);
    }

    #[test]
    fn bad_fixtures_say_what_is_wrong() {
        let e = Tenant::parse("users: [", true).unwrap_err();
        assert!(e.starts_with("not YAML"), "{e}");
        let e = Tenant::parse("[]", false).unwrap_err();
        assert!(e.contains("mapping"), "{e}");
        let e = Tenant::parse("apps:\n  - clientId: a\n    secret: typo\n", true).unwrap_err();
        assert!(e.starts_with("apps:") && e.contains("secret"), "{e}");
        let e = Tenant::parse("userz: []\n", true).unwrap_err();
        assert!(e.contains("userz"), "{e}");
        let e = Tenant::parse(
            "groups:\n  - id: g\n    displayName: G\n    members: [{type: user, id: nobody}]\n",
            true,
        )
        .unwrap_err();
        assert!(e.contains("nobody"), "{e}");
    }

    #[test]
    fn changes_are_logged_and_removal_cleans_memberships() {
        let mut t = Tenant::new(Snapshot::default());
        t.upsert_user(user("a"));
        t.upsert_group(Group {
            id: "g".into(),
            display_name: "G".into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: [Member::user("a")].into(),
        });
        assert_eq!(t.seq(), 3, "user, group, member");
        assert!(t.remove(Kind::User, "a"));
        assert!(t.groups["g"].members.is_empty());
        assert_eq!(
            t.events_since(3),
            [
                Event::MemberRemoved("g".into(), Member::user("a")),
                Event::UserRemoved("a".into())
            ]
        );
    }
}
