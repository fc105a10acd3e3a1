//! The LDAP source against a canned server on 127.0.0.1 that misbehaves as real ones do: it never
//! answers, drops the connection in the middle of a page, hits its size or time limit, refuses the
//! paged-results control, or is not an LDAP server at all. Each gives a clear error that names the
//! server and what to do, never the password, and no panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idsync_connectors::sources::ldap::LdapSource;
use idsync_connectors::sources::ldap::config::{Flavour, LdapSourceConfig};
use idsync_engine::scope::Scope;
use idsync_engine::{Source, SourceError, SourceErrorKind};
use idsync_model::Secret;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "never-in-a-message-4711";

fn len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let b: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|x| *x == 0)
        .collect();
    let mut out = vec![0x80 | b.len() as u8];
    out.extend(b);
    out
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(len(content.len()));
    out.extend_from_slice(content);
    out
}

fn message(id: u8, op: Vec<u8>) -> Vec<u8> {
    let mut body = tlv(0x02, &[id]);
    body.extend(op);
    tlv(0x30, &body)
}

/// An LDAPResult body (resultCode, matchedDN, diagnosticMessage) under `tag`.
fn result(tag: u8, rc: u8, text: &str) -> Vec<u8> {
    let mut b = tlv(0x0a, &[rc]);
    b.extend(tlv(0x04, b""));
    b.extend(tlv(0x04, text.as_bytes()));
    tlv(tag, &b)
}

fn entry(dn: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (k, v) in attrs {
        let mut a = tlv(0x04, k.as_bytes());
        a.extend(tlv(0x31, &tlv(0x04, v.as_bytes())));
        list.extend(tlv(0x30, &a));
    }
    let mut b = tlv(0x04, dn.as_bytes());
    b.extend(tlv(0x30, &list));
    tlv(0x64, &b)
}

/// One request: its message id and its operation's tag.
async fn request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u8, u8)> {
    loop {
        if buf.len() >= 2 {
            let (n, head) = if buf[1] & 0x80 == 0 {
                (buf[1] as usize, 2)
            } else {
                let k = (buf[1] & 0x7f) as usize;
                if buf.len() < 2 + k {
                    (usize::MAX, 0)
                } else {
                    let n = buf[2..2 + k]
                        .iter()
                        .fold(0usize, |a, b| (a << 8) | *b as usize);
                    (n, 2 + k)
                }
            };
            if n != usize::MAX && buf.len() >= head + n {
                let msg: Vec<u8> = buf.drain(..head + n).collect();
                // INTEGER messageID (short), then the operation's tag.
                let id_len = msg[head + 1] as usize;
                let id = msg[head + 2 + id_len - 1];
                let op = msg[head + 2 + id_len];
                return Some((id, op));
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What the canned server does with the n-th search (0: the root DSE).
#[derive(Clone, Copy)]
enum Search {
    /// Answers with nothing found.
    Empty,
    /// Sends half of an entry and closes the connection.
    DropMidEntry,
    /// Sends one entry, then ends with this result code.
    EntryThen(u8),
}

#[derive(Clone)]
enum Script {
    /// Accepts, reads, never answers.
    Silent,
    /// Answers the bind with HTML, as a web server on the wrong port would.
    Html,
    /// A bind that succeeds, then these searches.
    Searches(Vec<Search>),
}

async fn serve(script: Script) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut searches = 0usize;
                while let Some((id, op)) = request(&mut s, &mut buf).await {
                    let out = match (&*script, op) {
                        (Script::Silent, _) => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        (Script::Html, _) => {
                            let _ = s
                                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\r\n<html><body>400</body></html>")
                                .await;
                            return;
                        }
                        (Script::Searches(_), 0x60) => message(id, result(0x61, 0, "")),
                        (Script::Searches(plan), 0x63) => {
                            let step = plan.get(searches).copied().unwrap_or(Search::Empty);
                            searches += 1;
                            match step {
                                Search::Empty => message(id, result(0x65, 0, "")),
                                Search::DropMidEntry => {
                                    let e = message(
                                        id,
                                        entry(
                                            "uid=a,ou=people,dc=x",
                                            &[
                                                ("uid", "a"),
                                                (
                                                    "entryUUID",
                                                    "8c4f1e7a-0000-4000-8000-000000000001",
                                                ),
                                            ],
                                        ),
                                    );
                                    let _ = s.write_all(&e[..e.len() / 2]).await;
                                    let _ = s.shutdown().await;
                                    return;
                                }
                                Search::EntryThen(rc) => {
                                    let mut out = message(
                                        id,
                                        entry(
                                            "uid=a,ou=people,dc=x",
                                            &[
                                                ("uid", "a"),
                                                (
                                                    "entryUUID",
                                                    "8c4f1e7a-0000-4000-8000-000000000001",
                                                ),
                                            ],
                                        ),
                                    );
                                    out.extend(message(id, result(0x65, rc, "limit reached")));
                                    out
                                }
                            }
                        }
                        // Unbind, abandon: nothing to answer.
                        _ => continue,
                    };
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("ldap://{addr}")
}

async fn read(url: String) -> SourceError {
    let src = LdapSource::new(LdapSourceConfig {
        server_endpoint: url,
        bind_dn: Some("cn=idsync,dc=x".into()),
        bind_password: Some(Secret::new(PASSWORD)),
        user_base_dn: "ou=people,dc=x".into(),
        user_filter: None,
        username_attribute: None,
        group_base_dn: "ou=groups,dc=x".into(),
        group_filter: None,
        group_name_attribute: "cn".into(),
        member_attribute: "member".into(),
        mail_attribute: "mail".into(),
        display_name_attribute: None,
        disabled_attribute: None,
        disabled_value: None,
        start_tls: false,
        ca_bundle: None,
        page_size: 100,
        timeout: Duration::from_secs(1),
        flavour: Flavour::Auto,
    });
    let e = tokio::time::timeout(Duration::from_secs(20), src.read_full(&Scope::default()))
        .await
        .expect("the read ended on its own")
        .expect_err("the read failed");
    assert!(!e.message.contains(PASSWORD), "{e}");
    e
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_with_the_setting_to_raise() {
    let e = read(serve(Script::Silent).await).await;
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("binding"), "{e}");
    assert!(e.message.contains("within 1 s"), "{e}");
}

#[tokio::test]
async fn a_connection_dropped_in_the_middle_of_a_page_is_an_error_not_a_short_read() {
    // The root DSE, then the users' first page breaks off.
    let e = read(serve(Script::Searches(vec![Search::Empty, Search::DropMidEntry])).await).await;
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("ou=people,dc=x"), "{e}");
    assert!(e.message.contains("in the middle of the answer"), "{e}");
}

#[tokio::test]
async fn size_and_time_limits_say_what_to_raise() {
    let e = read(serve(Script::Searches(vec![Search::Empty, Search::EntryThen(4)])).await).await;
    assert_eq!(e.kind, SourceErrorKind::Invalid, "{e}");
    assert!(e.message.contains("size limit"), "{e}");
    assert!(e.message.contains("size.prtotal"), "{e}");
    let e = read(serve(Script::Searches(vec![Search::Empty, Search::EntryThen(3)])).await).await;
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("time limit"), "{e}");
}

#[tokio::test]
async fn a_refused_critical_control_names_the_overlay_or_control() {
    // unavailableCriticalExtension (12) on the users' search.
    let e = read(serve(Script::Searches(vec![Search::Empty, Search::EntryThen(12)])).await).await;
    assert_eq!(e.kind, SourceErrorKind::Invalid, "{e}");
    assert!(e.message.contains("critical control"), "{e}");
    assert!(e.message.contains("syncprov"), "{e}");
}

#[tokio::test]
async fn a_web_server_on_the_ldap_port_is_named_not_parsed() {
    let e = read(serve(Script::Html).await).await;
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("binding"), "{e}");
    assert!(e.message.contains("ldaps://"), "{e}");
}
