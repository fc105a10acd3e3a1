//! The order an apply runs one batch of operations in: each starts as soon as what it depends on
//! has finished, not when a whole phase has (issue #17 item 4).
//!
//! Creates, policy changes and member changes form one batch. Within it:
//! - an operation that names a principal created in the batch (a policy attached to a new group, a
//!   membership of a new user) waits for that create, whether it succeeded or not (the apply then
//!   resolves its id, or reports what was not created);
//! - a group's member additions wait for its member removals, when the target sends them apart;
//! - an addition of a group to a group waits for every removal of a group from a group: those
//!   removals are what break a cycle of nested groups before an addition would close one;
//! - where the target takes a group's member writes in parallel
//!   ([`crate::Target::parallel_member_writes`]), an addition is split into parts of
//!   `max_members_per_write`, its members ordered as their creates run, so that each part starts
//!   once its own members exist. A first sync then writes memberships while it still creates,
//!   instead of writing every group's members after the last create. No more than
//!   [`PARTS_IN_FLIGHT`] parts of one group run at once.
//!
//! Ready member changes and policies go before creates (they are what the end of the apply would
//! otherwise wait for); creates run groups first, since every membership needs its group.

use crate::fnv::FnvMap;
use idsync_model::{Kind, Op, PRef};
use std::collections::VecDeque;

/// The most parts of one group's additions in flight at once. Databricks' own Terraform provider
/// adds each member with its own PATCH (`databricks_group_member`) and applies up to 10 resources
/// at once, so a handful of concurrent PATCHes of one group is its ordinary use
/// (docs/apis/databricks-scim.md).
pub const PARTS_IN_FLIGHT: usize = 8;

/// What the apply runs as one task: an operation, or a group's member removals followed by its
/// member additions when the target sends both in one write.
#[derive(Clone, Copy, Debug)]
pub struct Unit<'a> {
    /// The operation (its place in the plan, and itself).
    pub first: (usize, &'a Op),
    /// The additions sent with `first`'s removals.
    pub then: Option<(usize, &'a Op)>,
}

impl Unit<'_> {
    /// The plan operations it holds.
    pub fn len(&self) -> usize {
        1 + usize::from(self.then.is_some())
    }

    /// Whether it adds a group to a group.
    pub fn nests(&self) -> bool {
        self.touches_nesting(|op| matches!(op, Op::AddMembers { .. }))
    }

    /// Whether it removes a group from a group.
    fn unnests(&self) -> bool {
        self.touches_nesting(|op| matches!(op, Op::RemoveMembers { .. }))
    }

    fn touches_nesting(&self, which: fn(&Op) -> bool) -> bool {
        [Some(self.first), self.then]
            .into_iter()
            .flatten()
            .any(|(_, op)| match op {
                Op::AddMembers { members, .. } | Op::RemoveMembers { members, .. } => {
                    which(op) && members.iter().any(|m| m.kind == Kind::Group)
                }
                _ => false,
            })
    }

    fn creates(&self) -> bool {
        self.then.is_none() && matches!(self.first.1, Op::Create { .. })
    }

    /// Every principal it names (its subject, its group, its members).
    fn refs(&self) -> impl Iterator<Item = &PRef> {
        [Some(self.first), self.then]
            .into_iter()
            .flatten()
            .flat_map(|(_, op)| refs(op))
    }
}

fn refs(op: &Op) -> Box<dyn Iterator<Item = &PRef> + '_> {
    match op {
        Op::Create { .. } => Box::new(std::iter::empty()),
        Op::Adopt { target, .. }
        | Op::Forget { target }
        | Op::Update { target, .. }
        | Op::Deactivate { target }
        | Op::Delete { target, .. } => Box::new(std::iter::once(target)),
        Op::AttachPolicies { group, .. } | Op::DetachPolicies { group, .. } => {
            Box::new(std::iter::once(group))
        }
        Op::AddMembers { group, members } | Op::RemoveMembers { group, members } => {
            Box::new(std::iter::once(group).chain(members))
        }
    }
}

/// One task of a batch: a unit, or a part of a split addition.
#[derive(Debug)]
pub struct Task<'a> {
    /// The unit.
    pub unit: Unit<'a>,
    /// For a part: the positions of its members in the addition's member list.
    pub part: Option<Vec<u32>>,
}

/// A batch, with what each task waits for.
pub struct Schedule<'a> {
    tasks: Vec<Option<Task<'a>>>,
    /// Unfinished tasks each waits for.
    waiting: Vec<u32>,
    /// The tasks that wait for each.
    dependents: Vec<Vec<u32>>,
    /// For a part, its group (an index of `in_flight`).
    lane: Vec<Option<u32>>,
    in_flight: Vec<usize>,
    parked: Vec<VecDeque<u32>>,
    /// Ready tasks that are not creates, in the order they became ready.
    ready: VecDeque<u32>,
    /// Creates not started yet: groups first, then the rest in plan order.
    creates: VecDeque<u32>,
    /// For each split addition (by its place in the plan), its parts not finished yet.
    parts_left: FnvMap<usize, u32>,
}

impl<'a> Schedule<'a> {
    /// How many tasks it holds.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Plans a batch. `split`: the member count of a part, when the target takes a group's member
    /// writes in parallel.
    pub fn new(units: Vec<Unit<'a>>, split: Option<usize>) -> Self {
        let order = create_order(&units);
        let mut made: FnvMap<(Kind, &'a str), (usize, u32)> = FnvMap::default();
        for (rank, &i) in order.iter().enumerate() {
            if let Op::Create { principal, .. } = units[i].first.1 {
                made.entry((principal.kind, principal.key.as_str()))
                    .or_insert((i, rank as u32 + 1));
            }
        }
        // Removals sent apart from additions: a group's additions wait for them.
        let mut removals: FnvMap<(Kind, &'a str), Vec<usize>> = FnvMap::default();
        for (i, u) in units.iter().enumerate() {
            if let (Op::RemoveMembers { group, .. }, None) = (u.first.1, u.then) {
                removals
                    .entry((group.kind, group.key.as_str()))
                    .or_default()
                    .push(i);
            }
        }

        // Removals of a group from a group: additions of a group to a group wait for them.
        let unnesting: Vec<usize> = (0..units.len()).filter(|&i| units[i].unnests()).collect();

        // Tasks: a unit keeps its index; the parts of split additions come after every unit.
        let n = units.len();
        let mut s = Schedule {
            tasks: Vec::with_capacity(n),
            waiting: Vec::with_capacity(n),
            dependents: vec![Vec::new(); n],
            lane: Vec::with_capacity(n),
            in_flight: Vec::new(),
            parked: Vec::new(),
            ready: VecDeque::new(),
            creates: VecDeque::with_capacity(order.len()),
            parts_left: FnvMap::default(),
        };
        let mut deps: Vec<usize> = Vec::new();
        let mut parts: Vec<(Unit<'a>, Vec<u32>, u32)> = Vec::new();
        for (i, u) in units.into_iter().enumerate() {
            let group_removals = match (u.first.1, u.then) {
                (Op::AddMembers { group, .. }, None) => removals
                    .get(&(group.kind, group.key.as_str()))
                    .map_or(&[][..], Vec::as_slice),
                _ => &[],
            };
            let split_members = match (u.first.1, u.then, split) {
                (Op::AddMembers { members, .. }, None, Some(chunk)) if members.len() > chunk => {
                    Some((members, chunk))
                }
                _ => None,
            };
            if let Some((members, chunk)) = split_members {
                let rank = |m: &PRef| made.get(&(m.kind, m.key.as_str())).map_or(0, |&(_, r)| r);
                // Each member's rank looked up once (a group may hold 100,000).
                let mut ranked: Vec<(u32, u32)> = (0..members.len() as u32)
                    .map(|k| (rank(&members[k as usize]), k))
                    .collect();
                ranked.sort_unstable();
                let positions: Vec<u32> = ranked.into_iter().map(|(_, k)| k).collect();
                let lane = s.in_flight.len() as u32;
                s.in_flight.push(0);
                s.parked.push(VecDeque::new());
                let count = positions.len().div_ceil(chunk);
                s.parts_left.insert(u.first.0, count as u32);
                for positions in positions.chunks(chunk) {
                    parts.push((u, positions.to_vec(), lane));
                }
                // The unit itself does nothing: it stands finished, so nothing waits on it.
                s.tasks.push(None);
                s.waiting.push(0);
                s.lane.push(None);
                continue;
            }
            deps.clear();
            if !u.creates() {
                deps.extend(
                    u.refs()
                        .filter_map(|r| made.get(&(r.kind, r.key.as_str())).map(|&(t, _)| t)),
                );
                deps.extend(group_removals.iter().copied().filter(|&t| t != i));
                if u.nests() {
                    deps.extend(unnesting.iter().copied().filter(|&t| t != i));
                }
            }
            s.push_task(
                Task {
                    unit: u,
                    part: None,
                },
                None,
                &mut deps,
            );
        }
        for (u, positions, lane) in parts {
            let Op::AddMembers { group, members } = u.first.1 else {
                unreachable!("only additions are split")
            };
            deps.clear();
            let group_removals = removals
                .get(&(group.kind, group.key.as_str()))
                .map_or(&[][..], Vec::as_slice);
            deps.extend(
                std::iter::once(group)
                    .chain(positions.iter().map(|&k| &members[k as usize]))
                    .filter_map(|r| made.get(&(r.kind, r.key.as_str())).map(|&(t, _)| t)),
            );
            deps.extend(group_removals.iter().copied());
            if positions
                .iter()
                .any(|&k| members[k as usize].kind == Kind::Group)
            {
                deps.extend(unnesting.iter().copied());
            }
            let task = Task {
                unit: u,
                part: Some(positions),
            };
            s.push_task(task, Some(lane), &mut deps);
        }
        for i in order {
            s.creates.push_back(i as u32);
        }
        s
    }

    fn push_task(&mut self, task: Task<'a>, lane: Option<u32>, deps: &mut Vec<usize>) {
        let t = self.tasks.len() as u32;
        deps.sort_unstable();
        deps.dedup();
        let creates = task.unit.creates();
        self.tasks.push(Some(task));
        self.waiting.push(deps.len() as u32);
        self.lane.push(lane);
        if t as usize >= self.dependents.len() {
            self.dependents.push(Vec::new());
        }
        for &d in deps.iter() {
            self.dependents[d].push(t);
        }
        if deps.is_empty() && !creates {
            self.ready.push_back(t);
        }
    }

    /// The next task to start, if one is ready.
    pub fn next(&mut self) -> Option<(u32, Task<'a>)> {
        while let Some(t) = self.ready.pop_front() {
            if let Some(lane) = self.lane[t as usize] {
                let lane = lane as usize;
                if self.in_flight[lane] >= PARTS_IN_FLIGHT {
                    self.parked[lane].push_back(t);
                    continue;
                }
                self.in_flight[lane] += 1;
            }
            if let Some(task) = self.tasks[t as usize].take() {
                return Some((t, task));
            }
        }
        let t = self.creates.pop_front()?;
        self.tasks[t as usize].take().map(|task| (t, task))
    }

    /// Records that task `t` finished; returns the plan operations it completed (a part
    /// completes its addition when it is the last).
    pub fn finished(&mut self, t: u32, unit: &Unit<'_>, part: bool) -> usize {
        let t = t as usize;
        if let Some(lane) = self.lane[t] {
            let lane = lane as usize;
            self.in_flight[lane] -= 1;
            if let Some(p) = self.parked[lane].pop_front() {
                self.ready.push_front(p);
            }
        }
        for d in std::mem::take(&mut self.dependents[t]) {
            let w = &mut self.waiting[d as usize];
            *w -= 1;
            if *w == 0 {
                self.ready.push_back(d);
            }
        }
        if !part {
            return unit.len();
        }
        match self.parts_left.get_mut(&unit.first.0) {
            Some(left) if *left > 1 => {
                *left -= 1;
                0
            }
            _ => 1,
        }
    }

    /// Tasks never started (none, once every task has finished: nothing waits in a cycle).
    #[cfg(test)]
    pub fn left(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_some()).count()
    }

    /// Makes every task still waiting ready; whether there was one. A safety net: it never
    /// happens while nothing waits in a cycle, which the waits' shape rules out.
    pub fn release_waiting(&mut self) -> bool {
        let mut any = false;
        for (t, task) in self.tasks.iter().enumerate() {
            if task.is_some() && self.waiting[t] > 0 {
                self.waiting[t] = 0;
                self.ready.push_back(t as u32);
                any = true;
            }
        }
        any
    }
}

/// The order creates run in (indexes of `units`): groups first, since every membership needs its
/// group; then the members of each addition, smallest addition first, so that groups fill up
/// one after another while the apply still creates (members drawn from the whole tenant would
/// otherwise leave nearly every group waiting for the last creates); then the rest, in plan
/// order.
fn create_order(units: &[Unit<'_>]) -> Vec<usize> {
    let mut placed = vec![false; units.len()];
    let mut order: Vec<usize> = Vec::new();
    let mut made: FnvMap<(Kind, &str), usize> = FnvMap::default();
    for (i, u) in units.iter().enumerate() {
        if let (true, Op::Create { principal, .. }) = (u.creates(), u.first.1) {
            made.entry((principal.kind, principal.key.as_str()))
                .or_insert(i);
            if principal.kind == Kind::Group {
                placed[i] = true;
                order.push(i);
            }
        }
    }
    let mut additions: Vec<&[PRef]> = units
        .iter()
        .flat_map(|u| [Some(u.first), u.then])
        .flatten()
        .filter_map(|(_, op)| match op {
            Op::AddMembers { members, .. } => Some(members.as_slice()),
            _ => None,
        })
        .collect();
    additions.sort_by_key(|m| m.len());
    for members in additions {
        for m in members {
            if let Some(&i) = made.get(&(m.kind, m.key.as_str()))
                && !placed[i]
            {
                placed[i] = true;
                order.push(i);
            }
        }
    }
    for (i, u) in units.iter().enumerate() {
        if u.creates() && !placed[i] {
            order.push(i);
        }
    }
    order
}

/// The addition a part stands for: its group and its own members.
pub fn part_op(op: &Op, positions: &[u32]) -> Op {
    match op {
        Op::AddMembers { group, members } => Op::AddMembers {
            group: group.clone(),
            members: positions
                .iter()
                .map(|&k| members[k as usize].clone())
                .collect(),
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use idsync_model::{Principal, SourceRef};

    fn create(kind: Kind, key: &str) -> Op {
        Op::Create {
            principal: Principal::new(kind, key),
            source: SourceRef {
                kind,
                id: format!("s-{key}"),
            },
        }
    }

    fn r(kind: Kind, key: &str, id: Option<&str>) -> PRef {
        PRef {
            kind,
            key: key.into(),
            id: id.map(str::to_owned),
        }
    }

    fn units(ops: &[Op]) -> Vec<Unit<'_>> {
        ops.iter()
            .enumerate()
            .map(|(i, op)| Unit {
                first: (i, op),
                then: None,
            })
            .collect()
    }

    /// Runs the schedule one task at a time, finishing each at once: the order tasks start in.
    fn drain(s: &mut Schedule<'_>) -> Vec<(usize, Option<Vec<u32>>)> {
        let mut out = Vec::new();
        while let Some((t, task)) = s.next() {
            s.finished(t, &task.unit, task.part.is_some());
            out.push((task.unit.first.0, task.part));
        }
        assert_eq!(s.left(), 0, "every task ran");
        out
    }

    #[test]
    fn memberships_wait_for_their_creates_and_groups_are_created_first() {
        let ops = vec![
            create(Kind::User, "a"),
            create(Kind::User, "b"),
            create(Kind::Group, "g"),
            Op::AddMembers {
                group: r(Kind::Group, "g", None),
                members: vec![r(Kind::User, "a", None), r(Kind::User, "b", None)],
            },
            Op::AddMembers {
                group: r(Kind::Group, "old", Some("7")),
                members: vec![r(Kind::User, "x", Some("8"))],
            },
        ];
        let mut s = Schedule::new(units(&ops), None);
        let order: Vec<usize> = drain(&mut s).into_iter().map(|(i, _)| i).collect();
        // The addition to an existing group of an existing user is ready at once; the group is
        // created before the users; the other addition waits for all three.
        assert_eq!(order, vec![4, 2, 0, 1, 3]);
    }

    #[test]
    fn a_split_addition_starts_each_part_once_its_members_exist() {
        let mut ops = vec![create(Kind::Group, "g")];
        for k in ["u0", "u1", "u2", "u3", "u4"] {
            ops.push(create(Kind::User, k));
        }
        // Members listed out of create order, one of them already in the target.
        ops.push(Op::AddMembers {
            group: r(Kind::Group, "g", None),
            members: vec![
                r(Kind::User, "u4", None),
                r(Kind::User, "u0", None),
                r(Kind::User, "old", Some("9")),
                r(Kind::User, "u2", None),
                r(Kind::User, "u1", None),
                r(Kind::User, "u3", None),
            ],
        });
        let mut s = Schedule::new(units(&ops), Some(2));
        let got = drain(&mut s);
        let Op::AddMembers { members, .. } = &ops[6] else {
            panic!()
        };
        let named = |p: &Option<Vec<u32>>| -> Vec<&str> {
            p.as_ref()
                .unwrap()
                .iter()
                .map(|&k| members[k as usize].key.as_str())
                .collect()
        };
        // g, then the members in the addition's order; the first part (the existing member and
        // u4) goes before the next member is created.
        let steps: Vec<String> = got
            .iter()
            .map(|(i, p)| match p {
                Some(_) => named(p).join("+"),
                None => ops[*i].subject().1.to_owned(),
            })
            .collect();
        assert_eq!(
            steps,
            vec![
                "g", "u4", "old+u4", "u0", "u2", "u0+u2", "u1", "u3", "u1+u3"
            ]
        );
    }

    #[test]
    fn parts_of_one_group_in_flight_are_capped() {
        let members: Vec<PRef> = (0..40)
            .map(|k| r(Kind::User, &format!("u{k}"), Some("1")))
            .collect();
        let ops = vec![Op::AddMembers {
            group: r(Kind::Group, "g", Some("2")),
            members,
        }];
        let mut s = Schedule::new(units(&ops), Some(1));
        let mut started = Vec::new();
        while let Some((t, task)) = s.next() {
            started.push((t, task));
        }
        assert_eq!(
            started.len(),
            PARTS_IN_FLIGHT,
            "the rest wait for a part to finish"
        );
        let (t, task) = started.remove(0);
        assert_eq!(
            s.finished(t, &task.unit, true),
            0,
            "the addition is not done yet"
        );
        assert!(
            s.next().is_some(),
            "a finished part lets the next one start"
        );
        assert!(s.next().is_none());
    }

    #[test]
    fn additions_wait_for_the_removals_of_their_group_and_a_last_part_completes_them() {
        let ops = vec![
            Op::AddMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![r(Kind::User, "a", Some("2")), r(Kind::User, "b", Some("3"))],
            },
            Op::RemoveMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![r(Kind::User, "c", Some("4"))],
            },
        ];
        let mut s = Schedule::new(units(&ops), Some(1));
        let (t, task) = s.next().unwrap();
        assert_eq!(task.unit.first.0, 1, "the removal first");
        assert!(s.next().is_none(), "the parts wait for it");
        assert_eq!(s.finished(t, &task.unit, false), 1);
        let (a, pa) = s.next().unwrap();
        let (b, pb) = s.next().unwrap();
        assert_eq!(s.finished(a, &pa.unit, true), 0);
        assert_eq!(
            s.finished(b, &pb.unit, true),
            1,
            "the last part completes the addition"
        );
    }

    #[test]
    fn the_members_of_small_groups_are_created_first() {
        let mut ops: Vec<Op> = ["a", "b", "c", "d", "e"]
            .into_iter()
            .map(|k| create(Kind::User, k))
            .collect();
        ops.push(create(Kind::Group, "big"));
        ops.push(create(Kind::Group, "small"));
        let member = |k: &str| r(Kind::User, k, None);
        ops.push(Op::AddMembers {
            group: r(Kind::Group, "big", None),
            members: vec![member("a"), member("c"), member("e"), member("d")],
        });
        ops.push(Op::AddMembers {
            group: r(Kind::Group, "small", None),
            members: vec![member("e"), member("c")],
        });
        let units = units(&ops);
        let keys: Vec<&str> = create_order(&units)
            .into_iter()
            .map(|i| ops[i].subject().1)
            .collect();
        // Groups, then small's members, then big's others, then b (in no group).
        assert_eq!(keys, ["big", "small", "e", "c", "a", "d", "b"]);
        // So small is written after its second member, big after its fourth.
        let mut s = Schedule::new(units, None);
        let order: Vec<usize> = drain(&mut s).into_iter().map(|(i, _)| i).collect();
        assert_eq!(order, vec![5, 6, 4, 2, 8, 0, 3, 7, 1]);
    }

    #[test]
    fn whole_additions_wait_for_removals_too() {
        // The same waits where additions are not split (a target that takes a group's member
        // writes one at a time).
        let ops = vec![
            Op::AddMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![r(Kind::User, "u", Some("2"))],
            },
            Op::AddMembers {
                group: r(Kind::Group, "k", Some("5")),
                members: vec![r(Kind::Group, "g", Some("1"))],
            },
            Op::RemoveMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![r(Kind::User, "v", Some("3"))],
            },
            Op::RemoveMembers {
                group: r(Kind::Group, "h", Some("4")),
                members: vec![r(Kind::Group, "k", Some("5"))],
            },
        ];
        let mut s = Schedule::new(units(&ops), None);
        let mut first = Vec::new();
        while let Some((t, task)) = s.next() {
            first.push((t, task));
        }
        let started: Vec<usize> = first.iter().map(|(_, t)| t.unit.first.0).collect();
        assert_eq!(started, [2, 3], "both additions wait");
        let (t, task) = first.remove(0);
        s.finished(t, &task.unit, false);
        let (_, task) = s.next().unwrap();
        assert_eq!(
            task.unit.first.0, 0,
            "g's addition once g's removal finished"
        );
        assert!(
            s.next().is_none(),
            "the nesting waits for the removal of a group"
        );
        let (t, task) = first.remove(0);
        s.finished(t, &task.unit, false);
        assert_eq!(s.next().unwrap().1.unit.first.0, 1);
    }

    #[test]
    fn the_safety_net_releases_what_still_waits() {
        let ops = vec![
            create(Kind::User, "a"),
            Op::AddMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![r(Kind::User, "a", None)],
            },
        ];
        let mut s = Schedule::new(units(&ops), None);
        // The create taken and dropped unfinished: its dependent would wait for ever.
        let (_, create) = s.next().unwrap();
        assert_eq!(create.unit.first.0, 0);
        assert!(s.next().is_none());
        assert!(s.release_waiting());
        assert_eq!(s.next().unwrap().1.unit.first.0, 1);
        assert!(!s.release_waiting());
    }

    #[test]
    fn nesting_is_told_apart() {
        let nested = Op::AddMembers {
            group: r(Kind::Group, "g", Some("1")),
            members: vec![r(Kind::Group, "h", Some("2"))],
        };
        let flat = Op::AddMembers {
            group: r(Kind::Group, "g", Some("1")),
            members: vec![r(Kind::User, "u", Some("2"))],
        };
        let u = |op| Unit {
            first: (0, op),
            then: None,
        };
        assert!(u(&nested).nests());
        assert!(!u(&flat).nests());
    }

    #[test]
    fn a_group_is_nested_only_after_every_removal_of_a_nested_group() {
        let ops = vec![
            // Adds a user and a group to g: the part with the group waits, the other does not.
            Op::AddMembers {
                group: r(Kind::Group, "g", Some("1")),
                members: vec![
                    r(Kind::User, "u", Some("2")),
                    r(Kind::Group, "h", Some("3")),
                ],
            },
            // Breaks the cycle h ⊃ g that the addition above would close.
            Op::RemoveMembers {
                group: r(Kind::Group, "h", Some("3")),
                members: vec![r(Kind::Group, "g", Some("1"))],
            },
            // A removal of a user only: nothing waits for it but its own group's additions.
            Op::RemoveMembers {
                group: r(Kind::Group, "k", Some("4")),
                members: vec![r(Kind::User, "u", Some("2"))],
            },
        ];
        let mut s = Schedule::new(units(&ops), Some(1));
        let mut started = Vec::new();
        while let Some((_, task)) = s.next() {
            let what = match &task.part {
                Some(p) => format!("part {:?}", p),
                None => format!("unit {}", task.unit.first.0),
            };
            started.push((what, task));
        }
        let names: Vec<&str> = started.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(names, ["unit 1", "unit 2", "part [0]"]);
        let (_, removal) = started.remove(0);
        s.finished(1, &removal.unit, false);
        let (_, task) = s.next().unwrap();
        assert_eq!(
            task.part,
            Some(vec![1]),
            "the group's part, once the cycle is broken"
        );
    }
}
