//! The environment idsync reads: process variables over `.env` files, limited to the names idsync
//! and its connectors use.

use super::{ConfigError, ConfigErrors};
use idsync_connectors::registry;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The environment: process variables over `.env` files.
#[derive(Clone, Debug, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

/// Variables idsync reads besides its connectors' (`idsync_connectors::registry`).
const SHARED_ENV: &[&str] = &[
    "IDSYNC_STATE",
    "DRY_RUN",
    "GROUP_FILTER",
    "AZURE_STORAGE_CONNECTION_STRING",
    "IDSYNC_WEBHOOK_URL",
    "IDSYNC_WEBHOOK_URL_FILE",
];

/// Every variable idsync reads: the shared ones, then each connector kind's.
pub fn env_names() -> BTreeSet<&'static str> {
    let sources = registry::SOURCES.iter().flat_map(|k| k.env());
    let targets = registry::TARGETS.iter().flat_map(|k| k.env());
    SHARED_ENV
        .iter()
        .copied()
        .chain(sources.chain(targets).flat_map(|v| v.names.iter().copied()))
        .collect()
}

impl Env {
    /// A variable's value, when it is set.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    /// The process environment over the given `.env` files (earlier files win over later ones, and
    /// the process environment over all of them, as dotenv does).
    pub fn load(env_files: &[PathBuf]) -> Result<Env, ConfigErrors> {
        let mut vars = BTreeMap::new();
        let mut errors = Vec::new();
        for f in env_files.iter().rev() {
            match dotenvy::from_path_iter(f) {
                Ok(iter) => {
                    for item in iter {
                        match item {
                            Ok((k, v)) => {
                                vars.insert(k, v);
                            }
                            Err(e) => errors.push(dotenv_error(f, &e)),
                        }
                    }
                }
                Err(e) => errors.push(ConfigError {
                    location: f.display().to_string(),
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        for name in env_names() {
            if let Ok(v) = std::env::var(name) {
                vars.insert(name.to_owned(), v);
            }
            // A secret may come from a file instead (`NAME_FILE`), as Kubernetes mounts them.
            let file = format!("{name}_FILE");
            if let Ok(v) = std::env::var(&file) {
                vars.insert(file, v);
            }
        }
        if errors.is_empty() {
            Ok(Env { vars })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// An environment from explicit pairs (tests).
    #[cfg(test)]
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Env {
        Env {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The first of `names` that is set and not empty, with its name.
    pub(super) fn first<'a>(&'a self, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
        names.iter().find_map(|n| {
            self.vars
                .get(*n)
                .filter(|v| !v.is_empty())
                .map(|v| (*n, v.as_str()))
        })
    }
}

/// A `.env` problem, without the line's content: it may hold a secret.
fn dotenv_error(file: &Path, e: &dotenvy::Error) -> ConfigError {
    let location = match e {
        dotenvy::Error::LineParse(line, _) => {
            let n = std::fs::read_to_string(file)
                .ok()
                .and_then(|t| {
                    // An unterminated quote makes the "line" run to the end of the file.
                    let first = line.lines().next().unwrap_or(line);
                    t.lines().position(|l| l == first)
                })
                .map(|i| i + 1);
            n.map_or_else(
                || file.display().to_string(),
                |n| format!("{}:{n}", file.display()),
            )
        }
        _ => file.display().to_string(),
    };
    let message = match e {
        dotenvy::Error::LineParse(..) => {
            "cannot parse this line (check its quotes and escapes); it is not shown, as it may hold a secret".to_owned()
        }
        dotenvy::Error::Io(io) => format!("cannot read: {io}"),
        _ => "cannot parse".to_owned(),
    };
    ConfigError {
        location,
        key: String::new(),
        message,
    }
}
