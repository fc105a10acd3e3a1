//! Which part of a directory an agreement syncs: selected groups, their nested groups down to a
//! search depth, and the users and service principals they reach. Pure: sources that read a whole
//! directory (a file, LDAP) select with [`select`]; sources with server-side queries (Graph) apply
//! the same rules in their requests.

use crate::fnv::FnvSet;
use idsync_model::{Kind, Snapshot};
use std::collections::{BTreeMap, BTreeSet};

/// The selection rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Groups selected by display name (the `groups_to_sync.json` list).
    pub group_names: BTreeSet<String>,
    /// Groups selected by source id.
    pub group_ids: BTreeSet<String>,
    /// Groups selected by an fnmatch pattern on the display name (`GROUP_FILTER`).
    pub group_filter: Option<String>,
    /// Groups selected by a regular expression on the display name (found anywhere in it unless
    /// anchored with `^...$`).
    pub group_regex: Option<NameRegex>,
    /// 1 = only the selected groups; 2 = also groups nested directly in them; and so on.
    pub search_depth: u32,
    /// Also sync groups that are not security-enabled (distribution lists, Microsoft 365 groups).
    pub include_non_security: bool,
    /// Sync every user of the directory, not only those reached through memberships.
    pub all_users: bool,
    /// What becomes of groups nested one level beyond the search depth.
    pub edge_groups: EdgeGroups,
}

/// What becomes of a group nested in a group at the search depth (one level beyond it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EdgeGroups {
    /// Left out, and so is its membership in the group at the edge: no group appears in the
    /// target without its members.
    #[default]
    Omit,
    /// Synced without members and nested in the group at the edge, as the Databricks script does;
    /// idsync adds no member to it and removes none (it never read them).
    Empty,
}

impl EdgeGroups {
    /// The setting's value in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeGroups::Omit => "omit",
            EdgeGroups::Empty => "empty",
        }
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            group_names: BTreeSet::new(),
            group_ids: BTreeSet::new(),
            group_filter: None,
            group_regex: None,
            search_depth: 1,
            include_non_security: false,
            all_users: false,
            edge_groups: EdgeGroups::Omit,
        }
    }
}

impl Scope {
    /// A digest of every selection rule: a change feed's cursors hold what changed within the
    /// scope they were read under, so a run under another scope reads the whole scope again.
    pub fn fingerprint(&self) -> String {
        use std::hash::Hasher;
        let mut h = crate::fnv::Fnv::default();
        h.write(format!("{self:?}").as_bytes());
        format!("{:016x}", h.finish())
    }

    /// True when no selector is set: every group is selected.
    pub fn selects_all(&self) -> bool {
        self.group_names.is_empty()
            && self.group_ids.is_empty()
            && self.group_filter.is_none()
            && self.group_regex.is_none()
    }

    /// True when a pattern (fnmatch or regex) selects groups by name: a source must list groups
    /// to find them.
    pub fn has_name_pattern(&self) -> bool {
        self.group_filter.is_some() || self.group_regex.is_some()
    }

    /// True when the group is selected directly: every group when no selector is set, else by
    /// name, id, fnmatch pattern or regex.
    pub fn selects(&self, id: &str, name: &str) -> bool {
        self.selects_all()
            || self.group_names.contains(name)
            || self.group_ids.contains(id)
            || self
                .group_filter
                .as_deref()
                .is_some_and(|p| fnmatch(p, name))
            || self
                .group_regex
                .as_ref()
                .is_some_and(|r| r.0.is_match(name))
    }
}

/// A compiled regular expression on group names, compared by its pattern.
#[derive(Clone, Debug)]
pub struct NameRegex(regex::Regex);

impl NameRegex {
    /// Compiles `pattern` (Rust `regex` syntax, close to Python's `re`); the error says where it
    /// is wrong.
    pub fn new(pattern: &str) -> Result<Self, String> {
        regex::Regex::new(pattern)
            .map(NameRegex)
            .map_err(|e| e.to_string())
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for NameRegex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for NameRegex {}

/// The result of a selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// The scoped snapshot.
    pub snapshot: Snapshot,
    /// The search depth at which each selected group was found (1 = selected directly).
    pub depth: BTreeMap<String, u32>,
    /// Names and ids asked for that the directory does not have, and other remarks.
    pub notes: Vec<String>,
}

/// The search depth of each group the scope reaches in `dir` (1 = selected directly), and the
/// notes about names and ids not found: the first half of [`select`], without copying anything.
pub fn depths(dir: &Snapshot, scope: &Scope) -> (BTreeMap<String, u32>, Vec<String>) {
    let mut notes = Vec::new();
    let eligible = |g: &idsync_model::Group| g.security_enabled || scope.include_non_security;
    let mut depth: BTreeMap<String, u32> = BTreeMap::new();
    let mut found_names: BTreeSet<&str> = BTreeSet::new();
    for g in dir.groups.values() {
        if scope.group_names.contains(&g.display_name) {
            found_names.insert(&g.display_name);
        }
        let hit = scope.selects(&g.id, &g.display_name);
        if hit && eligible(g) {
            depth.insert(g.id.clone(), 1);
        } else if hit {
            notes.push(format!(
                "group {:?} is not security-enabled and is skipped (set include_non_security = true to sync it)",
                g.display_name
            ));
        }
    }
    for n in &scope.group_names {
        if !found_names.contains(n.as_str()) {
            notes.push(format!(
                "group {n:?} was asked for but does not exist in the source"
            ));
        }
    }
    for id in &scope.group_ids {
        if !dir.groups.contains_key(id) {
            notes.push(format!(
                "group id {id} was asked for but does not exist in the source"
            ));
        }
    }

    let mut frontier: Vec<String> = depth.keys().cloned().collect();
    for level in 2..=scope.search_depth {
        let mut next = Vec::new();
        for gid in &frontier {
            let Some(g) = dir.groups.get(gid) else {
                continue;
            };
            for m in g.members.groups() {
                if let Some(child) = dir.groups.get(&*m.id)
                    && eligible(child)
                    && !depth.contains_key(&*m.id)
                {
                    depth.insert(m.id.to_string(), level);
                    next.push(m.id.to_string());
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }

    (depth, notes)
}

/// Selects the scope from a whole directory.
pub fn select(dir: &Snapshot, scope: &Scope) -> Selection {
    let (depth, mut notes) = depths(dir, scope);
    let mut out = Snapshot::default();
    let (users, sps) = reached(dir, &depth, scope.all_users);
    for gid in depth.keys() {
        if let Some(g) = dir.groups.get(gid) {
            out.groups.insert(gid.clone(), g.clone());
            if dir.incomplete_groups.contains(gid) {
                out.incomplete_groups.insert(gid.clone());
            }
        }
    }
    for u in dir.users.values() {
        if scope.all_users || users.contains(u.id.as_str()) {
            out.users.insert(u.id.clone(), u.clone());
        }
    }
    for s in dir.service_principals.values() {
        if sps.contains(s.id.as_str()) {
            out.service_principals.insert(s.id.clone(), s.clone());
        }
    }
    if scope.edge_groups == EdgeGroups::Empty {
        out.edge_groups = edges(dir, &depth, scope);
    }
    notes.extend(cycle_notes(&out));
    Selection {
        snapshot: out,
        depth,
        notes,
    }
}

/// The ids of the users and service principals the groups in `depth` hold directly (hashed: at
/// 1M memberships an ordered set spent most of a selection comparing ids).
///
/// Under `all_users` the scope keeps every user whatever holds it: the users are not collected,
/// and only the service principals among the members are read.
fn reached<'a>(
    dir: &'a Snapshot,
    depth: &BTreeMap<String, u32>,
    all_users: bool,
) -> (FnvSet<&'a str>, FnvSet<&'a str>) {
    let (mut users, mut sps) = (FnvSet::default(), FnvSet::default());
    for g in depth.keys().filter_map(|gid| dir.groups.get(gid)) {
        if !all_users {
            users.extend(g.members.of_kind(Kind::User).map(|m| m.id.as_str()));
        }
        sps.extend(
            g.members
                .of_kind(Kind::ServicePrincipal)
                .map(|m| m.id.as_str()),
        );
    }
    (users, sps)
}

/// [`select`] of a directory this run owns: what the scope does not reach is dropped and the
/// rest kept where it is, not copied (a fold's snapshot, as big as the tenant).
pub fn select_owned(mut dir: Snapshot, scope: &Scope) -> Selection {
    let (depth, mut notes) = depths(&dir, scope);
    let edge_groups = if scope.edge_groups == EdgeGroups::Empty {
        edges(&dir, &depth, scope)
    } else {
        BTreeMap::new()
    };
    // Decided while the groups are there to say it, applied once they may be borrowed no more.
    let (keep_users, keep_sps): (Vec<bool>, Vec<bool>) = {
        let (users, sps) = reached(&dir, &depth, scope.all_users);
        (
            if scope.all_users {
                Vec::new()
            } else {
                dir.users
                    .keys()
                    .map(|id| users.contains(id.as_str()))
                    .collect()
            },
            dir.service_principals
                .keys()
                .map(|id| sps.contains(id.as_str()))
                .collect(),
        )
    };
    // `retain` visits in ascending key order, the order the flags were drawn in.
    if !scope.all_users {
        let mut keep = keep_users.into_iter();
        dir.users.retain(|_, _| keep.next().unwrap_or(false));
    }
    let mut keep = keep_sps.into_iter();
    dir.service_principals
        .retain(|_, _| keep.next().unwrap_or(false));
    dir.groups.retain(|gid, _| depth.contains_key(gid));
    dir.incomplete_groups.retain(|gid| depth.contains_key(gid));
    dir.edge_groups = edge_groups;
    notes.extend(cycle_notes(&dir));
    Selection {
        snapshot: dir,
        depth,
        notes,
    }
}

/// The groups nested in a group at the search depth that the scope does not reach, without
/// their members: what `edge_groups = "empty"` syncs. Their attributes come from `dir`'s groups,
/// or from its own edge groups (a folded snapshot holds only those of the scope).
pub fn edges(
    dir: &Snapshot,
    depth: &BTreeMap<String, u32>,
    scope: &Scope,
) -> BTreeMap<String, idsync_model::Group> {
    let mut out = BTreeMap::new();
    for (gid, &d) in depth {
        if d != scope.search_depth {
            continue;
        }
        let Some(g) = dir.groups.get(gid) else {
            continue;
        };
        for m in g.members.groups() {
            if depth.contains_key(&*m.id) || out.contains_key(&*m.id) {
                continue;
            }
            let Some(child) = dir
                .groups
                .get(&*m.id)
                .or_else(|| dir.edge_groups.get(&*m.id))
            else {
                continue;
            };
            if child.security_enabled || scope.include_non_security {
                out.insert(m.id.to_string(), without_members(child));
            }
        }
    }
    out
}

/// A group's attributes, without its members.
pub fn without_members(g: &idsync_model::Group) -> idsync_model::Group {
    idsync_model::Group {
        id: g.id.clone(),
        display_name: g.display_name.clone(),
        description: g.description.clone(),
        security_enabled: g.security_enabled,
        mail_enabled: g.mail_enabled,
        members: Default::default(),
    }
}

/// Notes on the nesting cycles among the snapshot's groups (groups that contain each other,
/// directly or through others): each is synced once, and flattening stops at the cycle. One note
/// per cycle, naming its groups in order of name.
pub fn cycle_notes(s: &Snapshot) -> Vec<String> {
    // Tarjan's strongly connected components, iterative (no recursion on deep nesting).
    let ids: Vec<&str> = s.groups.keys().map(String::as_str).collect();
    let index_of: BTreeMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let edges: Vec<Vec<usize>> = s
        .groups
        .values()
        .map(|g| {
            g.members
                .groups()
                .filter_map(|m| index_of.get(m.id.as_str()).copied())
                .collect()
        })
        .collect();
    let n = ids.len();
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut stack, mut next_index, mut notes) = (Vec::new(), 0usize, Vec::new());
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        // (node, next edge to look at)
        let mut work = vec![(start, 0usize)];
        index[start] = next_index;
        low[start] = next_index;
        next_index += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut e)) = work.last_mut() {
            if let Some(&w) = edges[v].get(*e) {
                *e += 1;
                if index[w] == usize::MAX {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 || edges[v].contains(&v) {
                    let mut names: Vec<&str> = component
                        .iter()
                        .map(|&i| s.groups[ids[i]].display_name.as_str())
                        .collect();
                    names.sort_unstable();
                    notes.push(if component.len() == 1 {
                        format!("group {:?} contains itself; it is synced once", names[0])
                    } else {
                        format!(
                            "groups {} nest each other in a cycle; each is synced once",
                            names
                                .iter()
                                .map(|n| format!("{n:?}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
            }
        }
    }
    notes.sort();
    notes
}

/// Shell-style matching as Python's `fnmatch.fnmatchcase`: `*`, `?`, `[abc]`, `[a-z]`, `[!abc]`.
pub fn fnmatch(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last '*': linear in practice, no recursion.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        // An unterminated '[' is a literal.
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`. Returns (matched, index after
/// the class), or None when the class is not terminated.
fn class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = i < p.len() && p[i] == '!';
    if negate {
        i += 1;
    }
    let first = i;
    let mut matched = false;
    while i < p.len() {
        if p[i] == ']' && i > first {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Directory, Group, Member, User};

    #[test]
    fn fnmatch_matches_like_python() {
        for (p, t, want) in [
            ("LakeFSProject*", "LakeFSProject-a", true),
            ("LakeFSProject*", "lakefsproject-a", false),
            ("team??-eng", "team01-eng", true),
            ("team??-eng", "team1-eng", false),
            ("team[0-9]*", "team7x", true),
            ("team[!0-9]*", "team7x", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("[", "[", true),
            ("O'Brien*", "O'Brien's team", true),
            ("Équipe*", "Équipe données", true),
        ] {
            assert_eq!(fnmatch(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn cycles_are_named_once_each_and_deep_chains_do_not_overflow() {
        let g = |id: &str, members: &[&str]| Group {
            id: id.into(),
            display_name: id.to_uppercase(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: members.iter().map(|m| Member::group(*m)).collect(),
        };
        let mut s = Snapshot::default();
        for grp in [
            g("a", &["b"]),
            g("b", &["c"]),
            g("c", &["a", "d"]),
            g("d", &[]),
            g("self", &["self"]),
            g("x", &["y"]),
            g("y", &["x", "a"]),
        ] {
            s.groups.insert(grp.id.clone(), grp);
        }
        assert_eq!(
            cycle_notes(&s),
            [
                "group \"SELF\" contains itself; it is synced once",
                "groups \"A\", \"B\", \"C\" nest each other in a cycle; each is synced once",
                "groups \"X\", \"Y\" nest each other in a cycle; each is synced once",
            ]
        );
        // A chain 100,000 deep and closed into one cycle: no recursion, one note.
        let mut chain = Snapshot::default();
        let n = 100_000;
        for i in 0..n {
            let next = format!("g{}", (i + 1) % n);
            let grp = g(&format!("g{i}"), &[next.as_str()]);
            chain.groups.insert(grp.id.clone(), grp);
        }
        assert_eq!(cycle_notes(&chain).len(), 1);
        chain.groups.get_mut("g0").unwrap().members.clear();
        assert!(cycle_notes(&chain).is_empty());
    }

    /// `select_owned` keeps what `select` copies: the same selection, for every setting that
    /// changes what is kept.
    #[test]
    fn selecting_an_owned_directory_equals_selecting_a_borrowed_one() {
        let g = |id: &str, security: bool, members: Vec<Member>| Group {
            id: id.into(),
            display_name: id.to_uppercase(),
            description: None,
            security_enabled: security,
            mail_enabled: false,
            members: members.into_iter().collect(),
        };
        let mut d = Snapshot::default();
        for i in 0..8 {
            let id = format!("u{i}");
            d.users.insert(
                id.clone(),
                std::sync::Arc::new(User {
                    id: id.clone(),
                    user_name: format!("{id}@x"),
                    display_name: id.clone(),
                    emails: vec![],
                    active: true,
                    user_type: Default::default(),
                    external_id: None,
                    attributes: Default::default(),
                }),
            );
        }
        d.service_principals.insert(
            "s1".into(),
            idsync_model::ServicePrincipal {
                id: "s1".into(),
                app_id: "a1".into(),
                display_name: "S1".into(),
                active: true,
            },
        );
        for grp in [
            g(
                "top",
                true,
                vec![
                    Member::user("u1"),
                    Member::group("mid"),
                    Member::service_principal("s1"),
                ],
            ),
            g("mid", true, vec![Member::user("u2"), Member::group("deep")]),
            g("deep", true, vec![Member::user("u3"), Member::group("top")]),
            g("dist", false, vec![Member::user("u4")]),
            g("other", true, vec![Member::user("u5")]),
        ] {
            d.groups.insert(grp.id.clone(), grp);
        }
        d.incomplete_groups.insert("mid".into());
        d.incomplete_groups.insert("other".into());
        for depth in 1..=3 {
            for edge_groups in [EdgeGroups::Omit, EdgeGroups::Empty] {
                for (names, all_users, include_non_security) in [
                    (vec!["TOP"], false, false),
                    (vec!["TOP", "DIST"], false, true),
                    (vec!["MID", "NOPE"], true, false),
                    (vec![], false, false),
                ] {
                    let scope = Scope {
                        group_names: names.iter().map(|n| n.to_string()).collect(),
                        search_depth: depth,
                        edge_groups,
                        all_users,
                        include_non_security,
                        ..Scope::default()
                    };
                    assert_eq!(
                        select_owned(d.clone(), &scope),
                        select(&d, &scope),
                        "{scope:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_regex_selects_by_name() {
        let scope = Scope {
            group_regex: Some(NameRegex::new("^team-(a|b)$").unwrap()),
            ..Scope::default()
        };
        assert!(!scope.selects_all() && scope.has_name_pattern());
        assert!(scope.selects("1", "team-a") && !scope.selects("2", "team-ab"));
        assert!(NameRegex::new("team-(").is_err());
    }

    fn dir() -> Snapshot {
        let g = |id: &str, members: Vec<Member>| Group {
            id: id.into(),
            display_name: id.to_uppercase(),
            description: None,
            security_enabled: id != "dl",
            mail_enabled: id == "dl",
            members: members.into_iter().collect(),
        };
        let u = |id: &str| User {
            id: id.into(),
            user_name: format!("{id}@x"),
            display_name: id.into(),
            emails: vec![],
            active: true,
            user_type: Default::default(),
            external_id: None,
            attributes: Default::default(),
        };
        Directory {
            users: vec![u("a"), u("b"), u("c"), u("loner")],
            service_principals: vec![],
            groups: vec![
                g("top", vec![Member::user("a"), Member::group("mid")]),
                g("mid", vec![Member::user("b"), Member::group("low")]),
                g("low", vec![Member::user("c"), Member::group("top")]),
                g("dl", vec![Member::user("loner")]),
            ],
            incomplete_groups: Default::default(),
            edge_groups: Default::default(),
        }
        .try_into()
        .unwrap()
    }

    #[test]
    fn search_depth_walks_nested_groups_through_cycles() {
        let d = dir();
        let mut s = Scope {
            group_names: ["TOP".to_string()].into(),
            ..Scope::default()
        };
        let ids = |sel: &Selection| sel.snapshot.users.keys().cloned().collect::<Vec<_>>();
        let sel = select(&d, &s);
        assert_eq!(sel.depth, BTreeMap::from([("top".into(), 1)]));
        assert_eq!(ids(&sel), ["a"]);
        s.search_depth = 2;
        let sel = select(&d, &s);
        assert_eq!(
            sel.depth,
            BTreeMap::from([("top".into(), 1), ("mid".into(), 2)])
        );
        assert_eq!(ids(&sel), ["a", "b"]);
        s.search_depth = 10;
        let sel = select(&d, &s);
        assert_eq!(sel.depth.len(), 3);
        assert_eq!(ids(&sel), ["a", "b", "c"]);
    }

    #[test]
    fn edge_groups_empty_keeps_the_groups_one_level_beyond_the_depth_without_members() {
        let mut d = dir();
        d.groups
            .get_mut("mid")
            .unwrap()
            .members
            .insert(Member::group("dl"));
        let s = Scope {
            group_names: ["TOP".to_string()].into(),
            search_depth: 2,
            ..Scope::default()
        };
        // Omitted by default: "low" is beyond the depth.
        assert!(select(&d, &s).snapshot.edge_groups.is_empty());
        let empty = Scope {
            edge_groups: EdgeGroups::Empty,
            ..s.clone()
        };
        let sel = select(&d, &empty);
        // "low" is kept without its members (c and the cycle back to top); "dl" is not a security
        // group, so it stays out as it would within the depth.
        assert_eq!(sel.snapshot.edge_groups.keys().collect::<Vec<_>>(), ["low"]);
        assert!(sel.snapshot.edge_groups["low"].members.is_empty());
        assert_eq!(sel.depth, select(&d, &s).depth, "the depths do not change");
        assert_eq!(
            sel.snapshot.users.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "no user of an edge group"
        );
        // "top" is reached within the depth, so it is never an edge group, even though "low"
        // nests it; with the whole cycle in scope there is no edge at all.
        let deep = Scope {
            search_depth: 3,
            ..empty.clone()
        };
        assert!(select(&d, &deep).snapshot.edge_groups.is_empty());
        let with_dl = Scope {
            include_non_security: true,
            ..empty
        };
        assert_eq!(
            select(&d, &with_dl)
                .snapshot
                .edge_groups
                .keys()
                .collect::<Vec<_>>(),
            ["dl", "low"]
        );
        // A snapshot round-trips through its serialised form with its edge groups.
        let back: Snapshot =
            serde_json::from_str(&serde_json::to_string(&sel.snapshot).unwrap()).unwrap();
        assert_eq!(back, sel.snapshot);
    }

    #[test]
    fn non_security_groups_and_missing_names_are_reported() {
        let d = dir();
        let s = Scope {
            group_names: ["DL".to_string(), "NOPE".to_string()].into(),
            ..Scope::default()
        };
        let sel = select(&d, &s);
        assert!(sel.snapshot.groups.is_empty());
        assert_eq!(sel.notes.len(), 2, "{:?}", sel.notes);
        let s = Scope {
            include_non_security: true,
            ..s
        };
        assert_eq!(
            select(&d, &s).snapshot.users.keys().collect::<Vec<_>>(),
            ["loner"]
        );
    }

    #[test]
    fn all_users_and_select_all() {
        let d = dir();
        let s = Scope {
            all_users: true,
            ..Scope::default()
        };
        let sel = select(&d, &s);
        assert_eq!(sel.snapshot.groups.len(), 3);
        assert_eq!(sel.snapshot.users.len(), 4);
    }
}
