//! `[source] kind = "file"`: a directory JSON file (the emulators' tenant format).

use crate::registry::{Context, Problem, SourceConfig, SourceKind, done, required, settings};
use idsync_engine::{Source, SourceError};
use serde::Deserialize;
use std::path::PathBuf;

/// The settings of `[source] kind = "file"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The directory JSON file to read (relative to the configuration's folder).
    path: Option<String>,
}

/// The `file` source kind.
pub struct FileKind;

/// A configured file source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSourceConfig {
    /// The file.
    pub path: PathBuf,
}

impl SourceKind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }

    fn configure(
        &self,
        value: serde_json::Value,
        cx: &Context<'_>,
    ) -> Result<Box<dyn SourceConfig>, Vec<Problem>> {
        let s: Settings = settings(value)?;
        let mut problems = Vec::new();
        let path = required(
            &mut problems,
            "path",
            s.path.as_ref(),
            "the directory JSON file to read",
        )
        .map(|p| {
            Box::new(FileSourceConfig {
                path: cx.resolve(p),
            }) as Box<dyn SourceConfig>
        });
        done(path, problems)
    }
}

impl SourceConfig for FileSourceConfig {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
    fn build(&self, _workers: usize) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(super::FileSource::new(&self.path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::check;
    use serde_json::json;

    /// Found by a hostile read of the configuration: with a single flat `[source]` shape, Entra's
    /// keys were accepted silently by a file source.
    #[test]
    fn another_kinds_settings_are_rejected() {
        let e = check::source(
            &FileKind,
            json!({
                "path": "dir.json",
                "client_certificate_path": "c.pem",
                "federated_token_file": "t",
                "managed_identity_endpoint": "http://x",
                "ca_bundle": "ca.pem",
            }),
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "ca_bundle",
                "client_certificate_path",
                "federated_token_file",
                "managed_identity_endpoint"
            ]
        );
        assert!(
            e.iter().all(|p| p.message.starts_with("unknown field")),
            "{e:?}"
        );
        let ok = check::source(&FileKind, json!({"path": "dir.json"}), &[]).unwrap();
        assert_eq!(ok.describe(), "file /cfg/dir.json");
    }
}
