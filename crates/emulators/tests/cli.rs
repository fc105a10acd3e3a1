//! The `idsync-emulator` command line: `--help` prints help and exits (it used to start a
//! server), a wrong argument is refused with exit code 2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the emulator with `args`; a run that is still going after 20 s is killed and fails.
fn run(args: &[&str]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_idsync-emulator"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = c.kill();
            panic!("idsync-emulator {args:?} did not exit (a server started?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn help_prints_help_and_exits() {
    for args in [
        &["--help"][..],
        &["graph", "--help"],
        &["all", "--help"],
        &["databricks", "--help"],
        &["generate", "--help"],
    ] {
        let (code, out) = run(args);
        assert_eq!(code, 0, "{args:?}: {out}");
        assert!(out.contains("Usage: idsync-emulator"), "{args:?}: {out}");
    }
}

#[test]
fn wrong_arguments_are_refused() {
    let (code, out) = run(&["graph", "--port", "not-a-port"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = run(&["generate", "--preset", "huge", "--out", "/dev/null"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown preset"), "{out}");
    let (code, _) = run(&["serve-everything"]);
    assert_eq!(code, 2);
}
