//! The fault suite (issue #15): the real `idsync` binary against the emulators, killed with
//! SIGKILL at exact write boundaries (the emulators count writes and can stall every write after
//! the N-th, so the process dies with exactly N made), in the middle of a rollback, through 5xx
//! and 429 storms, HTML error pages, truncated bodies and dropped connections, raced by two and
//! three concurrent runs on every state store, with its lease taken over mid-apply and its disk
//! full at the final commit. Every case ends the same way: after the fault, `idsync sync` is run
//! until it succeeds (after `idsync state unlock` where a killed run left its lease), then once
//! more, which must write nothing; the target must then hold exactly what a clean run produces,
//! nothing twice, and `idsync state show` must read the state. `scripts/faults.sh` runs it;
//! RELIABILITY.md holds the table it prints.

use crate::databricks::{ACCOUNT_ID, TOKEN, Type};
use crate::generator::{Params, generate};
use crate::infra::{Faults, Infra, ThrottleConfig};
use crate::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::{Databricks, Gcs, Lakefs};
use idsync_model::{Directory, Snapshot};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The idsync binary.
    pub idsync: PathBuf,
    /// `ci` (a plan of about a hundred writes) or `full` (a plan of over 1,000 operations).
    pub size: String,
    /// Kill at every `stride`-th write boundary (1: every one).
    pub stride: u64,
    /// A moto server (S3) to keep state on too, with its bucket `idsync-state` made.
    pub moto: Option<String>,
    /// An Azurite blob endpoint (`http://127.0.0.1:PORT/devstoreaccount1`) with a container
    /// `idsync-state`.
    pub azurite: Option<String>,
    /// A PEM file with a private key, for the GCS emulator's service account.
    pub gcs_key: Option<PathBuf>,
    /// Only the cases whose name contains this.
    pub only: Option<String>,
}

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// The case.
    pub case: String,
    /// idsync runs made.
    pub runs: usize,
    /// Faults injected (kills, failed requests, losing racers).
    pub faults: u64,
    /// What happened.
    pub outcome: String,
    /// Principals and memberships of a clean run missing or wrong at the end, summed over the
    /// case's trials (must be 0), and principals there twice.
    pub lost: usize,
    /// Whether every check held.
    pub passed: bool,
}

/// The targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Databricks,
    Lakefs,
    Scim,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Databricks => "Databricks",
            Kind::Lakefs => "lakeFS",
            Kind::Scim => "SCIM",
        }
    }
}

/// A running emulator of one target kind.
enum Emulator {
    Databricks(Databricks),
    Lakefs(Lakefs),
}

impl Emulator {
    async fn start(kind: Kind) -> Result<Emulator, String> {
        let io = |e: std::io::Error| e.to_string();
        Ok(match kind {
            Kind::Lakefs => Emulator::Lakefs(Lakefs::start_on(0).await.map_err(io)?),
            _ => Emulator::Databricks(Databricks::start_on(0, None).await.map_err(io)?),
        })
    }

    fn infra(&self) -> &Infra {
        match self {
            Emulator::Databricks(d) => &d.state.infra,
            Emulator::Lakefs(l) => &l.state.infra,
        }
    }

    /// The target's `[targets.t]` table.
    fn table(&self, kind: Kind) -> String {
        match (self, kind) {
            (Emulator::Lakefs(l), _) => format!(
                "kind = \"lakefs\"\nendpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\n\n[targets.t.mapping]\nuser_name = \"{{userName|lower}}\"\n",
                l.server.base_url
            ),
            (Emulator::Databricks(d), Kind::Scim) => format!(
                "kind = \"scim\"\nurl = \"{}/api/2.0/accounts/{ACCOUNT_ID}/scim/v2\"\n",
                d.server.base_url
            ),
            (Emulator::Databricks(d), _) => format!(
                "kind = \"databricks\"\nhost = \"{}\"\naccount_id = \"{ACCOUNT_ID}\"\n",
                d.server.base_url
            ),
        }
    }

    /// What the target holds, without its ids: each principal by kind and key with its
    /// attributes, each group with its members by key. A principal there twice is counted apart.
    fn canonical(&self) -> (BTreeMap<String, String>, usize) {
        let mut out = BTreeMap::new();
        let mut twice = 0;
        let mut put = |k: String, v: String| {
            if out.insert(k, v).is_some() {
                twice += 1;
            }
        };
        match self {
            Emulator::Databricks(d) => {
                let data = d.state.data();
                let mut names: BTreeMap<String, String> = BTreeMap::new();
                let key = |t: &Type, v: &Value| -> String {
                    let s = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
                    match t {
                        Type::Users => format!("user:{}", s("userName").to_lowercase()),
                        Type::ServicePrincipals => format!("sp:{}", s("applicationId")),
                        Type::Groups => format!("group:{}", s("displayName")),
                    }
                };
                for (t, all) in data.iter() {
                    for (id, v) in all {
                        names.insert(id.clone(), key(t, v));
                    }
                }
                for (t, all) in data.iter() {
                    for v in all.values() {
                        let mut v = v.clone();
                        if let Some(o) = v.as_object_mut() {
                            for f in ["id", "meta", "schemas", "externalId", "groups"] {
                                o.remove(f);
                            }
                        }
                        if let Some(ms) = v.get_mut("members").and_then(Value::as_array_mut) {
                            let mut keys: Vec<String> = ms
                                .iter()
                                .map(|m| {
                                    let id = m["value"].as_str().unwrap_or_default();
                                    names.get(id).cloned().unwrap_or_else(|| format!("?{id}"))
                                })
                                .collect();
                            keys.sort();
                            v["members"] = Value::from(keys);
                        }
                        put(key(t, &v), v.to_string());
                    }
                }
            }
            Emulator::Lakefs(l) => {
                let data = l.state.data();
                for u in data.users.values() {
                    if u.id != "admin" {
                        put(format!("user:{}", u.id), String::new());
                    }
                }
                for g in data.groups.values() {
                    put(
                        format!("group:{}", g.name),
                        format!("members {:?} policies {:?}", g.members, g.policies),
                    );
                }
            }
        }
        (out, twice)
    }
}

/// Where the state is kept.
#[derive(Clone, Debug)]
struct StateAt {
    name: &'static str,
    /// `lease_seconds`.
    lease: u64,
    /// The `[state]` table, with `{p}` for a prefix unique to the trial.
    table: String,
    env: Vec<(String, String)>,
}

/// A trial's folder, configuration and environment.
struct Trial {
    dir: Scratch,
    env: Vec<(String, String)>,
    idsync: PathBuf,
}

/// A folder of its own, removed when dropped, and its number (unique in this process).
struct Scratch(PathBuf, u64);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("idsync-faults-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Scratch(p, n))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one idsync run came to.
struct Ran {
    code: i32,
    text: String,
}

impl Trial {
    fn new(
        o: &Options,
        state: &StateAt,
        target: &str,
        policy: &str,
        dir: &Directory,
    ) -> Result<Trial, String> {
        let t = Scratch::new()?;
        let prefix = format!("t{}", t.1);
        let config = format!(
            "{}\nlease_seconds = {}\n\n[source]\nkind = \"file\"\npath = \"directory.json\"\n\n[scope]\nall_users = true\nsearch_depth = 3\n\n[run]\nworker_threads = 4\nreconcile_hours = 0\n\n[policy]\n{policy}\n\n[targets.t]\n{target}",
            state.table.replace("{p}", &prefix),
            state.lease
        );
        std::fs::write(t.0.join("idsync.toml"), config).map_err(|e| e.to_string())?;
        let trial = Trial {
            dir: t,
            env: state.env.clone(),
            idsync: o.idsync.clone(),
        };
        trial.directory(dir)?;
        Ok(trial)
    }

    fn directory(&self, dir: &Directory) -> Result<(), String> {
        let json = serde_json::to_vec(dir).map_err(|e| e.to_string())?;
        std::fs::write(self.dir.0.join("directory.json"), json).map_err(|e| e.to_string())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.base(self.idsync.as_os_str());
        c.args(args);
        c
    }

    /// `program` in the trial's folder with its environment.
    fn base(&self, program: &std::ffi::OsStr) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.dir.0)
            .env("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("DATABRICKS_TOKEN", TOKEN)
            .env("SCIM_TOKEN", TOKEN)
            .env("NO_COLOR", "1")
            .env_remove("IDSYNC_CONFIG")
            .env_remove("IDSYNC_STATE");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Starts a run in the background. Its output goes to a file of the trial's folder (read it
    /// with [`output_of`]), never to a pipe nobody reads while it runs: a plan of 1,000 lines
    /// fills a pipe and the run would stop at its first print.
    fn spawn(&self, args: &[&str]) -> Result<(Child, PathBuf), String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = self.dir.0.join(format!("run-{n}.out"));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.idsync.display()))?;
        Ok((child, path))
    }

    fn run(&self, args: &[&str]) -> Result<Ran, String> {
        let o = self
            .command(args)
            .output()
            .map_err(|e| format!("running {}: {e}", self.idsync.display()))?;
        Ok(Ran {
            code: o.status.code().unwrap_or(-1),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        })
    }

    /// A run under a shell that caps the size of any file it writes (`ulimit -f`, in KiB) and
    /// ignores SIGXFSZ, so a write past it fails as on a full disk.
    fn run_with_disk(&self, kib: u64) -> Result<Ran, String> {
        let o = self
            .base("bash".as_ref())
            .arg("-c")
            .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" sync"))
            .arg(&self.idsync)
            .output()
            .map_err(|e| e.to_string())?;
        Ok(Ran {
            code: o.status.code().unwrap_or(-1),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        })
    }
}

/// What a run started with [`Trial::spawn`] printed.
fn output_of(path: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

fn kill(child: &mut Child) {
    // SIGKILL: no handler runs, nothing is flushed or released.
    let _ = child.kill();
    let _ = child.wait();
}

/// The checks every case ends with: `idsync sync` until it succeeds (at most `tries`), once more
/// writing nothing, the target as a clean run leaves it, the state readable. Returns (runs
/// made, what is missing or twice, a problem).
fn settle(
    trial: &Trial,
    emu: &Emulator,
    want: &BTreeMap<String, String>,
    tries: usize,
) -> Result<(usize, usize, Option<String>), String> {
    let mut runs = 0;
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..tries {
        let r = trial.run(&["sync"])?;
        runs += 1;
        if r.code == 0 {
            ok = true;
            break;
        }
        last = r.text;
    }
    if !ok {
        return Ok((
            runs,
            0,
            Some(format!("no run succeeded in {tries}: {last}")),
        ));
    }
    let before = emu.infra().writes();
    let again = trial.run(&["sync"])?;
    runs += 1;
    let wrote = emu.infra().writes() - before;
    let (have, twice) = emu.canonical();
    let wrong = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .count()
        + have.keys().filter(|k| !want.contains_key(*k)).count()
        + twice;
    let show = trial.run(&["state", "show"])?;
    runs += 1;
    let problem = if again.code != 0 || wrote > 0 {
        Some(format!(
            "the run after recovery wrote {wrote} (exit {}): {}",
            again.code, again.text
        ))
    } else if show.code != 0 {
        Some(format!("state show failed: {}", show.text))
    } else if wrong > 0 {
        let diff: Vec<_> = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .chain(have.keys().filter(|k| !want.contains_key(*k)).cloned())
            .take(5)
            .collect();
        let detail: Vec<String> = diff
            .iter()
            .take(2)
            .map(|k| format!("{k}: clean run {:?}, here {:?}", want.get(k), have.get(k)))
            .collect();
        if std::env::var_os("IDSYNC_FAULTS_VERBOSE").is_some() {
            eprintln!("---- the run after recovery:\n{}", again.text);
            if let Ok(r) = trial.run(&["state", "export", "t"]) {
                eprintln!("---- its state:\n{}", r.text);
            }
        }
        Some(format!(
            "{wrong} principal(s) differ from a clean run: {diff:?}; {}",
            detail.join("; ")
        ))
    } else {
        None
    };
    Ok((runs, wrong, problem))
}

/// The directories: `full`, and `base` (every third user left out).
fn directories(size: &str) -> (Directory, Directory) {
    let p = if size == "full" {
        Params {
            users: 900,
            service_principals: 0,
            groups: 100,
            memberships: 300,
            nesting_depth: 2,
            ..Params::default()
        }
    } else {
        Params {
            users: 30,
            service_principals: 0,
            groups: 6,
            memberships: 45,
            nesting_depth: 2,
            ..Params::default()
        }
    };
    let full: Snapshot = generate(&p);
    let mut base = full.clone();
    let gone: Vec<String> = base.users.keys().step_by(3).cloned().collect();
    for id in &gone {
        base.users.remove(id);
        for g in base.groups.values_mut() {
            g.members.remove(&idsync_model::Member::user(id.clone()));
        }
    }
    (Directory::from(full), Directory::from(base))
}

/// Runs every case.
pub async fn run(o: &Options) -> Result<Vec<Row>, String> {
    let o = &Options {
        idsync: std::fs::canonicalize(&o.idsync).map_err(|e| {
            format!(
                "the idsync binary {}: {e} (build it: cargo build -p idsync)",
                o.idsync.display()
            )
        })?,
        ..o.clone()
    };
    let (full, base) = directories(&o.size);
    let mut states = vec![StateAt {
        name: "a folder",
        lease: 600,
        table: "[state]\nurl = \"state\"".into(),
        env: vec![],
    }];
    if let Some(m) = &o.moto {
        states.push(StateAt {
            name: "S3 (moto)",
            lease: 600,
            table: format!("[state]\nurl = \"s3://idsync-state/{{p}}\"\nendpoint = \"{m}\"\nregion = \"us-east-1\""),
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ],
        });
    }
    let mut rows = Vec::new();
    let wanted = |name: &str| o.only.as_deref().is_none_or(|w| name.contains(w));
    for kind in [Kind::Databricks, Kind::Lakefs, Kind::Scim] {
        // The reference: a clean run of the full directory.
        let emu = Emulator::start(kind).await?;
        let trial = Trial::new(o, &states[0], &emu.table(kind), "", &full)?;
        let r = trial.run(&["sync"])?;
        if r.code != 0 {
            return Err(format!(
                "the clean run into {} failed: {}",
                kind.name(),
                r.text
            ));
        }
        let writes = emu.infra().writes();
        let (want, _) = emu.canonical();
        drop(trial);

        for state in &states {
            let case = format!(
                "kill -9 at {} write boundary of a {writes}-write apply, {}, state in {}",
                ordinal(o.stride),
                kind.name(),
                state.name
            );
            if wanted(&case) {
                rows.push(kills(o, kind, state, &full, &want, writes, &case).await?);
            }
        }
        let case = format!(
            "on_apply_error = \"rollback\": a conflict mid-apply, then kill -9 at {} write of the rollback, {}",
            ordinal(o.stride),
            kind.name()
        );
        if wanted(&case) {
            rows.push(rollback(o, kind, &states[0], &full, &base, &case).await?);
        }
        for (what, faults) in storms() {
            let case = format!("{what}, {}", kind.name());
            if wanted(&case) {
                rows.push(
                    storm(
                        o, kind, &states[0], &full, &want, &faults.0, faults.1, &case,
                    )
                    .await?,
                );
            }
        }
    }
    let mut racing = states.clone();
    if let Some(a) = &o.azurite {
        racing.push(StateAt {
            name: "Azure Blob (Azurite)",
            lease: 600,
            table: "[state]\nurl = \"az://idsync-state/{p}\"".into(),
            env: vec![(
                "AZURE_STORAGE_CONNECTION_STRING".into(),
                format!("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint={a};"),
            )],
        });
    }
    let gcs = match &o.gcs_key {
        Some(k) => Some((
            Gcs::start_on(0, &["idsync-state"])
                .await
                .map_err(|e| e.to_string())?,
            k,
        )),
        None => None,
    };
    let sa_dir = Scratch::new()?;
    if let Some((g, key)) = &gcs {
        let pem = std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let sa = serde_json::json!({
            "type": "service_account",
            "project_id": "idsync-faults",
            "private_key_id": "k1",
            "private_key": pem_block(&pem, "PRIVATE KEY"),
            "client_email": "idsync-state@idsync-faults.iam.gserviceaccount.com",
        });
        let path = sa_dir.0.join("sa.json");
        std::fs::write(&path, sa.to_string()).map_err(|e| e.to_string())?;
        racing.push(StateAt {
            name: "GCS (our emulator)",
            lease: 600,
            table: format!(
                "[state]\nurl = \"gs://idsync-state/{{p}}\"\nendpoint = \"{}\"\ngoogle_service_account = \"{}\"",
                g.server.base_url,
                path.display()
            ),
            env: vec![],
        });
    }
    for state in &racing {
        for n in [2, 3] {
            let case = format!(
                "{n} concurrent runs of one agreement, state in {}",
                state.name
            );
            if wanted(&case) {
                rows.push(race(o, state, &full, n, &case).await?);
            }
        }
    }
    let case = "the lease ended mid-apply (`state unlock`) and taken by another run".to_owned();
    if wanted(&case) {
        let short = StateAt {
            lease: 3,
            ..states[0].clone()
        };
        rows.push(takeover(o, &short, &full, &case).await?);
    }
    let case = "a full disk (a file size limit) at each state commit, state in a folder".to_owned();
    if wanted(&case) {
        rows.push(full_disk(o, &states[0], &full, &case).await?);
    }
    Ok(rows)
}

/// Azurite's well-known development account key (public: Microsoft's documentation prints it).
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn pem_block(pem: &str, label: &str) -> String {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    match (pem.find(&begin), pem.find(&end)) {
        (Some(a), Some(b)) => format!("{}\n", &pem[a..b + end.len()]),
        _ => pem.to_owned(),
    }
}

/// "every write", "every 2nd write"...
fn ordinal(stride: u64) -> String {
    match stride {
        1 => "every".into(),
        2 => "every 2nd".into(),
        3 => "every 3rd".into(),
        n => format!("every {n}th"),
    }
}

/// Starts `idsync sync`, waits until the emulator made `k` writes (the rest stall), and kills it.
/// `false` when the run ended before (it had fewer writes to make).
fn kill_at(trial: &Trial, emu: &Emulator, k: u64, args: &[&str]) -> Result<bool, String> {
    let (mut child, _) = trial.spawn(args)?;
    let start = Instant::now();
    loop {
        if emu.infra().writes() >= k {
            kill(&mut child);
            return Ok(true);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(false);
        }
        if start.elapsed() > Duration::from_secs(120) {
            kill(&mut child);
            return Err(format!("no write {k} in two minutes"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn unlock(trial: &Trial) -> Result<(), String> {
    let r = trial.run(&["state", "unlock", "t", "--yes"])?;
    if r.code != 0 {
        return Err(format!("state unlock: {}", r.text));
    }
    Ok(())
}

async fn kills(
    o: &Options,
    kind: Kind,
    state: &StateAt,
    dir: &Directory,
    want: &BTreeMap<String, String>,
    writes: u64,
    case: &str,
) -> Result<Row, String> {
    let mut row = Row {
        case: case.to_owned(),
        runs: 0,
        faults: 0,
        outcome: String::new(),
        lost: 0,
        passed: true,
    };
    let mut problems = Vec::new();
    let mut k = o.stride.min(writes.max(1));
    while k < writes {
        let emu = Emulator::start(kind).await?;
        let trial = Trial::new(o, state, &emu.table(kind), "", dir)?;
        emu.infra().set_faults(Faults {
            stall_after_writes: Some(k),
            ..Faults::default()
        });
        let killed = tokio::task::block_in_place(|| kill_at(&trial, &emu, k, &["sync"]))?;
        row.runs += 1;
        emu.infra().set_faults(Faults::default());
        if killed {
            row.faults += 1;
            tokio::task::block_in_place(|| unlock(&trial))?;
            row.runs += 1;
        }
        let (runs, wrong, problem) = tokio::task::block_in_place(|| settle(&trial, &emu, want, 3))?;
        row.runs += runs;
        row.lost += wrong;
        if let Some(p) = problem {
            problems.push(format!("after write {k}: {p}"));
        }
        k += o.stride;
    }
    finish(
        &mut row,
        problems,
        "converged after every kill: no duplicate, the next run wrote nothing, the state read back",
    );
    Ok(row)
}

fn finish(row: &mut Row, problems: Vec<String>, good: &str) {
    if problems.is_empty() {
        row.outcome = good.to_owned();
    } else {
        row.passed = false;
        row.outcome = format!("{} failure(s); first: {}", problems.len(), problems[0]);
    }
}

async fn rollback(
    o: &Options,
    kind: Kind,
    state: &StateAt,
    full: &Directory,
    base: &Directory,
    case: &str,
) -> Result<Row, String> {
    let mut row = Row {
        case: case.to_owned(),
        runs: 0,
        faults: 0,
        outcome: String::new(),
        lost: 0,
        passed: true,
    };
    let mut problems = Vec::new();
    let policy = "on_apply_error = \"rollback\"";
    // The base synced, then the full directory: how many writes that takes, and the target each
    // leaves.
    let emu = Emulator::start(kind).await?;
    let trial = Trial::new(o, state, &emu.table(kind), policy, base)?;
    let r = tokio::task::block_in_place(|| trial.run(&["sync"]))?;
    if r.code != 0 {
        return Err(format!("syncing the base: {}", r.text));
    }
    let (before, _) = emu.canonical();
    trial.directory(full)?;
    let at = emu.infra().writes();
    let r = tokio::task::block_in_place(|| trial.run(&["sync"]))?;
    if r.code != 0 {
        return Err(format!("syncing the change: {}", r.text));
    }
    let change = emu.infra().writes() - at;
    let (after, _) = emu.canonical();
    drop(trial);
    let conflict_at = (change / 2).max(1);

    // The conflict alone: the run exits 3 and the target is as before it.
    let fresh = || async {
        let emu = Emulator::start(kind).await?;
        let trial = Trial::new(o, state, &emu.table(kind), policy, base)?;
        let r = tokio::task::block_in_place(|| trial.run(&["sync"]))?;
        if r.code != 0 {
            return Err(format!("syncing the base: {}", r.text));
        }
        trial.directory(full)?;
        emu.infra().reset_writes();
        Ok::<_, String>((emu, trial))
    };
    let (emu, trial) = fresh().await?;
    emu.infra().set_faults(Faults {
        conflict_at_write: Some(conflict_at),
        ..Faults::default()
    });
    let r = tokio::task::block_in_place(|| trial.run(&["sync"]))?;
    row.runs += 2;
    row.faults += 1;
    let undo_writes = emu.infra().writes() - conflict_at;
    let (have, twice) = emu.canonical();
    let differ = before
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .count()
        + have.keys().filter(|k| !before.contains_key(*k)).count()
        + twice;
    row.lost += differ;
    if r.code != 3 || !r.text.contains("rolled back") || differ > 0 {
        problems.push(format!(
            "the conflict at write {conflict_at}: exit {}, {differ} principal(s) not as before: {}",
            r.code, r.text
        ));
    }
    emu.infra().set_faults(Faults::default());
    let (runs, wrong, problem) = tokio::task::block_in_place(|| settle(&trial, &emu, &after, 3))?;
    row.runs += runs;
    row.lost += wrong;
    if let Some(p) = problem {
        problems.push(format!("after the rollback: {p}"));
    }

    // Killed at every write of the rollback: the next run finishes it, then applies.
    let mut j = o.stride.min(undo_writes.max(1));
    while j < undo_writes {
        let (emu, trial) = fresh().await?;
        emu.infra().set_faults(Faults {
            conflict_at_write: Some(conflict_at),
            stall_after_writes: Some(conflict_at + j),
            ..Faults::default()
        });
        let killed =
            tokio::task::block_in_place(|| kill_at(&trial, &emu, conflict_at + j, &["sync"]))?;
        row.runs += 2;
        emu.infra().set_faults(Faults::default());
        if killed {
            row.faults += 2;
            tokio::task::block_in_place(|| unlock(&trial))?;
            row.runs += 1;
        }
        let (runs, wrong, problem) =
            tokio::task::block_in_place(|| settle(&trial, &emu, &after, 3))?;
        row.runs += runs;
        row.lost += wrong;
        if let Some(p) = problem {
            problems.push(format!("killed after undo write {j}: {p}"));
        }
        j += o.stride;
    }
    finish(
        &mut row,
        problems,
        &format!(
            "the conflict rolled the target back to where it was (exit 3, {undo_writes} undo writes); after every kill in the rollback the next run finished it and converged"
        ),
    );
    Ok(row)
}

/// The storms: name, faults, throttle.
fn storms() -> Vec<(&'static str, (Faults, Option<ThrottleConfig>))> {
    vec![
        (
            "a 50 % 5xx storm with 429s",
            (
                Faults {
                    error_rate: 0.5,
                    ..Faults::default()
                },
                Some(ThrottleConfig {
                    capacity: 20.0,
                    per_second: 200.0,
                }),
            ),
        ),
        (
            "HTML error pages on 30 % of requests",
            (
                Faults {
                    html_rate: 0.3,
                    ..Faults::default()
                },
                None,
            ),
        ),
        (
            "truncated bodies on 20 % of requests",
            (
                Faults {
                    truncate_rate: 0.2,
                    ..Faults::default()
                },
                None,
            ),
        ),
        (
            "dropped connections on 20 % of requests",
            (
                Faults {
                    reset_rate: 0.2,
                    ..Faults::default()
                },
                None,
            ),
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
async fn storm(
    o: &Options,
    kind: Kind,
    state: &StateAt,
    dir: &Directory,
    want: &BTreeMap<String, String>,
    faults: &Faults,
    throttle: Option<ThrottleConfig>,
    case: &str,
) -> Result<Row, String> {
    let mut row = Row {
        case: case.to_owned(),
        runs: 0,
        faults: 0,
        outcome: String::new(),
        lost: 0,
        passed: true,
    };
    let emu = Emulator::start(kind).await?;
    let trial = Trial::new(o, state, &emu.table(kind), "", dir)?;
    emu.infra().set_faults(faults.clone());
    emu.infra().set_throttle(throttle);
    let mut runs = 0;
    let mut done = false;
    let mut last = String::new();
    while runs < 10 && !done {
        let r = tokio::task::block_in_place(|| trial.run(&["sync"]))?;
        runs += 1;
        done = r.code == 0;
        last = r.text.lines().rev().take(6).collect::<Vec<_>>().join(" / ");
    }
    let injected: u64 = emu
        .infra()
        .accounting
        .snapshot()
        .iter()
        .filter(|(k, _)| k.starts_with("429 "))
        .map(|(_, v)| v)
        .sum::<u64>()
        + emu.infra().injected();
    emu.infra().set_faults(Faults::default());
    emu.infra().set_throttle(None);
    row.runs = runs;
    row.faults = injected;
    let (more, wrong, problem) = tokio::task::block_in_place(|| settle(&trial, &emu, want, 3))?;
    row.runs += more;
    row.lost = wrong;
    let mut problems = Vec::new();
    if !done {
        problems.push(format!(
            "{runs} runs in the storm, none succeeded; the last said: {last}"
        ));
    }
    if let Some(p) = problem {
        problems.push(p);
    }
    finish(
        &mut row,
        problems,
        &format!("converged in {runs} run(s) during the storm; the next run wrote nothing"),
    );
    Ok(row)
}

/// Trials of each race: the runs start together, but which one wins, and whether they really
/// overlap, is up to the scheduler; several trials make a lost race likely to show.
const RACE_TRIALS: usize = 5;

async fn race(
    o: &Options,
    state: &StateAt,
    dir: &Directory,
    n: usize,
    case: &str,
) -> Result<Row, String> {
    let kind = Kind::Databricks;
    let reference = {
        let e = Emulator::start(kind).await?;
        let folder = StateAt {
            name: "",
            lease: 600,
            table: "[state]\nurl = \"state\"".into(),
            env: vec![],
        };
        let t = Trial::new(o, &folder, &e.table(kind), "", dir)?;
        let r = tokio::task::block_in_place(|| t.run(&["sync"]))?;
        if r.code != 0 {
            return Err(format!("the reference run: {}", r.text));
        }
        e.canonical().0
    };
    let mut row = Row {
        case: case.to_owned(),
        runs: 0,
        faults: 0,
        outcome: String::new(),
        lost: 0,
        passed: true,
    };
    let mut problems = Vec::new();
    for _ in 0..RACE_TRIALS {
        let emu = Emulator::start(kind).await?;
        let trial = Trial::new(o, state, &emu.table(kind), "", dir)?;
        // Slow writes, so that the runs overlap.
        emu.infra().set_faults(Faults {
            latency_ms: 3,
            ..Faults::default()
        });
        let children: Vec<(Child, PathBuf)> = (0..n)
            .map(|_| trial.spawn(&["sync"]))
            .collect::<Result<_, _>>()?;
        let mut codes = Vec::new();
        let mut texts = Vec::new();
        for (mut c, out) in children {
            let status = tokio::task::block_in_place(|| c.wait()).map_err(|e| e.to_string())?;
            let code = status.code().unwrap_or(-1);
            codes.push(code);
            if code != 0 && code != 4 {
                let all = output_of(&out);
                let tail: Vec<&str> = all.lines().rev().take(4).collect();
                texts.push(tail.join(" / "));
            }
        }
        emu.infra().set_faults(Faults::default());
        codes.sort();
        row.runs += n;
        row.faults += (n - 1) as u64;
        let expected: Vec<i32> = std::iter::once(0)
            .chain(std::iter::repeat_n(4, n - 1))
            .collect();
        if codes != expected {
            problems.push(format!(
                "exit codes {codes:?}, not one 0 and the rest 4: {}",
                texts.join(" // ")
            ));
        }
        let (runs, wrong, problem) =
            tokio::task::block_in_place(|| settle(&trial, &emu, &reference, 1))?;
        row.runs += runs;
        row.lost += wrong;
        if let Some(p) = problem {
            problems.push(p);
        }
    }
    finish(
        &mut row,
        problems,
        &format!(
            "in each of {RACE_TRIALS} trials one run applied and the others stopped with exit 4; the state was whole and the next run wrote nothing"
        ),
    );
    Ok(row)
}

async fn takeover(
    o: &Options,
    state: &StateAt,
    dir: &Directory,
    case: &str,
) -> Result<Row, String> {
    let kind = Kind::Databricks;
    let emu = Emulator::start(kind).await?;
    let trial = Trial::new(o, state, &emu.table(kind), "", dir)?;
    let want = {
        let e = Emulator::start(kind).await?;
        let t = Trial::new(o, state, &e.table(kind), "", dir)?;
        let r = tokio::task::block_in_place(|| t.run(&["sync"]))?;
        if r.code != 0 {
            return Err(format!("the reference run: {}", r.text));
        }
        e.canonical().0
    };
    // The first run stalls after a few writes; its lease is ended and a second run takes over.
    emu.infra().set_faults(Faults {
        stall_after_writes: Some(5),
        ..Faults::default()
    });
    let (mut first, first_out) = trial.spawn(&["sync"])?;
    let mut problems = Vec::new();
    tokio::task::block_in_place(|| -> Result<(), String> {
        let start = Instant::now();
        while emu.infra().writes() < 5 && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(2));
        }
        unlock(&trial)?;
        // The second run must wait for nothing: its writes are let through, the first run's
        // stalled ones stay stalled until it notices its lease is gone.
        emu.infra().set_faults(Faults::default());
        let second = trial.run(&["sync"])?;
        if second.code != 0 {
            problems.push(format!(
                "the second run: exit {}: {}",
                second.code, second.text
            ));
        }
        Ok(())
    })?;
    // The first run's stalled writes are let go now; it must find its lease gone and stop
    // without saving (exit 4).
    let code = tokio::task::block_in_place(|| {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = first.try_wait() {
                return s.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(30) {
                kill(&mut first);
                return -9;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    if code != 4 && code != -9 {
        let all = output_of(&first_out);
        let tail: Vec<&str> = all.lines().rev().take(4).collect();
        problems.push(format!(
            "the run whose lease was taken exited {code}, not 4: {}",
            tail.join(" / ")
        ));
    }
    let (runs, wrong, problem) = tokio::task::block_in_place(|| settle(&trial, &emu, &want, 3))?;
    if let Some(p) = problem {
        problems.push(p);
    }
    let mut row = Row {
        case: case.to_owned(),
        runs: 3 + runs,
        faults: 1,
        outcome: String::new(),
        lost: wrong,
        passed: true,
    };
    let how = if code == -9 {
        "the first run, stalled, was killed after 30 s"
    } else {
        "the first run stopped with exit 4 without saving"
    };
    finish(
        &mut row,
        problems,
        &format!("the second run applied; {how}; nothing lost, the next run wrote nothing"),
    );
    Ok(row)
}

async fn full_disk(
    o: &Options,
    state: &StateAt,
    dir: &Directory,
    case: &str,
) -> Result<Row, String> {
    let kind = Kind::Databricks;
    let mut problems = Vec::new();
    let want = {
        let e = Emulator::start(kind).await?;
        let t = Trial::new(o, state, &e.table(kind), "", dir)?;
        let r = tokio::task::block_in_place(|| t.run(&["sync"]))?;
        if r.code != 0 {
            return Err(format!("the reference run: {}", r.text));
        }
        e.canonical().0
    };
    let mut row = Row {
        case: case.to_owned(),
        runs: 0,
        faults: 0,
        outcome: String::new(),
        lost: 0,
        passed: true,
    };
    // From a limit that fails the first commit (the journal) up to one the final state fits in.
    let mut limits = Vec::new();
    for kib in 0..=64u64 {
        let emu = Emulator::start(kind).await?;
        let trial = Trial::new(o, state, &emu.table(kind), "", dir)?;
        let r = tokio::task::block_in_place(|| trial.run_with_disk(kib))?;
        row.runs += 1;
        if r.code == 0 {
            break;
        }
        row.faults += 1;
        limits.push((kib, emu.infra().writes()));
        if r.text.contains("panicked") {
            problems.push(format!("{kib} KiB: a panic: {}", r.text));
        }
        let (runs, wrong, problem) =
            tokio::task::block_in_place(|| settle(&trial, &emu, &want, 3))?;
        row.runs += runs;
        row.lost += wrong;
        if let Some(p) = problem {
            problems.push(format!("{kib} KiB: {p}"));
        }
    }
    if !limits.iter().any(|(_, w)| *w > 0) {
        problems.push(format!("no limit failed a commit after writes: {limits:?}"));
    }
    let mid: Vec<_> = limits
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(k, _)| *k)
        .collect();
    finish(
        &mut row,
        problems,
        &format!(
            "{} limit(s) failed a commit ({} after the target was written: {:?} KiB); each run exited 1 and the next converged",
            limits.len(),
            mid.len(),
            mid
        ),
    );
    Ok(row)
}

/// The table, as RELIABILITY.md shows it.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| case | runs | faults injected | outcome | lost | |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.case,
            r.runs,
            r.faults,
            r.outcome.replace('|', "\\|").replace('\n', " "),
            r.lost,
            if r.passed { "✅" } else { "❌" }
        ));
    }
    s
}
