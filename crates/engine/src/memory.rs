//! An in-memory target: the reference behaviour of [`Target`], used by the property tests, the
//! file target and the demo. It enforces what real targets enforce (unique keys, existing members,
//! allowed member kinds) so a plan that works here is a plan that is well-formed.

use crate::apply::{Outcome, Target, TargetError, TargetErrorKind};
use crate::observe::{Interest, Partial};
use async_trait::async_trait;
use idsync_model::{Capabilities, Kind, Observed, ObservedPrincipal, Op, PRef, Principal};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// The content of a memory target, serialisable (the file target stores exactly this).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryData {
    /// Next numeric id.
    pub next_id: u64,
    /// Principals.
    pub principals: Vec<ObservedPrincipal>,
    /// Memberships: group id → members.
    pub members: BTreeMap<String, BTreeSet<MemberId>>,
}

/// A member reference inside a memory target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId {
    /// Kind.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Target id.
    pub id: String,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    principals: BTreeMap<(Kind, String), ObservedPrincipal>,
    members: BTreeMap<String, BTreeSet<(Kind, String)>>,
    writes: usize,
    fail_after: Option<usize>,
    bulk_reads: usize,
    live_reads: usize,
}

/// An in-memory target.
#[derive(Debug)]
pub struct MemoryTarget {
    caps: Capabilities,
    inner: Mutex<Inner>,
    combine: bool,
    parallel: bool,
}

fn err(kind: TargetErrorKind, msg: String) -> TargetError {
    TargetError::new(kind, msg)
}

impl MemoryTarget {
    /// An empty target with these capabilities.
    pub fn new(caps: Capabilities) -> Self {
        MemoryTarget {
            caps,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            combine: false,
            parallel: false,
        }
    }

    /// Takes a group's member writes in parallel, as the Databricks target does
    /// ([`Target::parallel_member_writes`]): the apply splits large additions.
    pub fn writing_members_in_parallel(mut self) -> Self {
        self.parallel = true;
        self
    }

    /// Sends a group's member removals and additions together, as a SCIM target does
    /// ([`Target::combines_member_changes`]): one write per chunk of both.
    pub fn combining_member_changes(mut self) -> Self {
        self.combine = true;
        self
    }

    /// A target holding `data`.
    pub fn from_data(caps: Capabilities, data: MemoryData) -> Self {
        let t = MemoryTarget::new(caps);
        {
            let mut i = t.lock();
            i.next_id = data.next_id.max(1);
            for p in data.principals {
                i.principals.insert((p.principal.kind, p.id.clone()), p);
            }
            for (g, ms) in data.members {
                i.members
                    .insert(g, ms.into_iter().map(|m| (m.kind, m.id)).collect());
            }
        }
        t
    }

    /// Its content, for saving.
    pub fn data(&self) -> MemoryData {
        let i = self.lock();
        MemoryData {
            next_id: i.next_id,
            principals: i.principals.values().cloned().collect(),
            members: i
                .members
                .iter()
                .map(|(g, ms)| {
                    (
                        g.clone(),
                        ms.iter()
                            .map(|(k, id)| MemberId {
                                kind: *k,
                                id: id.clone(),
                            })
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    /// Makes every write after the next `n` fail, as if the process died there.
    pub fn fail_after(&self, n: Option<usize>) {
        let mut i = self.lock();
        i.fail_after = n.map(|n| i.writes + n);
    }

    /// Writes executed so far (a membership operation counts once per chunk of
    /// `max_members_per_write`, as a real target's requests would).
    pub fn writes(&self) -> usize {
        self.lock().writes
    }

    /// Bulk observations so far, and principals read one by one ([`Target::observe_some`]).
    pub fn reads(&self) -> (usize, usize) {
        let i = self.lock();
        (i.bulk_reads, i.live_reads)
    }

    /// Inserts a principal directly, as if someone created it outside idsync. Returns its id.
    pub fn insert(&self, p: Principal) -> String {
        let mut i = self.lock();
        let id = format!("{}", i.next_id);
        i.next_id += 1;
        i.principals.insert(
            (p.kind, id.clone()),
            ObservedPrincipal {
                id: id.clone(),
                principal: p,
                policies: BTreeSet::new(),
            },
        );
        id
    }

    /// Adds a member directly (outside idsync).
    pub fn insert_member(&self, group_id: &str, kind: Kind, id: &str) {
        self.lock()
            .members
            .entry(group_id.to_owned())
            .or_default()
            .insert((kind, id.to_owned()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another test thread panicked; the data is still consistent
        // because every mutation below completes before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn id_of(r: &PRef) -> Result<&str, TargetError> {
    r.id.as_deref()
        .ok_or_else(|| err(TargetErrorKind::Invalid, format!("{r} has no target id")))
}

impl Inner {
    /// Removes then adds members of a group, all or nothing (an invalid addition changes
    /// nothing). Counts the writes beyond the first a real target would send: one per chunk of
    /// `max_members_per_write` members.
    fn change_members(
        &mut self,
        caps: &Capabilities,
        group: &PRef,
        remove: &[PRef],
        add: &[PRef],
    ) -> Result<(), TargetError> {
        let gid = id_of(group)?.to_owned();
        self.get_mut(group)?;
        for m in add {
            let mid = id_of(m)?;
            if !caps.member_allowed(m.kind) {
                return Err(err(
                    TargetErrorKind::Invalid,
                    format!("a group cannot hold a {}", m.kind),
                ));
            }
            if !self.principals.contains_key(&(m.kind, mid.to_owned())) {
                return Err(err(
                    TargetErrorKind::NotFound,
                    format!("member {m} (id {mid}) not found"),
                ));
            }
        }
        if let Some(ms) = self.members.get_mut(&gid) {
            for m in remove {
                ms.remove(&(m.kind, id_of(m)?.to_owned()));
            }
        }
        if !add.is_empty() {
            let ms = self.members.entry(gid).or_default();
            for m in add {
                ms.insert((m.kind, id_of(m)?.to_owned()));
            }
        }
        let chunks = (remove.len() + add.len()).div_ceil(caps.max_members_per_write.max(1));
        self.writes += chunks.saturating_sub(1);
        Ok(())
    }

    fn key_taken(&self, caps: &Capabilities, kind: Kind, key: &str, except: Option<&str>) -> bool {
        let k = caps.fold(key);
        self.principals.iter().any(|((pk, id), p)| {
            *pk == kind && Some(id.as_str()) != except && caps.fold(&p.principal.key) == k
        })
    }

    fn get_mut(&mut self, r: &PRef) -> Result<&mut ObservedPrincipal, TargetError> {
        let id = id_of(r)?.to_owned();
        self.principals
            .get_mut(&(r.kind, id.clone()))
            .ok_or_else(|| {
                err(
                    TargetErrorKind::NotFound,
                    format!("{r} (id {id}) not found"),
                )
            })
    }
}

#[async_trait]
impl Target for MemoryTarget {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        let mut i = self.lock();
        i.bulk_reads += 1;
        let mut o = Observed::default();
        for p in i.principals.values() {
            o.insert(p.clone());
        }
        for (g, ms) in &i.members {
            let set = o.members.entry(g.clone()).or_default();
            for (k, id) in ms {
                set.insert(*k, id.clone());
            }
        }
        Ok(o)
    }

    async fn observe_some(&self, want: &Interest) -> Result<Option<Partial>, TargetError> {
        let mut i = self.lock();
        i.live_reads += want.len();
        let mut out = Partial::default();
        let mut found: BTreeSet<(Kind, String)> = BTreeSet::new();
        let mut with_members: BTreeSet<String> = BTreeSet::new();
        for (kind, id) in &want.ids {
            if let Some(p) = i.principals.get(&(*kind, id.clone())) {
                found.insert((*kind, id.clone()));
                out.principals.push(p.clone());
                if want.members.contains(id) {
                    with_members.insert(id.clone());
                }
            }
        }
        for (kind, key) in &want.keys {
            let k = self.caps.fold(key);
            for ((pk, id), p) in &i.principals {
                if pk == kind && self.caps.fold(&p.principal.key) == k {
                    if *kind == Kind::Group {
                        with_members.insert(id.clone());
                    }
                    if found.insert((*kind, id.clone())) {
                        out.principals.push(p.clone());
                    }
                }
            }
        }
        for id in with_members {
            let members = i.members.get(&id).into_iter().flatten();
            let ids = members.map(|(_, m)| m.clone()).collect();
            out.members.insert(id, ids);
        }
        Ok(Some(out))
    }

    fn combines_member_changes(&self) -> bool {
        self.combine
    }

    fn parallel_member_writes(&self) -> bool {
        self.parallel
    }

    async fn execute_members(
        &self,
        group: &PRef,
        remove: &[PRef],
        add: &[PRef],
    ) -> Result<Outcome, TargetError> {
        let mut i = self.lock();
        if i.fail_after.is_some_and(|n| i.writes >= n) {
            return Err(err(
                TargetErrorKind::Unavailable,
                "connection reset (injected)".into(),
            ));
        }
        i.change_members(&self.caps, group, remove, add)?;
        i.writes += 1;
        Ok(Outcome::Done)
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        let caps = &self.caps;
        let mut i = self.lock();
        if i.fail_after.is_some_and(|n| i.writes >= n) {
            return Err(err(
                TargetErrorKind::Unavailable,
                "connection reset (injected)".into(),
            ));
        }
        let out = match op {
            Op::Create { principal, .. } => {
                if !caps.supports(principal.kind) {
                    return Err(err(
                        TargetErrorKind::Invalid,
                        format!("this target has no {}s", principal.kind),
                    ));
                }
                if i.key_taken(caps, principal.kind, &principal.key, None) {
                    return Err(err(
                        TargetErrorKind::AlreadyExists,
                        format!("{} {:?} already exists", principal.kind, principal.key),
                    ));
                }
                let id = format!("{}", i.next_id);
                i.next_id += 1;
                let p = ObservedPrincipal {
                    id: id.clone(),
                    principal: principal.clone(),
                    policies: BTreeSet::new(),
                };
                i.principals.insert((principal.kind, id.clone()), p);
                if principal.kind == Kind::Group {
                    i.members.entry(id.clone()).or_default();
                }
                Outcome::Created(id)
            }
            Op::Update { target, .. } => {
                let id = id_of(target)?.to_owned();
                let mut p = i.get_mut(target)?.principal.clone();
                crate::apply::apply_changes(&mut p, op);
                if i.key_taken(caps, p.kind, &p.key, Some(&id)) {
                    return Err(err(
                        TargetErrorKind::AlreadyExists,
                        format!("cannot rename {target}: {:?} is taken", p.key),
                    ));
                }
                i.get_mut(target)?.principal = p;
                Outcome::Done
            }
            Op::Deactivate { target } => {
                i.get_mut(target)?.principal.active = false;
                Outcome::Done
            }
            Op::Delete { target, .. } => {
                let id = id_of(target)?.to_owned();
                if i.principals.remove(&(target.kind, id.clone())).is_none() {
                    return Err(err(
                        TargetErrorKind::NotFound,
                        format!("{target} not found"),
                    ));
                }
                if target.kind == Kind::Group {
                    i.members.remove(&id);
                }
                for ms in i.members.values_mut() {
                    ms.remove(&(target.kind, id.clone()));
                }
                Outcome::Done
            }
            Op::AttachPolicies { group, policies } => {
                if !caps.group_policies {
                    return Err(err(
                        TargetErrorKind::NotImplemented,
                        "this target has no policies".into(),
                    ));
                }
                i.get_mut(group)?.policies.extend(policies.iter().cloned());
                Outcome::Done
            }
            Op::DetachPolicies { group, policies } => {
                if !caps.group_policies {
                    return Err(err(
                        TargetErrorKind::NotImplemented,
                        "this target has no policies".into(),
                    ));
                }
                let g = i.get_mut(group)?;
                for p in policies {
                    g.policies.remove(p);
                }
                Outcome::Done
            }
            Op::AddMembers { group, members } => {
                i.change_members(caps, group, &[], members)?;
                Outcome::Done
            }
            Op::RemoveMembers { group, members } => {
                i.change_members(caps, group, members, &[])?;
                Outcome::Done
            }
            Op::Adopt { .. } | Op::Forget { .. } => Outcome::Done,
        };
        i.writes += 1;
        Ok(out)
    }
}
