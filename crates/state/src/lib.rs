//! idsync's state store: one versioned document per agreement, committed with compare-and-swap,
//! and a lease so two runs of the same agreement never overlap.
//!
//! The backend here is a local folder ([`LocalStore`]): a commit takes an exclusively created lock
//! file, checks the stored version, writes a temporary file, fsyncs it and renames it into place.
//! Object stores (S3, Azure Blob, GCS) implement the same [`StateStore`] trait with ETag or
//! generation preconditions.

use idsync_model::{AgreementState, state::STATE_FORMAT};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
pub trait StateStore: Send + Sync {
    /// Loads an agreement's state, or `None` when it has none yet.
    fn load(&self, agreement: &str) -> Result<Option<AgreementState>, StateError>;

    /// Commits `state` if the stored version is still `state.version` (0 = nothing stored), and
    /// returns the new version. The store never goes backwards and never loses a concurrent commit.
    fn commit(&self, state: &AgreementState) -> Result<u64, StateError>;

    /// Takes the agreement's lease for `ttl`, or fails with [`StateError::LeaseHeld`]. An expired
    /// lease (a crashed run) is taken over.
    fn acquire(&self, agreement: &str, holder: &str, ttl: Duration) -> Result<Lease, StateError>;

    /// Extends a lease this run still holds by `ttl` from now; fails with
    /// [`StateError::LeaseLost`] when another run took it over (after it expired).
    fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StateError>;

    /// Gives a lease back. Releasing a lease someone else took over does nothing.
    fn release(&self, lease: &Lease) -> Result<(), StateError>;

    /// Removes an agreement's state (`idsync state reset`).
    fn delete(&self, agreement: &str) -> Result<(), StateError>;

    /// The names of agreements with state.
    fn list(&self) -> Result<Vec<String>, StateError>;

    /// Where this store is, for messages.
    fn describe(&self) -> String;
}

/// State in a local folder: `<dir>/<agreement>.json`, `<agreement>.lock` (an advisory lock taken
/// during a commit), `<agreement>.lease` during a run.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StateError + 'p {
    move |source| StateError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// How long a commit waits for another process's commit (each takes milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Checks that an agreement name is safe as a file name.
fn check_name(agreement: &str) -> Result<(), StateError> {
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
                ErrorKind::InvalidInput,
                "agreement names use letters, digits, '-', '_' and '.'",
            ),
        })
    }
}

impl LocalStore {
    /// A store in `dir` (created on first commit). Accepts `file://` URLs and plain paths.
    pub fn new(location: &str) -> Self {
        let p = location.strip_prefix("file://").unwrap_or(location);
        LocalStore {
            dir: PathBuf::from(p),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, agreement: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{agreement}.{ext}"))
    }

    fn read(&self, path: &Path) -> Result<Option<AgreementState>, StateError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", path)(e)),
        };
        decode(&bytes, path)
    }

    fn ensure_dir(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(io("create the state folder", &self.dir))
    }

    /// Runs `f` while holding the agreement's lock: an advisory OS lock on `<agreement>.lock`,
    /// released by the kernel when the holder exits, so a crashed process never leaves it behind.
    fn locked<T>(
        &self,
        agreement: &str,
        f: impl FnOnce() -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        self.ensure_dir()?;
        let path = self.path(agreement, "lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut waited = Duration::ZERO;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if waited < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(10));
                    waited += Duration::from_millis(10);
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io("lock", &path)(std::io::Error::new(
                        ErrorKind::WouldBlock,
                        format!(
                            "another idsync process has held this lock for over {}s",
                            LOCK_WAIT.as_secs()
                        ),
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
            }
        }
        let out = f();
        let _ = file.unlock();
        out
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("rename into place", path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Decodes a state document, refusing newer formats.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Option<AgreementState>, StateError> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let corrupt = |e: serde_json::Error| StateError::Corrupt {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let head: Head = serde_json::from_slice(bytes).map_err(corrupt)?;
    if head.format > STATE_FORMAT {
        return Err(StateError::NewerFormat {
            path: path.display().to_string(),
            found: head.format,
            supported: STATE_FORMAT,
        });
    }
    serde_json::from_slice(bytes).map(Some).map_err(corrupt)
}

impl StateStore for LocalStore {
    fn load(&self, agreement: &str) -> Result<Option<AgreementState>, StateError> {
        check_name(agreement)?;
        self.read(&self.path(agreement, "json"))
    }

    fn commit(&self, state: &AgreementState) -> Result<u64, StateError> {
        check_name(&state.agreement)?;
        let path = self.path(&state.agreement, "json");
        self.locked(&state.agreement, || {
            // Reading first also means a corrupted file is reported, never overwritten.
            let found = self.read(&path)?.map_or(0, |s| s.version);
            if found != state.version {
                return Err(StateError::Conflict {
                    agreement: state.agreement.clone(),
                    expected: state.version,
                    found,
                });
            }
            let mut next = state.clone();
            next.version = found + 1;
            next.format = STATE_FORMAT;
            let bytes = serde_json::to_vec(&next).map_err(|e| StateError::Corrupt {
                path: path.display().to_string(),
                detail: format!("cannot encode: {e}"),
            })?;
            self.write_atomic(&path, &bytes)?;
            Ok(next.version)
        })
    }

    fn acquire(&self, agreement: &str, holder: &str, ttl: Duration) -> Result<Lease, StateError> {
        check_name(agreement)?;
        let path = self.path(agreement, "lease");
        self.locked(agreement, || {
            let t = now();
            if let Ok(bytes) = fs::read(&path)
                && let Ok(l) = serde_json::from_slice::<Lease>(&bytes)
            {
                if l.until > t {
                    return Err(StateError::LeaseHeld {
                        agreement: agreement.to_owned(),
                        holder: l.holder,
                        until: l.until,
                    });
                }
                tracing::warn!(holder = %l.holder, "taking over an expired lease");
            }
            let lease = Lease {
                agreement: agreement.to_owned(),
                holder: holder.to_owned(),
                token: format!("{}-{}-{}", std::process::id(), t, fastrand_token()),
                until: t + ttl.as_secs().max(1),
            };
            let bytes = serde_json::to_vec(&lease).unwrap_or_default();
            self.write_atomic(&path, &bytes)?;
            Ok(lease)
        })
    }

    fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StateError> {
        let path = self.path(&lease.agreement, "lease");
        self.locked(&lease.agreement, || {
            let current = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok());
            match current {
                Some(l) if l.token == lease.token => {
                    let renewed = Lease {
                        until: now() + ttl.as_secs().max(1),
                        ..l
                    };
                    let bytes = serde_json::to_vec(&renewed).unwrap_or_default();
                    self.write_atomic(&path, &bytes)?;
                    Ok(renewed)
                }
                other => Err(StateError::LeaseLost {
                    agreement: lease.agreement.clone(),
                    holder: other.map_or_else(|| "nobody".to_owned(), |l| l.holder),
                }),
            }
        })
    }

    fn release(&self, lease: &Lease) -> Result<(), StateError> {
        let path = self.path(&lease.agreement, "lease");
        self.locked(&lease.agreement, || {
            let ours = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
                .is_some_and(|l| l.token == lease.token);
            if ours {
                fs::remove_file(&path).map_err(io("remove", &path))?;
            }
            Ok(())
        })
    }

    fn delete(&self, agreement: &str) -> Result<(), StateError> {
        check_name(agreement)?;
        let path = self.path(agreement, "json");
        self.locked(agreement, || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        })
    }

    fn list(&self) -> Result<Vec<String>, StateError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut out: Vec<String> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

/// A token that tells two acquisitions apart: the time's nanoseconds and a per-process counter
/// (the caller adds the process id and the time in seconds).
fn fastrand_token() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{nanos:x}{n:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path().to_str().unwrap());
        (d, s)
    }

    #[test]
    fn round_trip_and_versions() {
        let (_d, s) = store();
        assert!(s.load("a").unwrap().is_none());
        let mut st = AgreementState::new("a");
        st.cursors.insert("users".into(), "token-1".into());
        assert_eq!(s.commit(&st).unwrap(), 1);
        let back = s.load("a").unwrap().unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.cursors["users"], "token-1");
        assert_eq!(s.commit(&back).unwrap(), 2);
        assert_eq!(s.list().unwrap(), ["a"]);
    }

    #[test]
    fn compare_and_swap_lets_exactly_one_writer_win() {
        let (_d, s) = store();
        let base = AgreementState::new("a");
        s.commit(&base).unwrap();
        let loaded = s.load("a").unwrap().unwrap();
        let winners: Vec<bool> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| sc.spawn(|| s.commit(&loaded).is_ok()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1);
        match s.commit(&loaded) {
            Err(StateError::Conflict {
                expected: 1,
                found: 2,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupted_and_newer_files_are_refused_and_kept() {
        let (d, s) = store();
        let p = d.path().join("a.json");
        fs::write(&p, b"{\"format\": 1, \"agreem").unwrap();
        let e = s.load("a").unwrap_err();
        assert!(e.to_string().contains("corrupted"), "{e}");
        assert!(s.commit(&AgreementState::new("a")).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"{\"format\": 1, \"agreem");
        fs::write(&p, b"{\"format\": 99}").unwrap();
        let e = s.load("a").unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn lease_is_exclusive_and_expires() {
        let (d, s) = store();
        let l = s.acquire("a", "run-1", Duration::from_secs(60)).unwrap();
        match s.acquire("a", "run-2", Duration::from_secs(60)) {
            Err(StateError::LeaseHeld { holder, .. }) => assert_eq!(holder, "run-1"),
            other => panic!("{other:?}"),
        }
        s.release(&l).unwrap();
        let l2 = s.acquire("a", "run-2", Duration::from_secs(60)).unwrap();
        // A crashed run's lease: expired in the past, taken over.
        let mut stale = l2.clone();
        stale.until = 1;
        fs::write(
            d.path().join("a.lease"),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        let l3 = s.acquire("a", "run-3", Duration::from_secs(60)).unwrap();
        assert_eq!(l3.holder, "run-3");
        // The crashed run releasing late does not remove the new holder's lease.
        s.release(&l2).unwrap();
        assert!(s.acquire("a", "run-4", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn a_lease_is_renewed_by_its_holder_and_lost_after_a_takeover() {
        let (d, s) = store();
        let l = s.acquire("a", "run-1", Duration::from_secs(60)).unwrap();
        let l = s.renew(&l, Duration::from_secs(120)).unwrap();
        assert!(l.until >= now() + 119);
        // It expires; another run takes over; the first one's renewal fails.
        let mut expired = l.clone();
        expired.until = 1;
        fs::write(
            d.path().join("a.lease"),
            serde_json::to_vec(&expired).unwrap(),
        )
        .unwrap();
        s.acquire("a", "run-2", Duration::from_secs(60)).unwrap();
        match s.renew(&l, Duration::from_secs(60)) {
            Err(StateError::LeaseLost { holder, .. }) => assert_eq!(holder, "run-2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn agreement_names_cannot_escape_the_folder() {
        let (_d, s) = store();
        assert!(s.load("../x").is_err());
        assert!(s.load("").is_err());
        assert!(s.load("a/b").is_err());
    }
}
