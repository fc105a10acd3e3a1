//! A target kept in a JSON file: the in-memory reference target, saved after each apply. It takes
//! the capabilities of a real target (`profile`), so a plan against it looks like the plan against
//! lakeFS or Databricks, with no server. For demos, tests and dry rehearsals.

pub mod config;

use async_trait::async_trait;
use idsync_engine::memory::MemoryData;
use idsync_engine::{MemoryTarget, Outcome, Target, TargetError, TargetErrorKind};
use idsync_model::{Attr, Capabilities, Kind, Observed, Op};
use std::path::PathBuf;

/// Which real target's capabilities a file target takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Everything: nested groups, service principals, renames.
    #[default]
    Full,
    /// Like the Databricks account: nested groups and service principals; a user's userName cannot
    /// change; keys compare case-insensitively.
    Databricks,
    /// Like lakeFS: groups hold only users (nested groups are flattened), no service principals,
    /// no deactivation, ids cannot change, default policies on groups.
    Lakefs,
}

impl Profile {
    /// The capabilities of the profile.
    pub fn capabilities(self) -> Capabilities {
        match self {
            Profile::Full => Capabilities::full(),
            Profile::Databricks => Capabilities {
                renamable: [Kind::Group, Kind::ServicePrincipal].into(),
                case_insensitive_keys: true,
                attributes: [Attr::Key, Attr::DisplayName, Attr::Active, Attr::ExternalId].into(),
                max_members_per_write: 50,
                ..Capabilities::full()
            },
            Profile::Lakefs => Capabilities {
                nested_groups: false,
                service_principals: false,
                service_principal_members: false,
                renamable: Default::default(),
                deactivate: false,
                case_insensitive_keys: false,
                attributes: [Attr::DisplayName, Attr::Emails].into(),
                group_policies: true,
                max_members_per_write: 1,
            },
        }
    }
}

/// A target stored in a JSON file.
#[derive(Debug)]
pub struct FileTarget {
    path: PathBuf,
    inner: MemoryTarget,
}

fn err(message: String) -> TargetError {
    TargetError::new(TargetErrorKind::Unavailable, message)
}

impl FileTarget {
    /// Opens (or starts) the target file.
    pub fn open(path: impl Into<PathBuf>, profile: Profile) -> Result<Self, TargetError> {
        let path = path.into();
        let data = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<MemoryData>(&b).map_err(|e| {
                TargetError::new(
                    TargetErrorKind::Protocol,
                    format!("the target file {} is not valid: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MemoryData::default(),
            Err(e) => {
                return Err(err(format!(
                    "cannot read the target file {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(FileTarget {
            inner: MemoryTarget::from_data(profile.capabilities(), data),
            path,
        })
    }

    /// The underlying memory target (tests edit it "by hand").
    pub fn memory(&self) -> &MemoryTarget {
        &self.inner
    }
}

#[async_trait]
impl Target for FileTarget {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn observe(&self) -> Result<Observed, TargetError> {
        self.inner.observe().await
    }

    async fn observe_some(
        &self,
        want: &idsync_engine::observe::Interest,
    ) -> Result<Option<idsync_engine::observe::Partial>, TargetError> {
        self.inner.observe_some(want).await
    }

    async fn execute(&self, op: &Op) -> Result<Outcome, TargetError> {
        self.inner.execute(op).await
    }

    async fn flush(&self) -> Result<(), TargetError> {
        let p = &self.path;
        if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| err(format!("cannot create {}: {e}", parent.display())))?;
        }
        let bytes =
            serde_json::to_vec_pretty(&self.inner.data()).map_err(|e| err(e.to_string()))?;
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, p).map_err(|e| err(format!("cannot write {}: {e}", p.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Principal, SourceRef};

    #[tokio::test]
    async fn persists_across_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.json");
        let t = FileTarget::open(&p, Profile::Lakefs).unwrap();
        let op = Op::Create {
            principal: Principal::new(Kind::User, "waad|1"),
            source: SourceRef {
                kind: Kind::User,
                id: "1".into(),
            },
        };
        assert!(matches!(t.execute(&op).await.unwrap(), Outcome::Created(_)));
        t.flush().await.unwrap();
        let again = FileTarget::open(&p, Profile::Lakefs).unwrap();
        assert_eq!(again.observe().await.unwrap().len(), 1);
        std::fs::write(&p, "<html>oops</html>").unwrap();
        let e = FileTarget::open(&p, Profile::Lakefs).unwrap_err();
        assert!(e.message.contains("not valid"), "{e}");
    }
}
