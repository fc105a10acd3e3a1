//! The status page of `idsync run --listen` (issue #16, item 7) in a real headless browser
//! (Chromium's headless shell, Debian's `chromium-headless-shell`): the service syncs a good and a
//! broken target, then the browser renders `/`; its DOM is checked for the agreements, their
//! outcomes and counts, the change log and the nested groups' picture, and its screenshot for being
//! a whole page. Run by `scripts/browser.sh`, which installs the browser.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::Sandbox;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A target whose file cannot be written.
const BROKEN: &str = "\n[targets.broken]\nkind = \"file\"\nprofile = \"lakefs\"\npath = \"directory.json/lake.json\"\n";

/// The browser, on loopback only: every host name but 127.0.0.1 fails to resolve, and nothing
/// runs in the background.
fn browser(chromium: &str, s: &Sandbox, args: &[&str]) -> std::process::Output {
    Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        ])
        .args(args)
        .current_dir(s.dir.path())
        .env("HOME", s.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Width, height and the decompressed pixel rows of a PNG.
fn png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut at, mut size, mut idat) = (8, (0, 0), Vec::new());
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                size = (
                    u32::from_be_bytes(data[0..4].try_into().unwrap()),
                    u32::from_be_bytes(data[4..8].try_into().unwrap()),
                );
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    (size.0, size.1, raw)
}

#[test]
#[ignore = "needs Chromium's headless shell: run scripts/browser.sh"]
fn the_status_page_renders_in_a_real_browser() {
    let chromium = std::env::var("IDSYNC_TEST_CHROMIUM").expect("IDSYNC_TEST_CHROMIUM");
    let s = Sandbox::new(BROKEN);
    let err = std::fs::File::create(s.path("run.err")).unwrap();
    let mut child = s
        .command(&["run", "--every", "1h", "--listen", "127.0.0.1:0"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = s.read("run.err");
        if log.contains("cycle 1 ended") {
            break log;
        }
        assert!(Instant::now() < until, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let addr = log
        .split("and /readyz on http://")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap()
        .to_owned();
    let url = format!("http://{addr}/");

    // The DOM as the browser built it.
    let o = browser(&chromium, &s, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{dom}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "<title>idsync status</title>",
        "<td>dbx</td><td><span class=\"ok\">active</span></td>",
        "success (exit 0)",
        "<td>broken</td><td><span class=\"none\">no state yet</span></td>",
        "failure (exit 1)",
        "broken: target broken: cannot read the target file directory.json/lake.json",
        // Owned by dbx: 4 users, 1 service principal, 3 groups.
        "<td class=\"n\">4</td><td class=\"n\">1</td><td class=\"n\">3</td>",
        "<td>user:chloé@corp.example</td>",
        "<td>group:Data \"Eng\"</td>",
        "the scope's groups as last applied to dbx",
        ">Data \"Eng\"</text>",
        ">Platform</text>",
        ">Équipe</text>",
    ] {
        assert!(dom.contains(want), "{want}\n{dom}");
    }
    // Data "Eng" holds Platform: one arrow.
    assert_eq!(dom.matches("marker-end=").count(), 1, "{dom}");
    assert!(!dom.contains("<script"), "{dom}");

    // A screenshot of the whole page: the size asked for, and not blank.
    let o = browser(
        &chromium,
        &s,
        &[
            "--screenshot=status.png",
            "--window-size=1280,1400",
            "--hide-scrollbars",
            &url,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shot = std::fs::read(s.path("status.png")).unwrap();
    let (w, h, pixels) = png(&shot);
    assert_eq!((w, h), (1280, 1400));
    let mut seen = [false; 256];
    for b in &pixels {
        seen[*b as usize] = true;
    }
    assert!(
        seen.iter().filter(|s| **s).count() > 64,
        "the screenshot is nearly uniform"
    );
    // Kept for people: target/tmp/status-page.png.
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
        &shot,
    );

    child.kill().unwrap();
    child.wait().unwrap();
}
