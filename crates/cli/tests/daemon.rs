//! `idsync run` (issue #16, item 1): the real binary as a service against a directory file and a
//! target file: cycles on a schedule, a change between cycles picked up by the next one, SIGHUP
//! with a broken configuration keeping the one in force, SIGTERM ending it cleanly with the lease
//! released, `--once` for a CronJob.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::{Sandbox, code, text};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Starts `idsync run ARGS` with its output in `run.out` and `run.err`.
fn start(s: &Sandbox, args: &[&str]) -> Child {
    let out = std::fs::File::create(s.path("run.out")).unwrap();
    let err = std::fs::File::create(s.path("run.err")).unwrap();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    s.command(&all, &[])
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap()
}

/// Waits until `run.err` satisfies `pred` (30 s at most).
fn wait_log(s: &Sandbox, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let log = s.read("run.err");
        if pred(&log) {
            return log;
        }
        assert!(Instant::now() < until, "waited for {what}; the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn cycles_ended_ok(log: &str) -> usize {
    log.matches("ended with exit code 0").count()
}

#[test]
fn the_service_syncs_on_schedule_reloads_on_hangup_and_stops_on_sigterm() {
    let s = Sandbox::new("");
    let mut child = start(&s, &["--every", "1s", "--jitter", "0"]);
    wait_log(&s, "two cycles", |l| cycles_ended_ok(l) >= 2);
    assert!(s.read("dbx.json").contains("kevin@corp.example"));

    // A change between cycles: the next cycle applies it.
    let dir = s.read("directory.json").replace(
        "\"displayName\": \"Kevin\"",
        "\"displayName\": \"Kevin M.\"",
    );
    s.write("directory.json", &dir);
    let until = Instant::now() + Duration::from_secs(30);
    while !s.read("dbx.json").contains("Kevin M.") {
        assert!(Instant::now() < until, "{}", s.read("run.err"));
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGHUP with a broken file: reported, the configuration in force kept, cycles go on.
    let good = s.read("idsync.toml");
    s.write("idsync.toml", "[state\nurl = ");
    signal(&child, "-HUP");
    let log = wait_log(&s, "the refused reload", |l| {
        l.contains("configuration not reloaded")
    });
    let before = cycles_ended_ok(&log);
    wait_log(&s, "a cycle after the refused reload", |l| {
        cycles_ended_ok(l) > before
    });
    // A good file is taken on the next SIGHUP.
    s.write("idsync.toml", &good);
    signal(&child, "-HUP");
    wait_log(&s, "the reload", |l| l.contains("configuration reloaded"));

    // SIGTERM: the service ends, saying so, with exit code 0.
    signal(&child, "-TERM");
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < until,
            "still running: {}",
            s.read("run.err")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", s.read("run.err"));
    assert!(
        s.read("run.err").contains("stopped"),
        "{}",
        s.read("run.err")
    );

    // Nothing left behind: the lease is free and the target in sync.
    let o = s.run(&["sync"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("in sync: nothing to do"), "{}", text(&o));
}

#[test]
fn once_runs_a_single_cycle_and_a_schedule_is_required_otherwise() {
    let s = Sandbox::new("");
    let o = s.run(&["run", "--once"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(s.read("dbx.json").contains("alice@corp.example"));

    let o = s.run(&["run"]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("no schedule"), "{}", text(&o));
    let o = s.run(&["run", "--every", "soon"]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("not an interval"), "{}", text(&o));

    // [run] every in the file is the schedule; a wrong one is a configuration error with its line.
    let cfg = s.read("idsync.toml");
    s.write("idsync.toml", &format!("{cfg}\n[run]\nevery = \"1s\"\n"));
    let mut child = start(&s, &["--jitter", "0"]);
    wait_log(&s, "two cycles on the file's schedule", |l| {
        cycles_ended_ok(l) >= 2
    });
    signal(&child, "-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    s.write("idsync.toml", &format!("{cfg}\n[run]\nevery = \"often\"\n"));
    let o = s.run(&["validate"]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("run.every"), "{}", text(&o));
}

/// SIGTERM in the middle of a cycle's apply: the writes in flight finish, what was applied is
/// saved, the lease released; the service exits 1 (work was left) and the next run converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_apply_leaves_a_state_the_next_run_resumes() {
    use idsync_emulators::infra::Faults;
    use idsync_emulators::lakefs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    let l = idsync_emulators::Lakefs::start_on(0).await.unwrap();
    l.state.infra.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let extra = format!(
        "\n[targets.lake]\nkind = \"lakefs\"\nendpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\n",
        l.server.base_url
    );
    let s = Sandbox::new(&extra);
    let env = [("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)];
    let (s, status, second, third) = tokio::task::spawn_blocking(move || {
        let out = std::fs::File::create(s.path("run.out")).unwrap();
        let err = std::fs::File::create(s.path("run.err")).unwrap();
        let mut child = s
            .command(
                &[
                    "run",
                    "--every",
                    "1h",
                    "--target",
                    "lake",
                    "--worker-threads",
                    "1",
                ],
                &env,
            )
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        wait_log(&s, "the first cycle", |l| l.contains("cycle 1 starts"));
        // Observing takes two requests; then writes go one at a time, 150 ms each.
        std::thread::sleep(Duration::from_millis(1200));
        signal(&child, "-TERM");
        let status = child.wait().unwrap();
        let second = s.run_env(&["sync", "--target", "lake"], &env);
        let third = s.run_env(&["plan", "--target", "lake"], &env);
        (s, status, second, third)
    })
    .await
    .unwrap();
    let log = s.read("run.err");
    // On a loaded machine the cycle may end before the signal: then nothing was left.
    let finished = log.contains("cycle 1 ended");
    if !finished {
        assert!(
            log.contains("stopping: the writes in flight finish"),
            "{log}"
        );
        assert!(log.contains("stopped after cycle 1"), "{log}");
    }
    assert!(log.contains("stopped"), "{log}");
    assert_eq!(status.code(), Some(if finished { 0 } else { 1 }), "{log}");
    assert_eq!(
        code(&second),
        0,
        "the lease was released: {}",
        text(&second)
    );
    assert_eq!(code(&third), 0, "converged: {}", text(&third));
}
