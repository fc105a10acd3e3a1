//! A directory in a JSON file (the fixture format of the emulators): for tests, demos, and
//! exports from systems idsync has no connector for. No change feed: every run reads in full.

pub mod config;

use async_trait::async_trait;
use idsync_engine::scope::{self, Scope};
use idsync_engine::{Changes, Read, Source, SourceError};
use idsync_model::{Directory, ReadMode, Snapshot};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Reads a [`Directory`] from a JSON file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }

    /// Loads the whole directory.
    pub fn load(&self) -> Result<Snapshot, SourceError> {
        let p = self.path.display();
        let bytes = std::fs::read(&self.path)
            .map_err(|e| SourceError::new(format!("cannot read the source file {p}: {e}")))?;
        let bytes = idsync_model::without_bom(&bytes);
        // serde reads a struct from a list too: `[]` would be an empty directory, not an error.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(SourceError::new(format!(
                "the source file {p} is not a directory: it must hold one JSON object with \"users\", \"servicePrincipals\" and \"groups\""
            )));
        }
        let dir: Directory = serde_json::from_slice(bytes).map_err(|e| {
            SourceError::new(format!("the source file {p} is not a valid directory: {e}"))
        })?;
        Snapshot::try_from(dir).map_err(|e| SourceError::new(format!("the source file {p}: {e}")))
    }
}

#[async_trait]
impl Source for FileSource {
    async fn read_full(&self, scope: &Scope) -> Result<Read, SourceError> {
        let dir = self.load()?;
        let sel = scope::select(&dir, scope);
        Ok(Read {
            snapshot: sel.snapshot.into(),
            cursors: BTreeMap::new(),
            mode: ReadMode::Full,
            depth: sel.depth,
            notes: sel.notes,
            unchanged: false,
        })
    }

    async fn read_changes(
        &self,
        _scope: &Scope,
        _base: &std::sync::Arc<Snapshot>,
        _cursors: &BTreeMap<String, String>,
    ) -> Result<Changes, SourceError> {
        Ok(Changes::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_selects_and_reports_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dir.json");
        std::fs::write(
            &p,
            r#"{"users":[{"id":"1","userPrincipalName":"a@x","displayName":"A"}],
                "groups":[{"id":"g","displayName":"G","members":[{"type":"user","id":"1"}]}]}"#,
        )
        .unwrap();
        let r = FileSource::new(&p)
            .read_full(&Scope::default())
            .await
            .unwrap();
        assert_eq!(r.snapshot.users.len(), 1);
        // A byte order mark is fine; a list or nothing is not a directory.
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(&std::fs::read(&p).unwrap());
        std::fs::write(&p, &bom).unwrap();
        let r = FileSource::new(&p).read_full(&Scope::default()).await;
        assert_eq!(r.unwrap().snapshot.users.len(), 1);
        for not_a_directory in ["[]", "", "null", "  [{\"users\": []}]"] {
            std::fs::write(&p, not_a_directory).unwrap();
            let e = FileSource::new(&p)
                .read_full(&Scope::default())
                .await
                .unwrap_err();
            assert!(
                e.message.contains("must hold one JSON object"),
                "{}",
                e.message
            );
        }
        std::fs::write(&p, r#"{"users":[{"id":"1"#).unwrap();
        let e = FileSource::new(&p)
            .read_full(&Scope::default())
            .await
            .unwrap_err();
        assert!(e.message.contains("not a valid directory"), "{e}");
        let e = FileSource::new(d.path().join("nope.json"))
            .read_full(&Scope::default())
            .await
            .unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
    }
}
