//! Progress (issue #16, item 4) through the real binary against a lakeFS emulator that answers
//! every request 150 ms late: plain lines when stderr is a file (a CronJob's log), bars in a
//! pseudo-terminal (`script`), nothing with `--quiet`, and the plan on stdout intact in each case.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::{Sandbox, code, text};
use idsync_emulators::lakefs::SECRET_ACCESS_KEY;

/// `idsync ARGS` against a slow lakeFS, one write at a time (about two seconds of apply).
async fn run(args: &'static [&'static str]) -> (Sandbox, std::process::Output) {
    let (lake, extra) = common::slow_lakefs().await;
    let s = Sandbox::new(&extra);
    let env = vec![(
        "LAKEFS_SECRET_ACCESS_KEY".to_owned(),
        SECRET_ACCESS_KEY.to_owned(),
    )];
    let out = common::run_isolated(s, args, &[], env).await;
    drop(lake);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_gets_a_line_per_interval_and_a_last_one_when_a_step_ends() {
    let (_s, o) = run(&[
        "sync",
        "--target",
        "lake",
        "--worker-threads",
        "1",
        "--progress-every",
        "1s",
    ])
    .await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    let apply: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("progress: applying to lakeFS"))
        .collect();
    assert!(
        apply.len() >= 2,
        "a line while applying, and the last: {err}"
    );
    // Nothing on stdout but the plan and the report.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("progress"), "{out}");
    let n = applied(&out);
    let last = apply.last().unwrap();
    assert!(
        last.contains(&format!(": {n}/{n} operations (100%)")),
        "{n}: {last}"
    );
    assert!(last.ends_with(", done"), "{last}");
    assert!(last.contains(" requests: "), "the requests sent: {last}");
    let first = apply.first().unwrap();
    assert!(
        first.contains(&format!("/{n} operations (")) && first.contains(" left"),
        "the time left while it runs: {first}"
    );
    // Reading the source was too quick for a line.
    assert!(!err.contains("progress: reading the source"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_shows_no_progress() {
    let (_s, o) = run(&[
        "sync",
        "--target",
        "lake",
        "--worker-threads",
        "1",
        "--progress-every",
        "1s",
        "--quiet",
    ])
    .await;
    assert_eq!(code(&o), 0, "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("progress"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_bars_and_the_plan_stays_readable() {
    let (lake, extra) = common::slow_lakefs().await;
    let s = Sandbox::new(&extra);
    let bin = env!("CARGO_BIN_EXE_idsync");
    let o = tokio::task::spawn_blocking(move || {
        // `script` runs the command in a pseudo-terminal and copies what it shows to stdout.
        let o = s
            .command(&[], &[])
            .env("TERM", "xterm-256color")
            .env("LAKEFS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env_remove("NO_COLOR")
            .arg0_replaced(bin)
            .output()
            .unwrap();
        (s, o)
    })
    .await
    .unwrap()
    .1;
    drop(lake);
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(code(&o), 0, "{shown}");
    // The bars: what, the count against the total, the bar itself, redrawn in place.
    assert!(shown.contains("applying to lakeFS"), "{shown}");
    let n = applied(&shown);
    assert!(shown.contains(&format!("{n}/{n} operations")), "{shown}");
    assert!(shown.contains("observing lakeFS"), "{shown}");
    assert!(shown.contains("reading the source"), "{shown}");
    assert!(
        shown.contains("[========================]"),
        "a full bar: {shown}"
    );
    assert!(shown.contains("\x1b[2K"), "lines redrawn in place: {shown}");
    // The plan and the report, whole.
    assert!(
        shown.contains("summary: 7 to create, 0 to update, +5 / -0 members"),
        "{shown}"
    );
}

/// The operations the report says were applied.
fn applied(out: &str) -> u64 {
    let tail = out.split("applied: ").nth(1).expect(out);
    tail.split(' ').next().unwrap().parse().expect(out)
}

/// Runs `idsync sync` under `script` instead of directly.
trait InTerminal {
    fn arg0_replaced(&mut self, bin: &str) -> &mut Self;
}

impl InTerminal for std::process::Command {
    fn arg0_replaced(&mut self, bin: &str) -> &mut Self {
        let cmd = format!("{bin} sync --target lake --worker-threads 1");
        let mut c = std::process::Command::new("script");
        c.args(["-qefc", &cmd, "/dev/null"]);
        if let Some(dir) = self.get_current_dir() {
            c.current_dir(dir);
        }
        for (k, v) in self.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        std::mem::swap(self, &mut c);
        self
    }
}
