//! Stateful emulators of the SaaS APIs idsync talks to, for tests, the demo and benchmarks:
//! Microsoft Graph with the Microsoft identity platform's token endpoint ([`graph`]), the lakeFS
//! auth API ([`lakefs`]) and the Databricks account SCIM API ([`databricks`]); for state, a GCS
//! ([`gcs`]) and AWS's credential services ([`aws`]: STS with trust policies, the container and
//! instance metadata endpoints). Each serves
//! HTTP on 127.0.0.1 only, in process ([`Graph::start`]) or from the `idsync-emulator` binary, with
//! fault injection, throttling and request accounting ([`infra`]) and a deterministic tenant
//! generator ([`generator`]).

// Handler helpers return the error response to send (`Result<_, Response>`), as axum code does;
// one is built per failed request, so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod aws;
pub mod bench;
pub mod databricks;
pub mod faults;
pub mod gcs;
pub mod generator;
pub mod graph;
pub mod infra;
pub mod kanidm;
pub mod lakefs;
pub mod tenant;

use axum::Router;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// A self-signed certificate for `localhost` and `127.0.0.1`, and the TLS configuration that
/// serves it. Clients trust it through its PEM (`REQUESTS_CA_BUNDLE`, `SSL_CERT_FILE`, or idsync's
/// own CA bundle setting).
#[derive(Clone)]
pub struct Tls {
    /// The certificate, PEM.
    pub cert_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(self-signed for localhost, 127.0.0.1)")
    }
}

impl Tls {
    /// Generates a fresh certificate and key.
    pub fn generate() -> Result<Tls, String> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .map_err(|e| format!("cannot generate a certificate: {e}"))?;
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| format!("cannot use the certificate: {e}"))?;
        Ok(Tls {
            cert_pem: ck.cert.pem(),
            config: Arc::new(config),
        })
    }
}

/// Hands axum connections whose TLS handshake completed. Handshakes run in their own tasks with a
/// time limit, so a client that connects and says nothing delays nobody else; failed handshakes (a
/// client that does not trust the certificate) are dropped and logged.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop is gone: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Serves `app` over HTTPS on 127.0.0.1 (`port` 0 picks a free one).
pub async fn serve_tls(app: Router, port: u16, tls: &Tls) -> std::io::Result<Running> {
    let tcp = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let addr = tcp.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let (tx, ready) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = tcp.accept() => a,
                // The server stopped (its listener, holding the receiver, was dropped).
                () = tx.closed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    let listener = TlsListener { ready, addr };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "emulator server stopped");
        }
    });
    Ok(Running {
        base_url: format!("https://{addr}"),
        addr,
        shutdown: Some(stop),
    })
}

/// A server running on 127.0.0.1; stopped when dropped.
#[derive(Debug)]
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `app` on 127.0.0.1 (`port` 0 picks a free one). Never binds another address.
pub async fn serve(app: Router, port: u16) -> std::io::Result<Running> {
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "emulator server stopped");
        }
    });
    Ok(Running {
        base_url: format!("http://{addr}"),
        addr,
        shutdown: Some(tx),
    })
}

/// A running Google Cloud Storage (XML API) emulator.
pub struct Gcs {
    /// Its state.
    pub state: Arc<gcs::GcsState>,
    /// The server.
    pub server: Running,
}

impl Gcs {
    /// Starts one with these buckets on a free port of 127.0.0.1 (or `port`).
    pub async fn start_on(port: u16, buckets: &[&str]) -> std::io::Result<Gcs> {
        let state = gcs::GcsState::new(buckets);
        let server = serve(gcs::router(state.clone()), port).await?;
        Ok(Gcs { state, server })
    }
}

/// A running AWS credential services emulator (STS, container and instance metadata).
pub struct Aws {
    /// Its state.
    pub state: Arc<aws::AwsState>,
    /// The server.
    pub server: Running,
}

impl Aws {
    /// Starts one on a free port of 127.0.0.1, trusting web identity tokens from `entra`.
    pub async fn start(entra: Option<Arc<graph::GraphState>>) -> std::io::Result<Aws> {
        let state = aws::AwsState::new(entra);
        let server = serve(aws::router(state.clone()), 0).await?;
        Ok(Aws { state, server })
    }
}

/// A running lakeFS auth API emulator.
pub struct Lakefs {
    /// Its state.
    pub state: Arc<lakefs::LakefsState>,
    /// The server.
    pub server: Running,
}

impl Lakefs {
    /// Starts one on a free port of 127.0.0.1 (or `port`).
    pub async fn start_on(port: u16) -> std::io::Result<Lakefs> {
        let state = lakefs::LakefsState::new();
        let server = serve(lakefs::router(state.clone()), port).await?;
        Ok(Lakefs { state, server })
    }

    /// The API base URL (`http://127.0.0.1:PORT/api/v1`).
    pub fn api_url(&self) -> String {
        format!("{}/api/v1", self.server.base_url)
    }
}

/// A running Kanidm sync-account API emulator.
pub struct Kanidm {
    /// Its state.
    pub state: Arc<kanidm::KanidmState>,
    /// The server.
    pub server: Running,
}

impl Kanidm {
    /// Starts one on a free port of 127.0.0.1 (or `port`).
    pub async fn start_on(port: u16) -> std::io::Result<Kanidm> {
        let state = kanidm::KanidmState::new();
        let server = serve(kanidm::router(state.clone()), port).await?;
        Ok(Kanidm { state, server })
    }
}

/// A running Databricks account SCIM emulator.
pub struct Databricks {
    /// Its state.
    pub state: Arc<databricks::DatabricksState>,
    /// The server.
    pub server: Running,
}

impl Databricks {
    /// Starts one on a free port of 127.0.0.1 (or `port`); it accepts Entra tokens from `entra`.
    pub async fn start_on(
        port: u16,
        entra: Option<Arc<graph::GraphState>>,
    ) -> std::io::Result<Databricks> {
        let state = databricks::DatabricksState::new(entra);
        let server = serve(databricks::router(state.clone()), port).await?;
        Ok(Databricks { state, server })
    }

    /// The SCIM base URL of the account.
    pub fn scim_url(&self) -> String {
        format!(
            "{}/api/2.0/accounts/{}/scim/v2",
            self.server.base_url,
            databricks::ACCOUNT_ID
        )
    }
}

/// A running Graph emulator.
pub struct Graph {
    /// Its state: the tenant, settings, accounting, faults.
    pub state: Arc<graph::GraphState>,
    /// The server.
    pub server: Running,
}

impl Graph {
    /// Starts a Graph emulator for `tenant` on a free port of 127.0.0.1.
    pub async fn start(tenant: tenant::Tenant) -> std::io::Result<Graph> {
        Graph::start_on(tenant, 0).await
    }

    /// Starts it on a given port.
    pub async fn start_on(tenant: tenant::Tenant, port: u16) -> std::io::Result<Graph> {
        Graph::start_with(tenant, port, None).await
    }

    /// Starts it on a given port, over HTTPS when `tls` is given (msal and azure-identity refuse
    /// plain-http authorities).
    pub async fn start_with(
        tenant: tenant::Tenant,
        port: u16,
        tls: Option<&Tls>,
    ) -> std::io::Result<Graph> {
        let state = graph::GraphState::new(tenant);
        let app = graph::router(state.clone());
        let server = match tls {
            Some(t) => {
                state.tls.store(true, std::sync::atomic::Ordering::Relaxed);
                serve_tls(app, port, t).await?
            }
            None => serve(app, port).await?,
        };
        Ok(Graph { state, server })
    }

    /// Graph's base URL (`http://127.0.0.1:PORT/v1.0`).
    pub fn graph_url(&self) -> String {
        format!("{}/v1.0", self.server.base_url)
    }

    /// The v2 token endpoint of the tenant.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.server.base_url,
            self.state.tenant().tenant_id
        )
    }
}
