//! AWS STS for S3 state: a role assumed with an external id (the cross-account pattern:
//! `AssumeRole`, signed with the caller's credentials from `object_store`'s chain: the
//! environment's keys, `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`, the ECS / EKS container
//! credentials, the instance role), or from a web identity (`AssumeRoleWithWebIdentity`, unsigned):
//! a token file (a Kubernetes service account token, a CI system's OIDC token, AKS workload
//! identity's), or a token fetched for each exchange from a [`WebIdentityToken`] source (idsync's
//! Entra ID sign-in: a managed identity has no file). Credentials are cached and fetched again five
//! minutes before the `Expiration` STS gives them. The STS endpoint is configurable (regional
//! endpoints, private links, emulators).
//!
//! Without `role_arn`, S3 credentials come from `object_store`'s chain directly.

use crate::StateError;
use crate::cache::{Cached, form};
use crate::object::StoreOptions;
use async_trait::async_trait;
use idsync_model::Secret;
use object_store::CredentialProvider;
use object_store::aws::{AwsAuthorizer, AwsCredential, AwsCredentialProvider};
use std::sync::Arc;
use std::time::Duration;

/// Where web identity tokens come from when there is no token file: fetched again for each
/// exchange (tokens expire; the source caches them as it sees fit).
#[async_trait]
pub trait WebIdentityToken: std::fmt::Debug + Send + Sync {
    /// A token for the audience the role trusts. The error says which step failed and never
    /// holds a token.
    async fn token(&self) -> Result<Secret, String>;
    /// What signs in, for messages (`Entra ID (managed identity), audience api://...`).
    fn describe(&self) -> String;
}

/// How credentials are obtained.
#[derive(Debug, Clone)]
enum Method {
    WebIdentityFile {
        token_file: String,
    },
    WebIdentity {
        source: Arc<dyn WebIdentityToken>,
    },
    /// `AssumeRole`, signed with the caller's credentials.
    AssumeRole {
        external_id: Option<String>,
        caller: AwsCredentialProvider,
    },
}

/// A role's temporary credentials, from STS.
#[derive(Debug)]
pub struct StsProvider {
    endpoint: String,
    region: String,
    role_arn: String,
    session: String,
    method: Method,
    http: reqwest::Client,
    cached: Cached<AwsCredential>,
}

fn sts_error(detail: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: detail.into(),
    }
}

/// The provider the options ask for, if any. `caller` gives the credentials that sign
/// `AssumeRole` (`object_store`'s chain, built without the role); it is asked for only when the
/// options assume a role without a web identity.
pub fn provider(
    opts: &StoreOptions,
    caller: impl FnOnce() -> Result<AwsCredentialProvider, StateError>,
) -> Result<Option<AwsCredentialProvider>, StateError> {
    let refuse = |detail: &str| StateError::Backend {
        action: "open",
        location: "S3 state".into(),
        detail: detail.to_owned(),
    };
    let Some(role_arn) = opts.role_arn.clone() else {
        if opts.external_id.is_some()
            || opts.web_identity_token_file.is_some()
            || opts.web_identity.is_some()
        {
            return Err(refuse(
                "external_id and a web identity (web_identity_token_file, web_identity) need role_arn",
            ));
        }
        return Ok(None);
    };
    if opts.web_identity_token_file.is_some() && opts.web_identity.is_some() {
        return Err(refuse(
            "web_identity_token_file and web_identity are two sources of the same token: keep one",
        ));
    }
    if opts.external_id.is_some()
        && (opts.web_identity_token_file.is_some() || opts.web_identity.is_some())
    {
        return Err(refuse(
            "external_id goes with AssumeRole, not with a web identity (AssumeRoleWithWebIdentity takes none): remove it, or the web identity",
        ));
    }
    let region = opts
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    let endpoint = opts
        .sts_endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_STS").ok())
        .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
    let method = match (&opts.web_identity_token_file, &opts.web_identity) {
        (Some(f), _) => Method::WebIdentityFile {
            token_file: f.clone(),
        },
        (None, Some(source)) => Method::WebIdentity {
            source: source.clone(),
        },
        (None, None) => Method::AssumeRole {
            external_id: opts.external_id.clone(),
            caller: caller()?,
        },
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| StateError::Backend {
            action: "open",
            location: endpoint.clone(),
            detail: e.to_string(),
        })?;
    Ok(Some(Arc::new(StsProvider {
        endpoint,
        region,
        role_arn,
        session: format!("idsync-{}", std::process::id()),
        method,
        http,
        cached: Cached::new(),
    })))
}

/// The text of `<tag>...</tag>` in an STS answer.
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim())
}

impl StsProvider {
    async fn fetch(&self) -> Result<(AwsCredential, Duration), String> {
        let mut body_pairs: Vec<(&str, String)> = vec![
            ("Version", "2011-06-15".into()),
            ("RoleArn", self.role_arn.clone()),
            ("RoleSessionName", self.session.clone()),
            ("DurationSeconds", "3600".into()),
        ];
        let signer_cred = match &self.method {
            Method::WebIdentityFile { token_file } => {
                let token = std::fs::read_to_string(token_file).map_err(|e| {
                    format!("cannot read the web identity token file {token_file}: {e}")
                })?;
                body_pairs.push(("Action", "AssumeRoleWithWebIdentity".into()));
                body_pairs.push(("WebIdentityToken", token.trim().to_owned()));
                None
            }
            Method::WebIdentity { source } => {
                let token = source.token().await.map_err(|e| {
                    format!(
                        "getting the web identity token for {} ({}) failed: {e}",
                        self.role_arn,
                        source.describe()
                    )
                })?;
                body_pairs.push(("Action", "AssumeRoleWithWebIdentity".into()));
                body_pairs.push(("WebIdentityToken", token.expose().trim().to_owned()));
                None
            }
            Method::AssumeRole {
                external_id,
                caller,
            } => {
                body_pairs.push(("Action", "AssumeRole".into()));
                if let Some(x) = external_id {
                    body_pairs.push(("ExternalId", x.clone()));
                }
                let c = caller.get_credential().await.map_err(|e| {
                    format!(
                        "assuming {} needs the caller's own AWS credentials (the environment's keys, AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, the container or the instance role), and none could be had: {e}",
                        self.role_arn
                    )
                })?;
                Some(c)
            }
        };
        let pairs: Vec<(&str, &str)> = body_pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = form(&pairs);
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("{}/", self.endpoint.trim_end_matches('/')))
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(object_store::client::HttpRequestBody::from(body.clone()))
            .map_err(|e| e.to_string())?;
        if let Some(c) = &signer_cred {
            AwsAuthorizer::new(c.as_ref(), "sts", &self.region)
                .with_sign_payload(true)
                .try_authorize(&mut req, None)
                .map_err(|e| format!("signing the STS request: {e}"))?;
        }
        let mut r = self.http.post(req.uri().to_string()).body(body);
        for (k, v) in req.headers() {
            r = r.header(k.as_str(), v.as_bytes());
        }
        let resp = r
            .send()
            .await
            .map_err(|e| format!("STS at {}: {}", self.endpoint, e.without_url()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            let code = xml_text(&text, "Code").unwrap_or("no code");
            let msg = xml_text(&text, "Message").unwrap_or("");
            let (identity, check) = match &self.method {
                Method::AssumeRole {
                    external_id: Some(_),
                    ..
                } => (
                    "the caller's credentials",
                    "the role's trust policy and the external id",
                ),
                Method::AssumeRole { .. } => {
                    ("the caller's credentials", "the role's trust policy")
                }
                Method::WebIdentityFile { .. } | Method::WebIdentity { .. } => (
                    "the web identity token",
                    "the role's trust policy, its OIDC provider (issuer) and the audience",
                ),
            };
            return Err(format!(
                "STS at {} refused {identity} for {} ({status}, {code}: {msg}); check {check}",
                self.endpoint, self.role_arn,
            ));
        }
        let cred = AwsCredential {
            key_id: xml_text(&text, "AccessKeyId")
                .ok_or("the STS answer has no AccessKeyId")?
                .to_owned(),
            secret_key: xml_text(&text, "SecretAccessKey")
                .ok_or("the STS answer has no SecretAccessKey")?
                .to_owned(),
            token: xml_text(&text, "SessionToken").map(str::to_owned),
        };
        // The lifetime STS gives (an hour was asked for; a role's maximum or a chained role can
        // make it shorter).
        let ttl = xml_text(&text, "Expiration")
            .and_then(idsync_model::parse_rfc3339)
            .map(|exp| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Duration::from_secs(exp.saturating_sub(now))
            })
            .unwrap_or(Duration::from_secs(3600));
        Ok((cred, ttl))
    }
}

#[async_trait]
impl CredentialProvider for StsProvider {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        self.cached.get(|| self.fetch()).await.map_err(sts_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_answers_are_read() {
        let xml = "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>s/k</SecretAccessKey><SessionToken>tok</SessionToken></Credentials></AssumeRoleResult></AssumeRoleResponse>";
        assert_eq!(xml_text(xml, "AccessKeyId"), Some("ASIA1"));
        assert_eq!(xml_text(xml, "SessionToken"), Some("tok"));
        assert_eq!(xml_text(xml, "Nope"), None);
        assert_eq!(
            crate::cache::form(&[("RoleArn", "arn:aws:iam::1:role/x y")]),
            "RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fx%20y"
        );
    }
}
