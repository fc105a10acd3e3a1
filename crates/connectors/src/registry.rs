//! The connector registry: one table of source kinds and one of target kinds. Each kind owns its
//! settings (a `deny_unknown_fields` type with a doc comment on every field), the environment
//! variables it reads, its checks (pure: no network) and its constructor. The command line keeps
//! only the shared sections of the configuration and hands each `[source]` or `[targets.NAME]`
//! table (less `kind`, `mapping` and `policy`) to its kind.
//!
//! Adding a connector: a folder under `sources/` or `targets/` with a `config.rs` that implements
//! [`SourceKind`] or [`TargetKind`], and one line in [`SOURCES`] or [`TARGETS`].

use idsync_engine::{Mapping, Source, SourceError, Target, TargetError, TargetIdentity};
use serde::de::DeserializeOwned;
use std::any::Any;
use std::cell::RefCell;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// Source kinds this build can run.
pub static SOURCES: &[&dyn SourceKind] = &[
    &crate::sources::file::config::KIND,
    &crate::sources::entra::config::KIND,
    &crate::sources::ldap::config::KIND,
];

/// Target kinds this build can run.
pub static TARGETS: &[&dyn TargetKind] = &[
    &crate::targets::file::config::KIND,
    &crate::targets::lakefs::config::KIND,
    &crate::targets::databricks::config::KIND,
    &crate::targets::scim::config::KIND,
    &crate::targets::kanidm::config::KIND,
];

/// Source kinds the configuration knows whose connectors are not in this build yet.
pub const PLANNED_SOURCES: &[&str] = &[];
/// Target kinds the configuration knows whose connectors are not in this build yet.
pub const PLANNED_TARGETS: &[&str] = &[];

/// The source kind of this name.
pub fn source_kind(name: &str) -> Option<&'static dyn SourceKind> {
    SOURCES.iter().copied().find(|k| k.name() == name)
}

/// The target kind of this name.
pub fn target_kind(name: &str) -> Option<&'static dyn TargetKind> {
    TARGETS.iter().copied().find(|k| k.name() == name)
}

/// One problem in a kind's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The setting, relative to the kind's table (`secret_access_key`); empty for the table.
    pub key: String,
    /// The environment variable the value came from, when the problem is its value's.
    pub env: Option<&'static str>,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl Problem {
    /// A problem with a setting.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            env: None,
            message: message.into(),
        }
    }

    /// A problem with an environment variable's value.
    pub fn env(var: &'static str, message: impl Into<String>) -> Self {
        Problem {
            key: String::new(),
            env: Some(var),
            message: message.into(),
        }
    }
}

/// How an environment variable's value becomes a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvForm {
    /// As it is.
    Text,
    /// As it is, and never shown.
    Secret,
    /// A comma-separated list.
    List,
}

/// An environment variable a kind reads: the first of `names` that is set (and not empty)
/// overrides the setting `setting`.
#[derive(Clone, Copy, Debug)]
pub struct EnvVar {
    /// The variable's names, in the order they are looked up.
    pub names: &'static [&'static str],
    /// The setting it overrides (empty when the kind reads it itself).
    pub setting: &'static str,
    /// How its value is read.
    pub form: EnvForm,
}

/// What a kind sees while it checks its settings: the environment and the configuration's folder.
pub struct Context<'a> {
    base: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Context<'a> {
    /// Relative paths resolve against `base`; `env` looks a variable up (`None` when unset).
    pub fn new(base: &'a Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Context { base, env }
    }

    /// A path from the configuration, resolved against the configuration's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    /// The first of `names` that is set and not empty, with its name.
    pub fn env(&self, names: &[&'static str]) -> Option<(&'static str, String)> {
        names
            .iter()
            .find_map(|n| (self.env)(n).filter(|v| !v.is_empty()).map(|v| (*n, v)))
    }

    /// Whether any of `vars` is set.
    pub fn any(&self, vars: &[EnvVar]) -> bool {
        vars.iter().any(|v| self.env(v.names).is_some())
    }
}

/// A kind of source.
pub trait SourceKind: Sync {
    /// Its name, as `[source] kind` says it.
    fn name(&self) -> &'static str;
    /// The environment variables it reads.
    fn env(&self) -> &'static [EnvVar] {
        &[]
    }
    /// Whether the environment alone chooses this kind when `[source]` names none.
    fn implied_by_env(&self, cx: &Context<'_>) -> bool {
        let _ = cx;
        false
    }
    /// Checks the settings (the `[source]` table less `kind`, with the environment's overrides
    /// applied) and returns the configured source, or every problem found.
    fn configure(
        &self,
        settings: serde_json::Value,
        cx: &Context<'_>,
    ) -> Result<Box<dyn SourceConfig>, Vec<Problem>>;
}

/// Any configured connector as [`Any`], for tests that look at a kind's own settings.
pub trait AsAny {
    /// `self` as [`Any`].
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A configured source: checked, not yet connected.
pub trait SourceConfig: Debug + Send + Sync + AsAny {
    /// Its kind's name.
    fn kind(&self) -> &'static str;
    /// What and where it is, for people (no secret).
    fn describe(&self) -> String;
    /// The Entra ID sign-in, for a source that has one (a target may reuse it).
    fn entra(&self) -> Option<&crate::sources::entra::config::EntraSettings> {
        None
    }
    /// Connects it, with at most `workers` requests in flight.
    fn build(&self, workers: usize) -> Result<Box<dyn Source>, SourceError>;
}

/// A kind of target.
pub trait TargetKind: Sync {
    /// Its name, as `[targets.NAME] kind` says it.
    fn name(&self) -> &'static str;
    /// The environment variables it reads.
    fn env(&self) -> &'static [EnvVar] {
        &[]
    }
    /// Whether the environment alone adds a target of this kind (named after it) when the
    /// configuration names no target.
    fn implied_by_env(&self, cx: &Context<'_>) -> bool {
        let _ = cx;
        false
    }
    /// Checks the settings (the `[targets.NAME]` table less `kind`, `mapping` and `policy`, with
    /// the environment's overrides applied), given the configured source (`None` when it has
    /// problems of its own), and returns the configured target, or every problem found.
    fn configure(
        &self,
        settings: serde_json::Value,
        cx: &Context<'_>,
        source: Option<&dyn SourceConfig>,
    ) -> Result<Box<dyn TargetConfig>, Vec<Problem>>;
}

/// A configured target: checked, not yet connected.
pub trait TargetConfig: Debug + Send + Sync + AsAny {
    /// Which target it is, as data.
    fn identity(&self) -> TargetIdentity;
    /// Its kind's name.
    fn kind(&self) -> String {
        self.identity().kind
    }
    /// What and where it is, for people (no secret).
    fn describe(&self) -> String;
    /// What the kind adds to the agreement's mapping (lakeFS: the groups' default policies).
    fn adjust_mapping(&self, mapping: &mut Mapping) {
        let _ = mapping;
    }
    /// The user key template this target takes with a source of `source_kind` when the
    /// configuration sets no `user_name` (lakeFS with LDAP: `{dn}`).
    fn default_user_name(&self, source_kind: &str) -> Option<&'static str> {
        let _ = source_kind;
        None
    }
    /// The guest key template that goes with [`TargetConfig::default_user_name`] when that
    /// applies and no mapping sets `guest_user_name` (`None`: guests are keyed as members).
    fn default_guest_user_name(&self) -> Option<&'static str> {
        None
    }
    /// Connects it, with at most `workers` requests in flight; `source` for a target that reuses
    /// the source's sign-in.
    fn build(
        &self,
        workers: usize,
        source: &dyn SourceConfig,
    ) -> Result<Box<dyn Target>, TargetError>;
}

/// A kind as data: its name, the environment variables it reads, those that choose it when the
/// configuration names none, and its settings type, which does the checking. The registry's
/// tables hold these.
pub struct KindOf<S> {
    name: &'static str,
    env: &'static [EnvVar],
    implied_by: &'static [EnvVar],
    settings: PhantomData<fn() -> S>,
}

impl<S> KindOf<S> {
    /// A kind named `name` that reads `env`.
    pub const fn new(name: &'static str, env: &'static [EnvVar]) -> Self {
        KindOf {
            name,
            env,
            implied_by: &[],
            settings: PhantomData,
        }
    }

    /// The environment variables the kind reads.
    pub fn env_vars(&self) -> &'static [EnvVar] {
        self.env
    }

    /// Chosen (a source) or added (a target) when any of `vars` is set and the configuration names
    /// none.
    pub const fn implied_by(self, vars: &'static [EnvVar]) -> Self {
        KindOf {
            implied_by: vars,
            ..self
        }
    }
}

/// Checking one kind's settings: the context, the configured source (for a target), and every
/// problem found.
pub struct Check<'a> {
    cx: &'a Context<'a>,
    source: Option<&'a dyn SourceConfig>,
    problems: RefCell<Vec<Problem>>,
}

impl Check<'_> {
    /// The environment and the configuration's folder.
    pub fn cx(&self) -> &Context<'_> {
        self.cx
    }

    /// The configured source (a target's check; `None` for a source, or a source with problems).
    pub fn source(&self) -> Option<&dyn SourceConfig> {
        self.source
    }

    /// A path from the configuration, resolved against its folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        self.cx.resolve(p)
    }

    /// Records a problem with a setting.
    pub fn problem(&self, key: &str, message: impl Into<String>) {
        self.problems.borrow_mut().push(Problem::at(key, message));
    }

    /// A required text setting: present and not blank, or a problem saying how to set it.
    pub fn required<'v>(
        &self,
        key: &str,
        value: Option<&'v String>,
        hint: &str,
    ) -> Option<&'v String> {
        required(&mut self.problems.borrow_mut(), key, value, hint)
    }

    /// Whether a problem was found.
    pub fn failed(&self) -> bool {
        !self.problems.borrow().is_empty()
    }
}

/// A source kind's settings type (`deny_unknown_fields`, a doc comment on every field): its checks.
pub trait SourceSettings: DeserializeOwned {
    /// Checks the settings, recording every problem in `c`; the configured source when there is
    /// none.
    fn check(self, c: &Check<'_>) -> Option<Box<dyn SourceConfig>>;
}

/// A target kind's settings type (`deny_unknown_fields`, a doc comment on every field): its checks.
pub trait TargetSettings: DeserializeOwned {
    /// Checks the settings, recording every problem in `c`; the configured target when there is
    /// none.
    fn check(self, c: &Check<'_>) -> Option<Box<dyn TargetConfig>>;
}

/// Deserialises `value` as `S`, lets `check` check it, and gathers every problem.
fn checked<S: DeserializeOwned, T>(
    value: serde_json::Value,
    cx: &Context<'_>,
    source: Option<&dyn SourceConfig>,
    check: impl FnOnce(S, &Check<'_>) -> Option<T>,
) -> Result<T, Vec<Problem>> {
    let s: S = settings(value)?;
    let c = Check {
        cx,
        source,
        problems: RefCell::new(Vec::new()),
    };
    let out = check(s, &c);
    done(out, c.problems.into_inner())
}

impl<S: SourceSettings> SourceKind for KindOf<S> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn env(&self) -> &'static [EnvVar] {
        self.env
    }
    fn implied_by_env(&self, cx: &Context<'_>) -> bool {
        cx.any(self.implied_by)
    }
    fn configure(
        &self,
        value: serde_json::Value,
        cx: &Context<'_>,
    ) -> Result<Box<dyn SourceConfig>, Vec<Problem>> {
        checked(value, cx, None, S::check)
    }
}

impl<S: TargetSettings> TargetKind for KindOf<S> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn env(&self) -> &'static [EnvVar] {
        self.env
    }
    fn implied_by_env(&self, cx: &Context<'_>) -> bool {
        cx.any(self.implied_by)
    }
    fn configure(
        &self,
        value: serde_json::Value,
        cx: &Context<'_>,
        source: Option<&dyn SourceConfig>,
    ) -> Result<Box<dyn TargetConfig>, Vec<Problem>> {
        checked(value, cx, source, S::check)
    }
}

/// Applies the environment's overrides to a kind's settings table. A secret may also come from a
/// file named by `NAME_FILE` (as Kubernetes mounts secrets), its trailing newline removed; a file
/// that cannot be read is a problem of that variable.
pub fn apply_env(
    settings: &mut serde_json::Value,
    vars: &[EnvVar],
    cx: &Context<'_>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Some(table) = settings.as_object_mut() else {
        return problems;
    };
    for v in vars.iter().filter(|v| !v.setting.is_empty()) {
        let value = match cx.env(v.names) {
            Some((_, value)) => value,
            None if v.form == EnvForm::Secret => {
                let from_file = v.names.iter().find_map(|n| {
                    (cx.env)(&format!("{n}_FILE"))
                        .filter(|p| !p.is_empty())
                        .map(|p| (*n, p))
                });
                let Some((name, path)) = from_file else {
                    continue;
                };
                match std::fs::read_to_string(cx.resolve(&path)) {
                    Ok(text) => text.trim_end_matches(['\r', '\n']).to_owned(),
                    Err(e) => {
                        problems.push(Problem::env(
                            name,
                            format!("{name}_FILE names {path}, which cannot be read: {e}"),
                        ));
                        continue;
                    }
                }
            }
            None => continue,
        };
        let value = match v.form {
            EnvForm::Text | EnvForm::Secret => serde_json::Value::String(value),
            EnvForm::List => serde_json::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| serde_json::Value::String(p.to_owned()))
                    .collect(),
            ),
        };
        table.insert(v.setting.to_owned(), value);
    }
    problems
}

/// Deserialises a kind's settings, collecting every unknown key and wrong type (each bad key is
/// reported, removed, and the rest deserialised again).
pub fn settings<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Vec<Problem>> {
    match settings_partial(value) {
        (Some(t), problems) if problems.is_empty() => Ok(t),
        (_, problems) => Err(problems),
    }
}

/// As [`settings`], but also the value made of the keys that were right, for a caller that goes on
/// checking the rest (the command line's shared sections).
pub fn settings_partial<T: DeserializeOwned>(
    mut value: serde_json::Value,
) -> (Option<T>, Vec<Problem>) {
    let mut problems = Vec::new();
    for _ in 0..64 {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) => return (Some(t), problems),
            Err(e) => {
                let mut path: Vec<String> = e
                    .path()
                    .iter()
                    .filter_map(|s| match s {
                        serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                        serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                        _ => None,
                    })
                    .collect();
                let msg = e.inner().to_string();
                // serde_json appends " at line L column C" of its own input: not the user's file.
                let msg = msg
                    .split(" at line ")
                    .next()
                    .unwrap_or(&msg)
                    .trim()
                    .to_owned();
                if let Some(field) = msg
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split('`').next())
                    && path.last().map(String::as_str) != Some(field)
                {
                    path.push(field.to_owned());
                }
                let msg = msg.replace(", expected one of", "; the known keys are");
                problems.push(Problem::at(path.join("."), msg));
                if path.is_empty() || !remove(&mut value, &path) {
                    return (None, problems);
                }
            }
        }
    }
    (None, problems)
}

fn remove(value: &mut serde_json::Value, path: &[String]) -> bool {
    let Some((last, head)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for p in head {
        match cur.get_mut(p.as_str()) {
            Some(v) => cur = v,
            None => return false,
        }
    }
    cur.as_object_mut()
        .is_some_and(|t| t.remove(last.as_str()).is_some())
}

/// A required text setting: present and not blank, or a problem saying how to set it.
pub fn required<'a>(
    problems: &mut Vec<Problem>,
    key: &str,
    value: Option<&'a String>,
    hint: &str,
) -> Option<&'a String> {
    match value {
        Some(s) if !s.trim().is_empty() => Some(s),
        _ => {
            problems.push(Problem::at(key, format!("missing; {hint}")));
            None
        }
    }
}

/// `Ok(v)` when there is no problem.
pub fn done<T>(v: Option<T>, problems: Vec<Problem>) -> Result<T, Vec<Problem>> {
    match v {
        Some(v) if problems.is_empty() => Ok(v),
        _ => Err(problems),
    }
}

/// Checks settings the way the command line does (the environment's overrides applied first), for
/// the kinds' own tests.
#[cfg(test)]
pub(crate) mod check {
    use super::*;

    /// A context over these variables, relative paths under `/cfg`.
    pub fn with_env<T>(pairs: &[(&str, &str)], f: impl FnOnce(&Context<'_>) -> T) -> T {
        let vars: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = |n: &str| vars.get(n).cloned();
        f(&Context::new(Path::new("/cfg"), &lookup))
    }

    /// The source kind's configuration of `settings` under `env`.
    pub fn source(
        kind: &dyn SourceKind,
        settings: serde_json::Value,
        env: &[(&str, &str)],
    ) -> Result<Box<dyn SourceConfig>, Vec<Problem>> {
        with_env(env, |cx| {
            let mut settings = settings;
            let problems = apply_env(&mut settings, kind.env(), cx);
            assert!(problems.is_empty(), "{problems:?}");
            kind.configure(settings, cx)
        })
    }

    /// The target kind's configuration of `settings` under `env`, with `source`.
    pub fn target(
        kind: &dyn TargetKind,
        settings: serde_json::Value,
        env: &[(&str, &str)],
        source: Option<&dyn SourceConfig>,
    ) -> Result<Box<dyn TargetConfig>, Vec<Problem>> {
        with_env(env, |cx| {
            let mut settings = settings;
            let problems = apply_env(&mut settings, kind.env(), cx);
            assert!(problems.is_empty(), "{problems:?}");
            kind.configure(settings, cx, source)
        })
    }

    /// Every problem as `key: message`.
    pub fn text(problems: &[Problem]) -> String {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
