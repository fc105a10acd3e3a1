//! `[notify]` (issue #16, item 5): the real binary posts run summaries to a webhook receiver on
//! loopback: a failure (retried after a 429, not after a 503), a halt and a change in the Teams shape, and a receiver
//! that never answers does not hold the run up. The webhook's path is a credential: it never shows
//! in the output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::{Sandbox, code, text};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The webhook's secret part, as in a Slack URL.
const TOKEN: &str = "T0001/B0002/s3cr3tW3bh00kT0k3n";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    content_type: String,
    body: serde_json::Value,
}

/// A webhook receiver on loopback: answers each request with the next status of `answers` (0:
/// never answer), then 200.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Receiver {
    fn start(answers: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/services/{TOKEN}", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(answers.to_vec()));
        let g = got.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (g, answers) = (g.clone(), answers.clone());
                std::thread::spawn(move || serve(conn, &g, &answers));
            }
        });
        Receiver { url, got }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

fn serve(conn: std::net::TcpStream, got: &Mutex<Vec<Got>>, answers: &Mutex<Vec<u16>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap(),
                "content-type" => content_type = v.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        got.lock().unwrap().push(Got {
            path,
            content_type,
            body: serde_json::from_slice(&body).unwrap(),
        });
        let status = {
            let mut a = answers.lock().unwrap();
            if a.is_empty() { 200 } else { a.remove(0) }
        };
        if status == 0 {
            // Hold the connection open without a word.
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        let reply = if status == 200 { "ok" } else { "busy" };
        let retry = if status == 429 {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\n{retry}content-length: {}\r\n\r\n{reply}",
            reply.len()
        );
    }
}

/// A second target whose file cannot be written: its runs fail.
const BROKEN: &str = "\n[targets.broken]\nkind = \"file\"\nprofile = \"lakefs\"\npath = \"directory.json/lake.json\"\n";

#[test]
fn a_failure_is_posted_retried_after_a_429_and_the_url_never_shows() {
    let r = Receiver::start(&[429]);
    let s = Sandbox::new(BROKEN);
    let o = s.run_env(&["sync"], &[("IDSYNC_WEBHOOK_URL", &r.url)]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(!out.contains(TOKEN), "the webhook URL leaked: {out}");
    assert!(!out.contains("not delivered"), "{out}");

    // Two requests for one summary: the 429, then its retry. The good target is not reported.
    let got = r.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, got[1].body);
    assert_eq!(got[0].path, format!("/services/{TOKEN}"));
    assert_eq!(got[0].content_type, "application/json");
    let body = got[0].body.as_object().unwrap();
    assert_eq!(body.len(), 1, "Slack's shape is text alone: {body:?}");
    let t = body["text"].as_str().unwrap();
    assert!(t.starts_with("*idsync: target broken failed on "), "{t}");
    assert!(t.contains("(exit code 1)"), "{t}");
    assert!(
        t.contains("directory.json/lake.json"),
        "the error says what failed: {t}"
    );
    assert!(!t.contains("target dbx"), "{t}");

    // A 503 is not retried (the message may have been posted): one request, and a warning.
    let r503 = Receiver::start(&[503]);
    let o = s.run_env(&["sync"], &[("IDSYNC_WEBHOOK_URL", &r503.url)]);
    let out = text(&o);
    assert_eq!(r503.got().len(), 1, "{out}");
    assert!(
        out.contains("warning: the notification of target broken's failed run was not delivered"),
        "{out}"
    );
    assert!(!out.contains(TOKEN), "{out}");

    // A plan changes nothing and posts nothing.
    let o = s.run_env(&["plan"], &[("IDSYNC_WEBHOOK_URL", &r.url)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert_eq!(r.got().len(), 2);
}

#[test]
fn changes_and_a_halt_are_posted_as_teams_cards() {
    let r = Receiver::start(&[]);
    let s = Sandbox::new(
        "[policy]\ndeprovision = \"delete\"\nmax_deletions = 0\n\n[notify]\non = \"change\"\nformat = \"teams\"\n",
    );
    let env = [("IDSYNC_WEBHOOK_URL", r.url.as_str())];
    let o = s.run_env(&["sync"], &env);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let got = r.got();
    assert_eq!(got.len(), 1, "{got:?}");
    let card = &got[0].body["attachments"][0];
    assert_eq!(got[0].body["type"], "message");
    assert_eq!(
        card["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let body = card["content"]["body"].to_string();
    assert!(body.contains("idsync: target dbx changed on "), "{body}");
    assert!(body.contains("kevin@corp.example"), "{body}");

    // Nothing changes: nothing posted.
    assert_eq!(code(&s.run_env(&["sync"], &env)), 0);
    assert_eq!(r.got().len(), 1);

    // Everyone leaves: the deletions exceed max_deletions and the run halts.
    s.write(
        "directory.json",
        r#"{"groups":[{"id":"g3","displayName":"Équipe","members":[]}]}"#,
    );
    let o = s.run_env(&["sync"], &env);
    assert_eq!(code(&o), 3, "{}", text(&o));
    let got = r.got();
    assert_eq!(got.len(), 2, "{got:?}");
    let body = got[1].body["attachments"][0]["content"]["body"].to_string();
    assert!(body.contains("idsync: target dbx halted on "), "{body}");
    assert!(body.contains("(exit code 3)"), "{body}");
    assert!(
        body.contains("--approve-deletions"),
        "says how to approve: {body}"
    );
}

#[test]
fn a_webhook_that_never_answers_does_not_hold_the_run_up() {
    let r = Receiver::start(&[0, 0, 0, 0, 0]);
    let s = Sandbox::new(&format!("{BROKEN}\n[notify]\ntimeout = \"2s\"\n"));
    let started = Instant::now();
    let o = s.run_env(&["sync"], &[("IDSYNC_WEBHOOK_URL", &r.url)]);
    let took = started.elapsed();
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    // The run itself went on: the good target was synced.
    assert!(s.read("dbx.json").contains("kevin@corp.example"), "{out}");
    assert!(
        out.contains("warning: the notification of target broken's failed run was not delivered"),
        "{out}"
    );
    assert!(!out.contains(TOKEN), "{out}");
    assert!(took < Duration::from_secs(15), "waited {took:?}");
    assert!(!r.got().is_empty());
}

#[test]
fn a_webhook_in_clear_text_off_this_machine_is_refused_without_echoing_it() {
    let s = Sandbox::new("");
    let url = format!("http://hooks.example.com/services/{TOKEN}");
    let o = s.run_env(&["validate"], &[("IDSYNC_WEBHOOK_URL", &url)]);
    let out = text(&o);
    assert_ne!(code(&o), 0, "{out}");
    assert!(out.contains("IDSYNC_WEBHOOK_URL"), "{out}");
    assert!(out.contains("use https://"), "{out}");
    assert!(!out.contains(TOKEN), "{out}");
}
