//! The `[state]` section: where the state is and how to reach it.

use super::{ConfigError, ConfigErrors, Env, RawState};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::{Path, PathBuf};

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
