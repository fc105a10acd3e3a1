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

    /// Gives a lease back. Releasing a lease someone else took over does nothing.
    fn release(&self, lease: &Lease) -> Result<(), StateError>;

    /// Removes an agreement's state (`idsync state reset`).
    fn delete(&self, agreement: &str) -> Result<(), StateError>;

    /// The names of agreements with state.
    fn list(&self) -> Result<Vec<String>, StateError>;

    /// Where this store is, for messages.
    fn describe(&self) -> String;
}

/// State in a local folder: `<dir>/<agreement>.json`, `.lock` during a commit, `.lease` during a
/// run.
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

/// A lock file older than this was left by a process that died mid-commit (a commit takes
/// milliseconds).
const STALE_LOCK: Duration = Duration::from_secs(60);

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

    /// Runs `f` while holding the agreement's lock file.
    fn locked<T>(
        &self,
        agreement: &str,
        f: impl FnOnce() -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        self.ensure_dir()?;
        let lock = self.path(agreement, "lock");
        let mut waited = Duration::ZERO;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    break;
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let age = fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .unwrap_or_default();
                    if age > STALE_LOCK {
                        tracing::warn!(lock = %lock.display(), "removing a stale lock file");
                        let _ = fs::remove_file(&lock);
                        continue;
                    }
                    if waited > Duration::from_secs(10) {
                        return Err(io("lock", &lock)(std::io::Error::new(
                            ErrorKind::WouldBlock,
                            "another process holds the lock; if none is running, delete this file",
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                Err(e) => return Err(io("create", &lock)(e)),
            }
        }
        let out = f();
        let _ = fs::remove_file(&lock);
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
            if let Ok(bytes) = fs::read(&path) {
                if let Ok(l) = serde_json::from_slice::<Lease>(&bytes) {
                    if l.until > t {
                        return Err(StateError::LeaseHeld {
                            agreement: agreement.to_owned(),
                            holder: l.holder,
                            until: l.until,
                        });
                    }
                    tracing::warn!(holder = %l.holder, "taking over an expired lease");
                }
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
    fn agreement_names_cannot_escape_the_folder() {
        let (_d, s) = store();
        assert!(s.load("../x").is_err());
        assert!(s.load("").is_err());
        assert!(s.load("a/b").is_err());
    }
}
