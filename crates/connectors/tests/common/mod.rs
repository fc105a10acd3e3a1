//! Shared by the connectors' tests: the demo directory, one sync cycle through the real engine,
//! and reading a request off a raw HTTP/1.1 connection (the canned servers on 127.0.0.1).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_emulators::infra::{Infra, ThrottleConfig};
use idsync_engine::apply::ApplyReport;
use idsync_engine::{Mapping, Policy, Target};
use idsync_model::{AgreementState, Directory, Plan, Snapshot};
use idsync_runner::RunOptions;
use idsync_runner::testing::run_seeded;

/// A 429 storm an emulator can be told to start and stop: a bucket of 3 requests, refilled at
/// 200 a second.
pub fn storm(infra: &Infra) -> Box<dyn Fn(bool) + Send + Sync + '_> {
    Box::new(move |on: bool| {
        infra.set_throttle(on.then_some(ThrottleConfig {
            capacity: 3.0,
            per_second: 200.0,
        }))
    })
}

/// The demo's directory, without the group outside the scope and the users it alone reaches.
pub fn directory() -> Snapshot {
    let d: Directory =
        serde_json::from_str(include_str!("../../../demo/src/directory.json")).unwrap();
    let mut s: Snapshot = d.try_into().unwrap();
    s.groups.retain(|_, g| g.display_name != "OTHER_TEAM");
    s.users
        .retain(|_, u| u.user_name != "olga@company.com" && u.user_name != "frank@company.com");
    s
}

/// Plans and applies `s` to `t` as `idsync sync` does (through the runner, observing in full),
/// and records the state.
pub async fn sync(
    t: &dyn Target,
    s: &Snapshot,
    mapping: &Mapping,
    st: &mut AgreementState,
) -> (Plan, ApplyReport) {
    sync_policy(t, s, mapping, &Policy::default(), st).await
}

/// [`sync`] under `policy`.
pub async fn sync_policy(
    t: &dyn Target,
    s: &Snapshot,
    mapping: &Mapping,
    policy: &Policy,
    st: &mut AgreementState,
) -> (Plan, ApplyReport) {
    let opts = RunOptions {
        workers: 4,
        reconcile: None,
        ..RunOptions::default()
    };
    let out = run_seeded(t, s, mapping, policy, st, &opts).await.unwrap();
    let plan = out.file.unwrap().plan;
    assert!(plan.halt.is_none(), "{:?}", plan.halt);
    (plan, out.report.unwrap())
}

/// The next request on an HTTP/1.1 connection: method, path (with its query) and body; `None`
/// when the client closed the connection.
pub fn read_request(
    reader: &mut std::io::BufReader<std::net::TcpStream>,
) -> Option<(String, String, Vec<u8>)> {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    Some((method, path, body))
}
