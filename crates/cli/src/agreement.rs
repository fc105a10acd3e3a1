//! `idsync agreement`: what a person does about an agreement: free a quarantined principal, resume
//! a halted agreement, see where each agreement stands, and end one: finalise (authority handed
//! to the target, the principals stay) or terminate (what it created removed). Each change is
//! made under the agreement's lease, so it never races a run.

use crate::output::{Printer, clean};
use crate::run::{Mode, RunOptions};
use crate::{
    Cli, agreement_of, build_target, exit, load_config, state_location, stop_on_signals, store_for,
};
use anyhow::{Context, Result, anyhow};
use clap::Subcommand;
use idsync_model::{AgreementState, AgreementStatus, Kind};
use idsync_runner::lifecycle;
use idsync_state::StateStore;

/// The `agreement` subcommands.
#[derive(Subcommand)]
pub enum AgreementCmd {
    /// Free a quarantined principal (`user:jane@corp.example`, `group:Data Engineers`,
    /// `servicePrincipal:<app id>`): the next run tries its operations again.
    Release {
        /// The principal, as `idsync state show` lists it.
        key: String,
        /// The agreement [default: the one whose state holds the key].
        #[arg(long)]
        agreement: Option<String>,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
    },
    /// Resume an agreement halted because too large a share of a run's operations failed.
    Resume {
        /// The agreement.
        agreement: String,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
    },
    /// Each agreement's status, what it owns, and what finalising or terminating it would do.
    Status {
        /// One agreement [default: every agreement in the state store].
        agreement: Option<String>,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
    },
    /// Hand authority to the target: the principals stay, now the target's own; idsync forgets
    /// them and later runs of the agreement stop.
    Finalise {
        /// The agreement.
        agreement: String,
        /// Confirm (without it, says what would happen).
        #[arg(long)]
        yes: bool,
        /// State location [default: from the configuration].
        #[arg(long)]
        state: Option<String>,
    },
    /// Remove what the agreement created (its groups, users and service principals, and with them
    /// their memberships) and end it. A plan first: it deletes only with --yes-delete N, N being the
    /// number of deletions the plan shows.
    Terminate {
        /// The agreement (`[targets.NAME]` of the configuration).
        agreement: String,
        /// Confirm the deletions: exactly the number the plan shows.
        #[arg(long, value_name = "N")]
        yes_delete: Option<usize>,
        /// Delete the principals idsync only adopted too (by default they stay, forgotten).
        #[arg(long)]
        include_adopted: bool,
        /// Concurrent requests to the target.
        #[arg(long)]
        worker_threads: Option<usize>,
    },
}

/// Runs an `agreement` subcommand.
pub async fn run(cli: &Cli, cmd: &AgreementCmd) -> Result<u8> {
    match cmd {
        AgreementCmd::Release {
            key,
            agreement,
            state,
        } => {
            let (u, o) = state_location(cli, state)?;
            let store = store_for(&u, &o)?;
            let key = normalise(key)?;
            let names = match agreement {
                Some(a) => vec![a.clone()],
                None => holding(store.as_ref(), &key).await?,
            };
            let name = match names.as_slice() {
                [one] => one.clone(),
                [] => {
                    println!(
                        "no agreement in {} has {} failing or quarantined: nothing to release",
                        store.describe(),
                        clean(&key)
                    );
                    return Ok(exit::OK);
                }
                many => {
                    return Err(anyhow!(
                        "{} is failing in several agreements ({}): say which with --agreement NAME",
                        clean(&key),
                        many.join(", ")
                    ));
                }
            };
            let freed = change(store.as_ref(), &name, |st| {
                st.failing
                    .remove(&key)
                    .or_else(|| st.failing.remove(&key.to_lowercase()))
            })
            .await?;
            match freed {
                Some(s) => println!(
                    "released {} in {name}: it had failed in {} run(s) in a row; the next run tries it again",
                    clean(&key),
                    s.runs
                ),
                None => println!(
                    "{} is not failing or quarantined in {name}: nothing to release",
                    clean(&key)
                ),
            }
            Ok(exit::OK)
        }
        AgreementCmd::Resume { agreement, state } => {
            let (u, o) = state_location(cli, state)?;
            let store = store_for(&u, &o)?;
            match change(store.as_ref(), agreement, |st| st.halted.take()).await? {
                Some(why) => println!(
                    "resumed {agreement} (it was halted: {}); the next run writes again",
                    clean(&why)
                ),
                None => println!("{agreement} is not halted: nothing to resume"),
            }
            Ok(exit::OK)
        }
        AgreementCmd::Status { agreement, state } => {
            let (u, o) = state_location(cli, state)?;
            let store = store_for(&u, &o)?;
            for (name, st) in states(store.as_ref(), agreement).await? {
                match st {
                    None => println!("{name}: no state in {} (it never ran)", store.describe()),
                    Some(st) => print_status(&name, &st),
                }
            }
            Ok(exit::OK)
        }
        AgreementCmd::Finalise {
            agreement,
            yes,
            state,
        } => {
            let (u, o) = state_location(cli, state)?;
            let store = store_for(&u, &o)?;
            if !yes {
                let Some(st) = store.load(agreement).await? else {
                    return Err(anyhow!(
                        "{agreement:?} has no state in {}: it never ran, so there is nothing to finalise",
                        store.describe()
                    ));
                };
                print_status(agreement, &st);
                println!(
                    "nothing was changed; to finalise {agreement}: idsync agreement finalise {agreement} --yes"
                );
                return Ok(exit::PENDING);
            }
            let lease = std::time::Duration::from_secs(600);
            // A target that keeps the agreement on its side (Kanidm) finalises it there too: it
            // is reached through the configuration that names it.
            let cfg = load_config(cli).ok();
            let built = match cfg.as_ref().and_then(|c| {
                c.agreements
                    .iter()
                    .find(|a| a.name == *agreement)
                    .map(|a| (c, a))
            }) {
                Some((c, a)) => Some(build_target(a, c, 1)?),
                None => None,
            };
            let target = built
                .as_ref()
                .map(|b| b.0.as_ref())
                .filter(|t| !t.readable());
            let held = lifecycle::finalise(store.as_ref(), agreement, lease, target).await?;
            println!(
                "finalised {agreement}: idsync gave up its authority over {} principal(s) ({}); they stay in the target, now its own, and later runs of {agreement} stop",
                held.created_total() + held.adopted_total(),
                counts(&held.created, &held.adopted)
            );
            Ok(exit::OK)
        }
        AgreementCmd::Terminate {
            agreement,
            yes_delete,
            include_adopted,
            worker_threads,
        } => {
            terminate(
                cli,
                agreement,
                *yes_delete,
                *include_adopted,
                *worker_threads,
            )
            .await
        }
    }
}

/// `idsync agreement terminate`.
async fn terminate(
    cli: &Cli,
    name: &str,
    confirm: Option<usize>,
    include_adopted: bool,
    workers: Option<usize>,
) -> Result<u8> {
    let cfg = load_config(cli)?;
    let a = cfg
        .agreements
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| anyhow!("no target named {name:?} in the configuration"))?;
    let workers = workers.unwrap_or(cfg.worker_threads).max(1);
    let built = build_target(a, &cfg, workers)?;
    let agreement = agreement_of(a, &built);
    let store = store_for(&cfg.state_url, &cfg.state_options)?;
    let opts = RunOptions {
        full_sync: true,
        mode: Mode::Sync,
        approve_deletions: 0,
        allow_empty_source: true,
        workers,
        lease: std::time::Duration::from_secs(cfg.lease_seconds),
        reconcile: None,
        now: None,
        stop: Some(stop_on_signals()),
        only: Vec::new(),
    };
    let mut printer = Printer::stdout(cli.verbose);
    let outcome = lifecycle::terminate(
        &agreement,
        store.as_ref(),
        &opts,
        lifecycle::Terminate {
            include_adopted,
            confirm,
        },
        &mut printer,
    )
    .await
    .with_context(|| format!("terminating {name}"))?;
    Ok(outcome.code)
}

/// "2 users, 1 group (1 adopted)".
fn counts(created: &[usize; 3], adopted: &[usize; 3]) -> String {
    let names = [
        ("user", "users"),
        ("service principal", "service principals"),
        ("group", "groups"),
    ];
    let parts: Vec<String> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| created[*i] + adopted[*i] > 0)
        .map(|(i, (one, many))| {
            let n = created[i] + adopted[i];
            let noun = if n == 1 { one } else { many };
            if adopted[i] > 0 {
                format!("{n} {noun} ({} adopted)", adopted[i])
            } else {
                format!("{n} {noun}")
            }
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// One agreement's status and what each ending would do.
fn print_status(name: &str, st: &AgreementState) {
    let held = lifecycle::Holdings::of(st);
    let status = match st.status {
        AgreementStatus::Active if st.halted.is_some() => "active, halted",
        AgreementStatus::Active => "active",
        AgreementStatus::Finalised => "finalised",
        AgreementStatus::Terminated => "terminated",
    };
    println!("{name}: {status} (state version {})", st.version);
    println!("  owns: {}", counts(&held.created, &held.adopted));
    if let Some(why) = &st.halted {
        println!(
            "  halted: {} (`idsync agreement resume {name}`)",
            clean(why)
        );
    }
    let quarantined = st
        .failing
        .values()
        .filter(|f| f.until > idsync_runner::unix_now())
        .count();
    if quarantined > 0 {
        println!("  quarantined: {quarantined} principal(s) (`idsync state show` lists them)");
    }
    if st.journal.is_some() {
        println!(
            "  an apply was interrupted: its journal is open; the next `idsync sync --target {name}` finishes it (and must, before the agreement can end)"
        );
    }
    endings(name, st);
}

/// The named agreement's state, or every agreement's in the store (saying so when there is none).
pub async fn states(
    store: &dyn StateStore,
    agreement: &Option<String>,
) -> Result<Vec<(String, Option<AgreementState>)>> {
    let names = match agreement {
        Some(a) => vec![a.clone()],
        None => store.list().await?,
    };
    if names.is_empty() {
        println!("no agreement has state in {} yet", store.describe());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let st = store.load(&name).await?;
        out.push((name, st));
    }
    Ok(out)
}

/// What finalising and terminating the agreement would do (or that it has ended).
pub fn endings(name: &str, st: &AgreementState) {
    let held = lifecycle::Holdings::of(st);
    if st.status != AgreementStatus::Active {
        println!(
            "  later runs of {name} stop; `idsync state reset {name} --yes` starts a new agreement"
        );
        return;
    }
    let total = held.created_total() + held.adopted_total();
    println!(
        "  finalise would: hand the {total} principal(s) over to the target (they stay; idsync forgets them)"
    );
    println!(
        "  terminate would: delete the {} principal(s) it created{}, after a plan and --yes-delete N",
        held.created_total(),
        match held.adopted_total() {
            0 => String::new(),
            n =>
                format!("; the {n} it adopted stay, forgotten (--include-adopted deletes them too)"),
        }
    );
}

/// `kind:key` with the kind spelled as the state spells it.
fn normalise(key: &str) -> Result<String> {
    let (kind, rest) = key
        .split_once(':')
        .and_then(|(k, v)| Some((Kind::parse(k)?, v)))
        .filter(|(_, v)| !v.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "{:?} is not a principal key: write KIND:KEY, as `idsync state show` lists it (user:jane@corp.example, group:Data Engineers, servicePrincipal:<app id>)",
                clean(key)
            )
        })?;
    Ok(format!("{}:{rest}", kind.as_str()))
}

/// The agreements whose state has `key` failing; a case-insensitive target folds the key, so
/// the key is also looked for in lower case.
async fn holding(store: &dyn StateStore, key: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for name in store.list().await? {
        if let Some(st) = store.load(&name).await?
            && (st.failing.contains_key(key) || st.failing.contains_key(&key.to_lowercase()))
        {
            names.push(name);
        }
    }
    Ok(names)
}

/// Loads the agreement's state under its lease, changes it, and commits it when `f` changed
/// something (returns `Some`).
async fn change<T>(
    store: &dyn StateStore,
    agreement: &str,
    f: impl FnOnce(&mut AgreementState) -> Option<T>,
) -> Result<Option<T>> {
    let out = idsync_runner::with_lease(store, agreement, async {
        let Some(mut st) = store.load(agreement).await? else {
            return Err(anyhow!(
                "{agreement:?} has no state in {}: check the name (`idsync state show` lists them)",
                store.describe()
            ));
        };
        let out = f(&mut st);
        if out.is_some() {
            store.commit(&st).await?;
        }
        Ok(out)
    })
    .await?;
    Ok(out)
}
