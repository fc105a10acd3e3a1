//! A deterministic tenant generator: the same parameters and seed always give the same directory.
//! Group sizes follow a power law (a few large groups, many small ones), as in real tenants; groups
//! nest to a chosen depth with a bounded fan-out.

use idsync_model::{Group, Member, ServicePrincipal, Snapshot, User, UserType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Params {
    /// Users (guests included).
    pub users: usize,
    /// Share of users that are guests, 0.0 to 1.0.
    pub guest_ratio: f64,
    /// Share of users that are disabled.
    pub disabled_ratio: f64,
    /// Service principals.
    pub service_principals: usize,
    /// Groups.
    pub groups: usize,
    /// Direct memberships in all (users and service principals; nesting comes on top).
    pub memberships: usize,
    /// Levels of nesting: 1 = no group in a group.
    pub nesting_depth: usize,
    /// Most child groups one group holds.
    pub fan_out: usize,
    /// Power-law exponent of group sizes (1.0 = Zipf).
    pub skew: f64,
    /// The seed.
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            users: 1000,
            guest_ratio: 0.05,
            disabled_ratio: 0.02,
            service_principals: 20,
            groups: 100,
            memberships: 10_000,
            nesting_depth: 3,
            fan_out: 4,
            skew: 1.0,
            seed: 42,
        }
    }
}

impl Params {
    /// The benchmark sizes of issue #7: `small` (1k users), `medium` (10k), `large` (100k users,
    /// 2k service principals, 10k groups, 1M memberships, nesting depth 3), and of issue #17:
    /// `xlarge` (1M users, 20k service principals, 100k groups, 10M memberships).
    pub fn preset(name: &str) -> Option<Params> {
        let p = match name {
            "small" => Params {
                users: 1_000,
                service_principals: 20,
                groups: 100,
                memberships: 10_000,
                ..Params::default()
            },
            "medium" => Params {
                users: 10_000,
                service_principals: 200,
                groups: 1_000,
                memberships: 100_000,
                ..Params::default()
            },
            "large" => Params {
                users: 100_000,
                service_principals: 2_000,
                groups: 10_000,
                memberships: 1_000_000,
                ..Params::default()
            },
            "xlarge" => Params {
                users: 1_000_000,
                service_principals: 20_000,
                groups: 100_000,
                memberships: 10_000_000,
                ..Params::default()
            },
            _ => return None,
        };
        Some(p)
    }
}

/// SplitMix64: small, fast, and good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A GUID-shaped id, unique per (kind tag, index).
fn guid(tag: u32, i: usize) -> String {
    format!(
        "{tag:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (i >> 48) & 0xffff,
        (i >> 36) & 0xfff,
        (i >> 24) & 0xfff,
        i & 0xff_ffff_ffff
    )
}

/// Generates a tenant.
pub fn generate(p: &Params) -> Snapshot {
    let mut rng = Rng::new(p.seed);
    let mut s = Snapshot::default();
    let mut user_ids = Vec::with_capacity(p.users);
    for i in 0..p.users {
        let id = guid(0x0000_0001, i);
        let guest = rng.unit() < p.guest_ratio;
        let (user_name, emails, user_type) = if guest {
            (
                format!("guest{i}_partner.example#EXT#@contoso.onmicrosoft.com"),
                vec![format!("guest{i}@partner.example")],
                UserType::Guest,
            )
        } else {
            (
                format!("user{i}@contoso.example"),
                vec![format!("user{i}@contoso.example")],
                UserType::Member,
            )
        };
        s.users.insert(
            id.clone(),
            std::sync::Arc::new(User {
                id: id.clone(),
                user_name,
                display_name: format!("User {i}"),
                emails,
                active: rng.unit() >= p.disabled_ratio,
                user_type,
                external_id: None,
                attributes: BTreeMap::new(),
            }),
        );
        user_ids.push(id);
    }
    let mut sp_ids = Vec::with_capacity(p.service_principals);
    for i in 0..p.service_principals {
        let id = guid(0x0000_0002, i);
        s.service_principals.insert(
            id.clone(),
            ServicePrincipal {
                id: id.clone(),
                app_id: guid(0x0000_0003, i),
                display_name: format!("app-{i}"),
                active: true,
            },
        );
        sp_ids.push(id);
    }

    // Power-law sizes, scaled to the membership total, each at least 1 and at most the population.
    let population = user_ids.len() + sp_ids.len();
    let weights: Vec<f64> = (0..p.groups)
        .map(|i| 1.0 / ((i + 1) as f64).powf(p.skew))
        .collect();
    let total: f64 = weights.iter().sum();
    let group_ids: Vec<String> = (0..p.groups).map(|i| guid(0x0000_0004, i)).collect();
    for (i, gid) in group_ids.iter().enumerate() {
        let want = ((p.memberships as f64) * weights[i] / total).round() as usize;
        let size = want.clamp(usize::from(population > 0), population);
        let mut members = BTreeSet::new();
        // Dense groups: walk a random stride through everyone; sparse ones: sample.
        if size * 2 > population {
            let start = rng.below(population);
            for k in 0..size {
                members.insert(pick(&user_ids, &sp_ids, (start + k) % population));
            }
        } else {
            while members.len() < size {
                members.insert(pick(&user_ids, &sp_ids, rng.below(population)));
            }
        }
        s.groups.insert(
            gid.clone(),
            Group {
                id: gid.clone(),
                display_name: format!("grp-{i:05}"),
                description: Some(format!("generated group {i}")),
                security_enabled: true,
                mail_enabled: false,
                members: members.into(),
            },
        );
    }

    // Nesting: a group at level l (0-based) may hold children at level l + 1, up to fan_out each.
    if p.nesting_depth > 1 && p.groups > 1 {
        let mut level = vec![0usize; p.groups];
        let mut children = vec![0usize; p.groups];
        for child in 1..p.groups {
            if rng.unit() < 0.5 {
                continue;
            }
            // A few tries to find a parent before `child` with room and depth left.
            for _ in 0..8 {
                let parent = rng.below(child);
                if level[parent] + 1 < p.nesting_depth && children[parent] < p.fan_out {
                    level[child] = level[parent] + 1;
                    children[parent] += 1;
                    if let Some(g) = s.groups.get_mut(&group_ids[parent]) {
                        g.members.insert(Member::group(group_ids[child].as_str()));
                    }
                    break;
                }
            }
        }
    }
    s
}

fn pick(users: &[String], sps: &[String], i: usize) -> Member {
    if i < users.len() {
        Member::user(users[i].as_str())
    } else {
        Member::service_principal(sps[i - users.len()].as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_sized_and_nested() {
        let p = Params::preset("small").unwrap();
        let a = generate(&p);
        let b = generate(&p);
        assert_eq!(a, b, "same seed, same tenant");
        assert_eq!(a.users.len(), 1000);
        assert_eq!(a.groups.len(), 100);
        let direct: usize = a
            .groups
            .values()
            .map(|g| {
                g.members
                    .iter()
                    .filter(|m| m.kind != idsync_model::Kind::Group)
                    .count()
            })
            .sum();
        assert!((9_000..=11_000).contains(&direct), "{direct}");
        assert!(a.users.values().any(|u| u.user_type == UserType::Guest));
        assert!(a.groups.values().any(|g| {
            g.members
                .iter()
                .any(|m| m.kind == idsync_model::Kind::Group)
        }));
        let sizes: Vec<usize> = a.groups.values().map(|g| g.members.len()).collect();
        assert!(
            sizes.iter().max() > Some(&(sizes.iter().sum::<usize>() / 10)),
            "power law: one group dominates"
        );
        let other = generate(&Params { seed: 7, ..p });
        assert_ne!(a, other);
    }
}
