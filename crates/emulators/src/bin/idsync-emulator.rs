//! `idsync-emulator`: serves an emulated API on 127.0.0.1, or generates a tenant file.
//!
//! ```text
//! idsync-emulator graph --tenant tenant.json --port 8400
//! idsync-emulator lakefs --port 8401
//! idsync-emulator databricks --port 8402
//! idsync-emulator kanidm --port 8403
//! idsync-emulator all --tenant tenant.json          # all four, on free ports
//! idsync-emulator all --tls --cert-out cert.pem --ports-file ports.json
//! idsync-emulator generate --preset large --out large.json
//! ```
//!
//! Every server listens on 127.0.0.1 only. Ctrl-C stops it.

use clap::{Args, Parser, Subcommand};
use idsync_emulators::generator::{self, Params};
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, Tenant};
use idsync_model::Directory;
use std::path::PathBuf;
use std::process::ExitCode;

/// Emulated Microsoft Graph (with its token endpoint), lakeFS auth, Databricks account SCIM and
/// Kanidm sync-account APIs on 127.0.0.1, for idsync's tests, benchmarks and demos; or a generated tenant file.
#[derive(Parser)]
#[command(name = "idsync-emulator", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve Microsoft Graph and its token endpoint.
    Graph(Serve),
    /// Serve Graph, lakeFS, Databricks and Kanidm, each on a free port (see --ports-file).
    All(Serve),
    /// Serve the lakeFS auth API.
    Lakefs(Serve),
    /// Serve the Databricks account SCIM API.
    Databricks(Serve),
    /// Serve Kanidm's sync-account API (`/scim/v1/Sync`, finalise, terminate).
    Kanidm(Serve),
    /// Write a generated tenant (the emulators' directory format) to a file.
    Generate {
        #[command(flatten)]
        tenant: TenantSpec,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct Serve {
    /// The tenant to serve (JSON or YAML, the emulators' directory format) [default: a
    /// generated small one].
    #[arg(long)]
    tenant: Option<PathBuf>,
    /// Port on 127.0.0.1 (0: a free one; `all` always takes free ones).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Serve Graph and its token endpoint over HTTPS with a fresh self-signed certificate
    /// (msal and azure-identity refuse http authorities).
    #[arg(long)]
    tls: bool,
    /// Where to write that certificate (PEM).
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// Write the servers' URLs and credentials as JSON to this file once all are up.
    #[arg(long)]
    ports_file: Option<PathBuf>,
    #[command(flatten)]
    generate: TenantSpec,
}

/// How a tenant is generated: a preset, adjusted by the numbers given.
#[derive(Args)]
struct TenantSpec {
    /// small, medium or large.
    #[arg(long)]
    preset: Option<String>,
    /// Users.
    #[arg(long)]
    users: Option<usize>,
    /// Groups.
    #[arg(long)]
    groups: Option<usize>,
    /// Memberships.
    #[arg(long)]
    memberships: Option<usize>,
    /// Service principals.
    #[arg(long)]
    service_principals: Option<usize>,
    /// How deep groups nest.
    #[arg(long)]
    nesting_depth: Option<usize>,
    /// Random seed (the same seed, the same tenant).
    #[arg(long)]
    seed: Option<u64>,
}

impl TenantSpec {
    fn params(&self) -> Result<Params, String> {
        let mut p = match &self.preset {
            Some(name) => Params::preset(name)
                .ok_or_else(|| format!("unknown preset {name:?} (small, medium or large)"))?,
            None => Params::default(),
        };
        p.users = self.users.unwrap_or(p.users);
        p.groups = self.groups.unwrap_or(p.groups);
        p.memberships = self.memberships.unwrap_or(p.memberships);
        p.service_principals = self.service_principals.unwrap_or(p.service_principals);
        p.nesting_depth = self.nesting_depth.unwrap_or(p.nesting_depth);
        p.seed = self.seed.unwrap_or(p.seed);
        Ok(p)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Generate { tenant, out } => generate(&tenant, &out),
        Cmd::Graph(s) => serve("graph", s).await,
        Cmd::All(s) => serve("all", s).await,
        Cmd::Lakefs(s) => serve("lakefs", s).await,
        Cmd::Databricks(s) => serve("databricks", s).await,
        Cmd::Kanidm(s) => serve("kanidm", s).await,
    }
}

fn generate(g: &TenantSpec, out: &std::path::Path) -> ExitCode {
    let p = match g.params() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let t = std::time::Instant::now();
    let dir: Directory = generator::generate(&p).into();
    let json = match serde_json::to_vec(&dir) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(out, json) {
        eprintln!("error: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "generated {} users, {} groups in {:?} into {}",
        dir.users.len(),
        dir.groups.len(),
        t.elapsed(),
        out.display()
    );
    ExitCode::SUCCESS
}

async fn serve(cmd: &str, args: Serve) -> ExitCode {
    let port = args.port;
    // --tls: Graph and its token endpoint over HTTPS (msal and azure-identity refuse http
    // authorities), with a fresh self-signed certificate written to --cert-out.
    let tls = if args.tls {
        let t = match idsync_emulators::Tls::generate() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(f) = &args.cert_out
            && let Err(e) = std::fs::write(f, &t.cert_pem)
        {
            eprintln!("error: cannot write {}: {e}", f.display());
            return ExitCode::FAILURE;
        }
        Some(t)
    } else {
        None
    };
    let mut ports = serde_json::Map::new();
    let mut graph = None;
    if cmd == "graph" || cmd == "all" {
        let tenant = match &args.tenant {
            Some(f) => match Tenant::from_file(f) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => match args.generate.params() {
                Ok(p) => Tenant::new(generator::generate(&p)),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
        };
        let tenant_id = tenant.tenant_id.clone();
        let g = match idsync_emulators::Graph::start_with(
            tenant,
            if cmd == "all" { 0 } else { port },
            tls.as_ref(),
        )
        .await
        {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("graph {}", g.graph_url());
        println!("token {}", g.token_url());
        println!("tenant {tenant_id} client {DEFAULT_CLIENT_ID}");
        ports.insert("graph".into(), g.graph_url().into());
        ports.insert("authority".into(), g.server.base_url.clone().into());
        ports.insert("tenant".into(), tenant_id.into());
        ports.insert("clientId".into(), DEFAULT_CLIENT_ID.into());
        ports.insert(
            "clientSecret".into(),
            idsync_emulators::tenant::DEFAULT_CLIENT_SECRET.into(),
        );
        graph = Some(g);
    }
    let mut lakefs = None;
    if cmd == "lakefs" || cmd == "all" {
        match idsync_emulators::Lakefs::start_on(if cmd == "all" { 0 } else { port }).await {
            Ok(l) => {
                println!(
                    "lakefs {} key {}",
                    l.api_url(),
                    idsync_emulators::lakefs::ACCESS_KEY_ID
                );
                ports.insert("lakefs".into(), l.api_url().into());
                ports.insert(
                    "lakefsKey".into(),
                    idsync_emulators::lakefs::ACCESS_KEY_ID.into(),
                );
                ports.insert(
                    "lakefsSecret".into(),
                    idsync_emulators::lakefs::SECRET_ACCESS_KEY.into(),
                );
                lakefs = Some(l);
            }
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut databricks = None;
    if cmd == "databricks" || cmd == "all" {
        let entra = graph.as_ref().map(|g| g.state.clone());
        match idsync_emulators::Databricks::start_on(if cmd == "all" { 0 } else { port }, entra)
            .await
        {
            Ok(d) => {
                println!(
                    "databricks {} account {}",
                    d.server.base_url,
                    idsync_emulators::databricks::ACCOUNT_ID
                );
                ports.insert("databricks".into(), d.server.base_url.clone().into());
                ports.insert(
                    "account".into(),
                    idsync_emulators::databricks::ACCOUNT_ID.into(),
                );
                ports.insert(
                    "databricksToken".into(),
                    idsync_emulators::databricks::TOKEN.into(),
                );
                databricks = Some(d);
            }
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut kanidm = None;
    if cmd == "kanidm" || cmd == "all" {
        match idsync_emulators::Kanidm::start_on(if cmd == "all" { 0 } else { port }).await {
            Ok(k) => {
                println!(
                    "kanidm {} sync-token {} admin-token {} sync-account {}",
                    k.server.base_url,
                    idsync_emulators::kanidm::SYNC_TOKEN,
                    idsync_emulators::kanidm::ADMIN_TOKEN,
                    idsync_emulators::kanidm::SYNC_ACCOUNT
                );
                ports.insert("kanidm".into(), k.server.base_url.clone().into());
                ports.insert(
                    "kanidmSyncToken".into(),
                    idsync_emulators::kanidm::SYNC_TOKEN.into(),
                );
                ports.insert(
                    "kanidmAdminToken".into(),
                    idsync_emulators::kanidm::ADMIN_TOKEN.into(),
                );
                ports.insert(
                    "kanidmSyncAccount".into(),
                    idsync_emulators::kanidm::SYNC_ACCOUNT.into(),
                );
                kanidm = Some(k);
            }
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(f) = &args.ports_file {
        // Written last and atomically: its presence means every server is up.
        let tmp = PathBuf::from(format!("{}.tmp", f.display()));
        let json = serde_json::Value::Object(ports).to_string();
        if std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, f))
            .is_err()
        {
            eprintln!("error: cannot write {}", f.display());
            return ExitCode::FAILURE;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    drop((graph, lakefs, databricks, kanidm));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
