//! AWS STS for S3 state: a role assumed with an external id (the cross-account pattern:
//! `AssumeRole`, signed with the caller's keys from the environment), or from a web identity
//! token file (`AssumeRoleWithWebIdentity`, unsigned: a Kubernetes service account token, a CI
//! system's OIDC token, or an Entra ID token for a service running in Azure). Credentials are cached
//! and fetched again five minutes before they expire. The STS endpoint is configurable (regional
//! endpoints, private links, emulators).
//!
//! Without `role_arn`, S3 credentials come from `object_store`'s own chain: the static keys of the
//! environment, `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`, the ECS / EKS container
//! credentials, the instance metadata service.

use crate::StateError;
use crate::cache::{Cached, form};
use crate::object::StoreOptions;
use async_trait::async_trait;
use object_store::CredentialProvider;
use object_store::aws::{AwsAuthorizer, AwsCredential, AwsCredentialProvider};
use std::sync::Arc;
use std::time::Duration;

/// How credentials are obtained.
#[derive(Debug, Clone)]
enum Method {
    WebIdentity { token_file: String },
    AssumeRole { external_id: Option<String> },
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

/// The provider the options ask for, if any.
pub fn provider(opts: &StoreOptions) -> Result<Option<AwsCredentialProvider>, StateError> {
    let Some(role_arn) = opts.role_arn.clone() else {
        if opts.external_id.is_some() || opts.web_identity_token_file.is_some() {
            return Err(StateError::Backend {
                action: "open",
                location: "S3 state".into(),
                detail: "external_id and web_identity_token_file need role_arn".into(),
            });
        }
        return Ok(None);
    };
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
    let method = match &opts.web_identity_token_file {
        Some(f) => Method::WebIdentity {
            token_file: f.clone(),
        },
        None => Method::AssumeRole {
            external_id: opts.external_id.clone(),
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
            Method::WebIdentity { token_file } => {
                let token = std::fs::read_to_string(token_file).map_err(|e| {
                    format!("cannot read the web identity token file {token_file}: {e}")
                })?;
                body_pairs.push(("Action", "AssumeRoleWithWebIdentity".into()));
                body_pairs.push(("WebIdentityToken", token.trim().to_owned()));
                None
            }
            Method::AssumeRole { external_id } => {
                body_pairs.push(("Action", "AssumeRole".into()));
                if let Some(x) = external_id {
                    body_pairs.push(("ExternalId", x.clone()));
                }
                let key_id = std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                    "assuming a role needs the caller's keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_owned()
                })?;
                let secret_key = std::env::var("AWS_SECRET_ACCESS_KEY")
                    .map_err(|_| "AWS_SECRET_ACCESS_KEY is not set".to_owned())?;
                Some(AwsCredential {
                    key_id,
                    secret_key,
                    token: std::env::var("AWS_SESSION_TOKEN").ok(),
                })
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
            AwsAuthorizer::new(c, "sts", &self.region)
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
            return Err(format!(
                "STS refused to let this identity assume {} ({status}, {code}: {msg}); check the role's trust policy{}",
                self.role_arn,
                match &self.method {
                    Method::AssumeRole {
                        external_id: Some(_),
                    } => " and the external id",
                    _ => "",
                }
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
        Ok((cred, Duration::from_secs(3600)))
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
