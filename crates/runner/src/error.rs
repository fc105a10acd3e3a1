//! What can stop a run, each with the exit code it asks for.

use crate::exit;
use idsync_engine::{SourceError, TargetError};
use idsync_state::StateError;

/// Why a run stopped. Messages say what to do and never hold a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The state store failed, or another run holds or took the lease.
    #[error(transparent)]
    State(#[from] StateError),
    /// The source could not be read.
    #[error("reading the source")]
    Source(#[source] SourceError),
    /// The target could not be observed.
    #[error("observing target {agreement} ({target}): {error}")]
    Observe {
        /// The agreement.
        agreement: String,
        /// Where the target is.
        target: String,
        /// What it answered.
        error: TargetError,
    },
    /// The agreement was finalised or terminated.
    #[error(
        "agreement {agreement:?} is {status}: idsync no longer syncs it; `idsync state reset {agreement}` starts a new agreement"
    )]
    Inactive {
        /// The agreement.
        agreement: String,
        /// Its status.
        status: String,
    },
    /// A saved plan was made from another state version than the store holds now.
    #[error(
        "the saved plan for {agreement:?} was computed from state version {planned}, but the state is now at version {now}: something ran since. Nothing was applied; run `idsync plan` again"
    )]
    StalePlan {
        /// The agreement.
        agreement: String,
        /// The version the plan was computed from.
        planned: u64,
        /// The version in the store.
        now: u64,
    },
    /// A saved plan was made against idsync's picture of a target that cannot be read, and the
    /// target has moved since (another writer, a force-refresh).
    #[error(
        "the saved plan for {agreement:?} was made against idsync's picture of {target}, but the target is no longer where idsync left it (another writer, or a refresh asked on its side). Nothing was applied; run `idsync plan` again"
    )]
    StaleTarget {
        /// The agreement.
        agreement: String,
        /// Where the target is.
        target: String,
    },
    /// A saved plan's content does not match its digest.
    #[error(
        "the saved plan for {agreement:?} is not as `idsync plan --out` sealed it (changed or cut off since, or written by an idsync from before plans were sealed): nothing was applied. Make a new one with `idsync plan --out`"
    )]
    PlanEdited {
        /// The agreement.
        agreement: String,
    },
    /// A saved plan does things the policy and the state do not allow.
    #[error(
        "the saved plan for {agreement:?} is refused, as this configuration and state could not have made it ({}). Nothing was applied; make a new one with `idsync plan --out`", reasons.join("; ")
    )]
    PlanRefused {
        /// The agreement.
        agreement: String,
        /// Every reason found.
        reasons: Vec<String>,
    },
    /// The journal could not be committed, so nothing was written to the target.
    #[error("recording the apply journal")]
    Journal(#[source] StateError),
    /// The state after the apply could not be committed (the journal covers the creates).
    #[error("saving the state after the apply")]
    Commit(#[source] StateError),
    /// A rollback (`on_apply_error = "rollback"`) could not undo everything: what is left stays
    /// in the journal, and the next run tries it again before anything else.
    #[error(
        "rolling back on target {agreement}: {left} operation(s) could not be undone yet (first: {first}). They stay in the journal; the next `idsync sync` tries them again before it plans anything"
    )]
    RollbackIncomplete {
        /// The agreement.
        agreement: String,
        /// Undo operations left.
        left: usize,
        /// The first failure.
        first: String,
    },
    /// Ending an agreement (finalise, terminate) cannot go on; the message says why and what to
    /// do.
    #[error("{0}")]
    Lifecycle(String),
    /// The target could not make the writes durable; the state went back to before the apply.
    #[error("finishing the writes to target {agreement}: {error}")]
    Flush {
        /// The agreement.
        agreement: String,
        /// What the target answered.
        error: TargetError,
    },
}

impl RunError {
    /// The exit code this error asks for: [`exit::BUSY`] when another run holds or took the
    /// lease, [`exit::HALTED`] when a target refused a whole apply for a conflict, else
    /// [`exit::ERROR`].
    pub fn exit_code(&self) -> u8 {
        let state = match self {
            RunError::State(e) | RunError::Journal(e) | RunError::Commit(e) => Some(e),
            _ => None,
        };
        match (state, self) {
            (Some(StateError::LeaseHeld { .. } | StateError::LeaseLost { .. }), _) => exit::BUSY,
            // A target that refused the whole apply for a conflict (Kanidm: a name or external
            // id another entry holds) halts the run: nothing was written, and a person decides.
            (_, RunError::Flush { error, .. })
                if error.kind == idsync_engine::TargetErrorKind::AlreadyExists =>
            {
                exit::HALTED
            }
            _ => exit::ERROR,
        }
    }
}
