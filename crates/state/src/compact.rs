//! The last applied snapshot as a base layer stores it (from head format 3): each group's members
//! as positions in the snapshot's own lists instead of one `{"type", "id"}` object each.
//!
//! Memberships are most of a snapshot: at 100k users and 1M memberships they were 66 of the 95 MB
//! of a base's JSON, every one a 36-character id written again for each group that holds it. Here
//! a group's members are three lists of positions (`u` in `users`, `s` in `servicePrincipals`, `g`
//! in `groups`), each in ascending order and written as the first position and then the steps
//! between them, so a member costs a few digits. A member that is not in the snapshot's lists (a
//! nested group beyond the search depth, a principal the scope left out) is written whole in
//! `other`. A base reads this form under `snapshot` and the older one (every member whole) under
//! `lastApplied`; a base written before head format 3 is read as it was.

use idsync_model::fnv::FnvMap;
use idsync_model::{Directory, Group, Id, Kind, Member, Members, ServicePrincipal, Snapshot, User};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};

/// Where each principal of a snapshot stands in its list, by kind.
struct Positions<'a> {
    users: FnvMap<&'a str, u32>,
    service_principals: FnvMap<&'a str, u32>,
    groups: FnvMap<&'a str, u32>,
}

impl<'a> Positions<'a> {
    fn of(s: &'a Snapshot) -> Self {
        fn index<V>(m: &BTreeMap<String, V>) -> FnvMap<&str, u32> {
            // A list longer than u32 positions is beyond any directory; its tail is written whole.
            m.keys()
                .zip(0..u32::MAX)
                .map(|(k, i)| (k.as_str(), i))
                .collect()
        }
        Positions {
            users: index(&s.users),
            service_principals: index(&s.service_principals),
            groups: index(&s.groups),
        }
    }

    fn get(&self, m: &Member) -> Option<u32> {
        let map = match m.kind {
            Kind::User => &self.users,
            Kind::ServicePrincipal => &self.service_principals,
            Kind::Group => &self.groups,
        };
        map.get(m.id.as_str()).copied()
    }
}

/// A snapshot written in the compact form, straight from its maps (no copy of it is made).
pub(crate) struct SnapshotOut<'a>(pub &'a Snapshot);

impl Serialize for SnapshotOut<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let at = Positions::of(s);
        let mut out = ser.serialize_struct("Snapshot", 5)?;
        out.serialize_field("users", &Values(&s.users))?;
        out.serialize_field("servicePrincipals", &Values(&s.service_principals))?;
        out.serialize_field("groups", &GroupsOut { s, at: &at })?;
        out.serialize_field("incompleteGroups", &s.incomplete_groups)?;
        out.serialize_field("edgeGroups", &Values(&s.edge_groups))?;
        out.end()
    }
}

/// A map's values as a list.
struct Values<'a, V>(&'a BTreeMap<String, V>);

impl<V: Serialize> Serialize for Values<'_, V> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.values())
    }
}

struct GroupsOut<'a> {
    s: &'a Snapshot,
    at: &'a Positions<'a>,
}

impl Serialize for GroupsOut<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.s.groups.values().map(|g| GroupOut {
            id: &g.id,
            display_name: &g.display_name,
            description: g.description.as_deref(),
            security_enabled: g.security_enabled,
            mail_enabled: g.mail_enabled,
            members: MembersOut::of(&g.members, self.at),
        }))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupOut<'a> {
    id: &'a str,
    display_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    security_enabled: bool,
    mail_enabled: bool,
    members: MembersOut<'a>,
}

#[derive(Serialize)]
struct MembersOut<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    u: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    s: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    g: Vec<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    other: Vec<&'a Member>,
}

impl<'a> MembersOut<'a> {
    fn of(ms: &'a Members, at: &Positions<'_>) -> Self {
        let mut out = MembersOut {
            u: Vec::new(),
            s: Vec::new(),
            g: Vec::new(),
            other: Vec::new(),
        };
        for kind in Kind::ALL {
            let mut steps = Vec::new();
            let mut last: Option<u32> = None;
            for m in ms.of_kind(kind) {
                match at.get(m) {
                    // Members are in id order, as the lists are: positions ascend.
                    Some(i) if last.is_none_or(|l| i > l) => {
                        steps.push(i - last.map_or(0, |l| l));
                        last = Some(i);
                    }
                    _ => out.other.push(m),
                }
            }
            match kind {
                Kind::User => out.u = steps,
                Kind::ServicePrincipal => out.s = steps,
                Kind::Group => out.g = steps,
            }
        }
        out
    }
}

/// A snapshot as a base of head format 3 holds it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SnapshotIn {
    #[serde(default)]
    users: Vec<User>,
    #[serde(default)]
    service_principals: Vec<ServicePrincipal>,
    #[serde(default)]
    groups: Vec<GroupIn>,
    #[serde(default)]
    incomplete_groups: BTreeSet<String>,
    #[serde(default)]
    edge_groups: Vec<Group>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GroupIn {
    id: String,
    display_name: String,
    #[serde(default)]
    description: Option<String>,
    security_enabled: bool,
    mail_enabled: bool,
    #[serde(default)]
    members: MembersIn,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersIn {
    #[serde(default)]
    u: Vec<u32>,
    #[serde(default)]
    s: Vec<u32>,
    #[serde(default)]
    g: Vec<u32>,
    #[serde(default)]
    other: Vec<Member>,
}

impl SnapshotIn {
    /// The snapshot, its members found at their positions; what is wrong (a position beyond its
    /// list, an id twice) said.
    pub(crate) fn into_snapshot(self) -> Result<Snapshot, String> {
        let SnapshotIn {
            users,
            service_principals,
            groups,
            incomplete_groups,
            edge_groups,
        } = self;
        let members: Vec<Members> = {
            // Each id once, shared by every member naming it.
            let ids = |kind: Kind| -> Vec<Id> {
                match kind {
                    Kind::User => users.iter().map(|u| Id::from(&u.id)).collect(),
                    Kind::ServicePrincipal => {
                        service_principals.iter().map(|s| Id::from(&s.id)).collect()
                    }
                    Kind::Group => groups.iter().map(|g| Id::from(&g.id)).collect(),
                }
            };
            let tables = Kind::ALL.map(|k| (k, ids(k)));
            groups
                .iter()
                .map(|g| {
                    let mut out: Vec<Member> = Vec::with_capacity(
                        g.members.u.len()
                            + g.members.s.len()
                            + g.members.g.len()
                            + g.members.other.len(),
                    );
                    for ((kind, table), steps) in
                        tables
                            .iter()
                            .zip([&g.members.u, &g.members.s, &g.members.g])
                    {
                        let mut at: u32 = 0;
                        for (n, step) in steps.iter().enumerate() {
                            at = if n == 0 {
                                *step
                            } else {
                                at.checked_add(*step)
                                    .ok_or("a member's position overflows")?
                            };
                            let id = table.get(at as usize).ok_or_else(|| {
                                format!("group {:?} names {kind} {at} of {}", g.id, table.len())
                            })?;
                            out.push(Member {
                                kind: *kind,
                                id: id.clone(),
                            });
                        }
                    }
                    out.extend(g.members.other.iter().cloned());
                    Ok(out.into_iter().collect())
                })
                .collect::<Result<_, String>>()?
        };
        let groups = groups
            .into_iter()
            .zip(members)
            .map(|(g, members)| Group {
                id: g.id,
                display_name: g.display_name,
                description: g.description,
                security_enabled: g.security_enabled,
                mail_enabled: g.mail_enabled,
                members,
            })
            .collect();
        Snapshot::try_from(Directory {
            users,
            service_principals,
            groups,
            incomplete_groups,
            edge_groups,
        })
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::UserType;

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            user_name: format!("{id}@example.com"),
            display_name: format!("Ünïcode \"{id}\""),
            emails: vec![],
            active: true,
            user_type: UserType::Member,
            external_id: None,
            attributes: BTreeMap::new(),
        }
    }

    fn group(id: &str, members: impl IntoIterator<Item = Member>) -> Group {
        Group {
            id: id.into(),
            display_name: format!("group {id}"),
            description: (id == "g2").then(|| "with a description".into()),
            security_enabled: id != "g3",
            mail_enabled: id == "g3",
            members: members.into_iter().collect(),
        }
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        for id in ["u1", "u2", "u3", "u4"] {
            s.users.insert(id.into(), std::sync::Arc::new(user(id)));
        }
        s.service_principals.insert(
            "sp1".into(),
            ServicePrincipal {
                id: "sp1".into(),
                app_id: "app".into(),
                display_name: "robot".into(),
                active: true,
            },
        );
        for g in [
            group(
                "g1",
                [
                    Member::user("u1"),
                    Member::user("u4"),
                    Member::service_principal("sp1"),
                    Member::group("g2"),
                    // Not in the snapshot's lists: written whole.
                    Member::group("beyond"),
                    Member::user("left-out"),
                ],
            ),
            group("g2", [Member::user("u2"), Member::user("u3")]),
            group("g3", []),
        ] {
            s.groups.insert(g.id.clone(), g);
        }
        s.incomplete_groups.insert("g2".into());
        s.edge_groups.insert("beyond".into(), group("beyond", []));
        s
    }

    #[test]
    fn a_snapshot_reads_back_as_it_was_written() {
        let s = snapshot();
        let json = serde_json::to_string(&SnapshotOut(&s)).unwrap();
        assert!(
            json.contains(r#""members":{"u":[0,3],"s":[0],"g":[1],"other":[{"type":"user","id":"left-out"},{"type":"group","id":"beyond"}]}"#),
            "{json}"
        );
        assert!(json.contains(r#""members":{"u":[1,1]}"#), "{json}");
        assert!(json.contains(r#""members":{}"#), "{json}");
        let back: SnapshotIn = serde_json::from_str(&json).unwrap();
        let back = back.into_snapshot().unwrap();
        assert_eq!(back, s);
        // A member names the id its principal's other memberships name.
        let mut s2 = s.clone();
        s2.groups
            .get_mut("g2")
            .unwrap()
            .members
            .insert(Member::user("u1"));
        let json = serde_json::to_string(&SnapshotOut(&s2)).unwrap();
        let back: Snapshot = serde_json::from_str::<SnapshotIn>(&json)
            .unwrap()
            .into_snapshot()
            .unwrap();
        let u1 = |g: &str| {
            let m = back.groups[g].members.iter().find(|m| m.id == "u1");
            m.unwrap().id.clone()
        };
        assert!(u1("g1").shares(&u1("g2")));
        let empty = serde_json::to_string(&SnapshotOut(&Snapshot::default())).unwrap();
        let back: SnapshotIn = serde_json::from_str(&empty).unwrap();
        assert_eq!(back.into_snapshot().unwrap(), Snapshot::default());
    }

    #[test]
    fn a_position_beyond_its_list_or_an_id_twice_is_refused() {
        let s = snapshot();
        let json = serde_json::to_string(&SnapshotOut(&s)).unwrap();
        let beyond = json.replace(r#""u":[1,1]"#, r#""u":[1,3]"#);
        let err = serde_json::from_str::<SnapshotIn>(&beyond)
            .unwrap()
            .into_snapshot()
            .unwrap_err();
        assert_eq!(err, r#"group "g2" names user 4 of 4"#);
        let overflow = json.replace(r#""u":[1,1]"#, r#""u":[1,4294967295]"#);
        let err = serde_json::from_str::<SnapshotIn>(&overflow)
            .unwrap()
            .into_snapshot()
            .unwrap_err();
        assert_eq!(err, "a member's position overflows");
        let twice = json.replace(r#""id":"u2""#, r#""id":"u1""#);
        let err = serde_json::from_str::<SnapshotIn>(&twice)
            .unwrap()
            .into_snapshot()
            .unwrap_err();
        assert!(err.contains(r#"duplicate user id "u1""#), "{err}");
        let unknown = json.replace(r#""u":[1,1]"#, r#""u":[1,1],"x":[]"#);
        assert!(serde_json::from_str::<SnapshotIn>(&unknown).is_err());
    }
}
