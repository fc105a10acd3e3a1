//! Google workload identity federation for GCS state: an `external_account` credential file (as
//! `gcloud iam workload-identity-pools create-cred-config` writes it). A token from another
//! identity provider is exchanged at Google's STS for a federated access token, then, when the
//! file names one, for a service account's token (impersonation). Tokens are cached and fetched
//! again five minutes before they expire. `object_store` reads service account keys itself but not
//! this file type.
//!
//! Where the other provider's token comes from (`credential_source`):
//! - `file`: a token file a platform keeps fresh (Kubernetes, CI, AKS workload identity);
//! - `url`: an endpoint that answers it, with `headers`: Azure's instance metadata service for a
//!   VM's or a container's managed identity (`create-cred-config --azure` writes
//!   `http://169.254.169.254/metadata/identity/oauth2/token?...` with `Metadata: True` and a JSON
//!   `access_token` field). Plain `http://` only to loopback and the link-local metadata address;
//! - either as `text` or as a `json` object with `subject_token_field_name`.
//!
//! Not supported, with a reason in the error: `executable` sources (the file would make idsync run
//! a program it names, which Google's own libraries refuse unless
//! `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`; a scheduler can write the token to a file
//! instead) and AWS sources (`environment_id`: idsync's state on AWS uses S3 directly).

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
    url: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    executable: Option<serde_json::Value>,
    environment_id: Option<String>,
    format: Option<Format>,
}

#[derive(Debug, Deserialize)]
struct Format {
    #[serde(rename = "type")]
    kind: String,
    subject_token_field_name: Option<String>,
}

/// Where the subject token is read from.
#[derive(Debug)]
enum Source {
    File(String),
    Url {
        url: String,
        headers: std::collections::BTreeMap<String, String>,
    },
}

/// How the subject token is written there: the whole text, or a field of a JSON object.
#[derive(Debug)]
enum TokenFormat {
    Text,
    Json(String),
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
    source: Source,
    format: TokenFormat,
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
    let (source, format) = source_of(&account.credential_source).map_err(bad)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some(ExternalAccountProvider {
        account,
        source,
        format,
        http,
        cached: Cached::new(),
    }))
}

/// The subject token's source and format, or why this file's cannot be used.
fn source_of(c: &CredentialSource) -> Result<(Source, TokenFormat), String> {
    if c.executable.is_some() {
        return Err("executable-sourced external accounts are not supported: the file would make idsync run the program it names (Google's own libraries refuse it unless GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1); have the scheduler write the token to a file and use credential_source.file".into());
    }
    if c.environment_id.is_some() {
        return Err("AWS-sourced external accounts (credential_source.environment_id) are not supported: keep idsync's state in S3 with the AWS credentials instead, or use a file- or URL-sourced credential".into());
    }
    let source = match (&c.file, &c.url) {
        (Some(f), None) => Source::File(f.clone()),
        (None, Some(u)) => {
            let parsed = reqwest::Url::parse(u)
                .map_err(|e| format!("credential_source.url is not a URL: {e}"))?;
            let local = matches!(
                parsed.host_str(),
                Some(
                    "127.0.0.1"
                        | "localhost"
                        | "[::1]"
                        | "169.254.169.254"
                        | "metadata.google.internal"
                )
            );
            match parsed.scheme() {
                "https" => {}
                "http" if local => {}
                _ => {
                    return Err(format!(
                        "credential_source.url must be https, or http to this machine or the instance metadata address 169.254.169.254 (it is {}://{})",
                        parsed.scheme(),
                        parsed.host_str().unwrap_or("")
                    ));
                }
            }
            Source::Url {
                url: u.clone(),
                headers: c.headers.clone(),
            }
        }
        (Some(_), Some(_)) => {
            return Err("credential_source names both a file and a url: keep one".into());
        }
        (None, None) => {
            return Err(
                "credential_source names no file and no url (the sources idsync supports)".into(),
            );
        }
    };
    let format = match &c.format {
        None => TokenFormat::Text,
        Some(f) if f.kind == "text" => TokenFormat::Text,
        Some(f) if f.kind == "json" => match &f.subject_token_field_name {
            Some(name) if !name.is_empty() => TokenFormat::Json(name.clone()),
            _ => {
                return Err(
                    "credential_source.format is json but names no subject_token_field_name".into(),
                );
            }
        },
        Some(f) => {
            return Err(format!(
                "credential_source.format.type {:?} is not text or json",
                f.kind
            ));
        }
    };
    Ok((source, format))
}

fn gcp_error(detail: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "GCS",
        source: detail.into(),
    }
}

impl ExternalAccountProvider {
    /// The other provider's token, as the credential source holds it.
    async fn subject(&self) -> Result<String, String> {
        let (text, from) = match &self.source {
            Source::File(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the federated token file {path}: {e}"))?,
                format!("the federated token file {path}"),
            ),
            Source::Url { url, headers } => {
                // The host only: a query may carry what the endpoint needs, not what logs need.
                let host = reqwest::Url::parse(url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default();
                let from = format!("the credential source URL (host {host})");
                let mut req = self.http.get(url);
                for (k, v) in headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let r = req
                    .send()
                    .await
                    .map_err(|e| format!("reading {from}: {}", e.without_url()))?;
                let status = r.status();
                let body = r
                    .text()
                    .await
                    .map_err(|e| format!("reading {from}: {}", e.without_url()))?;
                if !status.is_success() {
                    let detail: String = body.chars().take(200).collect();
                    return Err(format!(
                        "{from} answered {status} ({detail}); on Azure, check that the VM or container has a managed identity and that the resource in the URL is the one the workload identity pool expects"
                    ));
                }
                (body, from)
            }
        };
        let token = match &self.format {
            TokenFormat::Text => text.trim().to_owned(),
            TokenFormat::Json(field) => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("{from} is not the JSON the credential file says: {e}"))?;
                v.get(field)
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| format!("{from} has no {field:?} text field"))?
                    .to_owned()
            }
        };
        Ok(token)
    }

    async fn fetch(&self) -> Result<(String, Duration), String> {
        let subject = self.subject().await?;
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
