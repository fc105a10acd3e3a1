//! `idsync agreement`: what a person does about an agreement idsync stopped on its own: free a
//! quarantined principal, resume a halted agreement. Both change the state under the agreement's
//! lease, so they never race a run.

use crate::output::clean;
use crate::{Cli, exit, state_location, store_for};
use anyhow::{Result, anyhow};
use clap::Subcommand;
use idsync_model::{AgreementState, Kind};
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
    }
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
