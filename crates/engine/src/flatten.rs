//! Flattening nested groups for targets that do not nest: every group gets its transitive non-group
//! members. Cycles (A ∋ B ∋ A) are safe: each group's walk visits every group at most once.

use idsync_model::{Kind, PKey};
use std::collections::{BTreeMap, BTreeSet};

/// Transitive members of every group, groups excluded. `direct` maps a group to its direct members;
/// nested groups missing from `direct` contribute nothing.
pub fn flatten(direct: &BTreeMap<PKey, BTreeSet<PKey>>) -> BTreeMap<PKey, BTreeSet<PKey>> {
    let mut memo: BTreeMap<&PKey, BTreeSet<PKey>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for root in direct.keys() {
        let members = transitive(root, direct, &mut memo);
        out.insert(root.clone(), members);
    }
    out
}

/// The leaves reachable from `root`. Results of groups that are not on a cycle with anything still
/// being walked are memoised, so a group shared by many parents is expanded once.
fn transitive<'a>(
    root: &'a PKey,
    direct: &'a BTreeMap<PKey, BTreeSet<PKey>>,
    memo: &mut BTreeMap<&'a PKey, BTreeSet<PKey>>,
) -> BTreeSet<PKey> {
    if let Some(m) = memo.get(root) {
        return m.clone();
    }
    let mut leaves = BTreeSet::new();
    let mut seen: BTreeSet<&PKey> = BTreeSet::from([root]);
    let mut stack: Vec<&PKey> = vec![root];
    while let Some(g) = stack.pop() {
        let Some(ms) = direct.get(g) else { continue };
        for m in ms {
            if m.kind != Kind::Group {
                leaves.insert(m.clone());
            } else if let Some(done) = memo.get(m) {
                leaves.extend(done.iter().cloned());
            } else if seen.insert(m) {
                stack.push(m);
            }
        }
    }
    memo.insert(root, leaves.clone());
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(k: &str) -> PKey {
        PKey::new(Kind::Group, k)
    }
    fn u(k: &str) -> PKey {
        PKey::new(Kind::User, k)
    }

    #[test]
    fn nested_and_cyclic_groups_flatten_to_their_leaves() {
        let direct = BTreeMap::from([
            (g("a"), BTreeSet::from([u("1"), g("b")])),
            (g("b"), BTreeSet::from([u("2"), g("c")])),
            (g("c"), BTreeSet::from([u("3"), g("a")])), // cycle a → b → c → a
            (g("d"), BTreeSet::from([g("missing"), u("4")])),
        ]);
        let flat = flatten(&direct);
        let all = BTreeSet::from([u("1"), u("2"), u("3")]);
        assert_eq!(flat[&g("a")], all);
        assert_eq!(flat[&g("b")], all);
        assert_eq!(flat[&g("c")], all);
        assert_eq!(flat[&g("d")], BTreeSet::from([u("4")]));
    }

    #[test]
    fn self_membership_terminates() {
        let direct = BTreeMap::from([(g("a"), BTreeSet::from([g("a"), u("1")]))]);
        assert_eq!(flatten(&direct)[&g("a")], BTreeSet::from([u("1")]));
    }
}
