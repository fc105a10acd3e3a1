//! State in a local folder: `<dir>/<agreement>.state`, `<agreement>.lease`, and
//! `<agreement>.lock`, an advisory OS lock held for the milliseconds of a conditional write (the
//! kernel releases it when the holder exits, so a crashed process never leaves it behind). Writes
//! go to a temporary file, are fsynced, and renamed into place.

use crate::StateError;
use crate::blob::{BlobStore, Blobs, Cond, Tag};
use async_trait::async_trait;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// State in a local folder.
pub type LocalStore = BlobStore<LocalBlobs>;

impl LocalStore {
    /// A store in `location` (a path or a `file://` URL; the folder is created on first write).
    pub fn open(location: &str) -> Self {
        BlobStore::new(LocalBlobs::new(location))
    }
}

/// A folder of small files with conditional writes under an OS lock.
#[derive(Debug, Clone)]
pub struct LocalBlobs {
    dir: PathBuf,
}

/// How long a write waits for another process's write (each takes milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(10);

fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StateError + 'p {
    move |source| StateError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// The version of a file's content.
fn tag_of(bytes: &[u8]) -> Tag {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Tag(format!("{:x}-{:016x}", bytes.len(), h.finish()))
}

impl LocalBlobs {
    /// A folder (a path or a `file://` URL).
    pub fn new(location: &str) -> Self {
        let p = location.strip_prefix("file://").unwrap_or(location);
        LocalBlobs {
            dir: PathBuf::from(p),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn read(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", path)(e)),
        }
    }

    /// Runs `f` holding the lock of `key`'s agreement (`a.state`, `a.lease` and the layers
    /// `a.state-….base` and `.delta` share `a.lock`: one lock file per agreement, however many
    /// layers come and go).
    fn locked<T>(
        &self,
        key: &str,
        f: impl FnOnce() -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        fs::create_dir_all(&self.dir).map_err(io("create the state folder", &self.dir))?;
        let layer = key.ends_with(".base") || key.ends_with(".delta");
        let stem = match key.rfind(".state-") {
            Some(at) if layer => &key[..at],
            _ => key.rsplit_once('.').map_or(key, |(s, _)| s),
        };
        let path = self.path(&format!("{stem}.lock"));
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

#[async_trait]
impl Blobs for LocalBlobs {
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Tag)>, StateError> {
        // Builds before the state format had a name kept `<agreement>.json` (plain JSON, which the
        // codec reads): moved into place once, so no state is ever silently forgotten.
        if let Some(stem) = key.strip_suffix(".state") {
            let legacy = self.path(&format!("{stem}.json"));
            let path = self.path(key);
            if legacy.exists() && !path.exists() {
                self.locked(key, || {
                    if !path.exists() {
                        fs::rename(&legacy, &path).map_err(io("move the old state file", &legacy))?;
                        tracing::info!(from = %legacy.display(), to = %path.display(), "moved state to its new name");
                    }
                    Ok(())
                })?;
            }
        }
        Ok(Self::read(&self.path(key))?.map(|b| {
            let t = tag_of(&b);
            (b, t)
        }))
    }

    async fn put(&self, key: &str, bytes: Vec<u8>, cond: Cond) -> Result<bool, StateError> {
        let path = self.path(key);
        self.locked(key, || {
            let current = Self::read(&path)?;
            let holds = match (&cond, &current) {
                (Cond::Absent, None) => true,
                (Cond::Match(t), Some(b)) => *t == tag_of(b),
                _ => false,
            };
            if holds {
                self.write_atomic(&path, &bytes)?;
            }
            Ok(holds)
        })
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let path = self.path(key);
        self.locked(key, || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        })
    }

    async fn list(&self) -> Result<Vec<String>, StateError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        Ok(rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect())
    }

    async fn create(&self, key: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io("create the folder", parent))?;
        }
        // Written beside, synced, then moved into place: a reader never sees half a record.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        if path.exists() {
            let _ = fs::remove_file(&tmp);
            return Err(StateError::Backend {
                action: "write",
                location: path.display().to_string(),
                detail: "the object exists already".into(),
            });
        }
        fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
        Ok(())
    }

    async fn list_under(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), StateError> {
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("list", dir)(e)),
            };
            for e in rd.filter_map(Result::ok) {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let key = format!("{rel}{name}");
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), &format!("{key}/"), out)?;
                } else if !name.contains(".tmp.") {
                    out.push(key);
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.path(prefix), prefix, &mut out)?;
        out.sort();
        Ok(out)
    }

    fn location(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}
