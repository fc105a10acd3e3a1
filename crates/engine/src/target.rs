//! The [`Target`] trait: a system idsync writes principals to, and what its calls answer.

use async_trait::async_trait;
use idsync_model::{Capabilities, Observed, Op, PRef};
use serde::{Deserialize, Serialize};

/// What went wrong with one target call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetErrorKind {
    /// The principal does not exist.
    NotFound,
    /// A principal with that key exists already.
    AlreadyExists,
    /// Credentials missing or wrong.
    Unauthorized,
    /// Authenticated, but not allowed.
    Forbidden,
    /// The target does not implement this (lakeFS without RBAC answers 501).
    NotImplemented,
    /// Throttled, after retries.
    Throttled,
    /// A server or network error, after retries.
    Unavailable,
    /// The target rejected the request as invalid.
    Invalid,
    /// The target answered something idsync cannot read.
    Protocol,
}

/// An error from a target, with what to do about it in the message. Never contains a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    /// The category.
    pub kind: TargetErrorKind,
    /// Human-readable, actionable.
    pub message: String,
}

impl TargetError {
    /// A new error.
    pub fn new(kind: TargetErrorKind, message: impl Into<String>) -> Self {
        TargetError {
            kind,
            message: message.into(),
        }
    }
}

/// What a successful operation returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A principal was created with this target id.
    Created(String),
    /// Done.
    Done,
}

/// HTTP requests a connector sent (every attempt, retries included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Requests {
    /// GET and HEAD.
    pub reads: u64,
    /// Everything else.
    pub writes: u64,
}

impl std::ops::Sub for Requests {
    type Output = Requests;
    fn sub(self, o: Requests) -> Requests {
        Requests {
            reads: self.reads.saturating_sub(o.reads),
            writes: self.writes.saturating_sub(o.writes),
        }
    }
}

/// A system idsync writes principals to.
#[async_trait]
pub trait Target: Send + Sync {
    /// The requests it has sent so far, for targets that count them.
    fn requests(&self) -> Option<Requests> {
        None
    }

    /// What the target can do.
    fn capabilities(&self) -> Capabilities;

    /// Reads every principal and membership in bulk.
    async fn observe(&self) -> Result<Observed, TargetError>;

    /// Reads only the principals asked for: by target id (groups with their members) and by
    /// natural key. `Ok(None)` when the target cannot; the engine then observes in bulk.
    async fn observe_some(
        &self,
        want: &crate::observe::Interest,
    ) -> Result<Option<crate::observe::Partial>, TargetError> {
        let _ = want;
        Ok(None)
    }

    /// Executes one writing operation. Every [`PRef`] in it carries its target id. Must be
    /// idempotent where the API allows: removing an absent member is not an error.
    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError>;

    /// Whether [`Target::execute_members`] sends a group's member removals and additions in the
    /// same requests (a SCIM PATCH holds several operations, applied in order and atomically,
    /// RFC 7644 §3.5.2). The apply then runs a group's removals with its additions as one write.
    fn combines_member_changes(&self) -> bool {
        false
    }

    /// Whether a group's member writes may run at the same time: each adds or removes exactly the
    /// members it names (a PATCH with no version to match, no read-modify-write, no `/Bulk`).
    /// The apply then splits a large addition into writes of `max_members_per_write` members
    /// that start as soon as their members exist, a few of one group at once.
    fn parallel_member_writes(&self) -> bool {
        false
    }

    /// Removes `remove` from `group` and adds `add` to it, removals first. Every [`PRef`] carries
    /// its target id. By default two operations; targets that can send both together say so with
    /// [`Target::combines_member_changes`].
    async fn execute_members(
        &self,
        group: &PRef,
        remove: &[PRef],
        add: &[PRef],
    ) -> Result<Outcome, TargetError> {
        if !remove.is_empty() {
            self.execute(&Op::RemoveMembers {
                group: group.clone(),
                members: remove.to_vec(),
            })
            .await?;
        }
        if !add.is_empty() {
            self.execute(&Op::AddMembers {
                group: group.clone(),
                members: add.to_vec(),
            })
            .await?;
        }
        Ok(Outcome::Done)
    }

    /// Called once after an apply, whatever its outcome (a file target saves here).
    async fn flush(&self) -> Result<(), TargetError> {
        Ok(())
    }

    /// Whether the target can be read. One that cannot (a Kanidm sync account may write, never
    /// read) is planned against idsync's own picture of it: the runner asks [`Target::resume`]
    /// whether the target is where idsync left it, then hands it the picture to plan against with
    /// [`Target::seed`]; [`Target::observe`] is never called.
    fn readable(&self) -> bool {
        true
    }

    /// For a target that cannot be read: where it stands against `cursor`, the cursor the state
    /// recorded after the last successful flush ([`Target::cursor`]).
    async fn resume(&self, cursor: Option<&str>) -> Result<Sight, TargetError> {
        let _ = cursor;
        Err(TargetError::new(
            TargetErrorKind::NotImplemented,
            "this target is read, not resumed",
        ))
    }

    /// For a target that cannot be read: what it holds, as idsync pictures it, and how the run
    /// goes. Operations are then executed against this picture.
    fn seed(&self, picture: &Observed, how: &Seeding) {
        let _ = (picture, how);
    }

    /// Whether [`Target::seed`] was called in this process.
    fn seeded(&self) -> bool {
        true
    }

    /// The cursor to record in the state once [`Target::flush`] succeeded (`None`: nothing to
    /// record).
    fn cursor(&self) -> Option<String> {
        None
    }

    /// Ends the agreement on the target's own side, for a target that keeps agreements itself
    /// (Kanidm's sync account): finalising hands the entries over to the target, terminating
    /// deletes them with the agreement. `Ok(false)`: the target keeps no agreement of its own, so
    /// idsync ends it in its state (and a terminate deletes through a plan).
    async fn end(&self, how: Ending) -> Result<bool, TargetError> {
        let _ = how;
        Ok(false)
    }
}

/// How an agreement ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Ending {
    /// The target takes the principals over.
    Finalise,
    /// What the agreement made is deleted.
    Terminate,
}

/// How a run of a target that cannot be read goes ([`Target::seed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seeding {
    /// Attributes yielded to the target: never written.
    pub yielded: std::collections::BTreeSet<idsync_model::Attr>,
    /// The picture is not trusted (only what idsync owns, by key): every principal idsync wants
    /// is written in full, so the target ends as idsync wants it whatever it held.
    pub whole: bool,
    /// With `whole`: whatever the target holds for this agreement beyond what idsync wants may
    /// go (`deprovision = "delete"`), so a full run also removes what idsync's state forgot.
    pub prune: bool,
}

/// Where a target that cannot be read stands, against the cursor idsync recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Sight {
    /// Where idsync left it: the state's picture of it holds.
    Same,
    /// Something else moved it (another writer, or a run whose state was not saved): the picture
    /// may be wrong, so every principal idsync wants is written in full.
    Moved,
    /// It asks for everything again (a first run, or Kanidm's `force-refresh`): every principal
    /// idsync holds is written in full, and the target removes whatever is not among them.
    Refresh,
}

/// Which target an agreement writes to, as data: its kind and where it is, never a credential.
/// Part of the agreement's fingerprint, so pointing an agreement elsewhere makes its next run
/// observe the new target in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// The connector kind (`lakefs`, `databricks`, `scim`, ...).
    pub kind: String,
    /// Where it is: a base URL with the account, a file path.
    pub location: String,
}

impl TargetIdentity {
    /// A kind at a location.
    pub fn new(kind: impl Into<String>, location: impl Into<String>) -> Self {
        TargetIdentity {
            kind: kind.into(),
            location: location.into(),
        }
    }
}
