//! Tokens from Microsoft Entra ID, by every method enterprises use: a client secret, a client
//! certificate (a signed JWT assertion), workload identity federation (a federated token file, as on
//! AKS or in CI), managed identity (the instance metadata endpoint, or the `IDENTITY_ENDPOINT` of
//! App Service and Container Apps), the Azure CLI, and the device code flow for a person at a
//! terminal. Tokens are cached per scope and fetched again before they expire, so a long run never
//! uses a stale one.
//!
//! Secrets (client secrets, private keys, assertions, tokens) never reach a message: errors name the
//! method, the endpoint and Entra's error code only.

use crate::http::{Auth, ErrorKind, Http, HttpError, percent_encode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use idsync_model::Secret;
use reqwest::Method;
use ring::rand::SecureRandom;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The Graph scope.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// The instance metadata endpoint of Azure VMs and AKS nodes.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// How idsync proves who it is to Entra ID.
#[derive(Clone, Debug)]
pub enum EntraCredential {
    /// An app registration's client secret.
    ClientSecret {
        /// Application (client) id.
        client_id: String,
        /// The secret's value.
        secret: Secret,
    },
    /// An app registration's certificate: a JWT assertion signed with its private key.
    Certificate {
        /// Application (client) id.
        client_id: String,
        /// The loaded certificate and key.
        certificate: ClientCertificate,
    },
    /// Workload identity federation: a token issued by another identity provider (Kubernetes, a CI
    /// system), read from a file each time, because the platform rotates it.
    WorkloadIdentity {
        /// Application (client) id of the app or managed identity that trusts the token.
        client_id: String,
        /// The federated token file (`AZURE_FEDERATED_TOKEN_FILE`).
        token_file: PathBuf,
    },
    /// A managed identity, through the instance metadata endpoint or, where the platform sets
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (App Service, Container Apps), through that.
    ManagedIdentity {
        /// Client id of a user-assigned identity; none for the system-assigned one.
        client_id: Option<String>,
        /// The endpoint: [`IMDS_ENDPOINT`] (or an override) or the platform's `IDENTITY_ENDPOINT`.
        endpoint: String,
        /// `IDENTITY_HEADER`, when the endpoint is the platform's rather than IMDS.
        identity_header: Option<Secret>,
    },
    /// The signed-in Azure CLI (`az account get-access-token`).
    AzureCli {
        /// The `az` program.
        program: PathBuf,
    },
    /// The device code flow: a person signs in on another device; the refresh token then keeps
    /// the session for the rest of the run.
    DeviceCode {
        /// Application (client) id of a public client app.
        client_id: String,
    },
}

impl EntraCredential {
    /// The method's name, for messages.
    pub fn method(&self) -> &'static str {
        match self {
            EntraCredential::ClientSecret { .. } => "client secret",
            EntraCredential::Certificate { .. } => "client certificate",
            EntraCredential::WorkloadIdentity { .. } => "workload identity (federated token)",
            EntraCredential::ManagedIdentity { .. } => "managed identity",
            EntraCredential::AzureCli { .. } => "Azure CLI",
            EntraCredential::DeviceCode { .. } => "device code",
        }
    }
}

/// A certificate and its RSA private key, loaded from a PEM file (PKCS#8 `PRIVATE KEY` or PKCS#1
/// `RSA PRIVATE KEY`, then the certificate), as `AZURE_CLIENT_CERTIFICATE_PATH` names it.
#[derive(Clone)]
pub struct ClientCertificate {
    key: std::sync::Arc<ring::signature::RsaKeyPair>,
    /// base64url SHA-1 of the certificate (`x5t`).
    x5t: String,
    /// base64url SHA-256 of the certificate (`x5t#S256`).
    x5t_s256: String,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

/// Why a client certificate cannot be used. Never shows what the file holds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    /// The file cannot be read.
    #[error("cannot read the client certificate {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a usable certificate and key.
    #[error("the client certificate {path}: {problem}")]
    Unusable {
        /// The file (empty for PEM text given directly).
        path: String,
        /// What is missing or wrong.
        problem: &'static str,
    },
}

impl ClientCertificate {
    /// Loads a PEM file. The error says what is missing, never what the file holds.
    pub fn load(path: &Path) -> Result<Self, CertificateError> {
        let text = std::fs::read(path).map_err(|source| CertificateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text).map_err(|e| match e {
            CertificateError::Unusable { problem, .. } => CertificateError::Unusable {
                path: path.display().to_string(),
                problem,
            },
            other => other,
        })
    }

    /// Parses PEM text holding an RSA private key and a certificate.
    pub fn from_pem(text: &[u8]) -> Result<Self, CertificateError> {
        let unusable = |problem| CertificateError::Unusable {
            path: String::new(),
            problem,
        };
        let blocks = pem::parse_many(text).map_err(|_| unusable("not PEM text"))?;
        let cert = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                unusable(
                    "no CERTIFICATE block (the file must hold the certificate and its private key)",
                )
            })?;
        let key = blocks
            .iter()
            .find_map(|b| match b.tag() {
                "PRIVATE KEY" => Some(ring::signature::RsaKeyPair::from_pkcs8(b.contents())),
                "RSA PRIVATE KEY" => Some(ring::signature::RsaKeyPair::from_der(b.contents())),
                _ => None,
            })
            .ok_or_else(|| unusable("no unencrypted PRIVATE KEY or RSA PRIVATE KEY block (encrypted keys and PFX files are not read: convert with `openssl pkcs12 -nodes`)"))?
            .map_err(|_| unusable("the private key is not an RSA key of 2048 bits or more"))?;
        let der = cert.contents();
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
        let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
        Ok(ClientCertificate {
            key: std::sync::Arc::new(key),
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
        })
    }

    /// A client assertion for `audience` (the token endpoint), valid for ten minutes, signed with
    /// RS256.
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<Secret, String> {
        let now = unix_now();
        let rng = ring::rand::SystemRandom::new();
        let mut jti = [0u8; 16];
        rng.fill(&mut jti).map_err(|_| "no randomness available")?;
        let head =
            json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t, "x5t#S256": self.x5t_s256});
        let claims = json!({
            "aud": audience, "iss": client_id, "sub": client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "nbf": now, "iat": now, "exp": now + 600,
        });
        let mut signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(head.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &rng,
                signed.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the client assertion failed")?;
        signed.push('.');
        signed.push_str(&URL_SAFE_NO_PAD.encode(&sig));
        Ok(Secret::new(signed))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Tokens from Entra ID for one tenant and credential, cached per scope.
#[derive(Debug)]
pub struct EntraAuth {
    authority: String,
    tenant_id: String,
    credential: EntraCredential,
    http: Http,
    /// Scope → token and when it expires. One lock: concurrent callers wait for one fetch.
    cache: tokio::sync::Mutex<BTreeMap<String, (Secret, Instant)>>,
    /// The device code flow's refresh token.
    refresh: tokio::sync::Mutex<Option<Secret>>,
    /// Fetch again this long before expiry.
    margin: Duration,
}

fn auth_error(kind: ErrorKind, message: String) -> HttpError {
    HttpError {
        kind,
        status: None,
        code: None,
        request_id: None,
        message,
    }
}

fn number(v: &Value, k: &str) -> Option<u64> {
    let x = v.get(k)?;
    x.as_u64()
        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
}

impl EntraAuth {
    /// Tokens from `authority` (`https://login.microsoftonline.com`, a national cloud, an
    /// emulator) for `tenant_id`.
    pub fn new(authority: &str, tenant_id: &str, credential: EntraCredential, http: Http) -> Self {
        EntraAuth {
            authority: authority.trim_end_matches('/').to_owned(),
            tenant_id: tenant_id.to_owned(),
            credential,
            http,
            cache: tokio::sync::Mutex::new(BTreeMap::new()),
            refresh: tokio::sync::Mutex::new(None),
            margin: Duration::from_secs(300),
        }
    }

    /// Fetch tokens again this long before they expire (default five minutes).
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// The credential's method name.
    pub fn method(&self) -> &'static str {
        self.credential.method()
    }

    /// A bearer token for `scope` (`https://graph.microsoft.com/.default`, or a resource id with
    /// `/.default`), from the cache while it has more than the margin left.
    pub async fn token(&self, scope: &str) -> Result<Secret, HttpError> {
        let mut cache = self.cache.lock().await;
        if let Some((t, exp)) = cache.get(scope)
            && *exp > Instant::now() + self.margin
        {
            return Ok(t.clone());
        }
        let (token, ttl) = self.fetch(scope).await.map_err(|mut e| {
            e.message = format!(
                "Entra ID ({} for tenant {}): {}",
                self.method(),
                self.tenant_id,
                e.message
            );
            e
        })?;
        // A day at most: a lifetime from the server is trusted, not an absurd one.
        let ttl = ttl.min(Duration::from_secs(86_400));
        cache.insert(scope.to_owned(), (token.clone(), Instant::now() + ttl));
        Ok(token)
    }

    /// `Auth::Bearer` with a token for `scope`.
    pub async fn bearer(&self, scope: &str) -> Result<Auth, HttpError> {
        Ok(Auth::Bearer(self.token(scope).await?))
    }

    fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority,
            percent_encode(&self.tenant_id, b"")
        )
    }

    async fn fetch(&self, scope: &str) -> Result<(Secret, Duration), HttpError> {
        let enc = |s: &str| percent_encode(s, b"");
        let resource = scope.trim_end_matches("/.default");
        match &self.credential {
            EntraCredential::ClientSecret { client_id, secret } => {
                let form = format!(
                    "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
                    enc(client_id),
                    enc(secret.expose()),
                    enc(scope)
                );
                self.post_token(&self.token_url(), form).await
            }
            EntraCredential::Certificate {
                client_id,
                certificate,
            } => {
                let url = self.token_url();
                let assertion = certificate
                    .assertion(client_id, &url)
                    .map_err(|m| auth_error(ErrorKind::Invalid, m))?;
                self.post_assertion(client_id, assertion.expose(), scope)
                    .await
            }
            EntraCredential::WorkloadIdentity {
                client_id,
                token_file,
            } => {
                let assertion = tokio::fs::read_to_string(token_file).await.map_err(|e| {
                    auth_error(
                        ErrorKind::Unauthorized,
                        format!(
                            "cannot read the federated token file {}: {e}",
                            token_file.display()
                        ),
                    )
                })?;
                self.post_assertion(client_id, assertion.trim(), scope)
                    .await
            }
            EntraCredential::ManagedIdentity {
                client_id,
                endpoint,
                identity_header,
            } => {
                let endpoint = endpoint.trim_end_matches('/');
                let id = client_id
                    .as_deref()
                    .map(|c| format!("&client_id={}", enc(c)))
                    .unwrap_or_default();
                let a = match identity_header {
                    None => {
                        let url = format!(
                            "{endpoint}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}{id}",
                            enc(resource)
                        );
                        self.http
                            .send(
                                Method::GET,
                                &url,
                                &Auth::None,
                                &[("Metadata", "true")],
                                None,
                                true,
                            )
                            .await?
                    }
                    Some(h) => {
                        let url = format!(
                            "{endpoint}?api-version=2019-08-01&resource={}{id}",
                            enc(resource)
                        );
                        self.http
                            .send(
                                Method::GET,
                                &url,
                                &Auth::None,
                                &[("X-IDENTITY-HEADER", h.expose())],
                                None,
                                true,
                            )
                            .await?
                    }
                };
                let v: Value = a.json("the managed identity endpoint", "the token request")?;
                token_of(&v, a.status.as_u16())
            }
            EntraCredential::AzureCli { program } => self.azure_cli(program, resource).await,
            EntraCredential::DeviceCode { client_id } => self.device_code(client_id, scope).await,
        }
    }

    async fn post_assertion(
        &self,
        client_id: &str,
        assertion: &str,
        scope: &str,
    ) -> Result<(Secret, Duration), HttpError> {
        let enc = |s: &str| percent_encode(s, b"");
        let form = format!(
            "grant_type=client_credentials&client_id={}&client_assertion_type={}&client_assertion={}&scope={}",
            enc(client_id),
            enc("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
            enc(assertion),
            enc(scope)
        );
        self.post_token(&self.token_url(), form).await
    }

    async fn post_token(&self, url: &str, form: String) -> Result<(Secret, Duration), HttpError> {
        let (v, status) = self.post_form(url, form).await?;
        if let Some(r) = v.get("refresh_token").and_then(Value::as_str) {
            *self.refresh.lock().await = Some(Secret::new(r));
        }
        token_of(&v, status)
    }

    async fn post_form(&self, url: &str, form: String) -> Result<(Value, u16), HttpError> {
        let body = Some(("application/x-www-form-urlencoded", form.into_bytes()));
        let a = self
            .http
            .send(Method::POST, url, &Auth::None, &[], body, true)
            .await?;
        Ok((a.json("Entra ID", "the token request")?, a.status.as_u16()))
    }

    async fn azure_cli(
        &self,
        program: &Path,
        resource: &str,
    ) -> Result<(Secret, Duration), HttpError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args([
            "account",
            "get-access-token",
            "--output",
            "json",
            "--resource",
            resource,
        ]);
        if !self.tenant_id.is_empty() {
            cmd.args(["--tenant", &self.tenant_id]);
        }
        cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| {
                auth_error(
                    ErrorKind::Unavailable,
                    format!("`{}` did not answer within 60 s", program.display()),
                )
            })?
            .map_err(|e| {
                auth_error(
                    ErrorKind::Unauthorized,
                    format!(
                        "cannot run `{}` ({e}); install the Azure CLI and run `az login`, or choose another method",
                        program.display()
                    ),
                )
            })?;
        if !out.status.success() {
            // stderr carries az's advice ("Please run 'az login'"); stdout, never shown, may carry
            // a token.
            let err = String::from_utf8_lossy(&out.stderr);
            let err: String = err.trim().chars().take(500).collect();
            return Err(auth_error(
                ErrorKind::Unauthorized,
                format!(
                    "`az account get-access-token` failed ({}): {err}",
                    out.status
                ),
            ));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
            auth_error(
                ErrorKind::Protocol,
                "`az account get-access-token` did not print JSON".into(),
            )
        })?;
        let Some(token) = v.get("accessToken").and_then(Value::as_str) else {
            return Err(auth_error(
                ErrorKind::Protocol,
                "`az account get-access-token` printed no accessToken".into(),
            ));
        };
        // `expires_on` (seconds since the epoch) is printed by az 2.54 and later; older versions
        // print only a local time, so their tokens are trusted for ten minutes.
        let ttl = number(&v, "expires_on")
            .map(|at| Duration::from_secs(at.saturating_sub(unix_now())))
            .unwrap_or(self.margin + Duration::from_secs(600));
        Ok((Secret::new(token), ttl))
    }

    /// The device code flow: a refresh token if one is held, else a new sign-in: the
    /// instructions are printed on stderr, and the token endpoint polled until the person is done.
    async fn device_code(
        &self,
        client_id: &str,
        scope: &str,
    ) -> Result<(Secret, Duration), HttpError> {
        let enc = |s: &str| percent_encode(s, b"");
        let held = self.refresh.lock().await.clone();
        if let Some(r) = held {
            let form = format!(
                "grant_type=refresh_token&client_id={}&refresh_token={}&scope={}",
                enc(client_id),
                enc(r.expose()),
                enc(&format!("{scope} offline_access"))
            );
            match self.post_token(&self.token_url(), form).await {
                Ok(t) => return Ok(t),
                Err(e) => tracing::warn!(
                    "the device code session could not be refreshed ({}); signing in again",
                    e.code.as_deref().unwrap_or("no code")
                ),
            }
        }
        let url = format!(
            "{}/{}/oauth2/v2.0/devicecode",
            self.authority,
            percent_encode(&self.tenant_id, b"")
        );
        let form = format!(
            "client_id={}&scope={}",
            enc(client_id),
            enc(&format!("{scope} offline_access"))
        );
        let (v, _) = self.post_form(&url, form).await?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let Some(device_code) = text("device_code") else {
            return Err(auth_error(
                ErrorKind::Protocol,
                "the device code answer has no device_code".into(),
            ));
        };
        let message = text("message").unwrap_or_else(|| {
            format!(
                "To sign in, open {} and enter the code {}.",
                text("verification_uri").unwrap_or_default(),
                text("user_code").unwrap_or_default()
            )
        });
        eprintln!("{message}");
        let mut interval = Duration::from_secs(number(&v, "interval").unwrap_or(5).clamp(1, 60));
        let deadline =
            Instant::now() + Duration::from_secs(number(&v, "expires_in").unwrap_or(900).min(3600));
        loop {
            tokio::time::sleep(interval).await;
            let form = format!(
                "grant_type={}&client_id={}&device_code={}",
                enc("urn:ietf:params:oauth:grant-type:device_code"),
                enc(client_id),
                enc(&device_code)
            );
            match self.post_token(&self.token_url(), form).await {
                Ok(t) => return Ok(t),
                Err(e) if e.code.as_deref() == Some("authorization_pending") => {}
                Err(e) if e.code.as_deref() == Some("slow_down") => {
                    interval += Duration::from_secs(5);
                }
                Err(e) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(auth_error(
                    ErrorKind::Unauthorized,
                    "the device code expired before the sign-in was completed".into(),
                ));
            }
        }
    }
}

/// The token and its lifetime from a token endpoint's answer: `expires_in` as a number (v2) or a
/// string (v1, managed identity), else `expires_on`.
fn token_of(v: &Value, status: u16) -> Result<(Secret, Duration), HttpError> {
    let Some(token) = v.get("access_token").and_then(Value::as_str) else {
        return Err(HttpError {
            kind: ErrorKind::Protocol,
            status: Some(status),
            code: None,
            request_id: None,
            message: "the token endpoint answered without an access_token".into(),
        });
    };
    let ttl = number(v, "expires_in")
        .or_else(|| number(v, "expires_on").map(|at| at.saturating_sub(unix_now())))
        .unwrap_or(3599);
    Ok((Secret::new(token), Duration::from_secs(ttl)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &[u8] = include_bytes!("../../../tests/fixtures/entra-test-client.pem");
    const PEM_PKCS1: &[u8] = include_bytes!("../../../tests/fixtures/entra-test-client-pkcs1.pem");

    #[test]
    fn certificates_load_with_pkcs8_and_pkcs1_keys_and_sign() {
        let a = ClientCertificate::from_pem(PEM).unwrap();
        let b = ClientCertificate::from_pem(PEM_PKCS1).unwrap();
        assert_eq!(a.x5t, b.x5t);
        // The SHA-1 thumbprint `openssl x509 -fingerprint -sha1` prints for the fixture.
        let hex: String = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&a.x5t)
            .unwrap()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(hex, "EC77D79E118C271AD93BDCD6561C51AF5B91D7BD");
        let jwt = a
            .assertion("app", "https://login/t/oauth2/v2.0/token")
            .unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "app");
        assert_eq!(claims["aud"], "https://login/t/oauth2/v2.0/token");
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn unusable_certificate_files_say_what_is_missing() {
        let only_cert = String::from_utf8_lossy(PEM);
        let cert = &only_cert[only_cert.find("-----BEGIN CERTIFICATE").unwrap()..];
        let e = ClientCertificate::from_pem(cert.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("PRIVATE KEY"), "{e}");
        let e = ClientCertificate::from_pem(b"hello")
            .unwrap_err()
            .to_string();
        assert!(e.contains("CERTIFICATE") || e.contains("not PEM"), "{e}");
        let e = ClientCertificate::load(Path::new("/nonexistent/cert.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the client certificate /nonexistent/cert.pem"),
            "{e}"
        );
    }
}
