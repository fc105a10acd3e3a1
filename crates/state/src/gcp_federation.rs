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
//! - either as `text` or as a `json` object with `subject_token_field_name`;
//! - `environment_id = "aws1"`: idsync runs on AWS (`create-cred-config --aws`). The subject token
//!   is a signed, serialised STS `GetCallerIdentity` request, which Google's STS forwards to AWS to
//!   learn who the caller is: signed (SigV4) with the environment's keys, or else with the instance
//!   role's credentials from `credential_source.url` (IMDSv2 when the file names
//!   `imdsv2_session_token_url`), for the region in `AWS_REGION`, `AWS_DEFAULT_REGION` or
//!   `region_url`; the `x-goog-cloud-target-resource` header names the pool's provider. The
//!   serialisation is Google's Python library's (`google/auth/aws.py`; docs/apis/gcs.md).
//!
//! Not supported, with a reason in the error: `executable` sources (the file would make idsync run
//! a program it names, which Google's own libraries refuse unless
//! `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`; a scheduler can write the token to a file
//! instead).

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
    region_url: Option<String>,
    regional_cred_verification_url: Option<String>,
    imdsv2_session_token_url: Option<String>,
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
    /// A signed `GetCallerIdentity` request (AWS).
    Aws {
        region_url: Option<String>,
        /// The instance role's credentials (`.../iam/security-credentials`).
        url: Option<String>,
        verification_url: String,
        imdsv2_url: Option<String>,
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

/// Loopback, or the link-local metadata address of Azure, AWS and Google Cloud.
fn local_host(u: &reqwest::Url) -> bool {
    matches!(
        u.host_str(),
        Some(
            "127.0.0.1"
                | "localhost"
                | "[::1]"
                | "169.254.169.254"
                | "[fd00:ec2::254]"
                | "metadata.google.internal"
        )
    )
}

/// `https://`, or plain `http://` to this machine or the metadata address only: a token or
/// credentials must not cross the network in clear.
fn plain_http_only_nearby(name: &str, u: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(u).map_err(|e| format!("{name} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if local_host(&parsed) => Ok(()),
        _ => Err(format!(
            "{name} must be https, or http to this machine or the instance metadata address 169.254.169.254 (it is {}://{})",
            parsed.scheme(),
            parsed.host_str().unwrap_or("")
        )),
    }
}

/// Percent-encodes as Python's `urllib.parse.quote` does (`/` and RFC 3986's unreserved
/// characters kept).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The subject token's source and format, or why this file's cannot be used.
fn source_of(c: &CredentialSource) -> Result<(Source, TokenFormat), String> {
    if c.executable.is_some() {
        return Err("executable-sourced external accounts are not supported: the file would make idsync run the program it names (Google's own libraries refuse it unless GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1); have the scheduler write the token to a file and use credential_source.file".into());
    }
    if let Some(env) = &c.environment_id {
        if env != "aws1" {
            return Err(format!(
                "credential_source.environment_id {env:?} is not one idsync knows (aws1)"
            ));
        }
        let verification_url = c.regional_cred_verification_url.clone().ok_or(
            "an AWS-sourced credential needs credential_source.regional_cred_verification_url",
        )?;
        let parsed = reqwest::Url::parse(&verification_url.replace("{region}", "region"))
            .map_err(|e| format!("regional_cred_verification_url is not a URL: {e}"))?;
        if parsed.scheme() != "https" && !local_host(&parsed) {
            return Err("regional_cred_verification_url must be https".into());
        }
        for (name, u) in [
            ("region_url", &c.region_url),
            ("url", &c.url),
            ("imdsv2_session_token_url", &c.imdsv2_session_token_url),
        ] {
            if let Some(u) = u {
                plain_http_only_nearby(&format!("credential_source.{name}"), u)?;
            }
        }
        return Ok((
            Source::Aws {
                region_url: c.region_url.clone(),
                url: c.url.clone(),
                verification_url,
                imdsv2_url: c.imdsv2_session_token_url.clone(),
            },
            TokenFormat::Text,
        ));
    }
    let source = match (&c.file, &c.url) {
        (Some(f), None) => Source::File(f.clone()),
        (None, Some(u)) => {
            plain_http_only_nearby("credential_source.url", u)?;
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
            Source::Aws {
                region_url,
                url,
                verification_url,
                imdsv2_url,
            } => {
                return self
                    .aws_subject(region_url, url, verification_url, imdsv2_url)
                    .await;
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

    /// A GET (or the IMDSv2 PUT) to an AWS metadata endpoint: its text, or what failed.
    async fn metadata(
        &self,
        method: reqwest::Method,
        url: &str,
        what: &str,
        session: Option<&str>,
    ) -> Result<String, String> {
        let mut req = self.http.request(method.clone(), url);
        req = match session {
            _ if method == reqwest::Method::PUT => {
                req.header("X-aws-ec2-metadata-token-ttl-seconds", "300")
            }
            Some(t) => req.header("X-aws-ec2-metadata-token", t),
            None => req,
        };
        let r = req
            .send()
            .await
            .map_err(|e| format!("reading {what} from {url}: {}", e.without_url()))?;
        let status = r.status();
        let body = r
            .text()
            .await
            .map_err(|e| format!("reading {what} from {url}: {}", e.without_url()))?;
        if !status.is_success() {
            return Err(format!(
                "reading {what} from {url}: {status}; is this an EC2 instance (or a container) with an instance role, or are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set?"
            ));
        }
        Ok(body)
    }

    /// The AWS subject token: a `GetCallerIdentity` request signed with this machine's AWS
    /// credentials, serialised for Google's STS.
    async fn aws_subject(
        &self,
        region_url: &Option<String>,
        url: &Option<String>,
        verification_url: &str,
        imdsv2_url: &Option<String>,
    ) -> Result<String, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let env_region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION"));
        let env_keys = env("AWS_ACCESS_KEY_ID").zip(env("AWS_SECRET_ACCESS_KEY"));
        let session = match imdsv2_url {
            Some(u) if env_region.is_none() || env_keys.is_none() => Some(
                self.metadata(reqwest::Method::PUT, u, "an IMDSv2 session token", None)
                    .await?,
            ),
            _ => None,
        };
        let session = session.as_deref().map(str::trim);
        let region = match env_region {
            Some(r) => r,
            None => {
                let u = region_url.as_deref().ok_or(
                    "no AWS region: set AWS_REGION, or credential_source.region_url in the credential file",
                )?;
                let zone = self
                    .metadata(reqwest::Method::GET, u, "the availability zone", session)
                    .await?;
                let zone = zone.trim();
                // The zone (us-east-1a) without its letter is the region.
                zone.get(..zone.len().saturating_sub(1))
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| format!("{u} answered no availability zone"))?
                    .to_owned()
            }
        };
        let credential = match env_keys {
            Some((key_id, secret_key)) => object_store::aws::AwsCredential {
                key_id,
                secret_key,
                token: env("AWS_SESSION_TOKEN"),
            },
            None => {
                let u = url.as_deref().ok_or(
                    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or credential_source.url (the instance role) in the credential file",
                )?;
                let role = self
                    .metadata(reqwest::Method::GET, u, "the instance role's name", session)
                    .await?;
                let role = role.trim();
                let role_url = format!("{}/{role}", u.trim_end_matches('/'));
                let text = self
                    .metadata(
                        reqwest::Method::GET,
                        &role_url,
                        "the instance role's credentials",
                        session,
                    )
                    .await?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("the instance role's credentials are not JSON: {e}"))?;
                let field = |k: &str| {
                    v[k].as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("the instance role's credentials have no {k}"))
                };
                object_store::aws::AwsCredential {
                    key_id: field("AccessKeyId")?,
                    secret_key: field("SecretAccessKey")?,
                    token: v["Token"].as_str().map(str::to_owned),
                }
            }
        };
        let target = verification_url.replace("{region}", &region);
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&target)
            .header("x-goog-cloud-target-resource", &self.account.audience)
            .body(object_store::client::HttpRequestBody::from(Vec::<u8>::new()))
            .map_err(|e| format!("regional_cred_verification_url: {e}"))?;
        object_store::aws::AwsAuthorizer::new(&credential, "sts", &region)
            .with_sign_payload(true)
            .try_authorize(&mut req, None)
            .map_err(|e| format!("signing GetCallerIdentity: {e}"))?;
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut headers = Vec::new();
        let mut push = |k: &str, v: &str| {
            headers.push(serde_json::json!({"key": k, "value": v}));
        };
        if let Some(a) = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            push("Authorization", a);
        }
        push("host", &host);
        for (k, v) in req.headers() {
            if k.as_str() != "authorization"
                && let Ok(v) = v.to_str()
            {
                push(k.as_str(), v);
            }
        }
        let token = serde_json::json!({"headers": headers, "method": "POST", "url": target});
        Ok(quote(&token.to_string()))
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
        // An hour was asked for; the answer says how long it is.
        let ttl = v["expireTime"]
            .as_str()
            .and_then(idsync_model::parse_rfc3339)
            .map_or(Duration::from_secs(3600), |exp| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Duration::from_secs(exp.saturating_sub(now))
            });
        Ok((token, ttl))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn source(v: serde_json::Value) -> Result<(Source, TokenFormat), String> {
        source_of(
            &serde_json::from_value::<CredentialSource>(v)
                .unwrap_or_else(|e| unreachable!("a credential source: {e}")),
        )
    }

    #[test]
    fn aws_sources_are_read_and_bad_ones_refused() {
        let ok = source(serde_json::json!({
            "environment_id": "aws1",
            "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
            "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
            "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
        }));
        assert!(matches!(ok, Ok((Source::Aws { .. }, _))), "{ok:?}");
        let e = source(serde_json::json!({"environment_id": "aws2",
            "regional_cred_verification_url": "https://sts.{region}.amazonaws.com"}))
        .map(|_| ())
        .unwrap_err();
        assert!(e.contains("aws2"), "{e}");
        let e = source(serde_json::json!({"environment_id": "aws1"}))
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("regional_cred_verification_url"), "{e}");
        let e = source(serde_json::json!({"environment_id": "aws1",
            "url": "http://metadata.example.com/creds",
            "regional_cred_verification_url": "https://sts.{region}.amazonaws.com"}))
        .map(|_| ())
        .unwrap_err();
        assert!(e.contains("credential_source.url must be https"), "{e}");
    }

    #[test]
    fn quoting_is_pythons() {
        assert_eq!(
            quote("{\"a\":\"b c/d+e\"}"),
            "%7B%22a%22%3A%22b%20c/d%2Be%22%7D"
        );
    }
}
