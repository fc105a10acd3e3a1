//! `idsync run`: every agreement synced on a schedule, as a long-running service (a Deployment, a
//! VM's service manager) or once (`--once`, for a CronJob or a scheduled CI job).
//!
//! - A cycle is a `sync` of every agreement: one agreement's failure is reported and does not stop
//!   the others, nor the next cycles. The next cycle starts `every` after this one started (or at
//!   once if it took longer), plus a random jitter so that several deployments do not all call
//!   Graph at the same second.
//! - SIGTERM or Ctrl-C: between cycles, exit at once; during one, the writes in flight finish,
//!   what was applied is committed, the leases are released, then the process exits. A second
//!   signal quits at once.
//! - SIGHUP: the configuration is read again before the next cycle; an invalid one is reported and
//!   the one in force is kept.

use crate::config::{self, Config};
use crate::run::{Mode, exit};
use crate::{Cli, RunArgs, load_config, run_with, stop_on_signals};
use anyhow::{Result, anyhow};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When `idsync run` runs.
#[derive(clap::Args, Debug)]
pub struct Schedule {
    /// How often: 90s, 30m, 1h, 1h30m [default: `[run] every`].
    #[arg(long)]
    every: Option<String>,
    /// Run one cycle and exit with its code (a Kubernetes CronJob, a scheduled CI job).
    #[arg(long)]
    once: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address (127.0.0.1:9464).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Random delay added to each wait, as a percentage of the interval.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=50))]
    jitter: u8,
}

/// Up to `percent` of `every`, from the clock's nanoseconds (no need for a stronger source).
fn jitter(every: Duration, percent: u8) -> Duration {
    if percent == 0 {
        return Duration::ZERO;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed = nanos.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let max = every.as_millis() as u64 * u64::from(percent) / 100;
    Duration::from_millis(if max == 0 { 0 } else { mixed % (max + 1) })
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn clock() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss, _) = idsync_model::civil(now);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// A flag set by SIGHUP.
fn reload_on_hangup() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        let f = flag.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    f.store(true, Ordering::SeqCst);
                }
            });
        }
    }
    flag
}

/// Waits `d`, or less if a stop or a reload is asked for: whether to go on.
async fn wait(d: Duration, stop: &AtomicBool, reload: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        if reload.load(Ordering::SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
    }
    !stop.load(Ordering::SeqCst)
}

/// The configuration read again: the new one, or the old one kept with the problems reported.
fn reload(cli: &Cli, cfg: Config) -> Config {
    match load_config(cli) {
        Ok(new) => {
            eprintln!("{}: configuration reloaded", clock());
            new
        }
        Err(e) => {
            eprintln!(
                "{}: configuration not reloaded, the one in force is kept: {e:#}",
                clock()
            );
            cfg
        }
    }
}

/// `idsync run`.
pub async fn run(cli: &Cli, args: &RunArgs, schedule: &Schedule) -> Result<u8> {
    if !args.only.is_empty() && !schedule.once {
        return Err(anyhow!(
            "--only is provisioning on demand, once: use `idsync sync --only` (or `idsync run --once --only`)"
        ));
    }
    let mut cfg = load_config(cli)?;
    let from_flag = schedule
        .every
        .as_deref()
        .map(config::parse_interval)
        .transpose()
        .map_err(|e| anyhow!("--every: {e}"))?;
    let stop = stop_on_signals();
    let hangup = reload_on_hangup();
    let metrics = match schedule.listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow!("--listen {addr}: {e}"))?;
            let m = crate::metrics::Metrics::new();
            eprintln!(
                "{}: serving /metrics, /healthz and /readyz on http://{}",
                clock(),
                listener.local_addr().unwrap_or(addr)
            );
            crate::metrics::serve(listener, m.clone());
            Some(m)
        }
    };
    if schedule.once {
        return run_with(
            cli,
            &mut cfg,
            args,
            Mode::Sync,
            None,
            stop,
            metrics.as_deref(),
        )
        .await;
    }
    let mut cycle: u64 = 0;
    loop {
        let every = from_flag.or(cfg.every).ok_or_else(|| {
            anyhow!("no schedule: pass --every 30m or set [run] every = \"30m\" (or --once for a single run)")
        })?;
        cycle += 1;
        let started = Instant::now();
        eprintln!("{}: cycle {cycle} starts", clock());
        if let Some(m) = &metrics {
            m.cycle();
            // Ready: the configuration in force is valid, and the state store answers.
            let store_ok = match idsync_state::open(&cfg.state_url, &cfg.state_options) {
                Ok(store) => {
                    let ok = store.list().await.is_ok();
                    m.board.configure(
                        store,
                        &cfg.state_url,
                        cfg.agreements.iter().map(|a| a.name.clone()).collect(),
                    );
                    ok
                }
                Err(_) => false,
            };
            m.ready.store(store_ok, Ordering::SeqCst);
        }
        let run = run_with(
            cli,
            &mut cfg,
            args,
            Mode::Sync,
            None,
            stop.clone(),
            metrics.as_deref(),
        );
        let code = match run.await {
            Ok(c) => c,
            Err(e) => {
                // A cycle that could not start (the source unreachable, the state store
                // refusing) is reported; the next one tries again.
                eprintln!("error: {e:#}");
                crate::run::code_of(&e)
            }
        };
        if stop.load(Ordering::SeqCst) {
            eprintln!("{}: stopped after cycle {cycle}", clock());
            // Stopped in the middle of a cycle: what was left is done by the next run.
            return Ok(if code == exit::OK {
                exit::OK
            } else {
                exit::ERROR
            });
        }
        let next = every.saturating_sub(started.elapsed()) + jitter(every, schedule.jitter);
        if let Some(m) = &metrics {
            m.board
                .next_cycle(idsync_runner::unix_now() + next.as_secs());
        }
        eprintln!(
            "{}: cycle {cycle} ended with exit code {code}; the next starts in {}",
            clock(),
            human(next)
        );
        if !wait(next, &stop, &hangup).await {
            eprintln!("{}: stopped", clock());
            return Ok(exit::OK);
        }
        if hangup.swap(false, Ordering::SeqCst) {
            cfg = reload(cli, cfg);
            // A reload does not start a cycle early: wait what is left of the interval.
            let left = every.saturating_sub(started.elapsed());
            if !wait(left, &stop, &hangup).await {
                eprintln!("{}: stopped", clock());
                return Ok(exit::OK);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_jitter() {
        let p = |s: &str| config::parse_interval(s);
        assert_eq!(p("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(p("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(p("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "30", "0s", "m", "1w", "1.5h", "-1m"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(600), 10);
            assert!(j <= Duration::from_secs(60), "{j:?}");
        }
        assert_eq!(jitter(Duration::from_secs(600), 0), Duration::ZERO);
        assert_eq!(human(Duration::from_secs(95)), "1m35s");
    }
}
