//! Quarantine and escrow, as Entra's provisioning service treats objects that keep failing: a
//! principal whose writes failed in `quarantine_after` runs in a row is quarantined, its
//! operations held back (with a note) until a time that doubles with every further failure
//! (from an hour, at most a day), then tried again; a success or `idsync agreement release`
//! frees it. One poison principal never blocks the others. A run in which more than
//! `max_failed_percent` of the operations it attempted failed halts the agreement until a person
//! resumes it, like the deletion threshold. Failures of the service or the network (5xx and
//! dropped connections after retries, throttling) count for neither: they say nothing about the
//! principal, and the next run retries them anyway.

use crate::apply::ApplyReport;
use crate::plan::{Policy, tally};
use idsync_model::{AgreementState, Capabilities, Kind, Op, PRef, Plan, Strikes, Summary};
use std::collections::{BTreeMap, BTreeSet};

/// Fewest failed operations that can halt an agreement: one or two failures in a small run are
/// the quarantine's business, not a reason to stop everything.
pub const HALT_FLOOR: usize = 5;

/// The first quarantine lasts this long; each further failure doubles it, up to [`LONGEST`].
pub const FIRST: u64 = 3600;

/// The longest quarantine: a quarantined principal is tried again at least daily.
pub const LONGEST: u64 = 24 * 3600;

/// The key of a principal in [`AgreementState::failing`]: `kind:folded key`, as `adopt_keys`
/// and `idsync agreement release` write it.
pub fn key(kind: Kind, natural: &str, caps: &Capabilities) -> String {
    format!("{}:{}", kind.as_str(), caps.fold(natural))
}

/// How long a principal that failed in `runs` runs in a row stays quarantined (0: not yet).
pub fn escrow(runs: u32, after: u32) -> u64 {
    if after == 0 || runs < after {
        return 0;
    }
    let doublings = (runs - after).min(16);
    FIRST.saturating_mul(1 << doublings).min(LONGEST)
}

/// Holds back the operations of quarantined principals (until their time is up), and drops
/// them from the members a plan adds when this plan was to create them. Returns the number of
/// operations held back; notes say which principals and until when. The summary is counted again.
pub fn hold(plan: &mut Plan, state: &AgreementState, now: u64, caps: &Capabilities) -> usize {
    let quarantined: BTreeMap<&str, &Strikes> = state
        .failing
        .iter()
        .filter(|(_, s)| s.until > now)
        .map(|(k, s)| (k.as_str(), s))
        .collect();
    if quarantined.is_empty() {
        return 0;
    }
    let is_held =
        |kind: Kind, natural: &str| quarantined.contains_key(key(kind, natural, caps).as_str());
    let mut held_keys: BTreeSet<String> = BTreeSet::new();
    let before = plan.ops.len();
    let mut dropped_members = 0;
    plan.ops.retain_mut(|op| {
        let (kind, natural) = op.subject();
        if is_held(kind, natural) {
            held_keys.insert(key(kind, natural, caps));
            return false;
        }
        if let Op::AddMembers { members, .. } = op {
            let n = members.len();
            members.retain(|m: &PRef| {
                let held = m.id.is_none() && is_held(m.kind, &m.key);
                if held {
                    held_keys.insert(key(m.kind, &m.key, caps));
                }
                !held
            });
            if members.is_empty() {
                return false;
            }
            dropped_members += n - members.len();
        }
        true
    });
    let held = before - plan.ops.len() + dropped_members;
    for k in &held_keys {
        if let Some(s) = quarantined.get(k.as_str()) {
            plan.notes.push(format!(
                "quarantined, held back: {k}: its writes failed in {} run(s) in a row (last: {}); tried again after {} (in {} min), or now with `idsync agreement release {k}`",
                s.runs,
                s.error,
                utc(s.until),
                s.until.saturating_sub(now).div_ceil(60)
            ));
        }
    }
    plan.held_back += held;
    let mut summary = Summary {
        owned: plan.summary.owned,
        kept: plan.summary.kept,
        ..Summary::default()
    };
    tally(&plan.ops, &mut summary);
    plan.summary = summary;
    held
}

/// What [`record`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recorded {
    /// Principals quarantined by this run (`kind:key`).
    pub quarantined: Vec<String>,
    /// Principals freed by a success in this run.
    pub released: Vec<String>,
    /// Why the agreement halted, if this run halted it.
    pub halted: Option<String>,
}

impl Recorded {
    /// Nothing quarantined, freed or halted.
    pub fn is_empty(&self) -> bool {
        self.quarantined.is_empty() && self.released.is_empty() && self.halted.is_none()
    }
}

/// Records a run's outcome per principal: each one with a failed write gets a strike (once per
/// run) and is quarantined after `policy.quarantine_after` strikes in a row; each one whose
/// operations all succeeded is freed. A run whose failed share of attempted operations is above
/// `policy.max_failed_percent` (and at least [`HALT_FLOOR`]) halts the agreement.
pub fn record(
    plan: &Plan,
    report: &ApplyReport,
    state: &mut AgreementState,
    policy: &Policy,
    now: u64,
    caps: &Capabilities,
) -> Recorded {
    let mut out = Recorded::default();
    // The service or the network failing, or throttling, says nothing about the principal: only
    // the other failures count (a refusal, an invalid value, an unreadable answer...).
    let transient = |f: &&crate::apply::Failure| {
        matches!(
            f.kind,
            Some(
                crate::target::TargetErrorKind::Unavailable
                    | crate::target::TargetErrorKind::Throttled
            )
        )
    };
    let mut failed: BTreeMap<String, &str> = BTreeMap::new();
    for f in report.failed.iter().filter(|f| !transient(f)) {
        let (kind, natural) = f.op.subject();
        failed.entry(key(kind, natural, caps)).or_insert(&f.error);
    }
    let any_failure: std::collections::BTreeSet<String> = report
        .failed
        .iter()
        .map(|f| {
            let (kind, natural) = f.op.subject();
            key(kind, natural, caps)
        })
        .collect();
    for &i in &report.ran {
        let (kind, natural) = plan.ops[i].subject();
        let k = key(kind, natural, caps);
        if !any_failure.contains(&k) && state.failing.remove(&k).is_some() {
            out.released.push(k);
        }
    }
    for (k, error) in &failed {
        let s = state.failing.entry(k.clone()).or_insert_with(|| Strikes {
            since: now,
            ..Strikes::default()
        });
        s.runs += 1;
        s.error = (*error).to_owned();
        let was = s.until > 0;
        let wait = escrow(s.runs, policy.quarantine_after);
        s.until = if wait > 0 { now + wait } else { 0 };
        if s.until > 0 && !was {
            out.quarantined.push(k.clone());
        }
    }
    let attempted = report.applied + report.failed.len();
    let nfailed = report.failed.iter().filter(|f| !transient(f)).count();
    if let Some(pct) = policy.max_failed_percent
        && nfailed >= HALT_FLOOR
        && nfailed * 100 > attempted * pct as usize
    {
        let why = format!(
            "{nfailed} of the {attempted} operations attempted at {} failed, not for a passing outage (more than max_failed_percent = {pct}); first: {}",
            utc(now),
            report
                .failed
                .iter()
                .find(|f| !transient(f))
                .map_or("", |f| f.error.as_str())
        );
        state.halted = Some(why.clone());
        out.halted = Some(why);
    }
    out
}

/// A time in seconds since the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
pub fn utc(secs: u64) -> String {
    let (y, m, d, hh, mm, _, _) = idsync_model::civil(secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escrow_starts_at_the_threshold_doubles_and_stops_at_a_day() {
        assert_eq!(escrow(2, 3), 0);
        assert_eq!(escrow(3, 3), 3600);
        assert_eq!(escrow(4, 3), 7200);
        assert_eq!(escrow(7, 3), 16 * 3600);
        assert_eq!(escrow(8, 3), LONGEST);
        assert_eq!(escrow(u32::MAX, 3), LONGEST);
        assert_eq!(escrow(100, 0), 0, "0 never quarantines");
    }

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_800_000_000), "2027-01-15 08:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
    }
}
