//! A plan: the operations that bring a target in line with its source, as data. Serialisable,
//! stably ordered, stamped with the state version it was computed from.

use crate::source::{Kind, Snapshot};
use crate::target::{Attr, AttrValue, PKey, Principal, SourceRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The version of the plan file format.
pub const PLAN_FORMAT: u32 = 1;

/// The phase of key changes: an operation that takes a key another one frees runs after it (the
/// plan orders them so); the others run concurrently.
pub const RENAME_PHASE: u8 = 1;

/// The phase of creates.
pub const CREATE_PHASE: u8 = 3;

/// The phase of member removals: before every addition, as removals break cycles of nested groups.
pub const REMOVE_MEMBERS_PHASE: u8 = 5;

/// The phase of member additions.
pub const ADD_MEMBERS_PHASE: u8 = 6;

/// A reference to a target principal: its folded key, and its target id once it exists (a
/// principal created by the same plan gets its id during apply).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PRef {
    /// Kind.
    pub kind: Kind,
    /// The natural key as written to the target.
    pub key: crate::target::Key,
    /// The target id, when the principal already exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl fmt::Display for PRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind, self.key)
    }
}

/// One attribute change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrChange {
    /// Which attribute.
    pub attr: Attr,
    /// Its value in the target now.
    pub from: AttrValue,
    /// Its value after the change.
    pub to: AttrValue,
}

/// One operation on a target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Op {
    /// Take ownership of an existing principal with the same key (no write to the target).
    Adopt {
        /// The existing principal.
        target: PRef,
        /// The source principal it now stands for.
        source: SourceRef,
    },
    /// Forget an owned principal that is gone from the target (no write to the target).
    Forget {
        /// The principal idsync owned.
        target: PRef,
    },
    /// Change attributes of a principal idsync owns.
    Update {
        /// The principal.
        target: PRef,
        /// The source principal it stands for.
        source: SourceRef,
        /// What changes.
        changes: Vec<AttrChange>,
    },
    /// Create a principal.
    Create {
        /// What to create.
        principal: Principal,
        /// The source principal it stands for.
        source: SourceRef,
    },
    /// Attach policies to a group (lakeFS).
    AttachPolicies {
        /// The group.
        group: PRef,
        /// Policy ids.
        policies: Vec<String>,
    },
    /// Detach policies from a group (lakeFS). Plans never hold it: a rollback undoes an
    /// attachment with it.
    DetachPolicies {
        /// The group.
        group: PRef,
        /// Policy ids.
        policies: Vec<String>,
    },
    /// Remove members from a group.
    RemoveMembers {
        /// The group.
        group: PRef,
        /// The members to remove.
        members: Vec<PRef>,
    },
    /// Add members to a group.
    AddMembers {
        /// The group.
        group: PRef,
        /// The members to add.
        members: Vec<PRef>,
    },
    /// Deactivate a principal idsync owns that left the source (`deprovision = "deactivate"`).
    Deactivate {
        /// The principal.
        target: PRef,
    },
    /// Delete a principal idsync owns that left the source (`deprovision = "delete"`).
    #[serde(rename_all = "camelCase")]
    Delete {
        /// The principal.
        target: PRef,
        /// Another principal is renamed to this one's key in the same plan: the deletion runs in
        /// the rename phase, before that rename, instead of last.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        frees_key: bool,
    },
}

/// The stages of an apply, in order. The two dry-run levels stop between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Users, service principals and groups themselves (adopt, update, create, policies).
    Principals,
    /// Group memberships.
    Members,
    /// Deactivations and deletions, last.
    Deprovision,
}

impl Op {
    /// The order in which operations run: adopt and forget, renames (a rename that frees a key
    /// runs before the one that takes it, as the plan orders them; the others together), other
    /// updates, creates, policies, member removals (they break cycles), member additions,
    /// deactivations, deletions.
    pub fn phase(&self) -> u8 {
        match self {
            Op::Adopt { .. } | Op::Forget { .. } => 0,
            Op::Update { changes, .. } if changes.iter().any(|c| c.attr == Attr::Key) => {
                RENAME_PHASE
            }
            Op::Delete {
                frees_key: true, ..
            } => RENAME_PHASE,
            Op::Update { .. } => 2,
            Op::Create { .. } => CREATE_PHASE,
            Op::AttachPolicies { .. } | Op::DetachPolicies { .. } => 4,
            Op::RemoveMembers { .. } => REMOVE_MEMBERS_PHASE,
            Op::AddMembers { .. } => ADD_MEMBERS_PHASE,
            Op::Deactivate { .. } => 7,
            Op::Delete { .. } => 8,
        }
    }

    /// The stage the operation belongs to.
    pub fn stage(&self) -> Stage {
        match self {
            Op::Adopt { .. }
            | Op::Forget { .. }
            | Op::Update { .. }
            | Op::Create { .. }
            | Op::AttachPolicies { .. }
            | Op::DetachPolicies { .. } => Stage::Principals,
            // A deletion that frees a key for a rename runs with the renames.
            Op::Delete {
                frees_key: true, ..
            } => Stage::Principals,
            Op::RemoveMembers { .. } | Op::AddMembers { .. } => Stage::Members,
            Op::Deactivate { .. } | Op::Delete { .. } => Stage::Deprovision,
        }
    }

    /// The principal the operation is about (the group, for membership and policy operations).
    pub fn subject(&self) -> (Kind, &str) {
        match self {
            Op::Adopt { target, .. }
            | Op::Forget { target }
            | Op::Update { target, .. }
            | Op::Deactivate { target }
            | Op::Delete { target, .. } => (target.kind, &target.key),
            Op::Create { principal, .. } => (principal.kind, &principal.key),
            Op::AttachPolicies { group, .. }
            | Op::DetachPolicies { group, .. }
            | Op::RemoveMembers { group, .. }
            | Op::AddMembers { group, .. } => (group.kind, &group.key),
        }
    }

    /// Whether the operation takes something away: a deletion, a deactivation, or an update that
    /// turns `active` off. These count against the safety threshold.
    pub fn is_destructive(&self) -> bool {
        match self {
            Op::Delete { .. } | Op::Deactivate { .. } => true,
            Op::Update { changes, .. } => changes
                .iter()
                .any(|c| c.attr == Attr::Active && c.to == AttrValue::Bool(false)),
            _ => false,
        }
    }

    /// Whether the operation writes to the target (adopting and forgetting only change state).
    pub fn writes(&self) -> bool {
        !matches!(self, Op::Adopt { .. } | Op::Forget { .. })
    }

    /// Sort key that makes plans deterministic.
    pub fn sort_key(&self) -> (u8, u8, String) {
        let (kind, key) = self.subject();
        let kind_rank = match (self, kind) {
            // Deletions remove groups first, so no group is left pointing at a deleted member.
            (Op::Delete { .. }, Kind::Group) => 0,
            (Op::Delete { .. }, _) => 1,
            (_, Kind::User) => 0,
            (_, Kind::ServicePrincipal) => 1,
            (_, Kind::Group) => 2,
        };
        (self.phase(), kind_rank, key.to_owned())
    }
}

/// A target principal idsync does not own with the key a source principal maps to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conflict {
    /// The key both claim.
    pub key: PKey,
    /// The source principal (or principals) involved.
    pub sources: Vec<SourceRef>,
    /// The target id of the principal already there, if it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    /// What happened and how to resolve it.
    pub reason: String,
}

/// Why a plan may not be applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HaltReason {
    /// More deletions and deactivations than the threshold allows.
    Threshold,
    /// Conflicts, and `on_conflict = "halt"`.
    Conflicts,
    /// The source read returned nothing although idsync manages principals.
    EmptySource,
    /// Most of what idsync owns is missing from the target (a wrong target or credentials?).
    TargetVanished,
    /// Too large a share of a run's operations failed: the agreement waits for a person.
    Failures,
}

/// A safety guard stopped the plan before any write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    /// Which guard.
    pub reason: HaltReason,
    /// What happened and how to approve or resolve it.
    pub message: String,
}

/// How the snapshot the plan is based on was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReadMode {
    /// The whole scope was read.
    #[default]
    Full,
    /// Only changes since the last applied cursor were read.
    Incremental,
}

/// Counts, for the summary line and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Operations by name (`create`, `update`, ...) and kind.
    pub ops: BTreeMap<String, usize>,
    /// Members added in all.
    pub members_added: usize,
    /// Members removed in all.
    pub members_removed: usize,
    /// Deletions and deactivations (the threshold counts these).
    pub destructive: usize,
    /// Principals idsync owns in the target before the plan.
    pub owned: usize,
    /// Principals that left the source but are kept (`deprovision = "none"`).
    pub kept: usize,
}

/// A plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// File format version.
    pub format: u32,
    /// The agreement (source × target) the plan is for.
    pub agreement: String,
    /// The state version the plan was computed from. Apply refuses the plan if it moved.
    pub state_version: u64,
    /// How the source was read.
    pub mode: ReadMode,
    /// The operations, in apply order.
    pub ops: Vec<Op>,
    /// Conflicts found (not operations).
    pub conflicts: Vec<Conflict>,
    /// Things worth knowing that change nothing (stale id-map entries repaired, dangling members).
    pub notes: Vec<String>,
    /// Set when a safety guard stopped the plan.
    pub halt: Option<Halt>,
    /// Counts.
    pub summary: Summary,
    /// How the target was observed for this plan.
    #[serde(default)]
    pub observation: Observation,
    /// The trust a clean, complete apply of this plan leaves in the state (none when the plan has
    /// conflicts, held-back principals or an incomplete source read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<crate::state::Trust>,
    /// Deletions and deactivations approved when the plan was made (`--approve-deletions`): a
    /// saved plan's guards are checked again with these before it is applied.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub approved_deletions: usize,
    /// Operations held back because their principal is quarantined: a plan that holds some back
    /// is not complete, so applying it does not advance the source's cursors.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_back: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How the target was observed for a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "how")]
pub enum Observation {
    /// Every principal and membership was read.
    #[default]
    Full,
    /// Only the principals the source changes touch were read; the rest is the last applied
    /// snapshot, trusted since the full observation at `since` (seconds since the Unix epoch).
    #[serde(rename_all = "camelCase")]
    Incremental {
        /// Principals read live (by id or key).
        read: usize,
        /// When the target was last observed in full.
        since: u64,
        /// Principals the plan was made on, when it was made on what changed alone (mapped,
        /// pictured and compared: the change and what it references); the rest of the tenant is
        /// as the last apply left it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        touched: Option<usize>,
    },
}

impl Plan {
    /// True when the plan has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations of one stage.
    pub fn stage_ops(&self, stage: Stage) -> impl Iterator<Item = &Op> {
        self.ops.iter().filter(move |o| o.stage() == stage)
    }

    /// Number of operations that write to the target.
    pub fn write_count(&self) -> usize {
        self.ops.iter().filter(|o| o.writes()).count()
    }
}

/// A saved plan: the plan plus what apply needs to record in state afterwards (the snapshot it was
/// computed from and the source cursor to store), so `idsync apply plan.json` applies exactly what
/// was reviewed, without reading the source again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanFile {
    /// The plan.
    pub plan: Plan,
    /// The source snapshot the plan was computed from (shared with the read and the state, never
    /// copied: at 1M memberships a copy is 100+ MB).
    pub snapshot: std::sync::Arc<Snapshot>,
    /// The source's change-feed cursors after the read (stored only once the apply succeeds).
    #[serde(default)]
    pub cursors: BTreeMap<String, String>,
    /// A digest of the rest, set when the plan is saved: a saved plan whose content does not
    /// match it (edited, cut off) is refused. It detects edits; it is no signature, so the guards
    /// are checked again anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}
