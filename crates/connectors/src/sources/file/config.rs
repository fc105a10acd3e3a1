//! `[source] kind = "file"`: a directory JSON file (the emulators' tenant format).

use crate::registry::{Check, KindOf, SourceConfig, SourceSettings};
use idsync_engine::{Source, SourceError};
use serde::Deserialize;
use std::path::PathBuf;

/// The settings of `[source] kind = "file"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The directory JSON file to read (relative to the configuration's folder).
    path: Option<String>,
}

/// The `file` source kind.
pub static KIND: KindOf<Settings> = KindOf::new("file", &[]);

/// A configured file source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSourceConfig {
    /// The file.
    pub path: PathBuf,
}

impl SourceSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn SourceConfig>> {
        let path = c.required(
            "path",
            self.path.as_ref(),
            "the directory JSON file to read",
        )?;
        Some(Box::new(FileSourceConfig {
            path: c.resolve(path),
        }))
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
            &KIND,
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
        let ok = check::source(&KIND, json!({"path": "dir.json"}), &[]).unwrap();
        assert_eq!(ok.describe(), "file /cfg/dir.json");
    }
}
