//! The source side: a [`Source`] reads a scope in full, and, where it has a change feed, reads only
//! what changed since the cursors stored after the last successful apply.

use crate::scope::Scope;
use async_trait::async_trait;
use idsync_model::{ReadMode, Snapshot};
use std::collections::BTreeMap;

/// One read of a source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// The scoped snapshot (for a change read: the base with the changes applied).
    pub snapshot: std::sync::Arc<Snapshot>,
    /// The cursors to store once this read has been applied.
    pub cursors: BTreeMap<String, String>,
    /// Full or incremental.
    pub mode: ReadMode,
    /// Search depth per group (1 = selected directly).
    pub depth: BTreeMap<String, u32>,
    /// Remarks for the plan output (missing groups, skipped groups, ...).
    pub notes: Vec<String>,
    /// A change read whose feed held no change: `snapshot` is the base it was given (the same
    /// `Arc`), so a run may skip mapping and planning what it already applied.
    pub unchanged: bool,
}

/// The outcome of asking for changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// The changes, applied to the base.
    Read(Read),
    /// The source has no change feed: read in full.
    Unsupported,
    /// The cursor is no longer valid (expired delta token): read in full. The reason is shown.
    Expired(String),
}

/// What went wrong with a source call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceErrorKind {
    /// Credentials missing, wrong or expired.
    Unauthorized,
    /// Authenticated, but not allowed to read.
    Forbidden,
    /// What was asked for does not exist.
    NotFound,
    /// Throttled, after retries.
    Throttled,
    /// A server or network error, after retries.
    Unavailable,
    /// The source answered something idsync cannot read.
    Protocol,
    /// The request or its settings were refused as invalid.
    Invalid,
    /// Anything else (a file that cannot be read, a directory that does not parse).
    Other,
}

/// What went wrong with a source. Messages never contain secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// The category.
    pub kind: SourceErrorKind,
    /// Human-readable, actionable.
    pub message: String,
}

impl SourceError {
    /// A new error of kind [`SourceErrorKind::Other`].
    pub fn new(message: impl Into<String>) -> Self {
        SourceError::of(SourceErrorKind::Other, message)
    }

    /// A new error of a kind.
    pub fn of(kind: SourceErrorKind, message: impl Into<String>) -> Self {
        SourceError {
            kind,
            message: message.into(),
        }
    }
}

/// A system idsync reads principals from.
#[async_trait]
pub trait Source: Send + Sync {
    /// Reads the whole scope.
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError>;

    /// Reads what changed since `cursors`, applied to `base` (the snapshot last applied).
    async fn read_changes(
        &self,
        scope: &Scope,
        base: &std::sync::Arc<Snapshot>,
        cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError>;
}
