//! The `[state]` section: where the state is and how to reach it.

use super::{ConfigError, ConfigErrors, Env, RawState};
use idsync_connectors::entra_auth::EntraAuth;
use idsync_connectors::http::{Http, HttpConfig};
use idsync_connectors::registry::SourceConfig;
use idsync_model::Secret;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The object store settings of a `[state]` table (paths resolved against the configuration's
/// folder; the Azure connection string from the environment only).
pub(super) fn store_options(
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
        ca_bundle: path(&state.ca_bundle),
        google_application_credentials: path(&state.google_application_credentials),
        azure_connection_string: env
            .first(&["AZURE_STORAGE_CONNECTION_STRING"])
            .map(|(_, v)| Secret::new(v)),
        // Set once the source is checked (`web_identity = "entra"` signs in as it does).
        web_identity: None,
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
        #[serde(default)]
        source: Option<toml::Table>,
    }
    let fail = |message: String| {
        ConfigErrors(vec![ConfigError {
            location: path.map_or_else(String::new, |p| p.display().to_string()),
            key: "state".into(),
            message,
        }])
    };
    let (raw, text): (StateOnly, String) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| fail(format!("cannot read the configuration file: {e}")))?;
            (
                toml::from_str(&text).map_err(|e| fail(e.message().to_owned()))?,
                text,
            )
        }
        None => (StateOnly::default(), String::new()),
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
    let mut opts = store_options(&state, &resolve, env);
    match state.web_identity.as_deref() {
        None => {}
        Some("entra") => {
            let name = path.map_or_else(
                || "(no configuration file)".into(),
                |p| p.display().to_string(),
            );
            let source = super::source_alone(&text, &name, &base, env, raw.source)?;
            opts.web_identity = Some(entra_web_identity(&state, &url, source.as_deref()).map_err(
                |(key, message)| {
                    ConfigErrors(vec![ConfigError {
                        location: name.clone(),
                        key: key.into(),
                        message,
                    }])
                },
            )?);
        }
        Some(other) => {
            return Err(fail(format!(
                "web_identity: {other:?} is not a choice: \"entra\""
            )));
        }
    }
    Ok((url, opts))
}

/// Entra ID tokens for S3 state's `AssumeRoleWithWebIdentity`: the Entra ID source's sign-in
/// (any method: a managed identity, workload identity, a secret, a certificate), asked for the
/// audience the AWS role's OIDC provider trusts. The token is cached by [`EntraAuth`] and fetched
/// again before it expires; STS is asked again before the role's credentials expire.
#[derive(Debug)]
struct EntraWebIdentity {
    auth: EntraAuth,
    scope: String,
    what: String,
}

#[async_trait::async_trait]
impl idsync_state::sts::WebIdentityToken for EntraWebIdentity {
    async fn token(&self) -> Result<Secret, String> {
        self.auth.token(&self.scope).await.map_err(|e| e.message)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// The web identity token source `web_identity = "entra"` asks for, or the key and message of
/// what is wrong.
pub(super) fn entra_web_identity(
    state: &RawState,
    url: &str,
    source: Option<&dyn SourceConfig>,
) -> Result<Arc<dyn idsync_state::sts::WebIdentityToken>, (&'static str, String)> {
    if !url.starts_with("s3://") {
        return Err((
            "state.web_identity",
            "only S3 state exchanges a web identity token for its credentials (Azure state signs in with the AZURE_* variables, GCS with an external_account file)".into(),
        ));
    }
    if state.role_arn.is_none() {
        return Err((
            "state.role_arn",
            "web_identity = \"entra\" exchanges an Entra ID token for an AWS role's credentials: set the role's ARN".into(),
        ));
    }
    if state.web_identity_token_file.is_some() {
        return Err((
            "state.web_identity_token_file",
            "two sources of the same token: keep web_identity = \"entra\" or the token file".into(),
        ));
    }
    if state.external_id.is_some() {
        return Err((
            "state.external_id",
            "AssumeRoleWithWebIdentity takes no external id: remove it".into(),
        ));
    }
    let Some(audience) = state.audience.clone().filter(|a| !a.trim().is_empty()) else {
        return Err((
            "state.audience",
            "missing: the audience the role's OIDC provider lists, which the Entra ID token is requested for (an application ID URI such as api://idsync-state, or an app's client id)".into(),
        ));
    };
    let Some(e) = source.and_then(SourceConfig::entra) else {
        return Err((
            "state.web_identity",
            format!(
                "\"entra\" signs in as the Entra ID source does, and the source is {}: with another source, give the role a token file (web_identity_token_file)",
                source.map_or("not configured", SourceConfig::kind)
            ),
        ));
    };
    let credential = e
        .credential()
        .map_err(|err| ("state.web_identity", err.to_string()))?;
    let method = credential.method();
    let http = Http::new(HttpConfig {
        allow_insecure_http: e.allow_insecure_http,
        ca_bundle: e.ca_bundle.as_ref().map(PathBuf::from),
        // A metadata endpoint that does not answer fails the state's sign-in in seconds, not
        // after the long retries of a sync's requests.
        max_attempts: 4,
        ..HttpConfig::new("Entra ID")
    })
    .map_err(|err| ("state.web_identity", err.message))?;
    let scope = if audience.ends_with("/.default") {
        audience.clone()
    } else {
        format!("{}/.default", audience.trim_end_matches('/'))
    };
    Ok(Arc::new(EntraWebIdentity {
        auth: EntraAuth::new(&e.authority_host, &e.tenant_id, credential, http),
        scope,
        what: format!(
            "Entra ID, {method}, tenant {}, audience {audience}",
            e.tenant_id
        ),
    }))
}
