//! The benchmark driver (issue #7): `idsync-bench --size small|medium|large|xlarge --idsync PATH
//! [--latency-ms 20] [--setup-latency-ms N] [--rounds 1] [--changes 100] [--workers 10]
//! [--targets databricks,lakefs] [--rate-limits] [--json FILE]`. Prints a Markdown table; see
//! `idsync_emulators::bench`.

use idsync_emulators::bench::{Options, markdown, run};
use std::path::PathBuf;
use std::process::ExitCode;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let num = |name: &str, default: u64| -> Result<u64, String> {
        arg(&args, name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        })
    };
    let opts = (|| -> Result<Options, String> {
        Ok(Options {
            size: arg(&args, "--size").unwrap_or_else(|| "small".into()),
            idsync: PathBuf::from(
                arg(&args, "--idsync").unwrap_or_else(|| "target/release/idsync".into()),
            ),
            latency_ms: num("--latency-ms", 20)?,
            setup_latency_ms: arg(&args, "--setup-latency-ms")
                .map(|_| num("--setup-latency-ms", 0))
                .transpose()?,
            rounds: num("--rounds", 1)?.max(1) as usize,
            changes: num("--changes", 100)? as usize,
            workers: num("--workers", 10)? as usize,
            targets: arg(&args, "--targets")
                .unwrap_or_else(|| "databricks,lakefs".into())
                .split(',')
                .map(str::to_owned)
                .collect(),
            rate_limits: args.iter().any(|a| a == "--rate-limits"),
            groups_file: args.iter().any(|a| a == "--groups-file"),
        })
    })();
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "error: {e}\nusage: idsync-bench --size small|medium|large|xlarge --idsync PATH [--latency-ms 20] [--setup-latency-ms N] [--rounds 1] [--changes 100] [--workers 10] [--targets databricks,lakefs] [--rate-limits] [--json FILE]"
            );
            return ExitCode::from(2);
        }
    };
    match run(&opts).await {
        Ok(report) => {
            print!("{}", markdown(&report));
            if let Some(p) = arg(&args, "--json") {
                let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(&p, json + "\n") {
                    eprintln!("error: writing {p}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
