//! The configuration: a TOML file, environment overrides (including the names the existing Entra →
//! lakeFS and Entra → Databricks scripts use), and `.env` files. Parsed in two layers, like
//! ripgrep's arguments: the raw shape as typed (serde, unknown keys denied), then the real objects,
//! built once. Every problem is reported in one go, each with its file and line or its variable.

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
    source: Option<RawSource>,
    scope: Option<RawScope>,
    policy: Option<RawPolicy>,
    mapping: Option<RawMapping>,
    #[serde(default)]
    targets: BTreeMap<String, RawTarget>,
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
struct RawSource {
    kind: Option<String>,
    // file
    path: Option<String>,
    // entra
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    client_certificate_path: Option<String>,
    federated_token_file: Option<String>,
    auth: Option<String>,
    managed_identity_endpoint: Option<String>,
    #[serde(skip)]
    identity_header: Option<Secret>,
    azure_cli_path: Option<String>,
    authority_host: Option<String>,
    graph_url: Option<String>,
    ca_bundle: Option<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    kind: Option<String>,
    // file
    path: Option<String>,
    profile: Option<String>,
    // lakefs
    endpoint: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    default_policies: Option<Vec<String>>,
    // databricks
    host: Option<String>,
    account_id: Option<String>,
    // databricks, scim
    token: Option<Secret>,
    // lakefs, databricks, scim
    ca_bundle: Option<String>,
    // databricks (OAuth M2M)
    client_id: Option<String>,
    client_secret: Option<Secret>,
    // databricks (an Entra app's credentials, for the Azure Databricks resource)
    azure_tenant_id: Option<String>,
    azure_client_id: Option<String>,
    azure_client_secret: Option<Secret>,
    azure_authority_host: Option<String>,
    azure_use_source: Option<bool>,
    // scim
    url: Option<String>,
    member_chunk: Option<usize>,
    nested_groups: Option<bool>,
    mapping: Option<RawMapping>,
    policy: Option<RawPolicy>,
}

// ---------------------------------------------------------------------------------------------
// Layer 2: the real objects.

/// Where the source is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory JSON file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// Microsoft Entra ID over Microsoft Graph.
    Entra(Box<EntraConfig>),
}

/// Entra ID settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraConfig {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: Option<String>,
    /// Client secret.
    pub client_secret: Option<Secret>,
    /// Certificate (PEM) for a signed client assertion.
    pub client_certificate_path: Option<String>,
    /// Federated token file (workload identity).
    pub federated_token_file: Option<String>,
    /// How to sign in.
    pub method: EntraMethod,
    /// The managed identity endpoint: IMDS (or its override), or the platform's
    /// `IDENTITY_ENDPOINT`.
    pub managed_identity_endpoint: String,
    /// `IDENTITY_HEADER`, with the platform's `IDENTITY_ENDPOINT`.
    pub identity_header: Option<Secret>,
    /// The Azure CLI program.
    pub azure_cli_path: String,
    /// Authority host (national clouds, emulators).
    pub authority_host: String,
    /// Graph base URL.
    pub graph_url: String,
    /// Extra CA certificates (PEM).
    pub ca_bundle: Option<String>,
}

/// The Entra sign-in methods, by their `auth` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntraMethod {
    /// `secret`: an app's client secret.
    Secret,
    /// `certificate`: an app's certificate (PEM with its key).
    Certificate,
    /// `workload_identity`: a federated token file.
    WorkloadIdentity,
    /// `managed_identity`: the host's managed identity.
    ManagedIdentity,
    /// `azure_cli`: the signed-in Azure CLI.
    AzureCli,
    /// `device_code`: a person signs in at a terminal.
    DeviceCode,
}

/// The `auth` names, in the order they are inferred.
pub const ENTRA_METHODS: &[(&str, EntraMethod)] = &[
    ("secret", EntraMethod::Secret),
    ("certificate", EntraMethod::Certificate),
    ("workload_identity", EntraMethod::WorkloadIdentity),
    ("managed_identity", EntraMethod::ManagedIdentity),
    ("azure_cli", EntraMethod::AzureCli),
    ("device_code", EntraMethod::DeviceCode),
];

/// Where a target is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetConfig {
    /// A JSON file with the capabilities of a real target.
    File {
        /// The file.
        path: PathBuf,
        /// Whose capabilities.
        profile: idsync_connectors::target::file::Profile,
    },
    /// The lakeFS auth API.
    Lakefs {
        /// Base URL.
        endpoint: String,
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: Secret,
        /// Extra CA certificates (PEM).
        ca_bundle: Option<PathBuf>,
    },
    /// The Databricks account SCIM API.
    Databricks {
        /// Accounts host.
        host: String,
        /// Account id.
        account_id: String,
        /// A token (PAT or SCIM provisioning token).
        token: Option<Secret>,
        /// OAuth M2M client id and secret, when no token is given.
        oauth: Option<(String, Secret)>,
        /// An Entra app (authority, tenant, client id, secret), when neither is given.
        entra: Option<(String, String, String, Secret)>,
        /// An Entra token from the Entra source's sign-in (any method), when nothing else is
        /// given.
        entra_from_source: bool,
        /// Extra CA certificates (PEM).
        ca_bundle: Option<PathBuf>,
    },
    /// A SCIM 2.0 service provider.
    Scim {
        /// Base URL.
        url: String,
        /// Bearer token.
        token: Option<Secret>,
        /// Members per PATCH.
        member_chunk: usize,
        /// The provider keeps groups in groups.
        nested_groups: bool,
        /// Extra CA certificates (PEM).
        ca_bundle: Option<PathBuf>,
    },
}

impl TargetConfig {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::File { .. } => "file",
            TargetConfig::Lakefs { .. } => "lakefs",
            TargetConfig::Databricks { .. } => "databricks",
            TargetConfig::Scim { .. } => "scim",
        }
    }
}

/// One agreement: the source synced into one target.
#[derive(Clone, Debug)]
pub struct AgreementConfig {
    /// Its name (the `[targets.NAME]` table), also the state's name.
    pub name: String,
    /// The target.
    pub target: TargetConfig,
    /// How source principals map to it.
    pub mapping: Mapping,
    /// Its policy.
    pub policy: Policy,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// State location (a folder path or URL).
    pub state_url: String,
    /// How long a run's lease lasts.
    pub lease_seconds: u64,
    /// Object store settings the URL cannot carry.
    pub state_options: idsync_state::StoreOptions,
    /// The source.
    pub source: SourceConfig,
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

/// Source kinds this build can run.
pub const SOURCE_KINDS: &[&str] = &["file", "entra"];
/// Target kinds this build can run.
pub const TARGET_KINDS: &[&str] = &["file", "lakefs", "databricks", "scim"];
/// Kinds the configuration understands whose connectors are not in this build yet.
const PLANNED_KINDS: &[&str] = &["entra", "ldap", "lakefs", "databricks", "scim", "kanidm"];

/// The environment: process variables over `.env` files.
#[derive(Clone, Debug, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

/// Variables idsync reads, in override order (first found wins within a group).
const ENV_NAMES: &[&str] = &[
    "IDSYNC_STATE",
    "DRY_RUN",
    "GROUP_FILTER",
    "ENTRA_TENANT_ID",
    "AZURE_TENANT_ID",
    "ARM_TENANT_ID",
    "ENTRA_APPLICATION_ID",
    "AZURE_CLIENT_ID",
    "ARM_CLIENT_ID",
    "ENTRA_CLIENT_SECRET_VALUE",
    "AZURE_CLIENT_SECRET",
    "ARM_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "LAKEFS_ENDPOINT",
    "LAKEFS_ACCESS_KEY_ID",
    "LAKEFS_SECRET_ACCESS_KEY",
    "LAKEFS_DEFAULT_POLICIES",
    "DATABRICKS_HOST",
    "DATABRICKS_ACCOUNT_ID",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
    "SCIM_TOKEN",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_STORAGE_CONNECTION_STRING",
];

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
        for name in ENV_NAMES {
            if let Ok(v) = std::env::var(name) {
                vars.insert((*name).to_owned(), v);
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

    fn kind_fields(&mut self, prefix: &str, kind: &str, set: &[(&str, bool)], allowed: &[&str]) {
        for (field, present) in set {
            if *present && !allowed.contains(field) {
                self.err(
                    Origin::File(&format!("{prefix}.{field}")),
                    format!(
                        "not a setting of kind {kind:?} (it has: {})",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn required<'a>(&mut self, key: &str, v: Option<&'a String>, hint: &str) -> Option<&'a String> {
        match v {
            Some(s) if !s.trim().is_empty() => Some(s),
            _ => {
                self.err(Origin::File(key), format!("missing; {hint}"));
                None
            }
        }
    }

    fn build(&mut self, mut raw: Raw, base: &Path, env: &Env) -> Option<Config> {
        let resolve = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };

        // Environment overrides.
        // Entra variables configure an Entra source; with another source kind they are not ours
        // (Azure workload identity injects AZURE_CLIENT_ID and friends into every pod).
        let src = raw.source.get_or_insert_with(RawSource::default);
        let entra_source = matches!(src.kind.as_deref(), None | Some("entra"));
        let entra_vars = [
            (
                &["ENTRA_TENANT_ID", "AZURE_TENANT_ID", "ARM_TENANT_ID"][..],
                &mut src.tenant_id,
            ),
            (
                &["ENTRA_APPLICATION_ID", "AZURE_CLIENT_ID", "ARM_CLIENT_ID"][..],
                &mut src.client_id,
            ),
            (
                &["AZURE_CLIENT_CERTIFICATE_PATH"][..],
                &mut src.client_certificate_path,
            ),
            (
                &["AZURE_FEDERATED_TOKEN_FILE"][..],
                &mut src.federated_token_file,
            ),
            (&["AZURE_AUTHORITY_HOST"][..], &mut src.authority_host),
        ];
        let mut any_entra = false;
        for (names, slot) in entra_vars {
            if !entra_source {
                break;
            }
            if let Some((_, v)) = env.first(names) {
                *slot = Some(v.to_owned());
                any_entra = true;
            }
        }
        if let Some((_, v)) = env
            .first(&[
                "ENTRA_CLIENT_SECRET_VALUE",
                "AZURE_CLIENT_SECRET",
                "ARM_CLIENT_SECRET",
            ])
            .filter(|_| entra_source)
        {
            src.client_secret = Some(Secret::new(v));
            any_entra = true;
        }
        if any_entra && src.kind.is_none() {
            src.kind = Some("entra".into());
        }
        // Managed identity endpoints: azure-identity's IMDS override, and the identity endpoint
        // App Service and Container Apps set (used only when auth = "managed_identity").
        if entra_source {
            // Both, or it is not App Service's endpoint (Azure Arc sets IDENTITY_ENDPOINT alone,
            // with another protocol).
            if let (Some((_, v)), Some((_, h))) = (
                env.first(&["IDENTITY_ENDPOINT"]),
                env.first(&["IDENTITY_HEADER"]),
            ) {
                src.managed_identity_endpoint = Some(v.to_owned());
                src.identity_header = Some(Secret::new(h));
            } else if let Some((_, v)) = env.first(&["AZURE_POD_IDENTITY_AUTHORITY_HOST"]) {
                src.managed_identity_endpoint = Some(v.to_owned());
            }
        }
        if let Some((_, f)) = env.first(&["GROUP_FILTER"]) {
            raw.scope.get_or_insert_with(RawScope::default).group_filter = Some(f.to_owned());
        }
        if let Some((_, s)) = env.first(&["IDSYNC_STATE"]) {
            raw.state.get_or_insert_with(RawState::default).url = Some(s.to_owned());
        }
        // Targets come from the environment alone only when the file names none: a configured
        // target is never replaced or added to behind the user's back.
        let no_targets = raw.targets.is_empty();
        let lakefs_env = [
            "LAKEFS_ENDPOINT",
            "LAKEFS_ACCESS_KEY_ID",
            "LAKEFS_SECRET_ACCESS_KEY",
            "LAKEFS_DEFAULT_POLICIES",
        ];
        if env.first(&lakefs_env).is_some() && no_targets {
            raw.targets.insert(
                "lakefs".into(),
                RawTarget {
                    kind: Some("lakefs".into()),
                    ..RawTarget::default()
                },
            );
        }
        let dbx_env = [
            "DATABRICKS_HOST",
            "DATABRICKS_ACCOUNT_ID",
            "DATABRICKS_TOKEN",
        ];
        if env.first(&dbx_env).is_some() && no_targets {
            raw.targets.insert(
                "databricks".into(),
                RawTarget {
                    kind: Some("databricks".into()),
                    ..RawTarget::default()
                },
            );
        }
        for t in raw.targets.values_mut() {
            match t.kind.as_deref() {
                Some("lakefs") => {
                    if let Some((_, v)) = env.first(&["LAKEFS_ENDPOINT"]) {
                        t.endpoint = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["LAKEFS_ACCESS_KEY_ID"]) {
                        t.access_key_id = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["LAKEFS_SECRET_ACCESS_KEY"]) {
                        t.secret_access_key = Some(Secret::new(v));
                    }
                    if let Some((_, v)) = env.first(&["LAKEFS_DEFAULT_POLICIES"]) {
                        t.default_policies = Some(
                            v.split(',')
                                .map(|p| p.trim().to_owned())
                                .filter(|p| !p.is_empty())
                                .collect(),
                        );
                    }
                }
                Some("scim") => {
                    if let Some((_, v)) = env.first(&["SCIM_TOKEN"]) {
                        t.token = Some(Secret::new(v));
                    }
                }
                Some("databricks") => {
                    if let Some((_, v)) = env.first(&["DATABRICKS_HOST"]) {
                        t.host = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["DATABRICKS_ACCOUNT_ID"]) {
                        t.account_id = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["DATABRICKS_TOKEN"]) {
                        t.token = Some(Secret::new(v));
                    }
                    if let Some((_, v)) = env.first(&["DATABRICKS_CLIENT_ID"]) {
                        t.client_id = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["DATABRICKS_CLIENT_SECRET"]) {
                        t.client_secret = Some(Secret::new(v));
                    }
                    // databricks-sdk's Azure service-principal variables.
                    if let Some((_, v)) = env.first(&["ARM_TENANT_ID"]) {
                        t.azure_tenant_id = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["ARM_CLIENT_ID"]) {
                        t.azure_client_id = Some(v.to_owned());
                    }
                    if let Some((_, v)) = env.first(&["ARM_CLIENT_SECRET"]) {
                        t.azure_client_secret = Some(Secret::new(v));
                    }
                    if let Some((_, v)) = env.first(&["AZURE_AUTHORITY_HOST"]) {
                        t.azure_authority_host = Some(v.to_owned());
                    }
                }
                _ => {}
            }
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
        if let Some(scheme) = state_url.split_once("://").map(|(s, _)| s).filter(|s| {
            !matches!(
                *s,
                "file" | "s3" | "az" | "abfs" | "abfss" | "azure" | "adl" | "gs"
            )
        }) {
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

        // [source]
        let src = raw.source.unwrap_or_default();
        let source = match src.kind.as_deref() {
            None => {
                self.err(Origin::File("source.kind"), "missing: set [source] kind = \"file\" (or set ENTRA_TENANT_ID and friends for Entra ID)");
                None
            }
            Some("file") => {
                let set = [
                    ("tenant_id", src.tenant_id.is_some()),
                    ("client_id", src.client_id.is_some()),
                    ("client_secret", src.client_secret.is_some()),
                    ("graph_url", src.graph_url.is_some()),
                    ("authority_host", src.authority_host.is_some()),
                    ("auth", src.auth.is_some()),
                    ("azure_cli_path", src.azure_cli_path.is_some()),
                ];
                self.kind_fields("source", "file", &set, &["kind", "path"]);
                self.required(
                    "source.path",
                    src.path.as_ref(),
                    "the directory JSON file to read",
                )
                .map(|p| SourceConfig::File { path: resolve(p) })
            }
            Some("entra") => {
                if src.path.is_some() {
                    self.err(
                        Origin::File("source.path"),
                        "not a setting of kind \"entra\"",
                    );
                }
                let tenant = self.required(
                    "source.tenant_id",
                    src.tenant_id.as_ref(),
                    "set tenant_id or ENTRA_TENANT_ID / AZURE_TENANT_ID",
                );
                let has_secret = src.client_secret.as_ref().is_some_and(|s| !s.is_empty());
                let method = match src.auth.as_deref() {
                    Some(name) => {
                        let m = ENTRA_METHODS
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, m)| *m);
                        if m.is_none() {
                            let names: Vec<&str> = ENTRA_METHODS.iter().map(|(n, _)| *n).collect();
                            self.err(
                                Origin::File("source.auth"),
                                format!(
                                    "unknown sign-in method {name:?} (one of: {})",
                                    names.join(", ")
                                ),
                            );
                        }
                        m
                    }
                    None if has_secret => Some(EntraMethod::Secret),
                    None if src.client_certificate_path.is_some() => Some(EntraMethod::Certificate),
                    None if src.federated_token_file.is_some() => {
                        Some(EntraMethod::WorkloadIdentity)
                    }
                    None => {
                        self.err(
                            Origin::File("source.auth"),
                            "missing credentials: set ENTRA_CLIENT_SECRET_VALUE or AZURE_CLIENT_SECRET (keep secrets out of the file), AZURE_CLIENT_CERTIFICATE_PATH or AZURE_FEDERATED_TOKEN_FILE, or auth = \"managed_identity\", \"azure_cli\" or \"device_code\"",
                        );
                        None
                    }
                };
                match method {
                    Some(EntraMethod::Secret) if !has_secret => self.err(
                        Origin::File("source.client_secret"),
                        "missing: set ENTRA_CLIENT_SECRET_VALUE or AZURE_CLIENT_SECRET (keep secrets out of the file)",
                    ),
                    Some(EntraMethod::Certificate) if src.client_certificate_path.is_none() => self.err(
                        Origin::File("source.client_certificate_path"),
                        "missing: set client_certificate_path or AZURE_CLIENT_CERTIFICATE_PATH (a PEM file with the certificate and its private key)",
                    ),
                    Some(EntraMethod::WorkloadIdentity) if src.federated_token_file.is_none() => self.err(
                        Origin::File("source.federated_token_file"),
                        "missing: set federated_token_file or AZURE_FEDERATED_TOKEN_FILE",
                    ),
                    _ => {}
                }
                // The app's client id: needed by every method but the Azure CLI, and by a managed
                // identity only when it is user-assigned.
                if !matches!(
                    method,
                    None | Some(EntraMethod::AzureCli | EntraMethod::ManagedIdentity)
                ) {
                    self.required(
                        "source.client_id",
                        src.client_id.as_ref(),
                        "set client_id or ENTRA_APPLICATION_ID / AZURE_CLIENT_ID",
                    );
                }
                let cfg = tenant.zip(method).map(|(t, method)| {
                    SourceConfig::Entra(Box::new(EntraConfig {
                        tenant_id: t.clone(),
                        client_id: src.client_id.clone(),
                        client_secret: src.client_secret.clone(),
                        client_certificate_path: src
                            .client_certificate_path
                            .as_deref()
                            .map(|p| resolve(p).display().to_string()),
                        federated_token_file: src
                            .federated_token_file
                            .as_deref()
                            .map(|p| resolve(p).display().to_string()),
                        method,
                        managed_identity_endpoint: src
                            .managed_identity_endpoint
                            .clone()
                            .unwrap_or_else(|| idsync_connectors::entra_auth::IMDS_ENDPOINT.into()),
                        identity_header: src.identity_header.clone(),
                        azure_cli_path: src.azure_cli_path.clone().unwrap_or_else(|| "az".into()),
                        authority_host: src
                            .authority_host
                            .clone()
                            .unwrap_or_else(|| "https://login.microsoftonline.com".into()),
                        graph_url: src
                            .graph_url
                            .clone()
                            .unwrap_or_else(|| "https://graph.microsoft.com".into()),
                        ca_bundle: src.ca_bundle.clone(),
                    }))
                });
                self.unavailable("source.kind", "entra", SOURCE_KINDS);
                cfg
            }
            Some(other) => {
                self.unavailable("source.kind", other, SOURCE_KINDS);
                None
            }
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
        if raw.targets.is_empty() {
            self.err(
                Origin::File("targets"),
                "no target: add a [targets.NAME] table (or set LAKEFS_ENDPOINT / DATABRICKS_HOST)",
            );
        }
        let mut agreements = Vec::new();
        for (name, t) in &raw.targets {
            let prefix = format!("targets.{name}");
            if idsync_state_name_ok(name).is_err() {
                self.err(Origin::File(&prefix), "target names use letters, digits, '-', '_' and '.' (the name is also the state's name)");
            }
            let set = [
                ("path", t.path.is_some()),
                ("profile", t.profile.is_some()),
                ("endpoint", t.endpoint.is_some()),
                ("access_key_id", t.access_key_id.is_some()),
                ("secret_access_key", t.secret_access_key.is_some()),
                ("default_policies", t.default_policies.is_some()),
                ("host", t.host.is_some()),
                ("account_id", t.account_id.is_some()),
                ("token", t.token.is_some()),
                ("url", t.url.is_some()),
                ("member_chunk", t.member_chunk.is_some()),
                ("nested_groups", t.nested_groups.is_some()),
                ("ca_bundle", t.ca_bundle.is_some()),
                ("client_id", t.client_id.is_some()),
                ("client_secret", t.client_secret.is_some()),
                ("azure_tenant_id", t.azure_tenant_id.is_some()),
                ("azure_client_id", t.azure_client_id.is_some()),
                ("azure_client_secret", t.azure_client_secret.is_some()),
                ("azure_authority_host", t.azure_authority_host.is_some()),
                ("azure_use_source", t.azure_use_source.is_some()),
            ];
            let common = ["kind", "mapping", "policy"];
            let mut tmapping = t.mapping.as_ref().map_or_else(
                || mapping.clone(),
                |m| self.mapping(&format!("{prefix}.mapping"), m, &mapping),
            );
            let tpolicy = t.policy.as_ref().map_or_else(
                || policy.clone(),
                |p| self.policy(&format!("{prefix}.policy"), p, &policy),
            );
            let key = |f: &str| format!("{prefix}.{f}");
            let target = match t.kind.as_deref() {
                None => {
                    self.err(
                        Origin::File(&key("kind")),
                        format!("missing; one of: {}", TARGET_KINDS.join(", ")),
                    );
                    None
                }
                Some("file") => {
                    self.kind_fields(
                        &prefix,
                        "file",
                        &set,
                        &[&common[..], &["path", "profile", "default_policies"]].concat(),
                    );
                    let profile = match t.profile.as_deref() {
                        None | Some("full") => Some(idsync_connectors::target::file::Profile::Full),
                        Some("databricks") => {
                            Some(idsync_connectors::target::file::Profile::Databricks)
                        }
                        Some("lakefs") => Some(idsync_connectors::target::file::Profile::Lakefs),
                        Some(other) => {
                            self.err(Origin::File(&key("profile")), format!("{other:?} is not a profile; use \"full\", \"databricks\" or \"lakefs\""));
                            None
                        }
                    };
                    if let Some(pol) = &t.default_policies {
                        tmapping.group_policies = pol.iter().cloned().collect();
                    }
                    let path = self.required(
                        &key("path"),
                        t.path.as_ref(),
                        "the JSON file that holds the target",
                    );
                    match (path, profile) {
                        (Some(p), Some(profile)) => Some(TargetConfig::File {
                            path: resolve(p),
                            profile,
                        }),
                        _ => None,
                    }
                }
                Some("lakefs") => {
                    self.kind_fields(
                        &prefix,
                        "lakefs",
                        &set,
                        &[
                            &common[..],
                            &[
                                "endpoint",
                                "access_key_id",
                                "secret_access_key",
                                "default_policies",
                            ],
                        ]
                        .concat(),
                    );
                    let policies = t.default_policies.clone().unwrap_or_else(|| {
                        vec!["AuthManageOwnCredentials".into(), "FSReadAll".into()]
                    });
                    tmapping.group_policies = policies.into_iter().collect();
                    let endpoint = self.required(
                        &key("endpoint"),
                        t.endpoint.as_ref(),
                        "set endpoint or LAKEFS_ENDPOINT",
                    );
                    let id = self.required(
                        &key("access_key_id"),
                        t.access_key_id.as_ref(),
                        "set access_key_id or LAKEFS_ACCESS_KEY_ID",
                    );
                    if t.secret_access_key.as_ref().is_none_or(Secret::is_empty) {
                        self.err(
                            Origin::File(&key("secret_access_key")),
                            "missing; set LAKEFS_SECRET_ACCESS_KEY (keep secrets out of the file)",
                        );
                    }
                    self.unavailable(&key("kind"), "lakefs", TARGET_KINDS);
                    match (endpoint, id, &t.secret_access_key) {
                        (Some(e), Some(i), Some(s)) => Some(TargetConfig::Lakefs {
                            endpoint: e.clone(),
                            access_key_id: i.clone(),
                            secret_access_key: s.clone(),
                            ca_bundle: t.ca_bundle.as_deref().map(resolve),
                        }),
                        _ => None,
                    }
                }
                Some("databricks") => {
                    self.kind_fields(
                        &prefix,
                        "databricks",
                        &set,
                        &[
                            &common[..],
                            &[
                                "host",
                                "account_id",
                                "token",
                                "client_id",
                                "client_secret",
                                "azure_tenant_id",
                                "azure_client_id",
                                "azure_client_secret",
                                "azure_authority_host",
                                "azure_use_source",
                                "ca_bundle",
                            ],
                        ]
                        .concat(),
                    );
                    let host = self.required(
                        &key("host"),
                        t.host.as_ref(),
                        "set host or DATABRICKS_HOST (e.g. https://accounts.azuredatabricks.net)",
                    );
                    let acct = self.required(
                        &key("account_id"),
                        t.account_id.as_ref(),
                        "set account_id or DATABRICKS_ACCOUNT_ID",
                    );
                    self.unavailable(&key("kind"), "databricks", TARGET_KINDS);
                    match (host, acct) {
                        (Some(h), Some(a)) => {
                            let oauth = match (&t.client_id, &t.client_secret) {
                                (Some(i), Some(sec)) => Some((i.clone(), sec.clone())),
                                _ => None,
                            };
                            let entra = match (
                                &t.azure_tenant_id,
                                &t.azure_client_id,
                                &t.azure_client_secret,
                            ) {
                                (Some(tn), Some(ci), Some(cs)) => Some((
                                    t.azure_authority_host.clone().unwrap_or_else(|| {
                                        "https://login.microsoftonline.com".into()
                                    }),
                                    tn.clone(),
                                    ci.clone(),
                                    cs.clone(),
                                )),
                                _ => None,
                            };
                            let from_source = t.azure_use_source.unwrap_or(false);
                            let entra_source = matches!(source, Some(SourceConfig::Entra(_)));
                            if from_source && !entra_source {
                                self.err(
                                    Origin::File(&key("azure_use_source")),
                                    "the source is not Entra ID: there is no sign-in to reuse",
                                );
                            }
                            if from_source
                                && (t.token.is_some() || oauth.is_some() || entra.is_some())
                            {
                                self.err(
                                    Origin::File(&key("azure_use_source")),
                                    "other Databricks credentials are set too (DATABRICKS_TOKEN, DATABRICKS_CLIENT_ID/SECRET or ARM_*), which would win: remove them or azure_use_source",
                                );
                            }
                            if t.token.is_none()
                                && oauth.is_none()
                                && entra.is_none()
                                && !from_source
                            {
                                self.err(
                                    Origin::File(&key("token")),
                                    "no credentials: set DATABRICKS_TOKEN (an account SCIM or admin token), or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (OAuth M2M), or ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET (an Entra app, for Azure Databricks), or azure_use_source = true (the Entra source's sign-in, any method)",
                                );
                            }
                            Some(TargetConfig::Databricks {
                                host: h.clone(),
                                account_id: a.clone(),
                                token: t.token.clone(),
                                oauth,
                                entra,
                                entra_from_source: from_source && entra_source,
                                ca_bundle: t.ca_bundle.as_deref().map(resolve),
                            })
                        }
                        _ => None,
                    }
                }
                Some("scim") => {
                    self.kind_fields(
                        &prefix,
                        "scim",
                        &set,
                        &[
                            &common[..],
                            &["url", "token", "member_chunk", "nested_groups", "ca_bundle"],
                        ]
                        .concat(),
                    );
                    let url = self.required(
                        &key("url"),
                        t.url.as_ref(),
                        "the SCIM base URL (e.g. https://scim.example.com/scim/v2)",
                    );
                    if t.token.as_ref().is_none_or(Secret::is_empty) {
                        self.err(
                            Origin::File(&key("token")),
                            "missing: set SCIM_TOKEN (keep secrets out of the file)",
                        );
                    }
                    let member_chunk = t.member_chunk.unwrap_or(100);
                    if member_chunk == 0 {
                        self.err(Origin::File(&key("member_chunk")), "must be at least 1");
                    }
                    self.unavailable(&key("kind"), "scim", TARGET_KINDS);
                    url.map(|u| TargetConfig::Scim {
                        url: u.clone(),
                        token: t.token.clone(),
                        member_chunk: member_chunk.max(1),
                        nested_groups: t.nested_groups.unwrap_or(false),
                        ca_bundle: t.ca_bundle.as_deref().map(resolve),
                    })
                }
                Some(other) => {
                    self.unavailable(&key("kind"), other, TARGET_KINDS);
                    None
                }
            };
            if let Some(target) = target {
                agreements.push(AgreementConfig {
                    name: name.clone(),
                    target,
                    mapping: tmapping,
                    policy: tpolicy,
                });
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

    fn unavailable(&mut self, key: &str, kind: &str, available: &[&str]) {
        if available.contains(&kind) {
            return;
        }
        let msg = if PLANNED_KINDS.contains(&kind) {
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
        assert_eq!(
            c.source,
            SourceConfig::File {
                path: "/cfg/dir.json".into()
            }
        );
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
            lines[3]
                .starts_with("idsync.toml:14: targets.lake.host: not a setting of kind \"file\""),
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
    fn every_entra_sign_in_method_is_chosen_from_the_settings() {
        let base = [
            ("AZURE_TENANT_ID", "tenant-1"),
            ("LAKEFS_ENDPOINT", "https://lakefs.invalid"),
            ("LAKEFS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("LAKEFS_SECRET_ACCESS_KEY", "lakefs-secret"),
        ];
        let method = |file: &str, extra: &[(&'static str, &'static str)]| {
            let env = Env::from_pairs(base.iter().chain(extra).copied());
            parse_str(file, &env).map(|c| match c.source {
                SourceConfig::Entra(e) => {
                    (e.method, e.managed_identity_endpoint, e.identity_header)
                }
                other => panic!("{other:?}"),
            })
        };
        // Inferred from what is set, in azure-identity's order.
        let id = ("AZURE_CLIENT_ID", "app-1");
        let m = method(
            "",
            &[
                id,
                ("AZURE_CLIENT_SECRET", "s"),
                ("AZURE_CLIENT_CERTIFICATE_PATH", "c.pem"),
            ],
        );
        assert_eq!(m.unwrap().0, EntraMethod::Secret);
        let m = method("", &[id, ("AZURE_CLIENT_CERTIFICATE_PATH", "c.pem")]);
        assert_eq!(m.unwrap().0, EntraMethod::Certificate);
        let m = method("", &[id, ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token")]);
        assert_eq!(m.unwrap().0, EntraMethod::WorkloadIdentity);
        // Chosen: managed identity needs no client id, and takes the platform's endpoint.
        let mi = "[source]\nkind = \"entra\"\nauth = \"managed_identity\"\n";
        let (m, endpoint, header) = method(mi, &[]).unwrap();
        assert_eq!(m, EntraMethod::ManagedIdentity);
        assert_eq!(endpoint, "http://169.254.169.254");
        assert!(header.is_none());
        let (_, endpoint, header) = method(
            mi,
            &[
                ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
                ("IDENTITY_HEADER", "h"),
            ],
        )
        .unwrap();
        assert_eq!(endpoint, "http://localhost:42356/msi/token");
        assert_eq!(header.unwrap().expose(), "h");
        let cli = "[source]\nkind = \"entra\"\nauth = \"azure_cli\"\n";
        assert_eq!(method(cli, &[]).unwrap().0, EntraMethod::AzureCli);
        // Errors: nothing to sign in with; an unknown method; a method without its setting.
        let e = method("[source]\nkind = \"entra\"\n", &[id])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing credentials") && e.contains("managed_identity"),
            "{e}"
        );
        let e = method("[source]\nkind = \"entra\"\nauth = \"kerberos\"\n", &[id])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown sign-in method \"kerberos\"") && e.contains("idsync.toml:3"),
            "{e}"
        );
        let e = method("[source]\nkind = \"entra\"\nauth = \"device_code\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.client_id"), "{e}");
        let e = method(
            "[source]\nkind = \"entra\"\nauth = \"certificate\"\n",
            &[id],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("AZURE_CLIENT_CERTIFICATE_PATH"), "{e}");
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
        assert!(matches!(c.source, SourceConfig::File { .. }));
    }

    #[test]
    fn databricks_takes_an_entra_app_from_the_arm_variables() {
        let env = Env::from_pairs([
            ("ARM_TENANT_ID", "tenant-1"),
            ("ARM_CLIENT_ID", "app-1"),
            ("ARM_CLIENT_SECRET", "arm-secret"),
        ]);
        let text = GOOD.replace(
            "[targets.lake]\nkind = \"file\"\nprofile = \"lakefs\"\npath = \"lake.json\"\ndefault_policies = [\"FSReadAll\"]",
            "[targets.lake]\nkind = \"databricks\"\nhost = \"https://accounts.azuredatabricks.net\"\naccount_id = \"acct\"",
        );
        let c = parse_str(&text, &env).unwrap();
        match &c.agreements[0].target {
            TargetConfig::Databricks {
                token: None,
                oauth: None,
                entra: Some((authority, tenant, client, secret)),
                ..
            } => {
                assert_eq!(authority, "https://login.microsoftonline.com");
                assert_eq!(
                    (tenant.as_str(), client.as_str(), secret.expose()),
                    ("tenant-1", "app-1", "arm-secret")
                );
            }
            other => panic!("{other:?}"),
        }
        let e = parse_str(&text, &Env::default()).unwrap_err().to_string();
        assert!(
            e.contains("ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET"),
            "{e}"
        );
        assert!(
            !format!("{c:?}").contains("arm-secret"),
            "Debug never shows a secret"
        );
        // Reusing the source's sign-in needs an Entra source (GOOD reads a file).
        let reuse = text.replace(
            "account_id = \"acct\"",
            "account_id = \"acct\"\nazure_use_source = true",
        );
        let e = parse_str(&reuse, &Env::default()).unwrap_err().to_string();
        assert!(
            e.contains("azure_use_source: the source is not Entra ID"),
            "{e}"
        );
        // With the ARM variables set as well, reusing the source's sign-in would silently lose.
        let e = parse_str(&reuse, &env).unwrap_err().to_string();
        assert!(
            e.contains("other Databricks credentials are set too"),
            "{e}"
        );
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
