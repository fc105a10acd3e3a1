//! Ending an agreement (issue #14, item 3) through the real binary on a file target: terminate is
//! a plan first and deletes only with the exact count, spares what was adopted unless asked, and
//! ends the agreement; finalise keeps every principal and ends it; later runs stop either way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use common::{Sandbox, code, state_of, text};

/// The target before the first sync: bob made by hand (adopted), zoe not idsync's at all.
const BEFORE: &str = r#"{"nextId": 100, "principals": [
  {"id": "99", "principal": {"kind": "user", "key": "bob@corp.example", "active": true}},
  {"id": "98", "principal": {"kind": "user", "key": "zoe@corp.example", "active": true}}
], "members": {}}"#;

fn keys(s: &Sandbox) -> Vec<String> {
    let t: serde_json::Value = serde_json::from_str(&s.read("dbx.json")).unwrap();
    let mut k: Vec<String> = t["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["principal"]["key"].as_str().unwrap().to_owned())
        .collect();
    k.sort();
    k
}

/// The N of "--yes-delete N" in a plan's output.
fn asked(out: &str) -> usize {
    out.split("--yes-delete ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect(out)
}

fn adopted_sandbox() -> Sandbox {
    let s = Sandbox::new("[policy]\nadopt_keys = [\"user:bob@corp.example\"]\n");
    s.write("dbx.json", BEFORE);
    let o = s.run(&["sync"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(keys(&s).len(), 9, "7 created, bob adopted, zoe");
    s
}

#[test]
fn terminate_plans_first_deletes_what_it_created_and_ends_the_agreement() {
    let s = adopted_sandbox();
    let o = s.run(&["agreement", "status", "dbx"]);
    let out = text(&o);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.contains("dbx: active"), "{out}");
    assert!(
        out.contains("owns: 4 users (1 adopted), 1 service principal, 3 groups"),
        "{out}"
    );
    assert!(
        out.contains(
            "terminate would: delete the 7 principal(s) it created; the 1 it adopted stay"
        ),
        "{out}"
    );

    let out = text(&s.run(&["state", "show", "dbx"]));
    assert!(
        out.contains("terminate would: delete the 7 principal(s)"),
        "{out}"
    );

    // A plan: nothing deleted, the count to confirm named.
    let before = s.read("dbx.json");
    let o = s.run(&["agreement", "terminate", "dbx"]);
    let out = text(&o);
    assert_eq!(code(&o), 2, "{out}");
    assert!(out.contains("(plan only: nothing was written)"), "{out}");
    assert!(out.contains("the 1 it adopted stay as they are"), "{out}");
    let n = asked(&out);
    assert_eq!(n, 7, "{out}");
    assert_eq!(s.read("dbx.json"), before);

    // The wrong count deletes nothing.
    let o = s.run(&["agreement", "terminate", "dbx", "--yes-delete", "6"]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(
        out.contains("--yes-delete 6, but the plan deletes 7"),
        "{out}"
    );
    assert_eq!(s.read("dbx.json"), before);

    // The right one: what idsync created is gone, bob (adopted) and zoe stay.
    let o = s.run(&["agreement", "terminate", "dbx", "--yes-delete", "7"]);
    let out = text(&o);
    assert_eq!(code(&o), 0, "{out}");
    assert!(out.contains("dbx is terminated"), "{out}");
    assert_eq!(keys(&s), ["bob@corp.example", "zoe@corp.example"]);
    let st = state_of(&s, "dbx");
    assert_eq!(st["status"], "terminated", "{st}");
    assert!(
        st["owned"]
            .as_object()
            .unwrap()
            .values()
            .all(|m| m.as_object().unwrap().is_empty()),
        "{st}"
    );
    // The change log has the deletions.
    let log = text(&s.run(&["log", "dbx"]));
    assert_eq!(log.matches(" delete ").count(), 7, "{log}");

    // Later runs stop, and say so.
    let o = s.run(&["sync"]);
    let out = text(&o);
    assert_eq!(code(&o), 1, "{out}");
    assert!(out.contains("\"dbx\" is terminated"), "{out}");
    assert_eq!(keys(&s), ["bob@corp.example", "zoe@corp.example"]);
    let out = text(&s.run(&["agreement", "status"]));
    assert!(out.contains("dbx: terminated"), "{out}");
}

#[test]
fn terminate_with_include_adopted_deletes_the_adopted_too() {
    let s = adopted_sandbox();
    let o = s.run(&["agreement", "terminate", "dbx", "--include-adopted"]);
    let out = text(&o);
    assert_eq!(code(&o), 2, "{out}");
    assert_eq!(asked(&out), 8, "{out}");
    let o = s.run(&[
        "agreement",
        "terminate",
        "dbx",
        "--include-adopted",
        "--yes-delete",
        "8",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(keys(&s), ["zoe@corp.example"]);
}

#[test]
fn finalise_keeps_every_principal_and_ends_the_agreement() {
    let s = adopted_sandbox();
    let before = s.read("dbx.json");
    let o = s.run(&["agreement", "finalise", "dbx"]);
    let out = text(&o);
    assert_eq!(code(&o), 2, "{out}");
    assert!(
        out.contains("finalise would: hand the 8 principal(s) over"),
        "{out}"
    );
    assert!(out.contains("idsync agreement finalise dbx --yes"), "{out}");
    assert_eq!(state_of(&s, "dbx")["status"], "active");

    let o = s.run(&["agreement", "finalise", "dbx", "--yes"]);
    let out = text(&o);
    assert_eq!(code(&o), 0, "{out}");
    assert!(
        out.contains("gave up its authority over 8 principal(s) (4 users (1 adopted), 1 service principal, 3 groups)"),
        "{out}"
    );
    assert_eq!(s.read("dbx.json"), before, "the target is untouched");
    let st = state_of(&s, "dbx");
    assert_eq!(st["status"], "finalised", "{st}");

    for args in [&["sync"][..], &["agreement", "terminate", "dbx"][..]] {
        let o = s.run(args);
        let out = text(&o);
        assert_eq!(code(&o), 1, "{args:?}: {out}");
        assert!(out.contains("\"dbx\" is finalised"), "{args:?}: {out}");
    }
    assert_eq!(s.read("dbx.json"), before);
    let o = s.run(&["agreement", "finalise", "dbx", "--yes"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
}
