//! State in an object store, chosen by URL: `s3://bucket/prefix`, `az://container/prefix` or
//! `abfss://container@account.dfs.core.windows.net/prefix`, `gs://bucket/prefix`. Conditional
//! writes carry the object's ETag (S3, Azure) or generation (GCS): `If-None-Match: *` to create,
//! `If-Match` / `x-goog-if-generation-match` to replace.
//!
//! Credentials come from the environment, by the names each cloud's own tools use (read by the
//! `object_store` builders), plus what [`StoreOptions`] adds: an endpoint for S3-compatible
//! stores and emulators, an Azure connection string, and for S3 a role assumed with an external id
//! (on top of the chain's credentials) or from a web identity token ([`crate::sts`]).

use crate::StateError;
use crate::blob::{BlobStore, Blobs, Cond, Tag};
use async_trait::async_trait;
use object_store::path::Path;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion,
};
use std::sync::Arc;

/// What a state URL cannot say.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// An endpoint instead of the cloud's (S3-compatible stores, Azurite, a GCS emulator).
    pub endpoint: Option<String>,
    /// The S3 region.
    pub region: Option<String>,
    /// An S3 role to assume (cross-account), with `external_id` when the role's trust policy
    /// requires one.
    pub role_arn: Option<String>,
    /// The external id for `role_arn`.
    pub external_id: Option<String>,
    /// The STS endpoint (default: the region's).
    pub sts_endpoint: Option<String>,
    /// A web identity token file (OIDC: Kubernetes, CI, or an Entra ID token for a service
    /// running in Azure) exchanged for the role's credentials (`AWS_WEB_IDENTITY_TOKEN_FILE`).
    pub web_identity_token_file: Option<String>,
    /// A web identity token source for `role_arn` when there is no file (idsync's Entra ID
    /// sign-in, for a service running in Azure under a managed identity).
    pub web_identity: Option<Arc<dyn crate::sts::WebIdentityToken>>,
    /// Extra CA certificates (a PEM file) to trust besides the system's: a private CA in front of
    /// the store.
    pub ca_bundle: Option<String>,
    /// An Azure Storage connection string (`AZURE_STORAGE_CONNECTION_STRING`).
    pub azure_connection_string: Option<idsync_model::Secret>,
    /// A Google service account key file (else `GOOGLE_SERVICE_ACCOUNT`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`, or the metadata server).
    pub google_service_account: Option<String>,
    /// A Google credential file of any type, `external_account` (workload identity federation)
    /// included (else `GOOGLE_APPLICATION_CREDENTIALS`).
    pub google_application_credentials: Option<String>,
}

/// State in an object store.
pub type ObjectStateStore = BlobStore<ObjectBlobs>;

/// Objects under a prefix of a bucket or container.
#[derive(Debug)]
pub struct ObjectBlobs {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The URL, for messages.
    url: String,
    /// The bucket or container was seen to exist.
    bucket_seen: std::sync::atomic::AtomicBool,
}

fn backend(action: &'static str, location: &str, e: object_store::Error) -> StateError {
    let hint = match &e {
        object_store::Error::NotFound { .. } => {
            " (does the bucket or container exist, and is the URL right?)"
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            " (check the credentials and that they may read and write objects under this prefix)"
        }
        _ => "",
    };
    StateError::Backend {
        action,
        location: location.to_owned(),
        detail: format!("{e}{hint}"),
    }
}

/// Whether a listing failed because the bucket or container is not there.
fn missing_bucket(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::NotFound { .. }) {
        return true;
    }
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    [
        "NoSuchBucket",
        "ContainerNotFound",
        "404 Not Found",
        "status: 404",
    ]
    .iter()
    .any(|m| text.contains(m))
}

fn encode_tag(e_tag: Option<String>, version: Option<String>) -> Tag {
    Tag(serde_json::to_string(&(e_tag, version)).unwrap_or_default())
}

fn decode_tag(t: &Tag) -> UpdateVersion {
    let (e_tag, version): (Option<String>, Option<String>) =
        serde_json::from_str(&t.0).unwrap_or_default();
    UpdateVersion { e_tag, version }
}

impl ObjectBlobs {
    /// Objects of `store` under `prefix`; `url` names them in messages.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        ObjectBlobs {
            store,
            prefix: Path::from(prefix.trim_matches('/')),
            url: url.to_owned(),
            bucket_seen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// An absent object in a missing bucket reads as "not found" too: the first time something is
    /// not found, a listing tells the two apart (a missing bucket is an error, not an empty state).
    async fn check_bucket(&self) -> Result<(), StateError> {
        use std::sync::atomic::Ordering;
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.store.list_with_delimiter(Some(&self.prefix)).await {
            Ok(_) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            // Listing errors come back as generic ones: the service's words tell a missing bucket.
            Err(e) if missing_bucket(&e) => Err(StateError::Backend {
                action: "open",
                location: self.url.clone(),
                detail: "the bucket or container does not exist: create it, or fix the URL".into(),
            }),
            Err(e) => Err(backend("list", &self.url, e)),
        }
    }

    /// The object of a key; a nested key (`changes/a/day/x.jsonl`) is a path of parts.
    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }
}

#[async_trait]
impl Blobs for ObjectBlobs {
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Tag)>, StateError> {
        let loc = self.location(key);
        match self.store.get(&self.path(key)).await {
            Ok(r) => {
                let tag = encode_tag(r.meta.e_tag.clone(), r.meta.version.clone());
                let bytes = r.bytes().await.map_err(|e| backend("read", &loc, e))?;
                Ok(Some((bytes.to_vec(), tag)))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.check_bucket().await?;
                Ok(None)
            }
            Err(e) => Err(backend("read", &loc, e)),
        }
    }

    async fn put(&self, key: &str, bytes: Vec<u8>, cond: Cond) -> Result<bool, StateError> {
        let loc = self.location(key);
        let mode = match &cond {
            Cond::Absent => PutMode::Create,
            Cond::Match(t) => PutMode::Update(decode_tag(t)),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(key), bytes.clone().into(), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
            ) => {
                // A conditional write that was retried after its first attempt succeeded reports
                // a conflict with itself: what is stored tells.
                let ours = self
                    .get(key)
                    .await?
                    .is_some_and(|(stored, _)| stored == bytes);
                Ok(ours)
            }
            Err(object_store::Error::NotImplemented { .. }) => Err(StateError::Backend {
                action: "write",
                location: loc,
                detail: "this store does not support conditional writes, which idsync needs to keep two runs from overwriting each other".into(),
            }),
            Err(e) => Err(backend("write", &loc, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend("delete", &self.location(key), e)),
        }
    }

    async fn list(&self) -> Result<Vec<String>, StateError> {
        // This prefix's objects only, not those of deeper prefixes (other teams' state).
        let r = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| backend("list", &self.url, e))?;
        Ok(r.objects
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect())
    }

    async fn list_under(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        use futures::TryStreamExt;
        let base = self.path(prefix.trim_end_matches('/'));
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| backend("list", &self.location(prefix), e))?;
        let root = self.prefix.as_ref();
        let mut out: Vec<String> = metas
            .into_iter()
            .map(|m| {
                let full = m.location.as_ref();
                full.strip_prefix(root)
                    .unwrap_or(full)
                    .trim_start_matches('/')
                    .to_owned()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn location(&self, key: &str) -> String {
        format!("{}/{key}", self.url.trim_end_matches('/'))
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// The bucket-level part of a URL and the prefix under it.
fn split(url: &str) -> Result<(String, String), StateError> {
    let bad = |why: &str| StateError::Backend {
        action: "open",
        location: url.to_owned(),
        detail: why.to_owned(),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a URL"))?;
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(bad("the URL names no bucket or container"));
    }
    Ok((format!("{scheme}://{host}"), prefix.to_owned()))
}

/// Parses `AccountName=...;AccountKey=...;BlobEndpoint=...;SharedAccessSignature=...`.
fn connection_string(s: &str) -> std::collections::BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// The account a blob endpoint names: `https://ACCOUNT.blob.core.windows.net`, or an emulator's
/// `http://127.0.0.1:10000/ACCOUNT`.
fn account_of_endpoint(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://")?.1.trim_end_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return path.split('/').next().map(str::to_owned);
    }
    host.split_once('.')
        .map(|(a, _)| a.to_owned())
        .filter(|a| !a.is_empty())
}

/// Opens the object store a state URL names.
pub fn open(url: &str, opts: &StoreOptions) -> Result<ObjectStateStore, StateError> {
    // One crypto provider for the process (ring); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (base, prefix) = split(url)?;
    let fail = |e: object_store::Error| StateError::Backend {
        action: "open",
        location: url.to_owned(),
        detail: e.to_string(),
    };
    let http_endpoint = opts
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    // Extra roots for a private CA (S3-compatible stores, proxies, emulators), besides the
    // system's.
    let mut roots = Vec::new();
    if let Some(path) = &opts.ca_bundle {
        let pem = std::fs::read(path).map_err(|e| StateError::Backend {
            action: "open",
            location: url.to_owned(),
            detail: format!("cannot read the CA bundle {path}: {e}"),
        })?;
        roots =
            object_store::Certificate::from_pem_bundle(&pem).map_err(|e| StateError::Backend {
                action: "open",
                location: url.to_owned(),
                detail: format!("the CA bundle {path} holds no usable PEM certificate: {e}"),
            })?;
        if roots.is_empty() {
            return Err(StateError::Backend {
                action: "open",
                location: url.to_owned(),
                detail: format!("the CA bundle {path} holds no PEM certificate"),
            });
        }
    }
    let with_roots = |mut c: ClientOptions| {
        for r in &roots {
            c = c.with_root_certificate(r.clone());
        }
        c
    };
    let client = with_roots(ClientOptions::new().with_allow_http(http_endpoint));
    let store: Arc<dyn ObjectStore> = match base.split_once("://").map(|(s, _)| s) {
        Some("s3") => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_url(&base)
                .with_client_options(client);
            if let Some(e) = &opts.endpoint {
                b = b.with_endpoint(e).with_allow_http(http_endpoint);
            }
            if let Some(r) = &opts.region {
                b = b.with_region(r);
            }
            // A role is assumed with the credentials the chain would use without it (keys,
            // web identity, container or instance role).
            let chain = b.clone();
            let caller = || chain.build().map(|s| s.credentials().clone()).map_err(fail);
            if let Some(p) = crate::sts::provider(opts, caller)? {
                b = b.with_credentials(p);
            }
            Arc::new(b.build().map_err(fail)?)
        }
        Some("az" | "abfs" | "abfss" | "azure" | "adl") => {
            // A connection string is the whole credential, as in Azure's own SDKs: the
            // environment's keys do not mix into it.
            let b = match &opts.azure_connection_string {
                Some(_) => object_store::azure::MicrosoftAzureBuilder::new(),
                None => object_store::azure::MicrosoftAzureBuilder::from_env(),
            };
            let mut b = b.with_url(&base).with_client_options(client);
            if let Some(cs) = &opts.azure_connection_string {
                let cs = connection_string(cs.expose());
                if let Some(a) = cs
                    .get("accountname")
                    .cloned()
                    .or_else(|| cs.get("blobendpoint").and_then(|e| account_of_endpoint(e)))
                {
                    b = b.with_account(a);
                }
                if let Some(k) = cs.get("accountkey") {
                    b = b.with_access_key(k);
                }
                if let Some(sas) = cs.get("sharedaccesssignature") {
                    b = b.with_config(object_store::azure::AzureConfigKey::SasKey, sas);
                }
                if let Some(e) = cs.get("blobendpoint").filter(|_| opts.endpoint.is_none()) {
                    let http = e.starts_with("http://");
                    b = b
                        .with_endpoint(e.trim_end_matches('/').to_owned())
                        .with_allow_http(http)
                        .with_client_options(with_roots(
                            ClientOptions::new().with_allow_http(http),
                        ));
                }
            }
            if let Some(e) = &opts.endpoint {
                b = b
                    .with_endpoint(e.trim_end_matches('/').to_owned())
                    .with_allow_http(http_endpoint);
            }
            Arc::new(b.build().map_err(fail)?)
        }
        Some("gs") => {
            let adc = opts
                .google_application_credentials
                .clone()
                .or_else(|| std::env::var("GOOGLE_APPLICATION_CREDENTIALS").ok());
            let federated = match &adc {
                Some(p) => crate::gcp_federation::from_file(p)?,
                None => None,
            };
            // object_store refuses external_account files: with one, it is not shown the file.
            let b = if federated.is_some() {
                object_store::gcp::GoogleCloudStorageBuilder::new()
            } else {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env();
                match &opts.google_application_credentials {
                    Some(p) => b.with_application_credentials(p),
                    None => b,
                }
            };
            let mut b = b.with_url(&base).with_client_options(client);
            if let Some(p) = federated {
                b = b.with_credentials(Arc::new(p));
            }
            if let Some(e) = &opts.endpoint {
                b = b.with_base_url(e.trim_end_matches('/'));
            }
            if let Some(p) = &opts.google_service_account {
                b = b.with_service_account_path(p);
            }
            Arc::new(b.build().map_err(fail)?)
        }
        _ => {
            return Err(StateError::Backend {
                action: "open",
                location: url.to_owned(),
                detail:
                    "unknown scheme: use a folder path, file://, s3://, az://, abfss:// or gs://"
                        .into(),
            });
        }
    };
    Ok(BlobStore::new(ObjectBlobs::new(store, &prefix, url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(
            split("s3://b/a/b").unwrap(),
            ("s3://b".into(), "a/b".into())
        );
        assert_eq!(split("gs://b").unwrap(), ("gs://b".into(), String::new()));
        assert!(split("s3:///x").is_err());
        assert!(split("bucket").is_err());
    }

    #[test]
    fn accounts_are_read_from_blob_endpoints() {
        assert_eq!(
            account_of_endpoint("http://127.0.0.1:10000/devstoreaccount1").as_deref(),
            Some("devstoreaccount1")
        );
        assert_eq!(
            account_of_endpoint("https://acme.blob.core.windows.net/").as_deref(),
            Some("acme")
        );
        assert_eq!(account_of_endpoint("not a url"), None);
    }

    #[test]
    fn connection_strings_are_read_by_key() {
        let cs = connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
        );
        assert_eq!(cs["accountname"], "devstoreaccount1");
        assert_eq!(cs["accountkey"], "a2V5==");
        assert_eq!(
            cs["blobendpoint"],
            "http://127.0.0.1:10000/devstoreaccount1"
        );
    }
}
