//! The configuration: a TOML file, environment overrides (including the names the existing Entra →
//! lakeFS and Entra → Databricks scripts use), and `.env` files. Parsed in two layers, like
//! ripgrep's arguments: the raw shape as typed (serde, unknown keys denied), then the real objects,
//! built once. Every problem is reported in one go, each with its file and line or its variable.

use idsync_connectors::registry::{self, Context, Problem, SourceConfig, TargetConfig};
use idsync_engine::mapping::Mapping;
use idsync_engine::{Policy, Scope};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One problem in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `idsync.toml:12`, `environment variable DRY_RUN`, or the file name.
    pub location: String,
    /// The setting, as a dotted path (`scope.search_depth`).
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
    notify: Option<RawNotify>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhook_url: Option<String>,
    on: Option<String>,
    format: Option<String>,
    timeout: Option<String>,
    ca_bundle: Option<String>,
    allow_insecure_http: Option<bool>,
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
    web_identity: Option<String>,
    audience: Option<String>,
    ca_bundle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    every: Option<String>,
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
    edge_groups: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    deprovision: Option<String>,
    adopt: Option<bool>,
    adopt_keys: Option<Vec<String>>,
    on_conflict: Option<String>,
    on_apply_error: Option<String>,
    yield_attributes: Option<Vec<String>>,
    yield_members: Option<bool>,
    max_deletions: Option<usize>,
    max_deletions_percent: Option<u32>,
    quarantine_after: Option<u32>,
    max_failed_percent: Option<u32>,
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
    service_principal_external_id: Option<String>,
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
    /// How often `idsync run` syncs (`[run] every`).
    pub every: Option<Duration>,
    /// Where failures (and, if asked, changes) are posted (`[notify]`).
    pub notify: Option<crate::notify::NotifyConfig>,
    /// Things to tell the user that do not stop a run (a secret in a file others can read).
    pub warnings: Vec<String>,
}

mod env;
mod rules;
mod secrets;
mod state;
pub use env::Env;
#[cfg(test)]
use env::env_names;
pub use state::load_state;
use state::store_options;

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
    let mut cfg = parse(&text, &name, &base, env)?;
    if let Some(p) = path {
        cfg.warnings.extend(secrets::readable(p, &text));
    }
    Ok(cfg)
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

/// An interval: `90s`, `30m`, `1h`, `1h30m`, `2d` (at least a second).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not an interval: write it like 90s, 30m, 1h or 1h30m");
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// The source of a configuration, checked alone: for `idsync state` commands whose state signs in
/// as the source does (`[state] web_identity = "entra"`), which must not need the targets' secrets.
fn source_alone(
    text: &str,
    name: &str,
    base: &Path,
    env: &Env,
    src: Option<toml::Table>,
) -> Result<Option<Box<dyn SourceConfig>>, ConfigErrors> {
    let mut v = Validator {
        file: name.to_owned(),
        text,
        spans: toml::de::DeTable::parse(text).ok().map(|t| t.into_inner()),
        errors: Vec::new(),
    };
    let lookup = |n: &str| env.get(n);
    let cx = Context::new(base, &lookup);
    let source = v.source(src, &cx).flatten();
    if v.errors.is_empty() {
        Ok(source)
    } else {
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
        let value: toml::Table = match toml::from_str(self.text) {
            Ok(t) => t,
            Err(e) => {
                self.err(Origin::File(""), e.message().trim().to_owned());
                return Raw::default();
            }
        };
        let (raw, problems) = registry::settings_partial::<Raw>(Self::settings(value));
        self.problems("", problems);
        raw.unwrap_or_default()
    }

    /// Reports a kind's problems under `prefix` (`source`, `targets.NAME`).
    fn problems(&mut self, prefix: &str, problems: Vec<Problem>) {
        for p in problems {
            match p.env {
                Some(var) => self.err(Origin::Env(var), p.message),
                None if p.key.is_empty() => self.err(Origin::File(prefix), p.message),
                None if prefix.is_empty() => self.err(Origin::File(&p.key), p.message),
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

    /// `[source]`: its kind, named or chosen by the environment (Entra's variables), checks it.
    /// `None` inside when it is wrong (reported); `None` outside when the run cannot go on.
    #[allow(clippy::option_option)]
    fn source(
        &mut self,
        src: Option<toml::Table>,
        cx: &Context<'_>,
    ) -> Option<Option<Box<dyn SourceConfig>>> {
        let mut src = src.unwrap_or_default();
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
                .find(|k| k.implied_by_env(cx))
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
                    let from_env = registry::apply_env(&mut settings, kind.env(), cx);
                    self.problems("source", from_env);
                    match kind.configure(settings, cx) {
                        Ok(s) => Some(s),
                        Err(problems) => {
                            self.problems("source", problems);
                            None
                        }
                    }
                }
            },
        };
        Some(source)
    }

    /// `[state] web_identity`: S3 state's AssumeRoleWithWebIdentity with a token from the Entra
    /// ID source's sign-in.
    fn web_identity(
        &mut self,
        state: &RawState,
        url: &str,
        source: Option<&dyn SourceConfig>,
        opts: &mut idsync_state::StoreOptions,
    ) {
        match state.web_identity.as_deref() {
            None => {
                if state.audience.is_some() {
                    self.err(
                        Origin::File("state.audience"),
                        "goes with web_identity = \"entra\": set that too, or remove the audience",
                    );
                }
            }
            Some("entra") => match state::entra_web_identity(state, url, source) {
                Ok(w) => opts.web_identity = Some(w),
                Err((key, message)) => self.err(Origin::File(key), message),
            },
            Some(other) => self.err(
                Origin::File("state.web_identity"),
                format!(
                    "{other:?} is not a choice: \"entra\" (a token from the Entra ID source's sign-in; for a token file, set web_identity_token_file instead)"
                ),
            ),
        }
    }

    fn build(&mut self, mut raw: Raw, base: &Path, env: &Env) -> Option<Config> {
        let resolve = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let lookup = |name: &str| env.get(name);
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
        let every = match raw.run.as_ref().and_then(|r| r.every.as_deref()) {
            None => None,
            Some(text) => match parse_interval(text) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.err(Origin::File("run.every"), e);
                    None
                }
            },
        };

        let notify = self.notify(raw.notify.take(), &resolve, env);

        // [source]: its kind, named or chosen by the environment (Entra's variables), checks it.
        let source = self.source(raw.source.take(), &cx)?;
        let mut state_options = state_options;
        self.web_identity(&state, &state_url, source.as_deref(), &mut state_options);

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
            edge_groups: idsync_engine::scope::EdgeGroups::Omit,
        };
        match rs.edge_groups.as_deref() {
            None | Some("omit") => {}
            Some("empty") => scope.edge_groups = idsync_engine::scope::EdgeGroups::Empty,
            Some(other) => self.err(
                Origin::File("scope.edge_groups"),
                format!(
                    "{other:?} is not a choice: \"omit\" (groups beyond the search depth are left out) or \"empty\" (synced without members and nested)"
                ),
            ),
        }
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
        let user_name_set = raw.mapping.as_ref().is_some_and(|m| m.user_name.is_some());
        let guest_name_set = raw
            .mapping
            .as_ref()
            .is_some_and(|m| m.guest_user_name.is_some());
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
            let user_name_set =
                user_name_set || tmapping.as_ref().is_some_and(|m| m.user_name.is_some());
            let guest_name_set = guest_name_set
                || tmapping
                    .as_ref()
                    .is_some_and(|m| m.guest_user_name.is_some());
            // A target that keys its users its own way (lakeFS Cloud's "waad|{id}") keys its
            // guests the same way, unless its own mapping sets guest_user_name: the one in
            // [mapping] goes with [mapping]'s user_name.
            let guests_follow = tmapping
                .as_ref()
                .is_some_and(|m| m.user_name.is_some() && m.guest_user_name.is_none());
            let tpolicy: Option<RawPolicy> = self.typed(&key("policy"), t.remove("policy"));
            let mut tmapping = tmapping.as_ref().map_or_else(
                || mapping.clone(),
                |m| self.mapping(&key("mapping"), m, &mapping),
            );
            if guests_follow {
                tmapping.guest_user_name = None;
            }
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
            let from_env = registry::apply_env(&mut settings, kind.env(), &cx);
            self.problems(&prefix, from_env);
            match kind.configure(settings, &cx, source.as_deref()) {
                Ok(target) => {
                    target.adjust_mapping(&mut tmapping);
                    let preset = source
                        .as_deref()
                        .and_then(|s| target.default_user_name(s.kind()));
                    if let (false, Some(t)) = (user_name_set, preset) {
                        match Mapping::user_template(t) {
                            Ok(t) => tmapping.user_name = t,
                            Err(e) => {
                                self.err(Origin::File(&key("mapping.user_name")), e.to_string())
                            }
                        }
                        // Guests as the target keys them, unless a mapping says otherwise.
                        if !guest_name_set {
                            tmapping.guest_user_name = target
                                .default_guest_user_name()
                                .and_then(|g| Mapping::user_template(g).ok());
                        }
                    }
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
            every,
            notify,
            warnings: Vec::new(),
        })
    }

    /// `[notify]`, with the webhook from `IDSYNC_WEBHOOK_URL` over the file's.
    fn notify(
        &mut self,
        raw: Option<RawNotify>,
        resolve: &dyn Fn(&str) -> PathBuf,
        env: &Env,
    ) -> Option<crate::notify::NotifyConfig> {
        use crate::notify::{Format, NotifyConfig, On};
        let mut from_env = env
            .first(&["IDSYNC_WEBHOOK_URL"])
            .map(|(_, v)| v.to_owned());
        // As every secret: `NAME_FILE` names a file holding it (a mounted Kubernetes secret).
        if from_env.is_none()
            && let Some((_, path)) = env.first(&["IDSYNC_WEBHOOK_URL_FILE"])
        {
            match std::fs::read_to_string(resolve(path)) {
                Ok(text) => from_env = Some(text.trim().to_owned()),
                Err(e) => {
                    self.err(
                        Origin::Env("IDSYNC_WEBHOOK_URL_FILE"),
                        format!("cannot read {path}: {e}"),
                    );
                    return None;
                }
            }
        }
        if raw.is_none() && from_env.is_none() {
            return None;
        }
        let raw = raw.unwrap_or_default();
        let (url, origin) = match (from_env, raw.webhook_url) {
            (Some(u), _) => (u, Origin::Env("IDSYNC_WEBHOOK_URL")),
            (None, Some(u)) => (u, Origin::File("notify.webhook_url")),
            (None, None) => {
                self.err(
                    Origin::File("notify"),
                    "no webhook: set IDSYNC_WEBHOOK_URL (or [notify] webhook_url)",
                );
                return None;
            }
        };
        let allow_insecure_http = raw.allow_insecure_http.unwrap_or(false);
        let mut ok = true;
        match scheme_of(&url) {
            Some("https") => {}
            Some("http") if allow_insecure_http || idsync_connectors::http::safe_to_send(&url) => {}
            Some("http") => {
                ok = false;
                self.err(
                    origin,
                    "a webhook URL is a credential: use https:// (plain http:// only to this machine, or with allow_insecure_http = true)",
                );
            }
            _ => {
                ok = false;
                // Never echo the value: the URL is the secret.
                self.err(origin, "is not an http(s):// URL");
            }
        }
        let on = match raw.on.as_deref() {
            None | Some("failure") => On::Failure,
            Some("change") => On::Change,
            Some(other) => {
                ok = false;
                self.err(
                    Origin::File("notify.on"),
                    format!(
                        "{other:?} is not a choice: \"failure\" (a run failed or halted) or \"change\" (that, and every run that changed a target)"
                    ),
                );
                On::Failure
            }
        };
        let format = match raw.format.as_deref() {
            None | Some("slack") => Format::Slack,
            Some("teams") => Format::Teams,
            Some("json") => Format::Json,
            Some(other) => {
                ok = false;
                self.err(
                    Origin::File("notify.format"),
                    format!(
                        "{other:?} is not a choice: \"slack\" ({{\"text\": ...}}, also Teams connector webhooks), \"teams\" (an Adaptive Card, Teams Workflows) or \"json\""
                    ),
                );
                Format::Slack
            }
        };
        let timeout = match raw.timeout.as_deref() {
            None => Duration::from_secs(20),
            Some(t) => match parse_interval(t) {
                Ok(d) => d,
                Err(e) => {
                    ok = false;
                    self.err(Origin::File("notify.timeout"), e);
                    Duration::from_secs(20)
                }
            },
        };
        ok.then(|| NotifyConfig {
            url: idsync_model::Secret::new(url),
            on,
            format,
            timeout,
            ca_bundle: raw.ca_bundle.as_deref().map(resolve),
            allow_insecure_http,
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
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let names: Vec<String> = serde_json::from_slice(idsync_model::without_bom(&bytes))
        .map_err(|e| format!("{} is not a JSON list of group names: {e}", path.display()))?;
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests;

/// The scheme of a URL-looking string, lowercased.
fn scheme_of(url: &str) -> Option<&'static str> {
    let (scheme, rest) = url.split_once("://")?;
    if rest.is_empty() {
        return None;
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Some("https"),
        "http" => Some("http"),
        _ => Some("other"),
    }
}
