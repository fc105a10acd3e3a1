//! The benchmark driver (issue #7): a generated tenant in the Graph emulator, the Databricks and
//! lakeFS emulators with a set latency per request, and the real `idsync` binary run against
//! them — a full initial sync into each target, two runs with no change, then 100 random changes and
//! an incremental run. Each run records wall time, requests by endpoint and method, writes, and the
//! idsync process's peak RSS. `idsync-bench` prints the table and writes JSON; the CLI's tests run
//! the small size as a smoke test (request counts and zero writes, never a timing).
//!
//! To see where a run's time goes: `IDSYNC_BENCH_DEBUG=1` runs idsync with `--debug` (`last`:
//! only the last run), and `IDSYNC_BENCH_OUTPUT=DIR` keeps what each run printed as `DIR/N.log`
//! (N counts the runs).

use crate::databricks::{ACCOUNT_ID, TOKEN};
use crate::generator::{Params, generate};
use crate::infra::{Faults, Infra, ThrottleConfig};
use crate::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::tenant::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, Tenant};
use crate::{Databricks, Graph, Lakefs};
use idsync_model::{Kind, Member};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// `small`, `medium`, `large` or `xlarge`.
    pub size: String,
    /// The idsync binary.
    pub idsync: PathBuf,
    /// Added to every emulator request.
    pub latency_ms: u64,
    /// Added to every emulator request of the first syncs, which only set up the runs after them
    /// (`None`: `latency_ms`). At `xlarge` a first sync at 20 ms takes most of an hour.
    pub setup_latency_ms: Option<u64>,
    /// How many times the runs after the first syncs (no change, no change again, the changes
    /// and the incremental run) are repeated: three rounds give three measures of each for one
    /// first sync.
    pub rounds: usize,
    /// Source changes between the no-change run and the incremental run.
    pub changes: usize,
    /// Concurrent requests per target (`--worker-threads`).
    pub workers: usize,
    /// The targets to sync: `databricks`, `lakefs` or both (lakeFS adds one member per request,
    /// so its first sync of the large tenant takes about an hour at 20 ms).
    pub targets: Vec<String>,
    /// Throttle the emulators as the services do ([`rate_limits`]).
    pub rate_limits: bool,
    /// Select the groups by a groups file naming every group of the tenant (the Databricks
    /// script's way) instead of `group_filter = "*"`: the same scope, read by name.
    pub groups_file: bool,
}

/// The rate limits `--rate-limits` puts on the emulators, as (emulator, requests governed,
/// bucket size, per second). Graph: the directory quota of a tenant with more than 500 users,
/// 8,000 per 10 s (Microsoft's throttling limits; counted here per request where Graph counts
/// resource units of 1 to 3 per request, so this is the lenient end). Databricks account SCIM: per
/// method, GET one 20/s, list 240/s, PATCH 2/s, POST/PUT/DELETE 5/s (a third-party summary of
/// Databricks' resource limits page, unverified: docs/apis/databricks-scim.md). lakeFS: none
/// (its auth API does not throttle).
pub fn rate_limits() -> Vec<(&'static str, Vec<String>, f64, f64)> {
    let one = "GET /api/2.0/accounts/{acct}/scim/v2/{type}/{id}".to_owned();
    vec![
        ("graph", vec![], 8000.0, 800.0),
        ("databricks", vec![one], 20.0, 20.0),
        ("databricks", vec!["GET".into()], 240.0, 240.0),
        ("databricks", vec!["PATCH".into()], 2.0, 2.0),
        (
            "databricks",
            vec!["POST".into(), "PUT".into(), "DELETE".into()],
            5.0,
            5.0,
        ),
    ]
}

/// The least time any client needs for `requests` under [`rate_limits`]: for each bucket, the
/// requests it governs beyond its burst at its rate; the slowest bucket bounds the run.
pub fn limit_floor(requests: &BTreeMap<String, BTreeMap<String, u64>>) -> f64 {
    let mut worst = 0f64;
    let limits = rate_limits();
    for (emulator, counts) in requests {
        let mine: Vec<&(&str, Vec<String>, f64, f64)> =
            limits.iter().filter(|l| l.0 == emulator).collect();
        let mut per_bucket = vec![0u64; mine.len()];
        for (request, n) in counts {
            // A request answered 429 took no token: only the others count against the limits.
            let n = if request.starts_with("429 ") {
                continue;
            } else {
                n - counts.get(&format!("429 {request}")).copied().unwrap_or(0)
            };
            let method = request.split(' ').next().unwrap_or_default();
            if let Some(i) = mine.iter().position(|(_, m, _, _)| {
                m.is_empty() || m.iter().any(|x| x == request || x == method)
            }) {
                per_bucket[i] += n;
            }
        }
        for (n, (_, _, burst, rate)) in per_bucket.iter().zip(&mine) {
            worst = worst.max((*n as f64 - burst).max(0.0) / rate);
        }
    }
    worst
}

/// One run of idsync.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// What the run was.
    pub name: String,
    /// Its exit code.
    pub exit: i32,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident memory of the idsync process (MiB), sampled every 20 ms.
    pub peak_rss_mib: f64,
    /// Requests by emulator, then `METHOD /route`.
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests other than GET, by emulator.
    pub writes: BTreeMap<String, u64>,
    /// With rate limits: the least time any client needs for these requests ([`limit_floor`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_floor_seconds: Option<f64>,
    /// The fewest Databricks writes that take the account from what it held before the run to
    /// what it holds after ([`write_floor`]), when Databricks is a target. `writes` counts
    /// requests, so `writes["databricks"]` ÷ this is how close the run came to its floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub databricks_write_floor: Option<u64>,
}

/// What the Databricks account holds, reduced to what writes change: a hash of each resource's
/// attributes (without its members and `meta`), and each group's member ids.
#[derive(Default)]
pub struct Picture {
    attrs: std::collections::HashMap<(crate::databricks::Type, String), u64>,
    members: std::collections::HashMap<String, std::collections::HashSet<String>>,
}

/// The account's [`Picture`] now.
pub fn picture(st: &crate::databricks::DatabricksState) -> Picture {
    use std::hash::{Hash, Hasher};
    let mut p = Picture::default();
    for (t, resources) in st.data().iter() {
        for (id, v) in resources {
            let mut attrs = v.clone();
            let members = attrs
                .as_object_mut()
                .and_then(|o| {
                    o.remove("meta");
                    o.remove("members")
                })
                .and_then(|m| m.as_array().cloned())
                .unwrap_or_default();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            attrs.to_string().hash(&mut h);
            p.attrs.insert((*t, id.clone()), h.finish());
            if *t == crate::databricks::Type::Groups {
                let ids = members
                    .iter()
                    .filter_map(|m| m["value"].as_str().map(str::to_owned))
                    .collect();
                p.members.insert(id.clone(), ids);
            }
        }
    }
    p
}

/// The fewest writes from `before` to `after` for a client that sends one request per created,
/// changed or deleted resource, and a group's member changes (additions and removals together)
/// in PATCHes of `chunk` members: the floor the benchmark holds idsync's writes to.
pub fn write_floor(before: &Picture, after: &Picture, chunk: u64) -> u64 {
    let mut n = 0u64;
    for (k, h) in &after.attrs {
        if before.attrs.get(k) != Some(h) {
            n += 1;
        }
    }
    n += before
        .attrs
        .keys()
        .filter(|k| !after.attrs.contains_key(k))
        .count() as u64;
    let empty = std::collections::HashSet::new();
    for (g, now) in &after.members {
        let was = before.members.get(g).unwrap_or(&empty);
        let changed = now.difference(was).count() + was.difference(now).count();
        n += (changed as u64).div_ceil(chunk);
    }
    n
}

/// The whole benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The size.
    pub size: String,
    /// Users, service principals, groups and direct memberships of the tenant.
    pub tenant: BTreeMap<String, usize>,
    /// Latency per request (ms).
    pub latency_ms: u64,
    /// Latency per request of the first syncs (ms), when it differs from `latency_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_latency_ms: Option<u64>,
    /// Whether the emulators were throttled ([`rate_limits`]).
    pub rate_limits: bool,
    /// Concurrent requests per target.
    pub workers: usize,
    /// The lower bound of Databricks writes for the first sync: one per principal plus the
    /// member PATCHes at 100 members each.
    pub databricks_write_floor: u64,
    /// What the counts of each run mean, for whoever reads the JSON without this documentation.
    pub legend: BTreeMap<&'static str, &'static str>,
    /// The runs, in order.
    pub runs: Vec<RunResult>,
}

/// The [`Report::legend`].
fn legend() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "requests",
            "HTTP requests each emulator received, by method and route, every retry included; a throttled one is also counted apart as \"429 METHOD route\"",
        ),
        (
            "writes",
            "requests other than GET each emulator received (HTTP requests, not idsync operations: idsync's own summary counts operations and requests apart)",
        ),
        (
            "databricks_write_floor",
            "the fewest Databricks write requests that take the account from what it held before the run to what it held after: one per principal created, changed or deleted, and a group's member additions and removals together, 100 to a PATCH",
        ),
    ])
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs idsync with `args` in `dir`, sampling its peak RSS until it exits.
fn run_idsync(
    idsync: &Path,
    dir: &Path,
    args: &[&str],
) -> std::io::Result<(i32, f64, f64, String)> {
    let start = Instant::now();
    let mut child = std::process::Command::new(idsync)
        .args(args)
        .current_dir(dir)
        .env("ENTRA_CLIENT_SECRET_VALUE", DEFAULT_CLIENT_SECRET)
        .env("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .env("DATABRICKS_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0u64;
    // Drain each pipe on a thread of its own, so the child never blocks on a full one (with
    // --debug, stderr fills long before stdout ends).
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        if let Some(k) = peak_rss_kib(pid) {
            peak = peak.max(k);
        }
        if let Some(s) = child.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = out.join().unwrap_or_default();
    text.push_str(&err.join().unwrap_or_default());
    Ok((
        status.code().unwrap_or(-1),
        start.elapsed().as_secs_f64(),
        peak as f64 / 1024.0,
        text,
    ))
}

/// Requests that write, by emulator: all but reads and token requests, less those answered 429
/// (counted apart as `429 METHOD /route`), which wrote nothing.
fn writes(counts: &BTreeMap<String, u64>) -> u64 {
    let writes =
        |r: &str| !r.starts_with("GET ") && !r.starts_with("BATCH ") && !r.contains("/oauth2/");
    let (sent, throttled) = counts.iter().fold((0, 0), |(sent, throttled), (k, v)| {
        match k.strip_prefix("429 ") {
            Some(r) if writes(r) => (sent, throttled + v),
            None if writes(k) => (sent + v, throttled),
            _ => (sent, throttled),
        }
    });
    sent - throttled
}

/// 100 changes an administrator makes: members added and removed, groups renamed, users disabled,
/// renamed and deleted. Deterministic.
pub fn change_tenant(t: &mut Tenant, n: usize) {
    let users: Vec<String> = t.users.keys().cloned().collect();
    let groups: Vec<String> = t.groups.keys().cloned().collect();
    if users.is_empty() || groups.is_empty() {
        return;
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut pick = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut made = 0;
    let mut tries = 0;
    while made < n && tries < n * 20 {
        tries += 1;
        let (u, g) = (
            users[pick(users.len())].clone(),
            groups[pick(groups.len())].clone(),
        );
        let changed = match made % 5 {
            0 => t.add_member(&g, Member::user(u.clone())),
            1 => {
                let m = t.groups[&g]
                    .members
                    .iter()
                    .find(|m| m.kind == Kind::User)
                    .cloned();
                m.is_some_and(|m| t.remove_member(&g, &m))
            }
            2 => {
                let mut grp = t.groups[&g].clone();
                grp.display_name = format!("{} (renamed {made})", grp.display_name);
                t.upsert_group(grp);
                true
            }
            3 => match t.users.get(&u).cloned() {
                Some(mut user) if user.active => {
                    user.active = false;
                    t.upsert_user(user);
                    true
                }
                _ => false,
            },
            _ if made % 10 == 4 => t.remove(Kind::User, &u),
            _ => match t.users.get(&u).cloned() {
                Some(mut user) => {
                    user.display_name = format!("{} (renamed)", user.display_name);
                    t.upsert_user(user);
                    true
                }
                None => false,
            },
        };
        if changed {
            made += 1;
        }
    }
}

/// Runs the benchmark.
pub async fn run(o: &Options) -> Result<Report, String> {
    let params = Params::preset(&o.size).ok_or_else(|| format!("unknown size {:?}", o.size))?;
    if let Some(t) = o
        .targets
        .iter()
        .find(|t| *t != "databricks" && *t != "lakefs")
    {
        return Err(format!("unknown target {t:?}: databricks or lakefs"));
    }
    // The config table of a target, when it is benchmarked.
    let table = |kind: &str, settings: &str| {
        if o.targets.iter().any(|t| t == kind) {
            format!("\n[targets.{kind}]\nkind = \"{kind}\"\n{settings}\n")
        } else {
            String::new()
        }
    };
    let idsync = std::fs::canonicalize(&o.idsync).map_err(|e| {
        format!(
            "the idsync binary {}: {e} (build it: cargo build --release -p idsync)",
            o.idsync.display()
        )
    })?;
    let snap = generate(&params);
    let memberships = snap.membership_count();
    let chunk = 100u64;
    let floor = (snap.users.len() + snap.service_principals.len() + snap.groups.len()) as u64
        + snap
            .groups
            .values()
            .map(|g| (g.members.len() as u64).div_ceil(chunk))
            .sum::<u64>();
    let tenant_counts = BTreeMap::from([
        ("users".to_owned(), snap.users.len()),
        (
            "servicePrincipals".to_owned(),
            snap.service_principals.len(),
        ),
        ("groups".to_owned(), snap.groups.len()),
        ("memberships".to_owned(), memberships),
    ]);
    let io = |e: std::io::Error| e.to_string();
    let graph = Graph::start(Tenant::new(snap)).await.map_err(io)?;
    let dbx = Databricks::start_on(0, None).await.map_err(io)?;
    let lake = Lakefs::start_on(0).await.map_err(io)?;
    let infras: [(&str, &Infra); 3] = [
        ("graph", &graph.state.infra),
        ("databricks", &dbx.state.infra),
        ("lakefs", &lake.state.infra),
    ];
    // The latency is set before each run (the first syncs may have their own).
    for (name, i) in &infras {
        if o.rate_limits {
            i.set_throttles(
                rate_limits()
                    .into_iter()
                    .filter(|l| l.0 == *name)
                    .map(|(_, m, capacity, per_second)| {
                        let t = ThrottleConfig {
                            capacity,
                            per_second,
                        };
                        (m, t)
                    })
                    .collect(),
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("idsync-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let tenant = graph.state.tenant().tenant_id.clone();
    let config = format!(
        r#"[state]
url = "state"

[source]
kind = "entra"
tenant_id = "{tenant}"
client_id = "{DEFAULT_CLIENT_ID}"
authority_host = "{g}"
graph_url = "{g}"

[scope]
{scope_line}
search_depth = 3

[run]
worker_threads = {w}

{dbx_table}{lake_table}"#,
        g = graph.server.base_url,
        w = o.workers,
        scope_line = if o.groups_file {
            "groups_file = \"groups_to_sync.json\""
        } else {
            "group_filter = \"*\""
        },
        dbx_table = table(
            "databricks",
            &format!(
                "host = \"{}\"\naccount_id = \"{ACCOUNT_ID}\"",
                dbx.server.base_url
            )
        ),
        lake_table = table(
            "lakefs",
            &format!(
                "endpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"",
                lake.server.base_url
            )
        ),
    );
    std::fs::write(dir.join("idsync.toml"), config).map_err(io)?;
    if o.groups_file {
        let names: Vec<String> = graph
            .state
            .tenant()
            .groups
            .values()
            .map(|g| g.display_name.clone())
            .collect();
        let json = serde_json::to_vec(&names).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("groups_to_sync.json"), json).map_err(io)?;
    }

    let mut runs = Vec::new();
    let all = if o.targets.len() > 1 {
        "both"
    } else {
        "one target"
    };
    let mut steps: Vec<(String, Vec<&str>)> = Vec::new();
    for (t, name) in [("databricks", "Databricks"), ("lakefs", "lakeFS")] {
        if o.targets.iter().any(|x| x == t) {
            steps.push((
                format!("full sync into {name}"),
                vec!["sync", "--target", t],
            ));
        }
    }
    let setup = steps.len();
    for round in 1..=o.rounds.max(1) {
        let tag = if o.rounds > 1 {
            format!(", round {round}")
        } else {
            String::new()
        };
        steps.push((format!("no change ({all}{tag})"), vec!["sync"]));
        // The first run without change plans the tenant and records that it found nothing to
        // do; the second takes that record instead of planning again (issue #17).
        steps.push((format!("no change again ({all}{tag})"), vec!["sync"]));
        steps.push(("changes".into(), vec![]));
        steps.push((format!("incremental ({all}{tag})"), vec!["sync"]));
    }
    let setup_latency = o.setup_latency_ms.filter(|l| *l != o.latency_ms);
    let last = steps.len() - 1;
    for (step, (name, args)) in steps.into_iter().enumerate() {
        if args.is_empty() {
            change_tenant(&mut graph.state.tenant_mut(), o.changes);
            continue;
        }
        let latency_ms = match setup_latency {
            Some(l) if step < setup => l,
            _ => o.latency_ms,
        };
        for (_, i) in &infras {
            i.accounting.reset();
            i.set_faults(Faults {
                latency_ms,
                ..Faults::default()
            });
        }
        let with_databricks = o.targets.iter().any(|t| t == "databricks");
        let before = with_databricks.then(|| picture(&dbx.state));
        let idsync = idsync.clone();
        let d = dir.clone();
        // IDSYNC_BENCH_DEBUG=1 runs idsync with --debug (its timeline of requests and steps);
        // IDSYNC_BENCH_DEBUG=last only the last run (a first sync's timeline at xlarge is large).
        let debug = match std::env::var("IDSYNC_BENCH_DEBUG") {
            Ok(v) if v == "last" => step == last,
            Ok(_) => true,
            Err(_) => false,
        };
        let args: Vec<String> = debug
            .then(|| "--debug".to_owned())
            .into_iter()
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect();
        let (exit, seconds, rss, text) = tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run_idsync(&idsync, &d, &a)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(io)?;
        if exit != 0 {
            return Err(format!("{name}: idsync exited {exit}:\n{text}"));
        }
        // IDSYNC_BENCH_OUTPUT=DIR keeps what each run printed, as DIR/N.log.
        if let Some(out) = std::env::var_os("IDSYNC_BENCH_OUTPUT") {
            let file = Path::new(&out).join(format!("{}.log", runs.len() + 1));
            std::fs::write(&file, &text).map_err(io)?;
        }
        let mut requests = BTreeMap::new();
        let mut w = BTreeMap::new();
        for (n, i) in &infras {
            let c = i.accounting.snapshot();
            w.insert((*n).to_owned(), writes(&c));
            requests.insert((*n).to_owned(), c);
        }
        let limit_floor_seconds = o.rate_limits.then(|| limit_floor(&requests));
        let databricks_write_floor = before.map(|b| write_floor(&b, &picture(&dbx.state), chunk));
        runs.push(RunResult {
            limit_floor_seconds,
            databricks_write_floor,
            name: name.clone(),
            exit,
            seconds,
            peak_rss_mib: rss,
            requests,
            writes: w,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        size: o.size.clone(),
        tenant: tenant_counts,
        latency_ms: o.latency_ms,
        setup_latency_ms: setup_latency,
        rate_limits: o.rate_limits,
        workers: o.workers,
        databricks_write_floor: floor,
        legend: legend(),
        runs,
    })
}

/// The report as a Markdown table.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "### {} ({} users, {} service principals, {} groups, {} memberships; {} ms per request{}; {} workers; {})\n\n| run | wall | peak RSS | Graph requests | Databricks requests (writes, floor) | lakeFS requests (writes) |{}\n|---|---|---|---|---|---|{}\n",
        r.size,
        r.tenant["users"],
        r.tenant["servicePrincipals"],
        r.tenant["groups"],
        r.tenant["memberships"],
        r.latency_ms,
        r.setup_latency_ms.map_or(String::new(), |l| format!(
            " ({l} ms in the first syncs, which set up the runs after them)"
        )),
        r.workers,
        if r.rate_limits {
            "rate limits on"
        } else {
            "no rate limit"
        },
        if r.rate_limits {
            " floor the limits impose | wall ÷ floor |"
        } else {
            ""
        },
        if r.rate_limits { "---|---|" } else { "" },
    );
    for run in &r.runs {
        // Requests sent (a throttled one is also counted apart, as `429 ...`).
        let total = |n: &str| {
            run.requests.get(n).map_or(0, |c| {
                c.iter()
                    .filter(|(k, _)| !k.starts_with("429 "))
                    .map(|(_, v)| v)
                    .sum::<u64>()
            })
        };
        let graph_http: u64 = run.requests.get("graph").map_or(0, |c| {
            c.iter()
                .filter(|(k, _)| !k.starts_with("BATCH ") && !k.starts_with("429 "))
                .map(|(_, v)| v)
                .sum()
        });
        let floor = run.limit_floor_seconds.map_or(String::new(), |f| {
            if f < 1.0 {
                format!(" {f:.1} s | — |")
            } else {
                format!(" {f:.1} s | {:.2} |", run.seconds / f)
            }
        });
        s.push_str(&format!(
            "| {} | {:.1} s | {:.0} MiB | {} | {} ({}, {}) | {} ({}) |{floor}\n",
            run.name,
            run.seconds,
            run.peak_rss_mib,
            graph_http,
            total("databricks"),
            run.writes.get("databricks").copied().unwrap_or(0),
            run.databricks_write_floor
                .map_or_else(|| "—".to_owned(), |f| f.to_string()),
            total("lakefs"),
            run.writes.get("lakefs").copied().unwrap_or(0),
        ));
    }
    s.push_str(&format!(
        "\nDatabricks writes on the first sync: {} against a floor of {} (one per principal, members at 100 per PATCH).\n",
        r.runs
            .first()
            .and_then(|x| x.writes.get("databricks"))
            .copied()
            .unwrap_or(0),
        r.databricks_write_floor
    ));
    s
}
