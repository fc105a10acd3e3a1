//! Hostile input to the real `idsync` binary, one test each: directory content (quotes, `\`, `*`,
//! `( )`, unicode and right-to-left overrides, long names, names differing only by case, duplicate
//! group names, cycles, self-membership, guests, missing and null fields, a 5,000-member group),
//! configuration (malformed TOML, wrong types, unknown keys per connector), state files
//! (truncated, gzip garbage, valid gzip with bad JSON, a newer format, another agreement's) and
//! plan files (truncated, garbage, another agreement's, stale, a newer format, not a plan). Each is
//! either synced exactly or refused with the documented exit code and a message that says what to
//! do, and a refused run changes no file: not the state, not the target. (Hostile answers from the
//! services are in `crates/connectors/tests/hostile_answers.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::Write;

/// Every file of the sandbox but the inputs, with its bytes.
fn files(s: &Sandbox) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![s.dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.strip_prefix(s.dir.path()).unwrap().display().to_string();
                // Leases come and go with every run; inputs are what the test wrote.
                if !name.ends_with(".lease") && !name.ends_with(".json") && !name.ends_with(".toml")
                {
                    out.insert(name, std::fs::read(&p).unwrap());
                }
            }
        }
    }
    out.insert(
        "dbx.json".into(),
        std::fs::read(s.path("dbx.json")).unwrap_or_default(),
    );
    out
}

/// `args` exits with `want`, says `says`, and changes no state or target file.
fn refused(s: &Sandbox, args: &[&str], want: i32, says: &str) {
    let before = files(s);
    let o = s.run(args);
    let t = text(&o);
    assert_eq!(code(&o), want, "{t}");
    assert!(t.contains(says), "expected {says:?} in:\n{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert_eq!(before, files(s), "a refused run changed a file:\n{t}");
}

fn synced(s: &Sandbox) -> String {
    let o = s.run(&["sync"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    text(&o)
}

/// The target file's principals of one kind, as JSON.
fn target(s: &Sandbox) -> serde_json::Value {
    serde_json::from_str(&s.read("dbx.json")).unwrap()
}

fn directory(users: &str, groups: &str) -> String {
    format!(r#"{{"users": [{users}], "groups": [{groups}]}}"#)
}

/// A directory of `users` in one group `Team` holding those with the ids given.
fn team(users: &str, ids: &[&str]) -> String {
    let members: Vec<String> = ids
        .iter()
        .map(|i| format!(r#"{{"type": "user", "id": "{i}"}}"#))
        .collect();
    directory(
        users,
        &format!(
            r#"{{"id": "g0", "displayName": "Team", "members": [{}]}}"#,
            members.join(",")
        ),
    )
}

/// A sandbox synced once with the sample directory, then given `directory`.
fn synced_then(directory: &str) -> Sandbox {
    let s = Sandbox::new("");
    synced(&s);
    s.write("directory.json", directory);
    s
}

const ALICE: &str = r#"{"id": "u1", "userName": "alice@corp.example", "displayName": "Alice"}"#;

// ---- directory content ----

#[test]
fn quotes_backslashes_stars_and_parentheses_sync_exactly() {
    let s = Sandbox::new("");
    let name = r#"Data \"Eng\" \\ * (all)"#;
    s.write(
        "directory.json",
        &directory(ALICE, &format!(r#"{{"id": "g1", "displayName": "{name}", "members": [{{"type": "user", "id": "u1"}}]}}"#)),
    );
    synced(&s);
    assert!(s.read("dbx.json").contains(r#"Data \"Eng\" \\ * (all)"#));
    assert!(
        s.run(&["plan"]).status.success(),
        "a second run has nothing to do"
    );
}

#[test]
fn right_to_left_overrides_are_escaped_in_the_plan_and_kept_exact_in_the_target() {
    let s = Sandbox::new("");
    s.write(
        "directory.json",
        &team(r#"{"id": "u1", "userName": "eve@corp.example", "displayName": "Eve \u202egnp.exe\u001b[2J"}"#, &["u1"]),
    );
    let o = s.run(&["plan"]);
    let t = text(&o);
    assert!(!t.contains('\u{202e}') && !t.contains('\u{1b}'), "{t}");
    assert!(t.contains("\\u{202e}"), "{t}");
    synced(&s);
    assert!(s.read("dbx.json").contains("\\u202e") || s.read("dbx.json").contains('\u{202e}'));
}

#[test]
fn names_of_300_characters_sync() {
    let s = Sandbox::new("");
    let long = "n".repeat(300);
    s.write(
        "directory.json",
        &directory(
            ALICE,
            &format!(r#"{{"id": "g1", "displayName": "{long}", "members": []}}"#),
        ),
    );
    synced(&s);
    assert!(s.read("dbx.json").contains(&long));
}

#[test]
fn users_differing_only_by_case_are_a_conflict_where_the_target_ignores_case() {
    let s = synced_then(&team(
        r#"{"id": "u1", "userName": "Bob@corp.example", "displayName": "Bob"}, {"id": "u2", "userName": "bob@corp.example", "displayName": "bob"}"#,
        &["u1", "u2"],
    ));
    refused(&s, &["sync"], 3, "2 source principals map to user");
}

#[test]
fn duplicate_group_names_are_a_conflict() {
    let s = synced_then(&directory(
        ALICE,
        r#"{"id": "g1", "displayName": "Same", "members": []}, {"id": "g2", "displayName": "Same", "members": []}"#,
    ));
    refused(&s, &["sync"], 3, "2 source principals map to group");
}

#[test]
fn cyclic_groups_sync_and_are_named() {
    let s = Sandbox::new("");
    s.write(
        "directory.json",
        &directory(
            ALICE,
            r#"{"id": "g1", "displayName": "A", "members": [{"type": "group", "id": "g2"}, {"type": "user", "id": "u1"}]},
               {"id": "g2", "displayName": "B", "members": [{"type": "group", "id": "g1"}]}"#,
        ),
    );
    let t = synced(&s);
    assert!(t.contains("cycle"), "{t}");
}

#[test]
fn a_group_containing_itself_is_named_for_what_it_is() {
    let s = Sandbox::new("");
    s.write(
        "directory.json",
        &directory(
            ALICE,
            r#"{"id": "g1", "displayName": "Me", "members": [{"type": "group", "id": "g1"}]}"#,
        ),
    );
    let t = synced(&s);
    assert!(t.contains("contains itself"), "{t}");
}

#[test]
fn guests_are_named_by_their_mail() {
    let s = Sandbox::new("");
    s.write(
        "directory.json",
        &team(
            r#"{"id": "u9", "userName": "guest_partner.example#EXT#@corp.onmicrosoft.com", "displayName": "Guest", "emails": ["guest@partner.example"], "userType": "guest"}"#,
            &["u9"],
        ),
    );
    synced(&s);
    let t = s.read("dbx.json");
    assert!(
        t.contains("guest@partner.example") && !t.contains("#EXT#@"),
        "{t}"
    );
}

#[test]
fn a_user_without_a_user_name_is_a_clear_error() {
    let s = synced_then(&team(r#"{"id": "u1", "displayName": "Nameless"}"#, &["u1"]));
    refused(&s, &["sync"], 1, "missing field `userName`");
}

#[test]
fn a_null_where_a_name_goes_is_a_clear_error() {
    let s = synced_then(&team(r#"{"id": "u1", "userName": null}"#, &["u1"]));
    refused(&s, &["sync"], 1, "invalid type: null");
}

#[test]
fn a_5000_member_group_syncs() {
    let s = Sandbox::new("");
    let users: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                r#"{{"id": "u{i}", "userName": "user{i}@corp.example", "displayName": "U {i}"}}"#
            )
        })
        .collect();
    let members: Vec<String> = (0..5000)
        .map(|i| format!(r#"{{"type": "user", "id": "u{i}"}}"#))
        .collect();
    s.write(
        "directory.json",
        &directory(
            &users.join(","),
            &format!(
                r#"{{"id": "g1", "displayName": "Everyone", "members": [{}]}}"#,
                members.join(",")
            ),
        ),
    );
    synced(&s);
    let t = target(&s);
    let everyone = t["principals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["principal"]["key"] == "Everyone")
        .unwrap();
    let id = everyone["id"].as_str().unwrap();
    assert_eq!(t["members"][id].as_array().unwrap().len(), 5000);
    assert!(
        s.run(&["plan"]).status.success(),
        "a second run has nothing to do"
    );
}

#[test]
fn a_truncated_directory_file_changes_nothing() {
    let s = Sandbox::new("");
    synced(&s);
    let full = s.read("directory.json");
    s.write("directory.json", &full[..full.len() / 2]);
    refused(&s, &["sync"], 1, "directory.json");
}

#[test]
fn a_directory_file_that_is_not_utf8_changes_nothing() {
    let s = Sandbox::new("");
    synced(&s);
    std::fs::write(s.path("directory.json"), [0xff, 0xfe, 0x00, 0x7b]).unwrap();
    refused(&s, &["sync"], 1, "directory.json");
}

// ---- configuration ----

#[test]
fn malformed_toml_names_its_line() {
    let s = Sandbox::new("[policy\ndeprovision = \"none\"\n");
    refused(&s, &["sync"], 1, "idsync.toml");
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let s = Sandbox::new("\n[policy]\nmax_deletions = \"five\"\n");
    refused(&s, &["sync"], 1, "policy.max_deletions");
}

#[test]
fn an_unknown_policy_key_names_its_line() {
    let s = Sandbox::new("\n[policy]\ndelete_everything = true\n");
    refused(&s, &["sync"], 1, "unknown field `delete_everything`");
}

fn unknown_key_of(kind_table: &str) {
    let s = Sandbox::new("");
    let cfg = format!(
        "[state]\nurl = \"state\"\n\n[source]\nkind = \"file\"\npath = \"directory.json\"\n\n[targets.t]\n{kind_table}\nbogus_setting = 1\n"
    );
    s.write("idsync.toml", &cfg);
    refused(&s, &["validate"], 1, "unknown field `bogus_setting`");
}

#[test]
fn an_unknown_lakefs_key_is_refused() {
    unknown_key_of(
        "kind = \"lakefs\"\nendpoint = \"https://lakefs.example\"\naccess_key_id = \"AKIA\"",
    );
}

#[test]
fn an_unknown_databricks_key_is_refused() {
    unknown_key_of(
        "kind = \"databricks\"\nhost = \"https://accounts.example\"\naccount_id = \"a\"",
    );
}

#[test]
fn an_unknown_scim_key_is_refused() {
    unknown_key_of("kind = \"scim\"\nurl = \"https://scim.example/v2\"");
}

#[test]
fn an_unknown_file_target_key_is_refused() {
    unknown_key_of("kind = \"file\"\npath = \"t.json\"");
}

#[test]
fn an_unknown_entra_key_is_refused() {
    let s = Sandbox::new("");
    s.write(
        "idsync.toml",
        "[source]\nkind = \"entra\"\ntenant_id = \"t\"\nclient_id = \"c\"\nbogus_setting = 1\n\n[targets.t]\nkind = \"file\"\npath = \"t.json\"\n",
    );
    refused(&s, &["validate"], 1, "unknown field `bogus_setting`");
}

#[test]
fn an_unknown_connector_kind_lists_the_known_ones() {
    let s = Sandbox::new("");
    s.write(
        "idsync.toml",
        "[source]\nkind = \"file\"\npath = \"directory.json\"\n\n[targets.t]\nkind = \"okta\"\n",
    );
    refused(&s, &["validate"], 1, "databricks");
}

#[test]
fn a_kanidm_target_without_its_server_or_token_is_refused_with_both_named() {
    let s = Sandbox::new("");
    s.write(
        "idsync.toml",
        "[source]\nkind = \"file\"\npath = \"directory.json\"\n\n[targets.t]\nkind = \"kanidm\"\nyield_attributes = [\"name\"]\n",
    );
    refused(&s, &["validate"], 1, "url");
    refused(&s, &["validate"], 1, "KANIDM_SYNC_TOKEN");
    refused(
        &s,
        &["validate"],
        1,
        "\"name\" is not an attribute idsync writes that can be yielded",
    );
}

#[test]
fn an_unknown_apply_error_policy_is_refused() {
    let s = Sandbox::new("\n[policy]\non_apply_error = \"ignore\"\n");
    refused(&s, &["sync"], 1, "use \"resume\" or \"rollback\"");
}

#[test]
fn a_percentage_over_100_is_refused() {
    let s = Sandbox::new("\n[policy]\nmax_failed_percent = 250\n");
    refused(&s, &["sync"], 1, "not a percentage");
}

// ---- state files ----

/// A sandbox synced once, its state document replaced by `bytes`.
fn with_state(bytes: &[u8]) -> Sandbox {
    let s = Sandbox::new("");
    synced(&s);
    std::fs::write(s.path("state/dbx.state"), bytes).unwrap();
    s
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_truncated_state_is_reported_and_never_overwritten() {
    let s = Sandbox::new("");
    synced(&s);
    let full = std::fs::read(s.path("state/dbx.state")).unwrap();
    std::fs::write(s.path("state/dbx.state"), &full[..full.len() / 2]).unwrap();
    refused(&s, &["sync"], 1, "state");
}

#[test]
fn gzip_garbage_as_state_is_reported_and_never_overwritten() {
    let mut bytes = vec![0x1f, 0x8b, 0x08, 0x00];
    bytes.extend((0..200u8).map(|i| i.wrapping_mul(37)));
    let s = with_state(&bytes);
    refused(&s, &["sync"], 1, "state");
}

#[test]
fn valid_gzip_of_bad_json_as_state_is_reported_and_never_overwritten() {
    let s = with_state(&gzip(
        b"{\"format\": 1, \"agreement\": \"dbx\", \"version\": ",
    ));
    refused(&s, &["sync"], 1, "state");
}

#[test]
fn a_state_from_a_newer_idsync_is_refused() {
    let s = with_state(&gzip(
        br#"{"format": 99, "agreement": "dbx", "version": 3}"#,
    ));
    refused(&s, &["sync"], 1, "newer");
}

#[test]
fn another_agreements_state_is_named_as_such() {
    let s = Sandbox::new("");
    synced(&s);
    let mut st = state_of(&s, "dbx");
    st["agreement"] = "lake".into();
    s.write("other.json", &st.to_string());
    // Written as the store writes (a plain JSON import goes through the same codec).
    std::fs::write(s.path("state/dbx.state"), gzip(st.to_string().as_bytes())).unwrap();
    refused(&s, &["sync"], 1, "lake");
}

// ---- plan files ----

fn planned() -> Sandbox {
    let s = Sandbox::new("");
    let o = s.run(&["plan", "--out", "p.json"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    s
}

#[test]
fn a_truncated_plan_is_refused() {
    let s = planned();
    let p = s.read("p.json");
    s.write("p.json", &p[..p.len() / 2]);
    refused(&s, &["apply", "p.json"], 1, "p.json");
}

#[test]
fn a_garbage_plan_is_refused() {
    let s = planned();
    std::fs::write(s.path("p.json"), [0x1f, 0x8b, 0x08, 0x00, 0xde, 0xad]).unwrap();
    refused(&s, &["apply", "p.json"], 1, "p.json");
}

#[test]
fn a_plan_for_an_agreement_this_configuration_lacks_is_refused() {
    let s = planned();
    let other = Sandbox::new("");
    let cfg = other
        .read("idsync.toml")
        .replace("[targets.dbx]", "[targets.other]");
    other.write("idsync.toml", &cfg);
    other.write("p.json", &s.read("p.json"));
    refused(&other, &["apply", "p.json"], 1, "dbx");
}

#[test]
fn a_stale_plan_is_refused() {
    let s = planned();
    synced(&s);
    refused(&s, &["apply", "p.json"], 1, "state version");
}

#[test]
fn a_plan_of_a_newer_format_is_refused() {
    let s = planned();
    let mut p: serde_json::Value = serde_json::from_str(&s.read("p.json")).unwrap();
    p["format"] = 9.into();
    s.write("p.json", &p.to_string());
    refused(&s, &["apply", "p.json"], 1, "written by a newer idsync");
}

#[test]
fn a_directory_given_as_a_plan_is_refused() {
    let s = planned();
    refused(&s, &["apply", "directory.json"], 1, "directory.json");
}
