//! The change log: every operation an apply attempted, as one JSON line (time, agreement, run,
//! operation, principal, target id, result, error), kept beside the state as a new object per
//! apply (`changes/<agreement>/<day>/<time>-<run>.jsonl`, never rewritten), and read back by
//! `idsync log`. It is the audit trail of who was added where. It holds keys, ids, attribute
//! names and error messages, never a secret or an attribute's value.

use idsync_engine::apply::ApplyReport;
use idsync_model::{AgreementState, Kind, Op, PRef, Plan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One operation of one apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// When the apply ended (RFC 3339, UTC).
    pub time: String,
    /// The agreement.
    pub agreement: String,
    /// The apply's id, shared by its records.
    pub run: String,
    /// The operation (`create`, `update`, `addMembers`, ...).
    pub op: String,
    /// The principal it is about, `kind:key` (for member changes, the group).
    pub principal: String,
    /// Its id in the target, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    /// `applied`, `failed`, `unknown` (it may have happened: a timeout, a cut connection) or
    /// `skipped` (an operation it depends on failed).
    pub result: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Members added or removed, `kind:key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Attributes changed (names only) or policies attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// The apply was rolled back afterwards (`true`: this operation was among those undone, or
    /// the rollback left it for the next run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
}

/// A run id: the time, the process and a counter.
pub fn run_id(now: u64) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now:x}-{}-{n}", std::process::id())
}

/// `YYYY-MM-DD` and `HHMMSS` of a unix time, and its RFC 3339 form.
pub fn day_time(now: u64) -> (String, String, String) {
    let (y, m, d, hh, mm, ss, _) = idsync_model::civil(now);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{hh:02}{mm:02}{ss:02}"),
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    )
}

fn kind_key(kind: Kind, key: &str) -> String {
    format!("{kind}:{key}")
}

/// Target ids by key, for principals the apply created (their references carry none): drawn
/// from the owned set the first time an operation needs one. An apply that created nothing never
/// needs it, and the owned set holds every principal of the tenant.
struct OwnedIds<'a> {
    state: &'a AgreementState,
    index: std::cell::OnceCell<BTreeMap<(Kind, &'a str), &'a str>>,
}

impl<'a> OwnedIds<'a> {
    fn new(state: &'a AgreementState) -> Self {
        OwnedIds {
            state,
            index: std::cell::OnceCell::new(),
        }
    }

    /// The target id of the principal of this kind and key, if idsync owns it.
    fn get(&self, kind: Kind, key: &str) -> Option<String> {
        let index: &BTreeMap<(Kind, &str), &str> = self.index.get_or_init(|| {
            let mut ids = BTreeMap::new();
            for kind in Kind::ALL {
                for (id, o) in self.state.owned.get(kind) {
                    ids.insert((kind, o.key.as_str()), id.as_str());
                }
            }
            ids
        });
        index.get(&(kind, key)).map(|s| (*s).to_owned())
    }
}

/// The target id of a reference: its own, or the one the state learnt during the apply.
fn id_of(r: &PRef, ids: &OwnedIds<'_>) -> Option<String> {
    r.id.clone().or_else(|| ids.get(r.kind, &r.key))
}

/// The name, principal, target id, members and changes of an operation.
fn describe(
    op: &Op,
    state: &AgreementState,
    ids: &OwnedIds<'_>,
) -> (
    &'static str,
    String,
    Option<String>,
    Vec<String>,
    Vec<String>,
) {
    let members = |m: &[PRef]| m.iter().map(|r| kind_key(r.kind, &r.key)).collect();
    match op {
        Op::Adopt { target, .. } => (
            "adopt",
            kind_key(target.kind, &target.key),
            id_of(target, ids),
            vec![],
            vec![],
        ),
        Op::Forget { target } => (
            "forget",
            kind_key(target.kind, &target.key),
            id_of(target, ids),
            vec![],
            vec![],
        ),
        Op::Update {
            target, changes, ..
        } => (
            "update",
            kind_key(target.kind, &target.key),
            id_of(target, ids),
            vec![],
            changes
                .iter()
                .map(|c| {
                    serde_json::to_value(c.attr)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{:?}", c.attr))
                })
                .collect(),
        ),
        Op::Create { principal, source } => (
            "create",
            kind_key(source.kind, &principal.key),
            state
                .links
                .get(source.kind)
                .get(&source.id)
                .cloned()
                .or_else(|| ids.get(source.kind, &principal.key)),
            vec![],
            vec![],
        ),
        Op::AttachPolicies { group, policies } => (
            "attachPolicies",
            kind_key(group.kind, &group.key),
            id_of(group, ids),
            vec![],
            policies.clone(),
        ),
        Op::DetachPolicies { group, policies } => (
            "detachPolicies",
            kind_key(group.kind, &group.key),
            id_of(group, ids),
            vec![],
            policies.clone(),
        ),
        Op::RemoveMembers { group, members: m } => (
            "removeMembers",
            kind_key(group.kind, &group.key),
            id_of(group, ids),
            members(m),
            vec![],
        ),
        Op::AddMembers { group, members: m } => (
            "addMembers",
            kind_key(group.kind, &group.key),
            id_of(group, ids),
            members(m),
            vec![],
        ),
        Op::Deactivate { target } => (
            "deactivate",
            kind_key(target.kind, &target.key),
            id_of(target, ids),
            vec![],
            vec![],
        ),
        Op::Delete { target, .. } => (
            "delete",
            kind_key(target.kind, &target.key),
            id_of(target, ids),
            vec![],
            vec![],
        ),
    }
}

/// The records of an apply: what ran (applied, or of unknown outcome), what failed, what was
/// skipped, in that order.
pub fn records(
    agreement: &str,
    run: &str,
    now: u64,
    plan: &Plan,
    report: &ApplyReport,
    state: &AgreementState,
) -> Vec<Change> {
    let (_, _, time) = day_time(now);
    let ids = OwnedIds::new(state);
    let rolled_back = report.rollback.is_some();
    let record = |op: &Op, result: &str, error: Option<String>| {
        let (name, principal, target_id, members, changed) = describe(op, state, &ids);
        Change {
            time: time.clone(),
            agreement: agreement.to_owned(),
            run: run.to_owned(),
            op: name.to_owned(),
            principal,
            target_id,
            result: result.to_owned(),
            error,
            members,
            changed,
            rolled_back: rolled_back && result != "skipped" && result != "failed",
        }
    };
    let mut out = Vec::new();
    let mut failures: Vec<&idsync_engine::apply::Failure> = report.failed.iter().collect();
    for &i in &report.ran {
        let Some(op) = plan.ops.get(i) else { continue };
        // An operation that ran and failed with an unknown outcome is in both lists, and so is
        // a split addition a part of which failed. The failure holds the operation as it ran
        // (ids filled in, an addition's failed parts only): matched by what it is and names.
        let same = |f: &&idsync_engine::apply::Failure| {
            std::mem::discriminant(&f.op) == std::mem::discriminant(op)
                && f.op.subject() == op.subject()
        };
        if let Some(pos) = failures
            .iter()
            .position(|f| f.op == *op)
            .or_else(|| failures.iter().position(same))
        {
            let f = failures.remove(pos);
            let result = if f.outcome_unknown() {
                "unknown"
            } else {
                "failed"
            };
            out.push(record(op, result, Some(f.error.clone())));
        } else {
            out.push(record(op, "applied", None));
        }
    }
    for f in failures {
        let result = if f.outcome_unknown() {
            "unknown"
        } else {
            "failed"
        };
        out.push(record(&f.op, result, Some(f.error.clone())));
    }
    for f in &report.skipped {
        out.push(record(&f.op, "skipped", Some(f.error.clone())));
    }
    out
}

/// The records as JSON lines.
pub fn to_lines(records: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        if let Ok(line) = serde_json::to_string(r) {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    out
}

/// Reads records back from the change log's objects, skipping lines that are not records (a
/// record written by a newer idsync with fields this one does not know still reads).
pub fn parse(objects: &[(String, Vec<u8>)]) -> (Vec<Change>, usize) {
    let mut out = Vec::new();
    let mut unreadable = 0;
    for (_, bytes) in objects {
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Change>(line) {
                Ok(c) => out.push(c),
                Err(_) => unreadable += 1,
            }
        }
    }
    out.sort_by(|a, b| (&a.time, &a.run).cmp(&(&b.time, &b.run)));
    (out, unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Owned, Ownership};

    fn owning(key: &str, id: &str) -> AgreementState {
        let mut state = AgreementState::new("a");
        state.owned.get_mut(Kind::Group).insert(
            id.to_owned(),
            Owned {
                key: key.to_owned(),
                how: Ownership::Created,
                source: None,
            },
        );
        state
    }

    #[test]
    fn a_reference_without_an_id_takes_the_one_the_state_owns_under_its_key() {
        let state = owning("data-eng", "g-17");
        let ids = OwnedIds::new(&state);
        let op = Op::AddMembers {
            group: PRef {
                kind: Kind::Group,
                key: "data-eng".into(),
                id: None,
            },
            members: vec![],
        };
        let (name, principal, target_id, _, _) = describe(&op, &state, &ids);
        assert_eq!(
            (name, principal.as_str(), target_id.as_deref()),
            ("addMembers", "group:data-eng", Some("g-17"))
        );
        assert_eq!(ids.get(Kind::User, "data-eng"), None, "keys are per kind");
    }

    #[test]
    fn references_with_ids_never_draw_the_index_of_the_owned_set() {
        let state = owning("data-eng", "g-17");
        let ids = OwnedIds::new(&state);
        let op = Op::RemoveMembers {
            group: PRef {
                kind: Kind::Group,
                key: "data-eng".into(),
                id: Some("g-9".into()),
            },
            members: vec![],
        };
        let (_, _, target_id, _, _) = describe(&op, &state, &ids);
        assert_eq!(target_id.as_deref(), Some("g-9"));
        assert!(ids.index.get().is_none(), "the index was drawn");
    }
}
