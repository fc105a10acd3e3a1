//! `[source] kind = "entra"`: Microsoft Entra ID over Microsoft Graph, with the sign-in methods of
//! azure-identity and the environment names the existing Entra → lakeFS / Databricks scripts use.

use crate::entra_auth::{CertificateError, ClientCertificate, EntraCredential, IMDS_ENDPOINT};
use crate::http::HttpConfig;
use crate::registry::{Check, EnvForm, EnvVar, KindOf, SourceConfig, SourceSettings};
use idsync_engine::{Source, SourceError};
use idsync_model::Secret;
use serde::Deserialize;
use std::path::Path;

/// The public cloud's authority host.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The public cloud's Graph.
pub const PUBLIC_GRAPH: &str = "https://graph.microsoft.com";

/// The settings of `[source] kind = "entra"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory (tenant) id (`ENTRA_TENANT_ID`, `AZURE_TENANT_ID`, `ARM_TENANT_ID`).
    tenant_id: Option<String>,
    /// Application (client) id (`ENTRA_APPLICATION_ID`, `AZURE_CLIENT_ID`, `ARM_CLIENT_ID`).
    client_id: Option<String>,
    /// Client secret; keep it out of the file (`ENTRA_CLIENT_SECRET_VALUE`, `AZURE_CLIENT_SECRET`).
    client_secret: Option<Secret>,
    /// A PEM file with the app's certificate and private key (`AZURE_CLIENT_CERTIFICATE_PATH`).
    client_certificate_path: Option<String>,
    /// A federated token file, for workload identity (`AZURE_FEDERATED_TOKEN_FILE`).
    federated_token_file: Option<String>,
    /// How to sign in: secret, certificate, workload_identity, managed_identity, azure_cli or
    /// device_code [default: inferred from what is set, in azure-identity's order].
    auth: Option<String>,
    /// The managed identity endpoint [default: IMDS, or the platform's `IDENTITY_ENDPOINT`].
    managed_identity_endpoint: Option<String>,
    /// The Azure CLI program [default: `az`].
    azure_cli_path: Option<String>,
    /// Authority host, for national clouds [default: the public cloud] (`AZURE_AUTHORITY_HOST`).
    authority_host: Option<String>,
    /// Graph's base URL [default: the public cloud's].
    graph_url: Option<String>,
    /// Extra CA certificates (PEM) to trust.
    ca_bundle: Option<String>,
    /// Allow plain http:// to a host other than this machine (credentials and people's data in
    /// clear text on the network) [default: false].
    allow_insecure_http: Option<bool>,
}

/// Variables that override settings and, set with no `[source] kind`, choose Entra ID.
const ENV: &[EnvVar] = &[
    EnvVar {
        names: &["ENTRA_TENANT_ID", "AZURE_TENANT_ID", "ARM_TENANT_ID"],
        setting: "tenant_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["ENTRA_APPLICATION_ID", "AZURE_CLIENT_ID", "ARM_CLIENT_ID"],
        setting: "client_id",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &[
            "ENTRA_CLIENT_SECRET_VALUE",
            "AZURE_CLIENT_SECRET",
            "ARM_CLIENT_SECRET",
        ],
        setting: "client_secret",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["AZURE_CLIENT_CERTIFICATE_PATH"],
        setting: "client_certificate_path",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["AZURE_FEDERATED_TOKEN_FILE"],
        setting: "federated_token_file",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["AZURE_AUTHORITY_HOST"],
        setting: "authority_host",
        form: EnvForm::Text,
    },
];

/// Every variable the kind reads: [`ENV`], and the managed identity endpoints it reads itself
/// (App Service's and Container Apps' pair, azure-identity's IMDS override).
const ALL_ENV: &[EnvVar] = &[
    ENV[0],
    ENV[1],
    ENV[2],
    ENV[3],
    ENV[4],
    ENV[5],
    EnvVar {
        names: &["IDENTITY_ENDPOINT"],
        setting: "",
        form: EnvForm::Text,
    },
    EnvVar {
        names: &["IDENTITY_HEADER"],
        setting: "",
        form: EnvForm::Secret,
    },
    EnvVar {
        names: &["AZURE_POD_IDENTITY_AUTHORITY_HOST"],
        setting: "",
        form: EnvForm::Text,
    },
];

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

/// A checked Entra ID sign-in and where Graph is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraSettings {
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
    /// Plain http:// to other hosts allowed.
    pub allow_insecure_http: bool,
}

impl EntraSettings {
    /// The credential the settings chose (a certificate is read from its file here).
    pub fn credential(&self) -> Result<EntraCredential, CertificateError> {
        let client_id = self.client_id.clone().unwrap_or_default();
        Ok(match self.method {
            EntraMethod::Secret => EntraCredential::ClientSecret {
                client_id,
                secret: self.client_secret.clone().unwrap_or_default(),
            },
            EntraMethod::Certificate => {
                let path = self.client_certificate_path.clone().unwrap_or_default();
                EntraCredential::Certificate {
                    client_id,
                    certificate: ClientCertificate::load(Path::new(&path))?,
                }
            }
            EntraMethod::WorkloadIdentity => EntraCredential::WorkloadIdentity {
                client_id,
                token_file: self.federated_token_file.clone().unwrap_or_default().into(),
            },
            EntraMethod::ManagedIdentity => EntraCredential::ManagedIdentity {
                client_id: self.client_id.clone(),
                endpoint: self.managed_identity_endpoint.clone(),
                identity_header: self.identity_header.clone(),
            },
            EntraMethod::AzureCli => EntraCredential::AzureCli {
                program: self.azure_cli_path.clone().into(),
            },
            EntraMethod::DeviceCode => EntraCredential::DeviceCode { client_id },
        })
    }
}

/// The `entra` source kind: chosen by its variables when `[source]` names no kind.
pub static KIND: KindOf<Settings> = KindOf::new("entra", ALL_ENV).implied_by(ENV);

impl SourceSettings for Settings {
    fn check(self, c: &Check<'_>) -> Option<Box<dyn SourceConfig>> {
        let s = self;
        let tenant = c.required(
            "tenant_id",
            s.tenant_id.as_ref(),
            "set tenant_id or ENTRA_TENANT_ID / AZURE_TENANT_ID",
        );
        let has_secret = s.client_secret.as_ref().is_some_and(|s| !s.is_empty());
        let method = match s.auth.as_deref() {
            Some(name) => {
                let m = ENTRA_METHODS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, m)| *m);
                if m.is_none() {
                    let names: Vec<&str> = ENTRA_METHODS.iter().map(|(n, _)| *n).collect();
                    c.problem(
                        "auth",
                        format!(
                            "unknown sign-in method {name:?} (one of: {})",
                            names.join(", ")
                        ),
                    );
                }
                m
            }
            None if has_secret => Some(EntraMethod::Secret),
            None if s.client_certificate_path.is_some() => Some(EntraMethod::Certificate),
            None if s.federated_token_file.is_some() => Some(EntraMethod::WorkloadIdentity),
            None => {
                c.problem(
                    "auth",
                    "missing credentials: set ENTRA_CLIENT_SECRET_VALUE or AZURE_CLIENT_SECRET (keep secrets out of the file), AZURE_CLIENT_CERTIFICATE_PATH or AZURE_FEDERATED_TOKEN_FILE, or auth = \"managed_identity\", \"azure_cli\" or \"device_code\"",
                );
                None
            }
        };
        match method {
            Some(EntraMethod::Secret) if !has_secret => c.problem(
                "client_secret",
                "missing: set ENTRA_CLIENT_SECRET_VALUE or AZURE_CLIENT_SECRET (keep secrets out of the file)",
            ),
            Some(EntraMethod::Certificate) if s.client_certificate_path.is_none() => c.problem(
                "client_certificate_path",
                "missing: set client_certificate_path or AZURE_CLIENT_CERTIFICATE_PATH (a PEM file with the certificate and its private key)",
            ),
            Some(EntraMethod::WorkloadIdentity) if s.federated_token_file.is_none() => c.problem(
                "federated_token_file",
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
            c.required(
                "client_id",
                s.client_id.as_ref(),
                "set client_id or ENTRA_APPLICATION_ID / AZURE_CLIENT_ID",
            );
        }
        // Managed identity endpoints: the identity endpoint App Service and Container Apps set
        // (both variables, or it is not App Service's: Azure Arc sets IDENTITY_ENDPOINT alone,
        // with another protocol), else azure-identity's IMDS override.
        let cx = c.cx();
        let (endpoint, identity_header) =
            match (cx.env(&["IDENTITY_ENDPOINT"]), cx.env(&["IDENTITY_HEADER"])) {
                (Some((_, e)), Some((_, h))) => (Some(e), Some(Secret::new(h))),
                _ => (
                    cx.env(&["AZURE_POD_IDENTITY_AUTHORITY_HOST"])
                        .map(|(_, v)| v)
                        .or(s.managed_identity_endpoint.clone()),
                    None,
                ),
            };
        let path = |p: &Option<String>| p.as_deref().map(|p| c.resolve(p).display().to_string());
        let (tenant, method) = (tenant?, method?);
        Some(Box::new(EntraSettings {
            tenant_id: tenant.clone(),
            client_id: s.client_id.clone(),
            client_secret: s.client_secret.clone(),
            client_certificate_path: path(&s.client_certificate_path),
            federated_token_file: path(&s.federated_token_file),
            method,
            managed_identity_endpoint: endpoint.unwrap_or_else(|| IMDS_ENDPOINT.into()),
            identity_header,
            azure_cli_path: s.azure_cli_path.clone().unwrap_or_else(|| "az".into()),
            authority_host: s
                .authority_host
                .clone()
                .unwrap_or_else(|| PUBLIC_AUTHORITY.into()),
            graph_url: s.graph_url.clone().unwrap_or_else(|| PUBLIC_GRAPH.into()),
            ca_bundle: s.ca_bundle.clone(),
            allow_insecure_http: s.allow_insecure_http.unwrap_or(false),
        }))
    }
}

impl SourceConfig for EntraSettings {
    fn kind(&self) -> &'static str {
        "entra"
    }
    fn describe(&self) -> String {
        format!("entra tenant {}", self.tenant_id)
    }
    fn entra(&self) -> Option<&EntraSettings> {
        Some(self)
    }
    fn build(&self, workers: usize) -> Result<Box<dyn Source>, SourceError> {
        let credential = self
            .credential()
            .map_err(|e| SourceError::new(e.to_string()))?;
        let http = HttpConfig {
            allow_insecure_http: self.allow_insecure_http,
            ..HttpConfig::new("Microsoft Graph").bounded(
                workers,
                self.ca_bundle.as_ref().map(std::path::PathBuf::from),
            )
        };
        let src = super::EntraSource::new(super::EntraSourceConfig {
            authority: self.authority_host.clone(),
            graph: self.graph_url.clone(),
            tenant_id: self.tenant_id.clone(),
            credential,
            http,
        })?;
        Ok(Box::new(src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::check;
    use serde_json::json;

    fn method(
        settings: serde_json::Value,
        env: &[(&str, &str)],
    ) -> Result<(EntraMethod, String, Option<Secret>), String> {
        let mut all = vec![("AZURE_TENANT_ID", "tenant-1")];
        all.extend_from_slice(env);
        check::source(&KIND, settings, &all)
            .map(|c| {
                let e = c.entra().cloned().unwrap();
                (e.method, e.managed_identity_endpoint, e.identity_header)
            })
            .map_err(|p| check::text(&p))
    }

    #[test]
    fn every_sign_in_method_is_chosen_from_the_settings() {
        // Inferred from what is set, in azure-identity's order.
        let id = ("AZURE_CLIENT_ID", "app-1");
        let none = json!({});
        let m = method(
            none.clone(),
            &[
                id,
                ("AZURE_CLIENT_SECRET", "s"),
                ("AZURE_CLIENT_CERTIFICATE_PATH", "c.pem"),
            ],
        );
        assert_eq!(m.unwrap().0, EntraMethod::Secret);
        let m = method(
            none.clone(),
            &[id, ("AZURE_CLIENT_CERTIFICATE_PATH", "c.pem")],
        );
        assert_eq!(m.unwrap().0, EntraMethod::Certificate);
        let m = method(
            none.clone(),
            &[id, ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token")],
        );
        assert_eq!(m.unwrap().0, EntraMethod::WorkloadIdentity);
        // Chosen: managed identity needs no client id, and takes the platform's endpoint.
        let mi = json!({"auth": "managed_identity"});
        let (m, endpoint, header) = method(mi.clone(), &[]).unwrap();
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
        let cli = json!({"auth": "azure_cli"});
        assert_eq!(method(cli, &[]).unwrap().0, EntraMethod::AzureCli);
        // Errors: nothing to sign in with; an unknown method; a method without its setting.
        let e = method(none, &[id]).unwrap_err();
        assert!(
            e.contains("auth: missing credentials") && e.contains("managed_identity"),
            "{e}"
        );
        let e = method(json!({"auth": "kerberos"}), &[id]).unwrap_err();
        assert!(
            e.contains("auth: unknown sign-in method \"kerberos\""),
            "{e}"
        );
        let e = method(json!({"auth": "device_code"}), &[]).unwrap_err();
        assert!(e.contains("client_id: missing"), "{e}");
        let e = method(json!({"auth": "certificate"}), &[id]).unwrap_err();
        assert!(e.contains("AZURE_CLIENT_CERTIFICATE_PATH"), "{e}");
    }

    #[test]
    fn a_file_source_key_is_not_an_entra_setting_and_the_identity_header_never_comes_from_the_file()
    {
        let e = method(json!({"path": "dir.json", "identity_header": "h"}), &[]).unwrap_err();
        assert!(e.contains("path: unknown field `path`"), "{e}");
        assert!(e.contains("identity_header: unknown field"), "{e}");
    }
}
