//! From a source snapshot to the principals idsync wants in one target.

use crate::fnv::FnvMap as HashMap;
use crate::template::{Template, TemplateError};
use idsync_model::PerKind;
use idsync_model::{
    Capabilities, Desired, DesiredPrincipal, Group, HeldBack, Kind, Member, PKey, Principal,
    ServicePrincipal, Snapshot, SourceRef, User, UserType,
};
use std::collections::{BTreeMap, BTreeSet};

/// Variables a user template may use (besides any key of the user's `attributes`).
pub const USER_VARS: &[&str] = &[
    "id",
    "userName",
    "userPrincipalName",
    "mail",
    "displayName",
    "externalId",
];
/// Variables a service-principal template may use.
pub const SP_VARS: &[&str] = &["id", "appId", "applicationId", "displayName"];
/// Variables a group template may use.
pub const GROUP_VARS: &[&str] = &["id", "displayName", "description"];

/// How source principals become target principals, per target. Serialises with its templates as
/// text (the run's fingerprint of an agreement hashes it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mapping {
    /// The user's key (`userName` in SCIM, the user id in lakeFS).
    pub user_name: Template,
    /// The key for guests, when it differs (guests' UPNs are `x_corp#EXT#@...`).
    pub guest_user_name: Option<Template>,
    /// The user's display name.
    pub user_display_name: Template,
    /// The user's external id, if the target stores one.
    pub user_external_id: Option<Template>,
    /// The service principal's key.
    pub service_principal_key: Template,
    /// The service principal's display name.
    pub service_principal_display_name: Template,
    /// The service principal's external id, if the target stores one.
    pub service_principal_external_id: Option<Template>,
    /// The group's key (name).
    pub group_name: Template,
    /// The group's display name, when the key is not the name (lakeFS).
    pub group_display_name: Option<Template>,
    /// The group's external id.
    pub group_external_id: Option<Template>,
    /// The group's description.
    pub group_description: Option<Template>,
    /// Policies every group idsync manages should have (lakeFS default policies).
    pub group_policies: BTreeSet<String>,
}

fn user_var_ok(name: &str) -> bool {
    // Attribute names are free-form (LDAP, extension attributes), so any identifier is allowed for
    // users; a missing one renders as an error per user, which the plan reports.
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn parse_with(text: &str, vars: &'static [&'static str]) -> Result<Template, TemplateError> {
    Template::parse(text, |n| vars.contains(&n))
}

impl Mapping {
    /// Parses a user template.
    pub fn user_template(text: &str) -> Result<Template, TemplateError> {
        Template::parse(text, user_var_ok)
    }
    /// Parses a service-principal template.
    pub fn sp_template(text: &str) -> Result<Template, TemplateError> {
        parse_with(text, SP_VARS)
    }
    /// Parses a group template.
    pub fn group_template(text: &str) -> Result<Template, TemplateError> {
        parse_with(text, GROUP_VARS)
    }

    /// The defaults: users by userName (guests by mail), service principals by appId, groups by
    /// display name, the source id as external id.
    #[allow(clippy::expect_used)]
    pub fn defaults() -> Mapping {
        let u = |t: &str| Mapping::user_template(t).expect("built-in template");
        let s = |t: &str| Mapping::sp_template(t).expect("built-in template");
        let g = |t: &str| Mapping::group_template(t).expect("built-in template");
        Mapping {
            user_name: u("{userName}"),
            guest_user_name: Some(u("{mail}")),
            user_display_name: u("{displayName}"),
            user_external_id: Some(u("{id}")),
            service_principal_key: s("{appId}"),
            service_principal_display_name: s("{displayName}"),
            service_principal_external_id: Some(s("{id}")),
            group_name: g("{displayName}"),
            group_display_name: None,
            group_external_id: Some(g("{id}")),
            group_description: None,
            group_policies: BTreeSet::new(),
        }
    }
}

fn user_var<'a>(u: &'a User, name: &str) -> Option<&'a str> {
    match name {
        "id" => Some(&u.id),
        "userName" | "userPrincipalName" => Some(&u.user_name),
        "mail" => u.emails.first().map(String::as_str),
        "displayName" => Some(&u.display_name),
        "externalId" => u.external_id.as_deref(),
        other => u.attributes.get(other).map(String::as_str),
    }
}

fn sp_var<'a>(s: &'a ServicePrincipal, name: &str) -> Option<&'a str> {
    match name {
        "id" => Some(&s.id),
        "appId" | "applicationId" => Some(&s.app_id),
        "displayName" => Some(&s.display_name),
        _ => None,
    }
}

fn group_var<'a>(g: &'a Group, name: &str) -> Option<&'a str> {
    match name {
        "id" => Some(&g.id),
        "displayName" => Some(&g.display_name),
        "description" => g.description.as_deref(),
        _ => None,
    }
}

/// Renders an optional template; an empty value just leaves the attribute unset.
fn optional<'a>(t: &Option<Template>, lookup: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    t.as_ref().and_then(|t| t.render(lookup).ok())
}

struct Builder<'c, 's> {
    caps: &'c Capabilities,
    desired: Desired,
    /// Source id → key, per kind, borrowing the snapshot's ids (no allocation per member lookup).
    by_source: PerKind<HashMap<&'s str, PKey>>,
    /// The principals mapped, in the order they were, built into the ordered map at once (one
    /// sort, one bulk build): inserted one by one, the map's nodes are left part empty.
    principals: Vec<(PKey, DesiredPrincipal)>,
}

impl<'s> Builder<'_, 's> {
    fn add(
        &mut self,
        id: &'s str,
        source: SourceRef,
        principal: Principal,
        policies: BTreeSet<String>,
    ) {
        let key = self.caps.pkey(&principal);
        self.by_source.get_mut(source.kind).insert(id, key.clone());
        let dp = DesiredPrincipal {
            source,
            principal,
            policies,
        };
        self.principals.push((key, dp));
    }

    /// The principals mapped, into the desired state, but for keys more than one source
    /// principal maps to: returned with those principals, in the order they were mapped.
    fn principals(&mut self) -> BTreeMap<PKey, Vec<SourceRef>> {
        let mut all = std::mem::take(&mut self.principals);
        // Stable: the principals of one key stay in the order they were mapped.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dupes: BTreeMap<PKey, Vec<SourceRef>> = BTreeMap::new();
        let mut kept = Vec::with_capacity(all.len());
        let mut all = all.into_iter().peekable();
        while let Some((key, dp)) = all.next() {
            if all.peek().is_some_and(|(next, _)| *next == key) {
                let mut sources = vec![dp.source];
                while let Some((_, dp)) = all.next_if(|(next, _)| *next == key) {
                    sources.push(dp.source);
                }
                dupes.insert(key, sources);
            } else {
                kept.push((key, dp));
            }
        }
        self.desired.principals = kept.into_iter().collect();
        dupes
    }

    fn hold(&mut self, source: SourceRef, key: Option<PKey>, reason: String) {
        self.desired
            .held_back
            .insert(source, HeldBack { key, reason });
    }
}

/// Maps a snapshot to the desired target state. Principals whose templates cannot be rendered, and
/// principals that collide on one key, are held back (reported, never written, never treated as
/// gone). Members are kept direct; [`crate::plan`] flattens them for targets that do not nest.
pub fn map_snapshot(snapshot: &Snapshot, mapping: &Mapping, caps: &Capabilities) -> Desired {
    let mut b = Builder {
        caps,
        desired: Desired::default(),
        by_source: PerKind::default(),
        principals: Vec::with_capacity(
            snapshot.users.len()
                + snapshot.service_principals.len()
                + snapshot.groups.len()
                + snapshot.edge_groups.len(),
        ),
    };

    for u in snapshot.users.values() {
        let source = SourceRef {
            kind: Kind::User,
            id: u.id.clone(),
        };
        let key_t = match (u.user_type, &mapping.guest_user_name) {
            (UserType::Guest, Some(t)) => t,
            _ => &mapping.user_name,
        };
        let lookup = |n: &str| user_var(u, n);
        let key = match key_t.render(lookup) {
            Ok(k) => k,
            Err(e) => {
                b.hold(source, None, format!("user name template {key_t}: {e}"));
                continue;
            }
        };
        let p = Principal {
            kind: Kind::User,
            key,
            display_name: mapping.user_display_name.render(lookup).ok(),
            emails: u.emails.clone(),
            active: u.active,
            external_id: optional(&mapping.user_external_id, lookup),
            description: None,
        };
        b.add(&u.id, source, p, BTreeSet::new());
    }

    if caps.service_principals {
        for s in snapshot.service_principals.values() {
            let source = SourceRef {
                kind: Kind::ServicePrincipal,
                id: s.id.clone(),
            };
            let lookup = |n: &str| sp_var(s, n);
            let key = match mapping.service_principal_key.render(lookup) {
                Ok(k) => k,
                Err(e) => {
                    let t = &mapping.service_principal_key;
                    b.hold(
                        source,
                        None,
                        format!("service principal key template {t}: {e}"),
                    );
                    continue;
                }
            };
            let p = Principal {
                kind: Kind::ServicePrincipal,
                key,
                display_name: mapping.service_principal_display_name.render(lookup).ok(),
                emails: Vec::new(),
                active: s.active,
                external_id: optional(&mapping.service_principal_external_id, lookup),
                description: None,
            };
            b.add(&s.id, source, p, BTreeSet::new());
        }
    }

    for g in snapshot
        .groups
        .values()
        .chain(snapshot.edge_groups.values())
    {
        let source = SourceRef {
            kind: Kind::Group,
            id: g.id.clone(),
        };
        let lookup = |n: &str| group_var(g, n);
        let key = match mapping.group_name.render(lookup) {
            Ok(k) => k,
            Err(e) => {
                b.hold(
                    source,
                    None,
                    format!("group name template {}: {e}", mapping.group_name),
                );
                continue;
            }
        };
        let p = Principal {
            kind: Kind::Group,
            display_name: optional(&mapping.group_display_name, lookup),
            key,
            emails: Vec::new(),
            active: true,
            external_id: optional(&mapping.group_external_id, lookup),
            description: optional(&mapping.group_description, lookup),
        };
        let policies = if caps.group_policies {
            mapping.group_policies.clone()
        } else {
            BTreeSet::new()
        };
        b.add(&g.id, source, p, policies);
    }

    // Keys claimed by more than one source principal: hold all of them back.
    for (key, sources) in b.principals() {
        let names: Vec<String> = sources.iter().map(|s| s.id.clone()).collect();
        for s in sources {
            b.by_source.get_mut(s.kind).remove(s.id.as_str());
            let reason = format!(
                "{} source principals map to {key} (source ids {}); rename one in the source or change the mapping",
                names.len(),
                names.join(", ")
            );
            b.hold(s, Some(key.clone()), reason);
        }
    }

    for g in snapshot.groups.values() {
        let Some(gkey) = b.by_source.groups.get(g.id.as_str()).cloned() else {
            continue;
        };
        // Built into the set at once (one sort, one bulk build): inserted one by one, a set's
        // nodes are left part empty.
        let mut members = Vec::with_capacity(g.members.len());
        for Member { kind, id } in &g.members {
            match b.by_source.get(*kind).get(id.as_str()) {
                Some(k) => members.push(k.clone()),
                // Held back or unsupported: reported there.
                None if snapshot.contains(*kind, id)
                    || (*kind == Kind::Group && snapshot.edge_groups.contains_key(id.as_str())) => {
                }
                // A nested group the scope did not select (beyond the depth, not security).
                None if *kind == Kind::Group => b.desired.dangling_members += 1,
                // Selected groups bring their users and service principals along: one that is
                // not there is not in the source at all.
                None => b.desired.missing_members += 1,
            }
        }
        if snapshot.incomplete_groups.contains(&g.id) {
            b.desired.incomplete_groups.insert(gkey.clone());
        }
        b.desired
            .members
            .insert(gkey, members.into_iter().collect());
    }
    // Groups beyond the search depth: their members were never read, so none is added and none
    // removed.
    for g in snapshot.edge_groups.values() {
        if let Some(gkey) = b.by_source.groups.get(g.id.as_str()).cloned() {
            b.desired.edge_groups.insert(gkey.clone());
            b.desired.members.insert(gkey, BTreeSet::new());
        }
    }
    b.desired
}
