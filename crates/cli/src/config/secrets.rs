//! Secrets in the configuration file: a warning when others can read them.

use idsync_connectors::registry;
use std::path::Path;

/// A warning when the file holds a secret setting (a kind's secret, as its environment variables
/// name them) and users other than its owner may read it.
pub(super) fn readable(path: &Path, text: &str) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 == 0 {
            return None;
        }
        let secret = |k: &str| {
            registry::SOURCES
                .iter()
                .flat_map(|k| k.env())
                .chain(registry::TARGETS.iter().flat_map(|k| k.env()))
                .any(|v| v.form == registry::EnvForm::Secret && v.setting == k)
        };
        let table: toml::Table = toml::from_str(text).ok()?;
        let mut found: Vec<String> = Vec::new();
        if let Some(src) = table.get("source").and_then(toml::Value::as_table) {
            found.extend(
                src.keys()
                    .filter(|k| secret(k))
                    .map(|k| format!("source.{k}")),
            );
        }
        if let Some(targets) = table.get("targets").and_then(toml::Value::as_table) {
            for (name, t) in targets {
                if let Some(t) = t.as_table() {
                    found.extend(
                        t.keys()
                            .filter(|k| secret(k))
                            .map(|k| format!("targets.{name}.{k}")),
                    );
                }
            }
        }
        if table
            .get("notify")
            .and_then(toml::Value::as_table)
            .is_some_and(|n| n.contains_key("webhook_url"))
        {
            found.push("notify.webhook_url".into());
        }
        let first = found.first()?;
        Some(format!(
            "{} holds a secret ({first}{}) and others can read it (mode {:o}): `chmod 600 {}`, or move the secret to its environment variable or a NAME_FILE",
            path.display(),
            if found.len() > 1 {
                format!(" and {} more", found.len() - 1)
            } else {
                String::new()
            },
            mode & 0o777,
            path.display()
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, text);
        None
    }
}
