//! `idsync-emulator`: serves an emulated API on 127.0.0.1, or generates a tenant file.
//!
//! ```text
//! idsync-emulator graph --tenant tenant.json --port 8400
//! idsync-emulator lakefs --port 8401
//! idsync-emulator databricks --port 8402
//! idsync-emulator all --tenant tenant.json          # all three, on free ports
//! idsync-emulator all --tls --cert-out cert.pem --ports-file ports.json
//! idsync-emulator generate --preset large --out large.json
//! ```
//!
//! Every server listens on 127.0.0.1 only. Ctrl-C stops it.

use idsync_emulators::generator::{self, Params};
use idsync_emulators::tenant::{DEFAULT_CLIENT_ID, Tenant};
use idsync_model::Directory;
use std::path::PathBuf;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage:\n  idsync-emulator graph|all [--tenant FILE.json|FILE.yaml | --preset small|medium|large] [--port N] [--tls --cert-out FILE] [--ports-file FILE]\n  idsync-emulator lakefs|databricks [--port N] [--ports-file FILE]\n  idsync-emulator generate (--preset small|medium|large | --users N --groups N --memberships N [--service-principals N] [--nesting-depth N] [--seed N]) --out FILE"
    );
    ExitCode::from(2)
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn params(args: &[String]) -> Result<Params, String> {
    let mut p = match arg(args, "--preset") {
        Some(name) => Params::preset(name).ok_or_else(|| format!("unknown preset {name:?}"))?,
        None => Params::default(),
    };
    let num = |name: &str| -> Result<Option<usize>, String> {
        arg(args, name)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("{name} takes a number, not {v:?}"))
            })
            .transpose()
    };
    if let Some(n) = num("--users")? {
        p.users = n;
    }
    if let Some(n) = num("--groups")? {
        p.groups = n;
    }
    if let Some(n) = num("--memberships")? {
        p.memberships = n;
    }
    if let Some(n) = num("--service-principals")? {
        p.service_principals = n;
    }
    if let Some(n) = num("--nesting-depth")? {
        p.nesting_depth = n;
    }
    if let Some(n) = num("--seed")? {
        p.seed = n as u64;
    }
    Ok(p)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("generate") => {
            let Some(out) = arg(&args, "--out") else {
                return usage();
            };
            let p = match params(&args) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return usage();
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
            if let Err(e) = std::fs::write(PathBuf::from(out), json) {
                eprintln!("error: cannot write {out}: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!(
                "generated {} users, {} groups in {:?} into {out}",
                dir.users.len(),
                dir.groups.len(),
                t.elapsed()
            );
            ExitCode::SUCCESS
        }
        Some(cmd @ ("graph" | "all" | "lakefs" | "databricks")) => {
            let port = match arg(&args, "--port").map(str::parse::<u16>) {
                None => 0,
                Some(Ok(p)) => p,
                Some(Err(_)) => return usage(),
            };
            // --tls: Graph and its token endpoint over HTTPS (msal and azure-identity refuse http
            // authorities), with a fresh self-signed certificate written to --cert-out.
            let tls = if args.iter().any(|a| a == "--tls") {
                let t = match idsync_emulators::Tls::generate() {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Some(f) = arg(&args, "--cert-out")
                    && let Err(e) = std::fs::write(f, &t.cert_pem)
                {
                    eprintln!("error: cannot write {f}: {e}");
                    return ExitCode::FAILURE;
                }
                Some(t)
            } else {
                None
            };
            let mut ports = serde_json::Map::new();
            let mut graph = None;
            if cmd == "graph" || cmd == "all" {
                let tenant = match (arg(&args, "--tenant"), arg(&args, "--preset")) {
                    (Some(f), _) => match Tenant::from_file(&PathBuf::from(f)) {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return ExitCode::FAILURE;
                        }
                    },
                    (None, Some(_)) => match params(&args) {
                        Ok(p) => Tenant::new(generator::generate(&p)),
                        Err(e) => {
                            eprintln!("error: {e}");
                            return usage();
                        }
                    },
                    (None, None) => Tenant::new(generator::generate(&Params::default())),
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
                match idsync_emulators::Lakefs::start_on(if cmd == "all" { 0 } else { port }).await
                {
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
                match idsync_emulators::Databricks::start_on(
                    if cmd == "all" { 0 } else { port },
                    entra,
                )
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
            if let Some(f) = arg(&args, "--ports-file") {
                // Written last and atomically: its presence means every server is up.
                let tmp = format!("{f}.tmp");
                let json = serde_json::Value::Object(ports).to_string();
                if std::fs::write(&tmp, json)
                    .and_then(|()| std::fs::rename(&tmp, f))
                    .is_err()
                {
                    eprintln!("error: cannot write {f}");
                    return ExitCode::FAILURE;
                }
            }
            let _ = tokio::signal::ctrl_c().await;
            drop((graph, lakefs, databricks));
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
