//! The `idsync` command: keeps the identities of data platforms in step with an identity provider.
//!
//! Exit codes: 0 in sync or applied; 1 error; 2 changes pending (plan, dry runs); 3 halted by a
//! safety guard before any write; 4 another run holds the agreement's lease.

mod agreement;
mod config;
mod daemon;
mod draw;
mod metrics;
mod notify;
mod output;
mod progress;
mod run;
mod status;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use config::{Config, Env};
use idsync_engine::{Source, Target, TargetIdentity};
use idsync_model::Kind;
use idsync_state::StateStore;
use output::Printer;
use run::{Agreement, Mode, PlanBundle, ReadCache, RunOptions, exit};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "idsync",
    version,
    about = "Keeps the identities of data platforms in step with your identity provider.",
    after_help = "Exit codes: 0 in sync or applied, 1 error, 2 changes pending, 3 halted by a safety guard, 4 another run holds the lease."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Configuration file [default: ./idsync.toml when it exists; otherwise the environment alone].
    #[arg(long, short, global = true, env = "IDSYNC_CONFIG")]
    config: Option<PathBuf>,
    /// A .env file to read variables from (repeatable) [default: ./.env when it exists].
    #[arg(long = "env-file", global = true)]
    env_files: Vec<PathBuf>,
    /// Also log principals that did not change, and show every member in plans.
    #[arg(long, global = true)]
    verbose: bool,
    /// Log in detail, including requests.
    #[arg(long, global = true)]
    debug: bool,
    /// No progress on standard error (bars on a terminal, a line per interval otherwise).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// When standard error is not a terminal: a progress line this often, for a step that runs
    /// that long (30s, 1m).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_every)]
    progress_every: Duration,
}

fn parse_every(s: &str) -> Result<Duration, String> {
    config::parse_interval(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the configuration (no network) and report every problem at once.
    Validate,
    /// Compute and show the plan; write nothing. Exit 2 when changes are pending.
    Plan {
        #[command(flatten)]
        run: RunArgs,
        /// Save the plan as JSON, for review and `idsync apply PLAN`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Apply a saved plan (refused if the state moved since it was made), or plan and apply.
    Apply {
        /// A plan saved with `idsync plan --out`.
        plan: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Plan and apply.
    Sync {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Sync every agreement now and then on a schedule (`--every 30m` or `[run] every`), until
    /// SIGTERM or Ctrl-C; SIGHUP reloads the configuration. `--once` runs one cycle (a CronJob).
    Run {
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        schedule: daemon::Schedule,
    },
    /// Inspect or reset idsync's state.
    State {
        #[command(subcommand)]
        cmd: StateCmd,
    },
    /// Show the change log: every operation an apply attempted, newest last (kept beside the
    /// state, one object per apply).
    Log {
        /// Only this agreement.
        agreement: Option<String>,
        /// From this day on (YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only records about this principal: its key (`alice@corp.example`), `kind:key`, or its
        /// target id; member changes that name it count.
        #[arg(long)]
        principal: Option<String>,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
        /// Print JSON lines, as stored.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout:
    /// `idsync completions bash > /etc/bash_completion.d/idsync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout: `idsync man > /usr/share/man/man1/idsync.1`.
    Man,
    /// Free a quarantined principal, or resume a halted agreement.
    Agreement {
        #[command(subcommand)]
        cmd: agreement::AgreementCmd,
    },
    /// Read the source's scope and draw its groups and their nesting (search depth on each edge).
    Graph {
        /// Output format.
        #[arg(long, value_enum, default_value = "mermaid")]
        format: draw::Format,
        /// Write the drawing here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A JSON list of group names to draw (added to the configured scope).
        #[arg(long)]
        groups_json_file: Option<PathBuf>,
        /// 1 = only the listed groups; 2 = also groups nested in them; and so on.
        #[arg(long)]
        group_search_depth: Option<u32>,
    },
    /// Run the whole job on an embedded sample directory: full sync, a change, incremental sync.
    #[cfg(feature = "demo")]
    Demo {
        /// Where to keep the demo's state and targets.
        #[arg(long, default_value = ".idsync-demo")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum StateCmd {
    /// Show each agreement's state.
    Show {
        /// Only this agreement.
        agreement: Option<String>,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an agreement's state as plain JSON (a backup, or a move to another store).
    Export {
        /// The agreement.
        agreement: String,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
    },
    /// Replace an agreement's state with an exported one (committed on top of the current
    /// version, so a run in progress is never overwritten silently).
    Import {
        /// The agreement.
        agreement: String,
        /// The exported JSON (or a stored, compressed document).
        file: PathBuf,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// End the lease a run left behind (a process that was killed): says whose lease it was. A run
    /// still holding it stops at its next renewal without saving.
    Unlock {
        /// The agreement.
        agreement: String,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Forget an agreement's state: the next run treats every existing principal as not its own.
    Reset {
        /// The agreement.
        agreement: String,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Clone, Debug, Default)]
struct RunArgs {
    /// Only these targets (repeatable) [default: all].
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Provision on demand: only this principal and its memberships, now (repeatable;
    /// `user:alice@corp.example`, `group:Platform`, or a source or target id after the kind). The
    /// change feed's cursors do not move: the next run still sees every change.
    #[arg(long = "only", value_name = "KIND:KEY")]
    only: Vec<String>,
    /// Read the whole scope instead of the changes since the last run, and observe every target
    /// in full instead of only what the changes touch.
    #[arg(long)]
    full_sync: bool,
    /// Show user, service principal and group changes; apply nothing.
    #[arg(long)]
    dry_run_security_principals: bool,
    /// Apply principal changes; show membership changes without applying them.
    #[arg(long)]
    dry_run_members: bool,
    /// A JSON list of group names to sync (added to the configured scope).
    #[arg(long)]
    groups_json_file: Option<PathBuf>,
    /// 1 = only the listed groups; 2 = also groups nested in them; and so on.
    #[arg(long)]
    group_search_depth: Option<u32>,
    /// Only read the source and summarise it; no target is touched.
    #[arg(long)]
    query_graph_only: bool,
    /// Save what was read from the source as JSON.
    #[arg(long)]
    save_graph_response_json: Option<PathBuf>,
    /// Concurrent requests per target [default: 10, or run.worker_threads].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Approve up to N deletions and deactivations above the configured threshold.
    #[arg(long, default_value_t = 0)]
    approve_deletions: usize,
    /// Allow a plan from an empty source read (decommissioning on purpose).
    #[arg(long)]
    allow_empty_source: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // --debug: idsync's own debug lines (one per request, with its status and time), not the HTTP
    // stack's connection-pool chatter.
    let level = if cli.debug {
        "warn,idsync=debug,idsync_connectors=debug,idsync_engine=debug,idsync_runner=debug,idsync_state=debug"
    } else if cli.verbose {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(run::code_of(&e))
        }
    }
}

/// The configuration file (if any) and the environment (with `.env` files).
fn config_inputs(cli: &Cli) -> Result<(Option<PathBuf>, Env)> {
    let mut env_files = cli.env_files.clone();
    if env_files.is_empty() && Path::new(".env").is_file() {
        env_files.push(PathBuf::from(".env"));
    }
    let env = Env::load(&env_files)?;
    let path = cli
        .config
        .clone()
        .or_else(|| Some(PathBuf::from("idsync.toml")).filter(|p| p.is_file()));
    Ok((path, env))
}

fn load_config(cli: &Cli) -> Result<Config> {
    let (path, env) = config_inputs(cli)?;
    let cfg = config::load(path.as_deref(), &env)?;
    for w in &cfg.warnings {
        eprintln!("warning: {w}");
    }
    Ok(cfg)
}

async fn dispatch(cli: Cli) -> Result<u8> {
    if matches!(
        cli.cmd,
        Cmd::Plan { .. } | Cmd::Sync { .. } | Cmd::Apply { .. } | Cmd::Run { .. }
    ) && let Some(style) = progress::style(cli.quiet, cli.progress_every)
    {
        progress::install(style);
    }
    match &cli.cmd {
        #[cfg(feature = "demo")]
        Cmd::Demo { dir } => Ok(idsync_demo::run(dir, &mut Printer::stdout(cli.verbose)).await?),
        Cmd::Graph {
            format,
            out,
            groups_json_file,
            group_search_depth,
        } => {
            let mut cfg = load_config(&cli)?;
            if let Some(f) = groups_json_file {
                cfg.scope
                    .group_names
                    .extend(config::read_groups_file(f).map_err(|e| anyhow!(e))?);
            }
            if let Some(d) = *group_search_depth {
                if d == 0 {
                    return Err(anyhow!("--group-search-depth must be at least 1"));
                }
                cfg.scope.search_depth = d;
            }
            let read = build_source(&cfg, cfg.worker_threads)?
                .read_full(&cfg.scope)
                .await
                .context("reading the source")?;
            for n in &read.notes {
                eprintln!("note: {n}");
            }
            let picture = draw::draw(&read.snapshot, &read.depth, *format);
            match out {
                Some(path) => std::fs::write(path, picture)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{picture}"),
            }
            Ok(exit::OK)
        }
        Cmd::Validate => {
            let cfg = load_config(&cli)?;
            println!(
                "configuration OK: source {}, {} target(s): {}",
                cfg.source.describe(),
                cfg.agreements.len(),
                cfg.agreements
                    .iter()
                    .map(|a| format!("{} ({})", a.name, a.target.kind()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for a in &cfg.agreements {
                let m = &a.mapping;
                let guests = match &m.guest_user_name {
                    Some(g) => format!("guests {g}"),
                    None => "guests as members".to_owned(),
                };
                println!(
                    "  {}: users keyed by {} ({guests}), groups by {}",
                    a.name, m.user_name, m.group_name
                );
            }
            Ok(exit::OK)
        }
        Cmd::State { cmd } => state_cmd(&cli, cmd).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "idsync", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .context("rendering the manual page")?;
            use std::io::Write;
            std::io::stdout().write_all(&out)?;
            Ok(exit::OK)
        }
        Cmd::Run { run, schedule } => daemon::run(&cli, run, schedule).await,
        Cmd::Log {
            agreement,
            since,
            principal,
            state,
            json,
        } => {
            let (url, opts) = state_location(&cli, state)?;
            let store = store_for(&url, &opts)?;
            if let Some(d) = since
                && !(d.len() == 10
                    && idsync_model::parse_rfc3339(&format!("{d}T00:00:00Z")).is_some())
            {
                anyhow::bail!("--since {d:?} is not a day: use YYYY-MM-DD");
            }
            let objects = store
                .changes(agreement.as_deref(), since.as_deref())
                .await?;
            let (records, unreadable) = idsync_runner::changes::parse(&objects);
            let about = |c: &idsync_runner::changes::Change| match principal {
                None => true,
                Some(p) => {
                    let key_of = |k: &str| {
                        k.split_once(':')
                            .map_or(k.to_owned(), |(_, key)| key.to_owned())
                    };
                    c.principal == *p
                        || key_of(&c.principal) == *p
                        || c.target_id.as_deref() == Some(p.as_str())
                        || c.members.iter().any(|m| m == p || key_of(m) == *p)
                }
            };
            let mut shown = 0;
            for c in records.iter().filter(|c| about(c)) {
                shown += 1;
                if *json {
                    println!("{}", serde_json::to_string(c)?);
                } else {
                    let id = c
                        .target_id
                        .as_deref()
                        .map(|i| format!(" [{i}]"))
                        .unwrap_or_default();
                    let detail = if !c.members.is_empty() {
                        format!(" {}", c.members.join(", "))
                    } else if !c.changed.is_empty() {
                        format!(" ({})", c.changed.join(", "))
                    } else {
                        String::new()
                    };
                    let error = c
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    let undone = if c.rolled_back { " (rolled back)" } else { "" };
                    println!(
                        "{} {} {} {} {}{id}{detail} {}{undone}{error}",
                        c.time, c.agreement, c.run, c.op, c.principal, c.result
                    );
                }
            }
            if !*json && shown == 0 {
                println!(
                    "no changes recorded{}",
                    match principal {
                        Some(p) => format!(" for {p}"),
                        None => String::new(),
                    }
                );
            }
            if unreadable > 0 {
                eprintln!(
                    "warning: {unreadable} line(s) of the change log are not records and were skipped"
                );
            }
            Ok(exit::OK)
        }
        Cmd::Agreement { cmd } => agreement::run(&cli, cmd).await,
        Cmd::Plan { run, out } => {
            let mode = Mode::Plan;
            run_all(&cli, run, mode, out.as_deref()).await
        }
        Cmd::Sync { run } => {
            let mode = mode_of(run);
            run_all(&cli, run, mode, None).await
        }
        Cmd::Apply {
            plan: Some(path),
            run,
        } => apply_saved(&cli, path, run).await,
        Cmd::Apply { plan: None, run } => {
            let mode = mode_of(run);
            run_all(&cli, run, mode, None).await
        }
    }
}

fn mode_of(run: &RunArgs) -> Mode {
    if run.dry_run_security_principals {
        Mode::Plan
    } else if run.dry_run_members {
        Mode::PrincipalsOnly
    } else {
        Mode::Sync
    }
}

/// The configured source, connected, with at most `workers` requests in flight.
fn build_source(cfg: &Config, workers: usize) -> Result<Box<dyn Source>> {
    Ok(cfg.source.build(workers)?)
}

/// A target built from its configuration, with what identifies it and a description for people.
type BuiltTarget = (Box<dyn Target>, TargetIdentity, String);

/// The agreement's target, connected, with at most `workers` requests in flight.
fn build_target(a: &config::AgreementConfig, cfg: &Config, workers: usize) -> Result<BuiltTarget> {
    let target = a.target.build(workers, cfg.source.as_ref())?;
    Ok((target, a.target.identity(), a.target.describe()))
}

/// The runner's view of an agreement, with the target [`build_target`] built for it.
fn agreement_of<'a>(a: &'a config::AgreementConfig, built: &'a BuiltTarget) -> Agreement<'a> {
    Agreement {
        name: &a.name,
        target: built.0.as_ref(),
        identity: built.1.clone(),
        describe: built.2.clone(),
        mapping: &a.mapping,
        policy: &a.policy,
    }
}

/// A state command that replaces or forgets something goes on only with `--yes`.
fn confirmed(yes: bool, what: impl FnOnce() -> String) -> Result<()> {
    if yes {
        Ok(())
    } else {
        Err(anyhow!("{}; re-run with --yes to confirm", what()))
    }
}

/// A flag set on the first Ctrl-C or SIGTERM: no further write starts, those in flight finish,
/// what was applied is saved and the lease released. A second signal quits at once.
fn stop_on_signals() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if signal().await.is_err() {
            return;
        }
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!(
            "stopping: the writes in flight finish, what was applied is saved and the lease released (signal again to quit at once)"
        );
        if signal().await.is_ok() {
            eprintln!(
                "quitting at once: the lease stays until it expires; `idsync state unlock AGREEMENT` ends it"
            );
            std::process::exit(130);
        }
    });
    stop
}

/// The next Ctrl-C or SIGTERM.
async fn signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

fn store_for(url: &str, opts: &idsync_state::StoreOptions) -> Result<Box<dyn StateStore>> {
    Ok(idsync_state::open(url, opts)?)
}

async fn run_all(cli: &Cli, args: &RunArgs, mode: Mode, out: Option<&Path>) -> Result<u8> {
    let mut cfg = load_config(cli)?;
    run_with(cli, &mut cfg, args, mode, out, stop_on_signals(), None).await
}

/// What watches a run besides its printer: the metrics of `idsync run --listen`, the webhook of
/// `[notify]`.
#[derive(Clone, Copy, Default)]
struct Watch<'a> {
    metrics: Option<&'a metrics::Metrics>,
    notifier: Option<&'a notify::Notifier>,
}

/// Runs the agreements ([`run_agreements`]), posting a summary of what failed or halted to the
/// `[notify]` webhook (never in plan mode), and waiting a bounded time for it at the end.
async fn run_with(
    cli: &Cli,
    cfg: &mut Config,
    args: &RunArgs,
    mode: Mode,
    out: Option<&Path>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<&metrics::Metrics>,
) -> Result<u8> {
    let notifier = match &cfg.notify {
        Some(n) if mode != Mode::Plan && !cfg.dry_run => notify::Notifier::start(n),
        _ => None,
    };
    let watch = Watch {
        metrics,
        notifier: notifier.as_ref(),
    };
    let result = run_agreements(cli, cfg, args, mode, out, stop, watch).await;
    if let Some(n) = &notifier {
        if let Err(e) = &result {
            n.post(&notify::Summary::not_started(e, run::code_of(e)));
        }
        n.finish().await;
    }
    result
}

/// One run of every chosen agreement with a loaded configuration, stopping at `stop`.
async fn run_agreements(
    cli: &Cli,
    cfg: &mut Config,
    args: &RunArgs,
    mut mode: Mode,
    out: Option<&Path>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watch: Watch<'_>,
) -> Result<u8> {
    if cfg.dry_run {
        mode = Mode::Plan;
    }
    if let Some(f) = &args.groups_json_file {
        cfg.scope
            .group_names
            .extend(config::read_groups_file(f).map_err(|e| anyhow!(e))?);
    }
    if let Some(d) = args.group_search_depth {
        if d == 0 {
            return Err(anyhow!("--group-search-depth must be at least 1"));
        }
        cfg.scope.search_depth = d;
    }
    // --worker-threads bounds the source's requests too.
    let workers = args.worker_threads.unwrap_or(cfg.worker_threads).max(1);
    let source = build_source(cfg, workers)?;
    let mut printer = Printer::stdout(cli.verbose);

    if args.query_graph_only || args.save_graph_response_json.is_some() {
        let read = source
            .read_full(&cfg.scope)
            .await
            .context("reading the source")?;
        let s = &read.snapshot;
        printer.heading("Source read");
        printer.note(&format!(
            "{} users, {} service principals, {} groups, {} memberships",
            s.users.len(),
            s.service_principals.len(),
            s.groups.len(),
            s.membership_count()
        ));
        for (gid, depth) in &read.depth {
            if let Some(g) = s.groups.get(gid) {
                printer.note(&format!(
                    "group {:?} (search depth {depth}, {} direct members)",
                    g.display_name,
                    g.members.len()
                ));
            }
        }
        for n in &read.notes {
            printer.note(n);
        }
        if let Some(path) = &args.save_graph_response_json {
            let json = serde_json::to_vec_pretty(s)?;
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
            printer.note(&format!("saved to {}", path.display()));
        }
        if args.query_graph_only {
            return Ok(exit::OK);
        }
    }

    for t in &args.targets {
        if !cfg.agreements.iter().any(|a| &a.name == t) {
            return Err(anyhow!("no target named {t:?} in the configuration"));
        }
    }
    let store = store_for(&cfg.state_url, &cfg.state_options)?;
    let opts = RunOptions {
        full_sync: args.full_sync,
        mode,
        approve_deletions: args.approve_deletions,
        allow_empty_source: args.allow_empty_source,
        workers: args.worker_threads.unwrap_or(cfg.worker_threads).max(1),
        lease: Duration::from_secs(cfg.lease_seconds),
        reconcile: (cfg.reconcile_hours > 0)
            .then(|| Duration::from_secs(cfg.reconcile_hours.saturating_mul(3600))),
        now: None,
        stop: Some(stop),
        only: args
            .only
            .iter()
            .map(|o| idsync_engine::ondemand::Only::parse(o))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("--only {e}"))?,
    };
    let mut cache = ReadCache::default();
    let mut worst = exit::OK;
    let mut files = Vec::new();
    let mut failed = Vec::new();
    let chosen: Vec<&config::AgreementConfig> = cfg
        .agreements
        .iter()
        .filter(|a| args.targets.is_empty() || args.targets.contains(&a.name))
        .collect();
    // Agreements are independent: one that fails is reported, and the others still run.
    for a in &chosen {
        if opts.stopped() {
            eprintln!("stopped: target {} was not started", a.name);
            worst = run::worse(worst, exit::ERROR);
            continue;
        }
        let started = std::time::Instant::now();
        let outcome = async {
            let built = build_target(a, cfg, opts.workers)?;
            let agreement = agreement_of(a, &built);
            Ok::<_, anyhow::Error>(
                idsync_runner::run_agreement(
                    &agreement,
                    store.as_ref(),
                    source.as_ref(),
                    &cfg.scope,
                    &mut cache,
                    &opts,
                    &mut printer,
                )
                .await?,
            )
        }
        .await
        .with_context(|| format!("target {}", a.name));
        let error_code = outcome.as_ref().err().map_or(exit::OK, run::code_of);
        if let Some(m) = watch.metrics {
            m.agreement(&a.name, &outcome, started.elapsed(), error_code);
        }
        if let Some(n) = watch.notifier
            && let Some(summary) = notify::Summary::of(&a.name, &outcome, error_code, n.on())
        {
            n.post(&summary);
        }
        match outcome {
            Ok(o) => {
                worst = run::worse(worst, o.code);
                files.extend(o.file);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                worst = run::worse(worst, run::code_of(&e));
                failed.push(a.name.as_str());
            }
        }
    }
    if !failed.is_empty() && chosen.len() > 1 {
        eprintln!(
            "error: {} of {} targets failed ({}); the others ran",
            failed.len(),
            chosen.len(),
            failed.join(", ")
        );
    }
    let Some(path) = out else {
        // The plans and their snapshots, and the store's memory of the layers it last read or
        // wrote (a second copy of the id maps and the snapshot): freed aside, not waited for.
        idsync_runner::drop_aside((files, cache, store));
        return Ok(worst);
    };
    for f in &mut files {
        idsync_runner::saved::seal(f);
    }
    let bundle = PlanBundle {
        format: idsync_model::plan::PLAN_FORMAT,
        plans: files,
    };
    let json = serde_json::to_vec_pretty(&bundle)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    printer.note(&format!(
        "plan saved to {}; apply it with: idsync apply {}",
        path.display(),
        path.display()
    ));
    idsync_runner::drop_aside((bundle, cache, store));
    Ok(worst)
}

async fn apply_saved(cli: &Cli, path: &Path, args: &RunArgs) -> Result<u8> {
    let cfg = load_config(cli)?;
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the plan {}", path.display()))?;
    let bundle: PlanBundle = serde_json::from_slice(idsync_model::without_bom(&bytes))
        .with_context(|| {
            format!(
                "{} is not a plan saved by `idsync plan --out`",
                path.display()
            )
        })?;
    if bundle.format > idsync_model::plan::PLAN_FORMAT {
        return Err(anyhow!(
            "{} was written by a newer idsync (plan format {})",
            path.display(),
            bundle.format
        ));
    }
    let store = store_for(&cfg.state_url, &cfg.state_options)?;
    let opts = RunOptions {
        full_sync: false,
        mode: Mode::Sync,
        approve_deletions: 0,
        allow_empty_source: false,
        workers: args.worker_threads.unwrap_or(cfg.worker_threads).max(1),
        lease: Duration::from_secs(cfg.lease_seconds),
        reconcile: (cfg.reconcile_hours > 0)
            .then(|| Duration::from_secs(cfg.reconcile_hours.saturating_mul(3600))),
        now: None,
        stop: Some(stop_on_signals()),
        // A saved plan made with --only is already restricted (and counts the rest as held back).
        only: Vec::new(),
    };
    if !args.only.is_empty() {
        return Err(anyhow!(
            "--only restricts a plan as it is made: use it with `idsync plan --out` or `idsync sync`, not with a saved plan"
        ));
    }
    let notifier = cfg.notify.as_ref().and_then(notify::Notifier::start);
    let mut printer = Printer::stdout(cli.verbose);
    let mut worst = exit::OK;
    for file in &bundle.plans {
        let name = &file.plan.agreement;
        if opts.stopped() {
            eprintln!("stopped: the plan for target {name} was not applied");
            worst = run::worse(worst, exit::ERROR);
            continue;
        }
        let outcome = async {
            let a = cfg
                .agreements
                .iter()
                .find(|a| &a.name == name)
                .ok_or_else(|| {
                    anyhow!(
                        "the plan is for target {name:?}, which the configuration does not have"
                    )
                })?;
            let built = build_target(a, &cfg, opts.workers)?;
            let agreement = agreement_of(a, &built);
            Ok::<_, anyhow::Error>(
                idsync_runner::apply_saved(file, &agreement, store.as_ref(), &opts, &mut printer)
                    .await?,
            )
        }
        .await
        .with_context(|| format!("target {name}"));
        if let Some(n) = &notifier {
            let error_code = outcome.as_ref().err().map_or(exit::OK, run::code_of);
            if let Some(summary) = notify::Summary::of(name, &outcome, error_code, n.on()) {
                n.post(&summary);
            }
        }
        match outcome {
            Ok(o) => worst = run::worse(worst, o.code),
            Err(e) => {
                eprintln!("error: {e:#}");
                worst = run::worse(worst, run::code_of(&e));
            }
        }
    }
    if let Some(n) = &notifier {
        n.finish().await;
    }
    Ok(worst)
}

/// The state URL from --state or the configuration's [state] table (the rest of the
/// configuration need not be valid here: no source or target secret is needed to look at state);
/// the store settings from that table when the URL is the configured one.
fn state_location(
    cli: &Cli,
    explicit: &Option<String>,
) -> Result<(String, idsync_state::StoreOptions)> {
    let (path, env) = config_inputs(cli)?;
    let (configured, opts) = config::load_state(path.as_deref(), &env)?;
    match explicit {
        Some(u) if *u != configured => Ok((
            u.clone(),
            idsync_state::StoreOptions {
                azure_connection_string: std::env::var("AZURE_STORAGE_CONNECTION_STRING")
                    .ok()
                    .map(idsync_model::Secret::new),
                ..Default::default()
            },
        )),
        _ => Ok((configured, opts)),
    }
}

async fn state_cmd(cli: &Cli, cmd: &StateCmd) -> Result<u8> {
    let url = |explicit: &Option<String>| state_location(cli, explicit);
    match cmd {
        StateCmd::Show {
            agreement,
            state,
            json,
        } => {
            let (u, o) = url(state)?;
            let store = store_for(&u, &o)?;
            for (name, st) in agreement::states(store.as_ref(), agreement).await? {
                let Some(st) = st else {
                    println!("{name}: no state in {}", store.describe());
                    continue;
                };
                if *json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                    continue;
                }
                println!("{name} ({})", store.describe());
                println!("  version {}, {:?}", st.version, st.status);
                for k in Kind::ALL {
                    let owned = st.owned.get(k);
                    let adopted = owned
                        .values()
                        .filter(|o| o.how == idsync_model::Ownership::Adopted)
                        .count();
                    println!(
                        "  {k}s: {} owned ({adopted} adopted), {} linked",
                        owned.len(),
                        st.links.get(k).len()
                    );
                }
                match &st.last_applied {
                    Some(s) => println!(
                        "  last applied: {} users, {} service principals, {} groups, {} memberships",
                        s.users.len(),
                        s.service_principals.len(),
                        s.groups.len(),
                        s.membership_count()
                    ),
                    None => println!("  last applied: nothing yet"),
                }
                for (k, v) in &st.cursors {
                    let short: String = v.chars().take(40).collect();
                    println!(
                        "  cursor {k}: {short}{}",
                        if v.chars().count() > 40 { "…" } else { "" }
                    );
                }
                match &st.trust {
                    Some(t) => {
                        let ago = run::unix_now().saturating_sub(t.observed_at);
                        println!(
                            "  target last observed in full {} h {} min ago; incremental runs read only what changes touch (--full-sync observes all)",
                            ago / 3600,
                            ago % 3600 / 60
                        );
                    }
                    None => println!(
                        "  the next run observes the target in full (no clean, complete apply since the last full observation)"
                    ),
                }
                if let Some(why) = &st.halted {
                    println!(
                        "  HALTED: {}; `idsync agreement resume {name}` once the cause is fixed",
                        output::clean(why)
                    );
                }
                let now = run::unix_now();
                for (key, s) in &st.failing {
                    let key = output::clean(key);
                    let error = output::clean(&s.error);
                    if s.until > now {
                        println!(
                            "  quarantined {key}: failed in {} run(s) in a row (last: {error}); tried again after {}; `idsync agreement release {key}` frees it now",
                            s.runs,
                            idsync_engine::quarantine::utc(s.until)
                        );
                    } else {
                        println!(
                            "  failing {key}: failed in {} run(s) in a row (last: {error})",
                            s.runs
                        );
                    }
                }
                if let Some(j) = &st.journal {
                    if j.rolling_back {
                        println!(
                            "  rollback of apply {} unfinished: {} operation(s) left to undo; the next `idsync sync` undoes them before anything else",
                            j.plan_id,
                            j.undo.len()
                        );
                    } else {
                        println!(
                            "  interrupted apply {}: {} create(s) unconfirmed; the next run recognises them{}",
                            j.plan_id,
                            j.pending_creates.len(),
                            if j.undo.is_empty() {
                                ""
                            } else {
                                " (with on_apply_error = \"rollback\", it undoes the interrupted apply first)"
                            }
                        );
                    }
                }
                agreement::endings(&name, &st);
            }
            Ok(exit::OK)
        }
        StateCmd::Export {
            agreement,
            out,
            state,
        } => {
            let (u, o) = url(state)?;
            let store = store_for(&u, &o)?;
            let Some(st) = store.load(agreement).await? else {
                return Err(anyhow!(
                    "agreement {agreement:?} has no state in {}",
                    store.describe()
                ));
            };
            let json = serde_json::to_string_pretty(&st)?;
            match out {
                Some(p) => std::fs::write(p, json + "\n")
                    .with_context(|| format!("writing {}", p.display()))?,
                None => println!("{json}"),
            }
            Ok(exit::OK)
        }
        StateCmd::Import {
            agreement,
            file,
            state,
            yes,
        } => {
            confirmed(*yes, || {
                format!(
                    "importing replaces what idsync knows about agreement {agreement:?} (ownership, delta tokens)"
                )
            })?;
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let mut st = idsync_state::codec::decode(&bytes, &file.display().to_string())?;
            let (u, o) = url(state)?;
            let store = store_for(&u, &o)?;
            if st.agreement != *agreement {
                eprintln!(
                    "note: the file holds agreement {:?}; it is imported as {agreement:?}",
                    st.agreement
                );
                st.agreement.clone_from(agreement);
            }
            // An imported state may describe another target, or an older one: the next run
            // observes the target in full before it trusts a picture again.
            st.trust = None;
            st.settled = None;
            let v = idsync_runner::with_lease(store.as_ref(), agreement, async {
                st.version = store.load(agreement).await?.map_or(0, |s| s.version);
                store.commit(&st).await
            })
            .await?;
            println!(
                "state of {agreement} imported into {} (version {v})",
                store.describe()
            );
            Ok(exit::OK)
        }
        StateCmd::Unlock {
            agreement,
            state,
            yes,
        } => {
            confirmed(*yes, || {
                format!(
                    "unlocking ends the lease of any run of {agreement:?} still going (it stops without saving): make sure the holder is gone"
                )
            })?;
            let (u, o) = url(state)?;
            let store = store_for(&u, &o)?;
            match store.unlock(agreement).await? {
                Some(l) => {
                    let left = l.until.saturating_sub(run::unix_now());
                    println!(
                        "ended the lease of {agreement} in {}: it was held by {}, for {} more second(s)",
                        store.describe(),
                        l.holder,
                        left
                    );
                }
                None => println!(
                    "{agreement} has no lease in force in {}: nothing to unlock",
                    store.describe()
                ),
            }
            Ok(exit::OK)
        }
        StateCmd::Reset {
            agreement,
            state,
            yes,
        } => {
            confirmed(*yes, || {
                "resetting forgets which principals idsync owns".to_owned()
            })?;
            let (u, o) = url(state)?;
            let store = store_for(&u, &o)?;
            idsync_runner::with_lease(store.as_ref(), agreement, store.delete(agreement)).await?;
            println!("state of {agreement} removed from {}", store.describe());
            Ok(exit::OK)
        }
    }
}
