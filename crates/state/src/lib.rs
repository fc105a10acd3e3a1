//! idsync's state store: one versioned head per agreement, committed with compare-and-swap, over
//! layers that hold its big fields (so a commit writes what changed), and a lease so two runs of
//! the same agreement never overlap.
//!
//! The rules (versions, leases, takeover) are written once, in [`blob::BlobStore`], over a
//! minimal storage interface with conditional writes ([`blob::Blobs`]): a local folder
//! ([`local::LocalBlobs`]: an OS lock, fsync and an atomic rename) or an object store
//! ([`object`]: S3, Azure Blob / ADLS Gen2 and GCS with ETag or generation preconditions). The
//! document formats are in [`codec`], the layers in [`layers`].

pub mod blob;
mod cache;
pub mod codec;
mod compact;
pub mod gcp_federation;
pub mod layers;
pub mod local;
pub mod memory;
pub mod object;
pub mod sts;
pub mod testing;

use async_trait::async_trait;
use idsync_model::AgreementState;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use blob::BlobStore;
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use object::StoreOptions;

/// The URL schemes [`open`] takes (a path without a scheme is a local folder).
pub const SCHEMES: &[&str] = &["file", "s3", "az", "abfs", "abfss", "azure", "adl", "gs"];

/// Opens the store a state URL names: a folder path or `file://` URL, or an object store
/// (`s3://`, `az://`, `abfss://`, `gs://`; see [`object`]).
pub fn open(url: &str, opts: &StoreOptions) -> Result<Box<dyn StateStore>, StateError> {
    match url.split_once("://") {
        None => Ok(Box::new(LocalStore::open(url))),
        Some(("file", _)) => Ok(Box::new(LocalStore::open(url))),
        Some(_) => Ok(Box::new(object::open(url, opts)?)),
    }
}

/// What can go wrong with state. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Someone else committed since this run loaded the state.
    #[error(
        "the state of agreement {agreement:?} moved: this run read version {expected}, the store now holds version {found}. Another run committed in between; re-run plan"
    )]
    Conflict {
        /// The agreement.
        agreement: String,
        /// The version this run based its work on.
        expected: u64,
        /// The version in the store.
        found: u64,
    },
    /// The stored document is not valid state. It is left as it is.
    #[error(
        "the state file {path} is corrupted ({detail}); it was not modified. Restore it from a backup, or move it away to start over (idsync will then treat every existing principal as not its own)"
    )]
    Corrupt {
        /// Where.
        path: String,
        /// What the parser said.
        detail: String,
    },
    /// The stored document was written by a newer idsync.
    #[error(
        "the state file {path} has format {found}, newer than this idsync understands ({supported}); it was not modified. Upgrade idsync"
    )]
    NewerFormat {
        /// Where.
        path: String,
        /// The format found.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// Another run holds the lease.
    #[error(
        "agreement {agreement:?} is being synced by another run ({holder}) until {until} (unix time); wait for it to finish, or, if it crashed, for its lease to expire"
    )]
    LeaseHeld {
        /// The agreement.
        agreement: String,
        /// Who holds it.
        holder: String,
        /// When the lease expires (unix seconds).
        until: u64,
    },
    /// The document under an agreement's name holds another agreement (renamed or copied by hand).
    #[error(
        "the state file {path} holds agreement {holds:?}, not {agreement:?} (renamed or copied by hand?); it was not modified. Move it back under its own name, or take it over with `idsync state import {agreement} FILE --yes` after `idsync state export`"
    )]
    WrongAgreement {
        /// Where.
        path: String,
        /// The name it was loaded under.
        agreement: String,
        /// The agreement the document says it is.
        holds: String,
    },
    /// This run's lease expired and another run took it over.
    #[error(
        "this run's lease on agreement {agreement:?} expired and another run ({holder}) took it over; this run stopped without saving. Raise [state] lease_seconds if runs take longer than it"
    )]
    LeaseLost {
        /// The agreement.
        agreement: String,
        /// Who holds it now.
        holder: String,
    },
    /// The storage service refused or failed (credentials, a missing bucket, the network).
    #[error("{action} {location}: {detail}")]
    Backend {
        /// What was being done.
        action: &'static str,
        /// Where (a URL without credentials).
        location: String,
        /// What the service said, and what to check.
        detail: String,
    },
    /// File-system trouble.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A run's lease on an agreement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The agreement.
    pub agreement: String,
    /// Who holds it (host and process).
    pub holder: String,
    /// Unique token of this acquisition.
    pub token: String,
    /// Expiry, unix seconds.
    pub until: u64,
}

/// Where agreement state lives.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Loads an agreement's state, or `None` when it has none yet.
    async fn load(&self, agreement: &str) -> Result<Option<AgreementState>, StateError>;

    /// Commits `state` if the stored version is still `state.version` (0 = nothing stored), and
    /// returns the new version, `state.version + 1` (the document stored holds it). The store
    /// never goes backwards and never loses a concurrent commit.
    async fn commit(&self, state: &AgreementState) -> Result<u64, StateError>;

    /// Takes the agreement's lease for `ttl`, or fails with [`StateError::LeaseHeld`]. An expired
    /// lease (a crashed run) is taken over.
    async fn acquire(
        &self,
        agreement: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StateError>;

    /// Extends a lease this run still holds by `ttl` from now; fails with
    /// [`StateError::LeaseLost`] when another run took it over (after it expired).
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StateError>;

    /// Gives a lease back. Releasing a lease someone else took over does nothing.
    async fn release(&self, lease: &Lease) -> Result<(), StateError>;

    /// Removes an agreement's state (`idsync state reset`).
    async fn delete(&self, agreement: &str) -> Result<(), StateError>;

    /// The names of agreements with state.
    async fn list(&self) -> Result<Vec<String>, StateError>;

    /// Records a run's changes (gzip'd JSON lines, as they are stored) as a new object,
    /// `changes/<agreement>/<day>/<name>.jsonl.gz` beside the state: appended by new objects,
    /// never by rewriting one. `day` is `YYYY-MM-DD`; `name` is unique to the run.
    async fn append_changes(
        &self,
        agreement: &str,
        day: &str,
        name: &str,
        lines: Vec<u8>,
    ) -> Result<(), StateError>;

    /// The change log's objects of `agreement` (every agreement's when `None`) from `since_day`
    /// on, as (key, bytes as stored: `.jsonl.gz`, or `.jsonl` from before the log was
    /// compressed), ordered by key: by agreement, then day, then name.
    async fn changes(
        &self,
        agreement: Option<&str>,
        since_day: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError>;

    /// Ends the agreement's lease, whoever holds it (`idsync state unlock`, for a lease left by a
    /// process that is gone): the lease that was ended, or `None` when none was in force. A run
    /// still holding it finds out at its next renewal and stops without saving.
    async fn unlock(&self, agreement: &str) -> Result<Option<Lease>, StateError>;

    /// Where this store is, for messages.
    fn describe(&self) -> String;
}

/// Checks that an agreement name is safe as a file or object name.
pub(crate) fn check_name(agreement: &str) -> Result<(), StateError> {
    let ok = !agreement.is_empty()
        && agreement.len() <= 128
        && agreement
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !agreement.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StateError::Io {
            action: "use agreement name",
            path: agreement.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "agreement names use letters, digits, '-', '_' and '.'",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_local_folder_passes_the_conformance_suite() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path().to_str().unwrap());
        testing::run(&s, "local").await.unwrap();
        assert_eq!(s.describe(), format!("file://{}", d.path().display()));
    }

    #[tokio::test]
    async fn state_written_by_earlier_builds_is_moved_not_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let mut old = AgreementState::new("dbx");
        old.version = 7;
        old.cursors.insert("graph.users".into(), "t".into());
        std::fs::write(d.path().join("dbx.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        let s = LocalStore::open(d.path().to_str().unwrap());
        assert_eq!(s.load("dbx").await.unwrap().unwrap(), old);
        assert!(!d.path().join("dbx.json").exists());
        assert_eq!(s.commit(&old).await.unwrap(), 8);
        assert_eq!(s.list().await.unwrap(), ["dbx"]);
    }

    #[test]
    fn processes_racing_on_the_folder_let_exactly_one_commit_win() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path().to_str().unwrap());
        let rt = |f: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(f)
        };
        assert!(rt(Box::pin(async {
            s.commit(&AgreementState::new("a")).await.is_ok()
        })));
        let base = {
            let r = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            r.block_on(s.load("a")).unwrap().unwrap()
        };
        let wins: Vec<bool> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| sc.spawn(|| rt(Box::pin(async { s.commit(&base).await.is_ok() }))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    }

    #[tokio::test]
    async fn the_folder_holds_the_head_its_layers_and_one_lock() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path().to_str().unwrap());
        let mut st = AgreementState::new("a");
        for round in 0..40 {
            st.links
                .users
                .insert(format!("u{round}"), format!("t{round}"));
            st.version = s.commit(&st).await.unwrap();
            if round % 10 == 9 {
                s.forget();
            }
        }
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let layers = names
            .iter()
            .filter(|n| layers::layer_of("a", n).is_some())
            .count();
        assert!((1..=1 + layers::MAX_DELTAS).contains(&layers), "{names:?}");
        assert_eq!(names.len(), layers + 2, "{names:?}");
        assert!(names.contains(&"a.state".to_owned()) && names.contains(&"a.lock".to_owned()));
        assert_eq!(s.load("a").await.unwrap().unwrap(), st);
        s.delete("a").await.unwrap();
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            ["a.lock"],
            "the lock file outlives a reset, as before"
        );
    }

    #[tokio::test]
    async fn agreement_names_cannot_escape_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path().to_str().unwrap());
        for bad in ["../x", "", "a/b", ".hidden"] {
            assert!(s.load(bad).await.is_err(), "{bad}");
        }
    }
}
