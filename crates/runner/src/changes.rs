//! The change log: every operation an apply attempted, as one JSON line (time, agreement, run,
//! operation, principal, target id, result, error), kept beside the state as a new object per
//! apply (`changes/<agreement>/<day>/<time>-<run>.jsonl.gz`, gzip'd, never rewritten), and read back by
//! `idsync log`. It is the audit trail of who was added where. It holds keys, ids, attribute
//! names and error messages, never a secret or an attribute's value.

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
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

/// An apply as the change log records it.
pub struct Applied<'a> {
    /// The agreement.
    pub agreement: &'a str,
    /// The apply's id (`run_id`).
    pub run: &'a str,
    /// When it ended (unix seconds).
    pub now: u64,
    /// The plan it applied.
    pub plan: &'a Plan,
    /// What it did.
    pub report: &'a ApplyReport,
    /// The state after it (the ids of what it created).
    pub state: &'a AgreementState,
}

impl Applied<'_> {
    /// Calls `f` with each record of the apply, one at a time: what ran (applied, or of unknown
    /// outcome), what failed, what was skipped, in that order. A first sync's records name every
    /// membership of the tenant: they are made and handed on one by one, never held together.
    pub fn each_record(&self, f: impl FnMut(Change)) {
        each_record(self, f);
    }

    /// The records of the apply, together (see [`Applied::each_record`], which does not hold
    /// them).
    pub fn records(&self) -> Vec<Change> {
        let mut out = Vec::new();
        each_record(self, |c| out.push(c));
        out
    }

    /// The change log's object of the apply: its records as JSON lines, gzip'd as each is made
    /// (a first sync at 100k users records a million memberships, 94 MB as text). `None` when
    /// there is no record.
    pub fn log_object(&self) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Write;
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        let mut any = false;
        let mut failed: Option<std::io::Error> = None;
        each_record(self, |c| {
            if failed.is_some() {
                return;
            }
            let written = serde_json::to_writer(&mut gz, &c)
                .map_err(std::io::Error::from)
                .and_then(|()| gz.write_all(b"\n"));
            match written {
                Ok(()) => any = true,
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let bytes = gz.finish()?;
        Ok(any.then_some(bytes))
    }
}

fn each_record(a: &Applied<'_>, mut f: impl FnMut(Change)) {
    let Applied {
        agreement,
        run,
        now,
        plan,
        report,
        state,
    } = *a;
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
            let fail = failures.remove(pos);
            let result = if fail.outcome_unknown() {
                "unknown"
            } else {
                "failed"
            };
            f(record(op, result, Some(fail.error.clone())));
        } else {
            f(record(op, "applied", None));
        }
    }
    for fail in failures {
        let result = if fail.outcome_unknown() {
            "unknown"
        } else {
            "failed"
        };
        f(record(&fail.op, result, Some(fail.error.clone())));
    }
    for skipped in &report.skipped {
        f(record(&skipped.op, "skipped", Some(skipped.error.clone())));
    }
}

/// Reads records back from the change log's objects (`.jsonl.gz`, and the plain `.jsonl` objects
/// written before the log was compressed), skipping lines that are not records (a record written by
/// a newer idsync with fields this one does not know still reads). An object that does not
/// inflate counts as one unreadable record.
pub fn parse(objects: &[(String, Vec<u8>)]) -> (Vec<Change>, usize) {
    let mut out = Vec::new();
    let mut unreadable = 0;
    for (key, bytes) in objects {
        let inflated;
        let text: &[u8] = if key.ends_with(".gz") {
            let mut plain = Vec::new();
            match std::io::Read::read_to_end(&mut GzDecoder::new(bytes.as_slice()), &mut plain) {
                Ok(_) => {
                    inflated = plain;
                    &inflated
                }
                Err(_) => {
                    unreadable += 1;
                    continue;
                }
            }
        } else {
            bytes
        };
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
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

    fn plan_of(ops: Vec<Op>) -> Plan {
        Plan {
            format: 1,
            agreement: "a".into(),
            state_version: 0,
            mode: idsync_model::ReadMode::Full,
            ops,
            conflicts: vec![],
            notes: vec![],
            halt: None,
            summary: idsync_model::Summary::default(),
            observation: idsync_model::Observation::default(),
            trust: None,
            approved_deletions: 0,
            held_back: 0,
        }
    }

    fn add(group: &str, id: &str, members: &[&str]) -> Op {
        Op::AddMembers {
            group: PRef {
                kind: Kind::Group,
                key: group.into(),
                id: Some(id.into()),
            },
            members: members
                .iter()
                .map(|m| PRef {
                    kind: Kind::User,
                    key: (*m).into(),
                    id: Some(format!("id-{m}")),
                })
                .collect(),
        }
    }

    #[test]
    fn the_log_object_is_the_records_gzipped_and_reads_back_beside_plain_objects() {
        let state = AgreementState::new("a");
        let plan = plan_of(vec![
            add(
                "data \"eng\"",
                "g-1",
                &["bob@corp.example", "chloé@corp.example"],
            ),
            add("ops", "g-2", &["dan@corp.example"]),
            add("sales", "g-3", &["eve@corp.example"]),
        ]);
        let report = ApplyReport {
            applied: 1,
            ran: vec![0, 1],
            failed: vec![idsync_engine::apply::Failure {
                op: plan.ops[1].clone(),
                error: "HTTP 500".into(),
                kind: Some(idsync_engine::apply::TargetErrorKind::Forbidden),
            }],
            skipped: vec![idsync_engine::apply::Failure {
                op: plan.ops[2].clone(),
                error: "not attempted".into(),
                kind: None,
            }],
            ..ApplyReport::default()
        };
        let applied = Applied {
            agreement: "a",
            run: "r1",
            now: 86_400,
            plan: &plan,
            report: &report,
            state: &state,
        };
        let expected = applied.records();
        assert_eq!(
            expected
                .iter()
                .map(|c| (c.principal.as_str(), c.result.as_str()))
                .collect::<Vec<_>>(),
            [
                ("group:data \"eng\"", "applied"),
                ("group:ops", "failed"),
                ("group:sales", "skipped")
            ]
        );
        let object = applied.log_object().unwrap().unwrap();
        assert_eq!(&object[..2], &[0x1f, 0x8b], "a gzip member");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut GzDecoder::new(object.as_slice()), &mut text).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");

        // An object written before the log was compressed, one that does not inflate, and the
        // new one: the records of both readable ones, in time order, and one unreadable.
        let mut old = serde_json::to_string(&Change {
            time: "1970-01-01T00:00:00Z".into(),
            run: "r0".into(),
            ..expected[0].clone()
        })
        .unwrap();
        old.push('\n');
        let objects = vec![
            (
                "changes/a/1970-01-01/000000-r0.jsonl".to_owned(),
                old.into_bytes(),
            ),
            (
                "changes/a/1970-01-02/000000-r1.jsonl.gz".to_owned(),
                object.clone(),
            ),
            (
                "changes/a/1970-01-02/000001-r2.jsonl.gz".to_owned(),
                object[..object.len() / 2].to_vec(),
            ),
        ];
        let (back, unreadable) = parse(&objects);
        assert_eq!(unreadable, 1, "the cut object");
        assert_eq!(back.len(), 4);
        assert_eq!(back[0].run, "r0");
        assert_eq!(back[1..], expected[..]);
    }

    #[test]
    fn an_apply_without_records_has_no_log_object() {
        let state = AgreementState::new("a");
        let plan = plan_of(vec![]);
        let report = ApplyReport::default();
        let applied = Applied {
            agreement: "a",
            run: "r",
            now: 0,
            plan: &plan,
            report: &report,
            state: &state,
        };
        assert!(applied.log_object().unwrap().is_none());
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
