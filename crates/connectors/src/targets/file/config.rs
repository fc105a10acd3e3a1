//! `[targets.NAME] kind = "file"`: a JSON file with the capabilities of a real target (for tests,
//! demos and dry runs against a copy).

use super::Profile;
use crate::registry::{Check, KindOf, SourceConfig, TargetConfig, TargetSettings};
use idsync_engine::{Mapping, Target, TargetError, TargetIdentity};
use serde::Deserialize;
use std::path::PathBuf;

/// The settings of a `file` target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The JSON file that holds the target (relative to the configuration's folder).
    path: Option<String>,
    /// Whose capabilities: full, databricks or lakefs [default: full].
    profile: Option<String>,
    /// Policies attached to every group idsync creates, as lakeFS's default policies.
    default_policies: Option<Vec<String>>,
}

/// The `file` target kind.
pub static KIND: KindOf<Settings> = KindOf::new("file", &[]);

/// A configured file target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileTargetConfig {
    /// The file.
    pub path: PathBuf,
    /// Whose capabilities.
    pub profile: Profile,
    /// Policies for the groups idsync creates.
    pub default_policies: Option<Vec<String>>,
}

impl TargetSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>> {
        let profile = match self.profile.as_deref() {
            None | Some("full") => Some(Profile::Full),
            Some("databricks") => Some(Profile::Databricks),
            Some("lakefs") => Some(Profile::Lakefs),
            Some(other) => {
                c.problem(
                    "profile",
                    format!(
                        "{other:?} is not a profile; use \"full\", \"databricks\" or \"lakefs\""
                    ),
                );
                None
            }
        };
        let path = c.required(
            "path",
            self.path.as_ref(),
            "the JSON file that holds the target",
        );
        Some(Box::new(FileTargetConfig {
            path: c.resolve(path?),
            profile: profile?,
            default_policies: self.default_policies,
        }))
    }
}

impl TargetConfig for FileTargetConfig {
    fn identity(&self) -> TargetIdentity {
        TargetIdentity::new("file", self.path.display().to_string())
    }
    fn describe(&self) -> String {
        format!("file {} ({:?} profile)", self.path.display(), self.profile)
    }
    fn adjust_mapping(&self, mapping: &mut Mapping) {
        if let Some(p) = &self.default_policies {
            mapping.group_policies = p.iter().cloned().collect();
        }
    }
    fn build(&self, _: usize, _: &dyn SourceConfig) -> Result<Box<dyn Target>, TargetError> {
        Ok(Box::new(super::FileTarget::open(&self.path, self.profile)?))
    }
}
