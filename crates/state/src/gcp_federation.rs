//! Google workload identity federation for GCS state: an `external_account` credential file (as
//! `gcloud iam workload-identity-pools create-cred-config` writes it). A token from another
//! identity provider (a file: Kubernetes, CI, or an Entra ID token for a service in Azure) is
//! exchanged at Google's STS for a federated access token, then, when the file names one, for a
//! service account's token (impersonation). Tokens are cached and fetched again five minutes before
//! they expire. `object_store` reads service account keys itself but not this file type.

use crate::StateError;
use crate::cache::{Cached, form};
use async_trait::async_trait;
use object_store::CredentialProvider;
use object_store::gcp::GcpCredential;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Debug, Deserialize)]
struct CredentialSource {
    file: Option<String>,
}

/// The parts of an `external_account` file idsync uses.
#[derive(Debug, Deserialize)]
struct ExternalAccount {
    #[serde(rename = "type")]
    kind: String,
    audience: String,
    subject_token_type: String,
    token_url: String,
    credential_source: CredentialSource,
    service_account_impersonation_url: Option<String>,
}

/// Federated credentials for GCS.
#[derive(Debug)]
pub struct ExternalAccountProvider {
    account: ExternalAccount,
    token_file: String,
    http: reqwest::Client,
    cached: Cached<GcpCredential>,
}

/// Reads `path` if it is an `external_account` file: `Ok(Some(provider))`; another credential
/// type: `Ok(None)` (object_store reads it).
pub fn from_file(path: &str) -> Result<Option<ExternalAccountProvider>, StateError> {
    let bad = |detail: String| StateError::Backend {
        action: "open",
        location: path.to_owned(),
        detail,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("cannot read the Google credential file: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("the Google credential file is not JSON: {e}")))?;
    if v.get("type").and_then(serde_json::Value::as_str) != Some("external_account") {
        return Ok(None);
    }
    let account: ExternalAccount = serde_json::from_value(v).map_err(|e| {
        bad(format!(
            "not a complete external_account credential file: {e}"
        ))
    })?;
    debug_assert_eq!(account.kind, "external_account");
    let Some(token_file) = account.credential_source.file.clone() else {
        return Err(bad(
            "only file-sourced external accounts (credential_source.file) are supported".into(),
        ));
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some(ExternalAccountProvider {
        account,
        token_file,
        http,
        cached: Cached::new(),
    }))
}

fn gcp_error(detail: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "GCS",
        source: detail.into(),
    }
}

impl ExternalAccountProvider {
    async fn fetch(&self) -> Result<(String, Duration), String> {
        let subject = std::fs::read_to_string(&self.token_file).map_err(|e| {
            format!(
                "cannot read the federated token file {}: {e}",
                self.token_file
            )
        })?;
        let form = form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("audience", self.account.audience.as_str()),
            ("scope", SCOPE),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("subject_token", subject.trim()),
            (
                "subject_token_type",
                self.account.subject_token_type.as_str(),
            ),
        ]);
        let r = self
            .http
            .post(&self.account.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| format!("Google STS: {}", e.without_url()))?;
        let status = r.status();
        let v: serde_json::Value = r
            .json()
            .await
            .map_err(|e| format!("Google STS answered {status} with no JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "Google STS refused the federated token ({status}, {}: {}); check the workload identity pool's provider and its attribute conditions",
                v["error"].as_str().unwrap_or("no code"),
                v["error_description"].as_str().unwrap_or("")
            ));
        }
        let sts_token = v["access_token"]
            .as_str()
            .ok_or("the Google STS answer has no access_token")?
            .to_owned();
        let ttl = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600));
        let Some(url) = &self.account.service_account_impersonation_url else {
            return Ok((sts_token, ttl));
        };
        let r = self
            .http
            .post(url)
            .bearer_auth(&sts_token)
            .json(&serde_json::json!({"scope": [SCOPE], "lifetime": "3600s"}))
            .send()
            .await
            .map_err(|e| format!("IAM credentials: {}", e.without_url()))?;
        let status = r.status();
        let v: serde_json::Value = r
            .json()
            .await
            .map_err(|e| format!("IAM credentials answered {status} with no JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "impersonating the service account was refused ({status}: {}); grant the federated principal roles/iam.workloadIdentityUser on it",
                v["error"]["message"].as_str().unwrap_or("")
            ));
        }
        let token = v["accessToken"]
            .as_str()
            .ok_or("the IAM credentials answer has no accessToken")?
            .to_owned();
        Ok((token, Duration::from_secs(3600)))
    }
}

#[async_trait]
impl CredentialProvider for ExternalAccountProvider {
    type Credential = GcpCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<GcpCredential>> {
        self.cached
            .get(|| async {
                let (bearer, ttl) = self.fetch().await?;
                Ok((GcpCredential { bearer }, ttl))
            })
            .await
            .map_err(gcp_error)
    }
}
