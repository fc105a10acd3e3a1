//! The fault suite: `idsync-faults --idsync target/debug/idsync [--size ci|full] [--stride N]
//! [--moto URL] [--azurite URL] [--gcs-key PEM] [--only TEXT] [--markdown FILE]`. Prints the
//! table RELIABILITY.md holds and exits 1 if any case failed. `scripts/faults.sh` starts the real
//! servers and runs it.

use idsync_emulators::faults::{Options, markdown, run};
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let mut o = Options {
        idsync: PathBuf::from("target/debug/idsync"),
        size: "ci".into(),
        stride: 1,
        moto: None,
        azurite: None,
        gcs_key: None,
        only: None,
    };
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--idsync" => o.idsync = PathBuf::from(value()),
            "--size" => o.size = value(),
            "--stride" => o.stride = value().parse().unwrap_or(1).max(1),
            "--moto" => o.moto = Some(value()),
            "--azurite" => o.azurite = Some(value()),
            "--gcs-key" => o.gcs_key = Some(PathBuf::from(value())),
            "--only" => o.only = Some(value()),
            "--markdown" => out = Some(PathBuf::from(value())),
            other => {
                eprintln!("idsync-faults: unknown argument {other:?}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idsync-faults: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let started = std::time::Instant::now();
    match rt.block_on(run(&o)) {
        Ok(rows) => {
            let table = markdown(&rows);
            println!("{table}");
            println!(
                "{} case(s) in {:.0} s, size {}, every {} write boundary",
                rows.len(),
                started.elapsed().as_secs_f64(),
                o.size,
                o.stride
            );
            if let Some(p) = out
                && let Err(e) = std::fs::write(&p, &table)
            {
                eprintln!("idsync-faults: writing {}: {e}", p.display());
            }
            if rows.iter().all(|r| r.passed) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("idsync-faults: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
