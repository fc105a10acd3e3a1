//! The configuration: a TOML file, environment overrides (including the names the existing Entra →
//! lakeFS and Entra → Databricks scripts use), and `.env` files. Parsed in two layers, like
//! ripgrep's arguments: the raw shape as typed (serde, unknown keys denied), then the real objects,
//! built once. Every problem is reported in one go, each with its file and line or its variable.

use idsync_connectors::registry::{self, Context, Problem, SourceConfig, TargetConfig};
use idsync_engine::mapping::Mapping;
use idsync_engine::{Deprovision, OnConflict, Policy, Scope, Template};
use idsync_model::{Attr, Kind, PKey, Secret};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `idsync.toml:12`, `environment variable DRY_RUN`, or the file name.
    pub location: String,
    /// The setting, as a dotted path (`targets.lakefs.endpoint`).
    pub key: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.key, self.message)
        }
    }
}

/// All the problems found, in file order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the configuration has {n} error{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------------
// Layer 1: the raw shape.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    state: Option<RawState>,
    /// The source's table, handed to its kind (see `idsync_connectors::registry`).
    source: Option<toml::Table>,
    scope: Option<RawScope>,
    policy: Option<RawPolicy>,
    mapping: Option<RawMapping>,
    /// Each target's table: `kind`, `mapping` and `policy` are read here, the rest is handed to
    /// its kind.
    #[serde(default)]
    targets: BTreeMap<String, toml::Table>,
    run: Option<RawRun>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    url: Option<String>,
    lease_seconds: Option<u64>,
    endpoint: Option<String>,
    region: Option<String>,
    role_arn: Option<String>,
    external_id: Option<String>,
    sts_endpoint: Option<String>,
    web_identity_token_file: Option<String>,
    google_service_account: Option<String>,
    google_application_credentials: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    worker_threads: Option<usize>,
    reconcile_hours: Option<u64>,
    dry_run: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    #[serde(default)]
    groups: Vec<String>,
    groups_file: Option<String>,
    #[serde(default)]
    group_ids: Vec<String>,
    group_filter: Option<String>,
    group_regex: Option<String>,
    search_depth: Option<u32>,
    include_non_security: Option<bool>,
    all_users: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    deprovision: Option<String>,
    adopt: Option<bool>,
    adopt_keys: Option<Vec<String>>,
    on_conflict: Option<String>,
    yield_attributes: Option<Vec<String>>,
    yield_members: Option<bool>,
    max_deletions: Option<usize>,
    max_deletions_percent: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    user_name: Option<String>,
    guest_user_name: Option<String>,
    user_display_name: Option<String>,
    user_external_id: Option<String>,
    service_principal_key: Option<String>,
    service_principal_display_name: Option<String>,
    group_name: Option<String>,
    group_display_name: Option<String>,
    group_external_id: Option<String>,
    group_description: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Layer 2: the real objects.

/// One agreement: the source synced into one target.
#[derive(Debug)]
pub struct AgreementConfig {
    /// Its name (the `[targets.NAME]` table), also the state's name.
    pub name: String,
    /// The target, as its kind checked it.
    pub target: Box<dyn TargetConfig>,
    /// How source principals map to it.
    pub mapping: Mapping,
    /// Its policy.
    pub policy: Policy,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// State location (a folder path or URL).
    pub state_url: String,
    /// How long a run's lease lasts.
    pub lease_seconds: u64,
    /// Object store settings the URL cannot carry.
    pub state_options: idsync_state::StoreOptions,
    /// The source, as its kind checked it.
    pub source: Box<dyn SourceConfig>,
    /// What is synced.
    pub scope: Scope,
    /// One per target.
    pub agreements: Vec<AgreementConfig>,
    /// Plan only (`DRY_RUN`).
    pub dry_run: bool,
    /// Concurrent requests per target.
    pub worker_threads: usize,
    /// How long an incremental run may trust the last applied snapshot as a picture of a target
    /// before observing it in full again (`[run] reconcile_hours`, default 24; 0 observes every
    /// target in full on every run).
    pub reconcile_hours: u64,
}

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

    fn first<'a>(&'a self, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
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

/// The object store settings of a `[state]` table (paths resolved against the configuration's
/// folder; the Azure connection string from the environment only).
fn store_options(
    state: &RawState,
    resolve: &dyn Fn(&str) -> PathBuf,
    env: &Env,
) -> idsync_state::StoreOptions {
    let path = |p: &Option<String>| p.as_deref().map(|p| resolve(p).display().to_string());
    idsync_state::StoreOptions {
        endpoint: state.endpoint.clone(),
        region: state.region.clone(),
        role_arn: state.role_arn.clone(),
        external_id: state.external_id.clone(),
        sts_endpoint: state.sts_endpoint.clone(),
        web_identity_token_file: path(&state.web_identity_token_file),
        google_service_account: path(&state.google_service_account),
        google_application_credentials: path(&state.google_application_credentials),
        azure_connection_string: env
            .first(&["AZURE_STORAGE_CONNECTION_STRING"])
            .map(|(_, v)| Secret::new(v)),
    }
}

/// Where the state is, and how to reach it, from the configuration's `[state]` table and
/// `IDSYNC_STATE` alone: for `idsync state` commands, which must work when the rest of the
/// configuration cannot be validated here (a secret that is not in this shell).
pub fn load_state(
    path: Option<&Path>,
    env: &Env,
) -> Result<(String, idsync_state::StoreOptions), ConfigErrors> {
    #[derive(Default, Deserialize)]
    struct StateOnly {
        #[serde(default)]
        state: Option<RawState>,
    }
    let fail = |message: String| {
        ConfigErrors(vec![ConfigError {
            location: path.map_or_else(String::new, |p| p.display().to_string()),
            key: "state".into(),
            message,
        }])
    };
    let raw: StateOnly = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| fail(format!("cannot read the configuration file: {e}")))?;
            toml::from_str(&text).map_err(|e| fail(e.message().to_owned()))?
        }
        None => StateOnly::default(),
    };
    let base = path
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }
    };
    let state = raw.state.unwrap_or_default();
    let url = env
        .first(&["IDSYNC_STATE"])
        .map(|(_, v)| v.to_owned())
        .or_else(|| state.url.clone())
        .unwrap_or_else(|| ".idsync/state".to_owned());
    Ok((url, store_options(&state, &resolve, env)))
}

/// Reads and validates a configuration. `path` may be `None` (environment only).
pub fn load(path: Option<&Path>, env: &Env) -> Result<Config, ConfigErrors> {
    let (text, name) = match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => (t, p.display().to_string()),
            Err(e) => {
                return Err(ConfigErrors(vec![ConfigError {
                    location: p.display().to_string(),
                    key: String::new(),
                    message: format!("cannot read the configuration file: {e}"),
                }]));
            }
        },
        None => (String::new(), "(no configuration file)".to_owned()),
    };
    let base = path
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    parse(&text, &name, &base, env)
}

/// Parses configuration text. `base` resolves relative file paths in it.
pub fn parse(text: &str, name: &str, base: &Path, env: &Env) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        file: name.to_owned(),
        text,
        spans: None,
        errors: Vec::new(),
    };
    let (spanned, syntax) = toml::de::DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            let line = e.span().map(|s| line_of(text, s.start));
            v.errors.push(ConfigError {
                location: line.map_or(name.to_owned(), |l| format!("{name}:{l}")),
                key: String::new(),
                message: e.message().trim().to_owned(),
            });
        }
        return Err(ConfigErrors(v.errors));
    }
    v.spans = Some(spanned.into_inner());
    let raw = v.raw();
    let cfg = v.build(raw, base, env);
    if v.errors.is_empty() {
        cfg.ok_or_else(|| ConfigErrors(Vec::new()))
    } else {
        v.errors.sort_by_key(|e| {
            let line = e
                .location
                .rsplit(':')
                .next()
                .and_then(|l| l.parse::<usize>().ok());
            (line.is_none(), line)
        });
        Err(ConfigErrors(v.errors))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

struct Validator<'t> {
    file: String,
    text: &'t str,
    spans: Option<toml::de::DeTable<'t>>,
    errors: Vec<ConfigError>,
}

/// Where a value came from.
enum Origin<'a> {
    File(&'a str),
    Env(&'static str),
}

impl Validator<'_> {
    /// The line of a dotted key in the file, if it is there.
    fn line(&self, key: &str) -> Option<usize> {
        let mut table = self.spans.as_ref()?;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (k, v) = table.get_key_value(*part)?;
            if i + 1 == parts.len() {
                return Some(line_of(self.text, k.span().start));
            }
            match v.get_ref() {
                toml::de::DeValue::Table(t) => table = t,
                _ => return Some(line_of(self.text, k.span().start)),
            }
        }
        None
    }

    fn err(&mut self, origin: Origin<'_>, message: impl Into<String>) {
        let (location, key) = match origin {
            Origin::File(key) => {
                // Point at the deepest part of the key that exists in the file.
                let mut k = key;
                let line = loop {
                    if let Some(l) = self.line(k) {
                        break Some(l);
                    }
                    match k.rsplit_once('.') {
                        Some((head, _)) => k = head,
                        None => break None,
                    }
                };
                (
                    line.map_or(self.file.clone(), |l| format!("{}:{l}", self.file)),
                    key.to_owned(),
                )
            }
            Origin::Env(var) => (format!("environment variable {var}"), String::new()),
        };
        self.errors.push(ConfigError {
            location,
            key,
            message: message.into(),
        });
    }

    /// Deserialises the raw shape, collecting every unknown key and wrong type: each error's key is
    /// removed and the rest deserialised again.
    fn raw(&mut self) -> Raw {
        let mut value: toml::Table = match toml::from_str(self.text) {
            Ok(t) => t,
            Err(e) => {
                self.err(Origin::File(""), e.message().trim().to_owned());
                return Raw::default();
            }
        };
        for _ in 0..64 {
            let de = toml::Value::Table(value.clone());
            match serde_path_to_error::deserialize::<_, Raw>(de) {
                Ok(raw) => return raw,
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
                    let msg = e.inner().message().trim().to_owned();
                    if let Some(field) = msg
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split('`').next())
                        && path.last().map(String::as_str) != Some(field)
                    {
                        path.push(field.to_owned());
                    }
                    let key = path.join(".");
                    let msg = msg.replace(", expected one of", "; the known keys are");
                    self.err(Origin::File(&key), msg);
                    if path.is_empty() || !remove(&mut value, &path) {
                        return Raw::default();
                    }
                }
            }
        }
        Raw::default()
    }

    fn template(
        &mut self,
        key: &str,
        text: Option<&String>,
        default: Option<Template>,
        parse: fn(&str) -> Result<Template, idsync_engine::template::TemplateError>,
    ) -> Option<Template> {
        match text {
            None => default,
            Some(t) if t.is_empty() => None,
            Some(t) => match parse(t) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.err(Origin::File(key), e.to_string());
                    default
                }
            },
        }
    }

    fn mapping(&mut self, prefix: &str, raw: &RawMapping, base: &Mapping) -> Mapping {
        let k = |f: &str| format!("{prefix}.{f}");
        let u = Mapping::user_template;
        let s = Mapping::sp_template;
        let g = Mapping::group_template;
        let req = |me: &mut Self, f: &str, t: &Option<String>, d: &Template, p| {
            me.template(&k(f), t.as_ref(), Some(d.clone()), p)
                .unwrap_or_else(|| d.clone())
        };
        Mapping {
            user_name: req(self, "user_name", &raw.user_name, &base.user_name, u),
            guest_user_name: self.template(
                &k("guest_user_name"),
                raw.guest_user_name.as_ref(),
                base.guest_user_name.clone(),
                u,
            ),
            user_display_name: req(
                self,
                "user_display_name",
                &raw.user_display_name,
                &base.user_display_name,
                u,
            ),
            user_external_id: self.template(
                &k("user_external_id"),
                raw.user_external_id.as_ref(),
                base.user_external_id.clone(),
                u,
            ),
            service_principal_key: req(
                self,
                "service_principal_key",
                &raw.service_principal_key,
                &base.service_principal_key,
                s,
            ),
            service_principal_display_name: req(
                self,
                "service_principal_display_name",
                &raw.service_principal_display_name,
                &base.service_principal_display_name,
                s,
            ),
            group_name: req(self, "group_name", &raw.group_name, &base.group_name, g),
            group_display_name: self.template(
                &k("group_display_name"),
                raw.group_display_name.as_ref(),
                base.group_display_name.clone(),
                g,
            ),
            group_external_id: self.template(
                &k("group_external_id"),
                raw.group_external_id.as_ref(),
                base.group_external_id.clone(),
                g,
            ),
            group_description: self.template(
                &k("group_description"),
                raw.group_description.as_ref(),
                base.group_description.clone(),
                g,
            ),
            group_policies: base.group_policies.clone(),
        }
    }

    fn policy(&mut self, prefix: &str, raw: &RawPolicy, base: &Policy) -> Policy {
        let k = |f: &str| format!("{prefix}.{f}");
        let mut p = base.clone();
        if let Some(d) = &raw.deprovision {
            match d.as_str() {
                "none" => p.deprovision = Deprovision::None,
                "deactivate" => p.deprovision = Deprovision::Deactivate,
                "delete" => p.deprovision = Deprovision::Delete,
                other => self.err(Origin::File(&k("deprovision")), format!("{other:?} is not a deprovision policy; use \"none\", \"deactivate\" or \"delete\"")),
            }
        }
        if let Some(c) = &raw.on_conflict {
            match c.as_str() {
                "halt" => p.on_conflict = OnConflict::Halt,
                "skip" => p.on_conflict = OnConflict::Skip,
                other => self.err(
                    Origin::File(&k("on_conflict")),
                    format!("{other:?} is not a conflict policy; use \"halt\" or \"skip\""),
                ),
            }
        }
        if let Some(a) = raw.adopt {
            p.adopt = a;
        }
        if let Some(keys) = &raw.adopt_keys {
            p.adopt_keys.clear();
            for entry in keys {
                match entry.split_once(':').and_then(|(k, v)| Some((Kind::parse(k)?, v))) {
                    Some((kind, key)) if !key.is_empty() => {
                        p.adopt_keys.insert(PKey::new(kind, key));
                    }
                    _ => self.err(
                        Origin::File(&k("adopt_keys")),
                        format!("{entry:?} is not KIND:KEY (e.g. \"user:jane@corp.example\", \"group:Data Engineers\", \"servicePrincipal:<app id>\")"),
                    ),
                }
            }
        }
        if let Some(attrs) = &raw.yield_attributes {
            p.yield_attributes.clear();
            for a in attrs {
                match Attr::parse(a) {
                    Some(Attr::Key) | None => self.err(
                        Origin::File(&k("yield_attributes")),
                        format!("{a:?} cannot be yielded; the attributes are displayName, emails, active, externalId, description"),
                    ),
                    Some(attr) => {
                        p.yield_attributes.insert(attr);
                    }
                }
            }
        }
        if let Some(y) = raw.yield_members {
            p.yield_members = y;
        }
        if raw.max_deletions.is_some() {
            p.max_deletions = raw.max_deletions;
        }
        if let Some(pct) = raw.max_deletions_percent {
            if pct > 100 {
                self.err(
                    Origin::File(&k("max_deletions_percent")),
                    format!("{pct} is not a percentage (0 to 100)"),
                );
            }
            p.max_deletions_percent = Some(pct);
        }
        p
    }

    /// Reports a kind's problems under `prefix` (`source`, `targets.NAME`).
    fn problems(&mut self, prefix: &str, problems: Vec<Problem>) {
        for p in problems {
            match p.env {
                Some(var) => self.err(Origin::Env(var), p.message),
                None if p.key.is_empty() => self.err(Origin::File(prefix), p.message),
                None => self.err(Origin::File(&format!("{prefix}.{}", p.key)), p.message),
            }
        }
    }

    /// A table of the file as a kind's settings (TOML values as JSON values).
    fn settings(table: toml::Table) -> serde_json::Value {
        serde_json::to_value(table)
            .unwrap_or_else(|_| serde_json::Value::Object(Default::default()))
    }

    /// A nested typed table (`mapping`, `policy` of a target), every bad key reported.
    fn typed<T: serde::de::DeserializeOwned + Default>(
        &mut self,
        prefix: &str,
        value: Option<toml::Value>,
    ) -> Option<T> {
        let value = value?;
        let json = serde_json::to_value(value).unwrap_or_default();
        match registry::settings::<T>(json) {
            Ok(t) => Some(t),
            Err(problems) => {
                self.problems(prefix, problems);
                Some(T::default())
            }
        }
    }

    fn build(&mut self, mut raw: Raw, base: &Path, env: &Env) -> Option<Config> {
        let resolve = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let lookup = |name: &str| env.vars.get(name).cloned();
        let cx = Context::new(base, &lookup);

        // Environment overrides of the shared sections.
        if let Some((_, f)) = env.first(&["GROUP_FILTER"]) {
            raw.scope.get_or_insert_with(RawScope::default).group_filter = Some(f.to_owned());
        }
        if let Some((_, s)) = env.first(&["IDSYNC_STATE"]) {
            raw.state.get_or_insert_with(RawState::default).url = Some(s.to_owned());
        }
        let mut dry_run = raw.run.as_ref().and_then(|r| r.dry_run).unwrap_or(false);
        if let Some((var, v)) = env.first(&["DRY_RUN"]) {
            match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => dry_run = true,
                "0" | "false" | "no" | "off" => dry_run = false,
                _ => self.err(
                    Origin::Env(var),
                    format!("{v:?} is not a boolean; use true or false"),
                ),
            }
        }

        // [state], [run]
        let state = raw.state.unwrap_or_default();
        let state_url = state
            .url
            .clone()
            .unwrap_or_else(|| ".idsync/state".to_owned());
        if let Some(scheme) = state_url
            .split_once("://")
            .map(|(s, _)| s)
            .filter(|s| !idsync_state::SCHEMES.contains(s))
        {
            self.err(
                Origin::File("state.url"),
                format!("{scheme}:// is not a state store: use a folder path, file://, s3://, az://, abfss:// or gs://"),
            );
        }
        let state_options = store_options(&state, &resolve, env);
        let worker_threads = raw
            .run
            .as_ref()
            .and_then(|r| r.worker_threads)
            .unwrap_or(10);
        if worker_threads == 0 {
            self.err(Origin::File("run.worker_threads"), "must be at least 1");
        }
        let reconcile_hours = raw
            .run
            .as_ref()
            .and_then(|r| r.reconcile_hours)
            .unwrap_or(24);

        // [source]: its kind, named or chosen by the environment (Entra's variables), checks it.
        let mut src = raw.source.unwrap_or_default();
        let named = match src.remove("kind") {
            None => None,
            Some(toml::Value::String(k)) => Some(k),
            Some(_) => {
                self.err(Origin::File("source.kind"), "must be a string");
                return None;
            }
        };
        let kind = named.or_else(|| {
            registry::SOURCES
                .iter()
                .find(|k| k.implied_by_env(&cx))
                .map(|k| k.name().to_owned())
        });
        let source = match kind.as_deref() {
            None => {
                self.err(Origin::File("source.kind"), "missing: set [source] kind = \"file\" (or set ENTRA_TENANT_ID and friends for Entra ID)");
                None
            }
            Some(name) => match registry::source_kind(name) {
                None => {
                    self.unavailable(
                        "source.kind",
                        name,
                        registry::SOURCES.iter().map(|k| k.name()),
                        registry::PLANNED_SOURCES,
                    );
                    None
                }
                Some(kind) => {
                    let mut settings = Self::settings(src);
                    registry::apply_env(&mut settings, kind.env(), &cx);
                    match kind.configure(settings, &cx) {
                        Ok(s) => Some(s),
                        Err(problems) => {
                            self.problems("source", problems);
                            None
                        }
                    }
                }
            },
        };

        // [scope]
        let rs = raw.scope.unwrap_or_default();
        let mut scope = Scope {
            group_names: rs.groups.into_iter().collect(),
            group_ids: rs.group_ids.into_iter().collect(),
            group_filter: rs.group_filter,
            group_regex: None,
            search_depth: rs.search_depth.unwrap_or(1),
            include_non_security: rs.include_non_security.unwrap_or(false),
            all_users: rs.all_users.unwrap_or(false),
        };
        if let Some(p) = &rs.group_regex {
            match idsync_engine::scope::NameRegex::new(p) {
                Ok(r) => scope.group_regex = Some(r),
                Err(e) => self.err(
                    Origin::File("scope.group_regex"),
                    format!("not a regular expression: {e}"),
                ),
            }
        }
        if scope.search_depth == 0 {
            self.err(
                Origin::File("scope.search_depth"),
                "must be at least 1 (1 = only the listed groups)",
            );
        }
        if let Some(f) = rs.groups_file {
            match read_groups_file(&resolve(&f)) {
                Ok(names) => scope.group_names.extend(names),
                Err(e) => self.err(Origin::File("scope.groups_file"), e),
            }
        }

        // [policy], [mapping], [targets.*]
        let policy = self.policy(
            "policy",
            &raw.policy.unwrap_or_default(),
            &Policy::default(),
        );
        let mapping = self.mapping(
            "mapping",
            &raw.mapping.unwrap_or_default(),
            &Mapping::defaults(),
        );
        // Targets come from the environment alone only when the file names none: a configured
        // target is never replaced or added to behind the user's back.
        if raw.targets.is_empty() {
            for kind in registry::TARGETS.iter().filter(|k| k.implied_by_env(&cx)) {
                let mut t = toml::Table::new();
                t.insert("kind".into(), toml::Value::String(kind.name().into()));
                raw.targets.insert(kind.name().into(), t);
            }
        }
        if raw.targets.is_empty() {
            self.err(
                Origin::File("targets"),
                "no target: add a [targets.NAME] table (or set LAKEFS_ENDPOINT / DATABRICKS_HOST)",
            );
        }
        let mut agreements = Vec::new();
        for (name, mut t) in std::mem::take(&mut raw.targets) {
            let prefix = format!("targets.{name}");
            if idsync_state_name_ok(&name).is_err() {
                self.err(Origin::File(&prefix), "target names use letters, digits, '-', '_' and '.' (the name is also the state's name)");
            }
            let key = |f: &str| format!("{prefix}.{f}");
            let tmapping: Option<RawMapping> = self.typed(&key("mapping"), t.remove("mapping"));
            let tpolicy: Option<RawPolicy> = self.typed(&key("policy"), t.remove("policy"));
            let mut tmapping = tmapping.as_ref().map_or_else(
                || mapping.clone(),
                |m| self.mapping(&key("mapping"), m, &mapping),
            );
            let tpolicy = tpolicy.as_ref().map_or_else(
                || policy.clone(),
                |p| self.policy(&key("policy"), p, &policy),
            );
            let names = || registry::TARGETS.iter().map(|k| k.name());
            let kind = match t.remove("kind") {
                None => {
                    let all: Vec<&str> = names().collect();
                    self.err(
                        Origin::File(&key("kind")),
                        format!("missing; one of: {}", all.join(", ")),
                    );
                    continue;
                }
                Some(toml::Value::String(k)) => k,
                Some(_) => {
                    self.err(Origin::File(&key("kind")), "must be a string");
                    continue;
                }
            };
            let Some(kind) = registry::target_kind(&kind) else {
                self.unavailable(&key("kind"), &kind, names(), registry::PLANNED_TARGETS);
                continue;
            };
            let mut settings = Self::settings(t);
            registry::apply_env(&mut settings, kind.env(), &cx);
            match kind.configure(settings, &cx, source.as_deref()) {
                Ok(target) => {
                    target.adjust_mapping(&mut tmapping);
                    agreements.push(AgreementConfig {
                        name,
                        target,
                        mapping: tmapping,
                        policy: tpolicy,
                    });
                }
                Err(problems) => self.problems(&prefix, problems),
            }
        }
        let source = source?;
        Some(Config {
            state_url,
            lease_seconds: state.lease_seconds.unwrap_or(3600),
            state_options,
            source,
            scope,
            agreements,
            dry_run,
            worker_threads: worker_threads.max(1),
            reconcile_hours,
        })
    }

    fn unavailable<'k>(
        &mut self,
        key: &str,
        kind: &str,
        available: impl Iterator<Item = &'k str>,
        planned: &[&str],
    ) {
        let available: Vec<&str> = available.collect();
        let msg = if planned.contains(&kind) {
            format!(
                "the {kind:?} connector is not in this build of idsync yet (available: {})",
                available.join(", ")
            )
        } else {
            format!(
                "unknown kind {kind:?} (available: {})",
                available.join(", ")
            )
        };
        self.err(Origin::File(key), msg);
    }
}

fn idsync_state_name_ok(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(()) }
}

/// Reads a `groups_to_sync.json` file: a JSON list of group display names.
pub fn read_groups_file(path: &Path) -> Result<BTreeSet<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let names: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JSON list of group names: {e}", path.display()))?;
    Ok(names.into_iter().collect())
}

/// Removes the value at `path` from a TOML table. Returns whether something was removed.
fn remove(table: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, head)) = path.split_last() else {
        return false;
    };
    let mut cur = table;
    for p in head {
        match cur.get_mut(p) {
            Some(toml::Value::Table(t)) => cur = t,
            _ => return false,
        }
    }
    cur.remove(last).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str, env: &Env) -> Result<Config, ConfigErrors> {
        parse(text, "idsync.toml", Path::new("/cfg"), env)
    }

    const GOOD: &str = r#"
[state]
url = "/var/lib/idsync"

[source]
kind = "file"
path = "dir.json"

[scope]
groups = ["TEAM_ALPHA"]
search_depth = 2

[policy]
deprovision = "deactivate"
adopt_keys = ["user:jane@corp.example"]
max_deletions = 5

[targets.lake]
kind = "file"
profile = "lakefs"
path = "lake.json"
default_policies = ["FSReadAll"]

[targets.lake.mapping]
user_name = "waad|{id}"
"#;

    #[test]
    fn a_good_file() {
        let c = parse_str(GOOD, &Env::default()).unwrap();
        assert_eq!(c.state_url, "/var/lib/idsync");
        assert_eq!(c.source.kind(), "file");
        assert_eq!(c.source.describe(), "file /cfg/dir.json");
        assert_eq!(c.scope.search_depth, 2);
        let a = &c.agreements[0];
        assert_eq!(a.name, "lake");
        assert_eq!(a.policy.deprovision, Deprovision::Deactivate);
        assert_eq!(a.policy.max_deletions, Some(5));
        assert_eq!(a.mapping.user_name.as_str(), "waad|{id}");
        assert_eq!(a.mapping.group_policies, ["FSReadAll".to_string()].into());
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let text = r#"
[source]
kind = "file"
path = "dir.json"
colour = "blue"

[policy]
deprovision = "sometimes"
max_deletions = "five"

[targets.lake]
kind = "file"
path = "lake.json"
host = "https://nowhere"

[targets.lake.mapping]
user_name = "{nope"
"#;
        let e = parse_str(text, &Env::default()).unwrap_err();
        let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with("idsync.toml:5: source.colour: unknown field `colour`"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("idsync.toml:8: policy.deprovision: \"sometimes\""),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("idsync.toml:9: policy.max_deletions: invalid type"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("idsync.toml:14: targets.lake.host: unknown field `host`"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].starts_with("idsync.toml:17: targets.lake.mapping.user_name: template"),
            "{}",
            lines[4]
        );
    }

    #[test]
    fn syntax_errors_are_reported_with_lines() {
        let e = parse_str("[source]\nkind = \"file\nx = 1\n", &Env::default()).unwrap_err();
        assert!(e.0[0].location.starts_with("idsync.toml:2"), "{e}");
    }

    #[test]
    fn the_existing_scripts_environment_names_work() {
        let env = Env::from_pairs([
            ("ENTRA_TENANT_ID", "tenant-1"),
            ("ENTRA_APPLICATION_ID", "app-1"),
            ("ENTRA_CLIENT_SECRET_VALUE", "s3cret-value"),
            ("LAKEFS_ENDPOINT", "https://org.lakefscloud.io"),
            ("LAKEFS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("LAKEFS_SECRET_ACCESS_KEY", "lakefs-secret"),
            (
                "LAKEFS_DEFAULT_POLICIES",
                "AuthManageOwnCredentials, FSReadAll",
            ),
            ("GROUP_FILTER", "LakeFSProject*"),
            ("DRY_RUN", "maybe"),
        ]);
        let e = parse_str("", &env).unwrap_err();
        let text = e.to_string();
        // Entra and lakeFS are configured completely by the scripts' variables alone: the one error
        // left is the deliberate DRY_RUN. Nothing leaks.
        assert!(text.contains("has 1 error"), "{text}");
        assert!(
            !text.contains("lakefs") && !text.contains("source."),
            "{text}"
        );
        assert!(
            text.contains("environment variable DRY_RUN: \"maybe\" is not a boolean"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret-value") && !text.contains("lakefs-secret"),
            "{text}"
        );
    }

    #[test]
    fn the_environment_alone_chooses_an_entra_source() {
        let env = Env::from_pairs([
            ("AZURE_TENANT_ID", "tenant-1"),
            ("AZURE_CLIENT_ID", "app-1"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("LAKEFS_ENDPOINT", "https://lakefs.invalid"),
            ("LAKEFS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("LAKEFS_SECRET_ACCESS_KEY", "lakefs-secret"),
        ]);
        let c = parse_str("", &env).unwrap();
        assert_eq!(c.source.kind(), "entra");
        assert_eq!(c.source.describe(), "entra tenant tenant-1");
        assert_eq!(c.agreements.len(), 1);
        assert_eq!(c.agreements[0].target.kind(), "lakefs");
        // A kind's own problem is reported with the file's line.
        let e = parse_str("[source]\nkind = \"entra\"\nauth = \"kerberos\"\n", &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("idsync.toml:3: source.auth: unknown sign-in method \"kerberos\""),
            "{e}"
        );
    }

    /// Every kind in the registry rejects a key it does not have, with its line, and every
    /// variable a kind reads is documented in the README's table.
    #[test]
    fn every_kind_rejects_an_unknown_key_with_its_line_and_documents_its_variables() {
        let env = Env::default();
        for kind in registry::SOURCES {
            let text = format!(
                "[source]\nkind = \"{}\"\nno_such_key = 1\n\n[targets.t]\nkind = \"file\"\npath = \"t.json\"\n",
                kind.name()
            );
            let e = parse_str(&text, &env).unwrap_err().to_string();
            assert!(
                e.contains("idsync.toml:3: source.no_such_key: unknown field `no_such_key`"),
                "source kind {}: {e}",
                kind.name()
            );
        }
        for kind in registry::TARGETS {
            let text = format!(
                "[source]\nkind = \"file\"\npath = \"d.json\"\n\n[targets.t]\nkind = \"{}\"\nno_such_key = 1\n",
                kind.name()
            );
            let e = parse_str(&text, &env).unwrap_err().to_string();
            assert!(
                e.contains("idsync.toml:7: targets.t.no_such_key: unknown field `no_such_key`"),
                "target kind {}: {e}",
                kind.name()
            );
        }
        let readme = include_str!("../../../README.md");
        for name in env_names() {
            assert!(
                readme.contains(&format!("`{name}`")),
                "the README's table of environment variables lacks `{name}`"
            );
        }
    }

    #[test]
    fn another_kinds_settings_are_rejected_in_a_file_source() {
        // The keys Entra ID takes are not a file source's, wherever they come from in the file.
        let text = GOOD.replace(
            "path = \"dir.json\"",
            "path = \"dir.json\"\nclient_certificate_path = \"c.pem\"\nfederated_token_file = \"t\"\nmanaged_identity_endpoint = \"http://x\"\nca_bundle = \"ca.pem\"",
        );
        let e = parse_str(&text, &Env::default()).unwrap_err();
        let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        for (i, key) in [
            "client_certificate_path",
            "federated_token_file",
            "managed_identity_endpoint",
            "ca_bundle",
        ]
        .iter()
        .enumerate()
        {
            assert!(
                lines[i].starts_with(&format!(
                    "idsync.toml:{}: source.{key}: unknown field",
                    8 + i
                )),
                "{}",
                lines[i]
            );
        }
    }

    #[test]
    fn a_group_regex_is_compiled_and_a_bad_one_reported_with_its_line() {
        let env = Env::from_pairs([]);
        let c = parse_str(
            &GOOD.replace("[scope]\n", "[scope]\ngroup_regex = \"^data-(eng|ops)$\"\n"),
            &env,
        )
        .unwrap();
        assert!(c.scope.selects("x", "data-ops") && !c.scope.selects("x", "data-opsx"));
        let e = parse_str(
            &GOOD.replace("[scope]\n", "[scope]\ngroup_regex = \"data-(\"\n"),
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("scope.group_regex: not a regular expression"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = Env::from_pairs([
            ("GROUP_FILTER", "team-*"),
            ("IDSYNC_STATE", "/tmp/st"),
            ("DRY_RUN", "1"),
        ]);
        let c = parse_str(GOOD, &env).unwrap();
        assert_eq!(c.scope.group_filter.as_deref(), Some("team-*"));
        assert_eq!(c.state_url, "/tmp/st");
        assert!(c.dry_run);
    }

    #[test]
    fn environment_never_replaces_configured_targets_or_sources() {
        // Databricks CLI users have DATABRICKS_HOST set; Azure workload identity injects AZURE_*.
        let env = Env::from_pairs([
            ("DATABRICKS_HOST", "https://accounts.azuredatabricks.net"),
            ("AZURE_CLIENT_ID", "pod-identity"),
            ("AZURE_TENANT_ID", "tenant"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com"),
            ("LAKEFS_ENDPOINT", "https://lakefs.invalid"),
        ]);
        let text = GOOD
            .replace("[targets.lake]", "[targets.databricks]")
            .replace("targets.lake.mapping", "targets.databricks.mapping");
        let c = parse_str(&text, &env).unwrap();
        assert_eq!(c.agreements.len(), 1);
        assert_eq!(c.agreements[0].name, "databricks");
        assert_eq!(c.agreements[0].target.kind(), "file");
        assert_eq!(c.source.kind(), "file");
    }

    #[test]
    fn a_malformed_env_file_never_shows_its_secret() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(".env");
        std::fs::write(
            &f,
            "GROUP_FILTER=x\nLAKEFS_SECRET_ACCESS_KEY=\"abc-secret-123\n",
        )
        .unwrap();
        let e = Env::load(&[f]).unwrap_err().to_string();
        assert!(!e.contains("abc-secret-123"), "{e}");
        assert!(e.contains(".env:2: cannot parse this line"), "{e}");
    }

    #[test]
    fn a_config_without_source_or_targets_says_what_to_add() {
        let e = parse_str("", &Env::default()).unwrap_err().to_string();
        assert!(e.contains("source.kind: missing"), "{e}");
        assert!(e.contains("no target"), "{e}");
    }
}
