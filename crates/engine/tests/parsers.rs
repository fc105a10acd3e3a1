//! Random input to every parser a user's files reach, which must answer with an error and never
//! panic: mapping templates, saved plans (and their seal), directory files (JSON, then the checks
//! that make a snapshot of it). State documents are fuzzed in `crates/state/tests/decode.rs`, the
//! configuration in the CLI's unit tests, filter escaping in the connectors'.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use idsync_engine::Mapping;
use idsync_model::{Directory, PlanFile, Snapshot};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// JSON values of any shape, with the keys a directory or a plan has among random ones, so that
/// the decoders get past the first field.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let keys = prop::sample::select(vec![
        "id",
        "userName",
        "displayName",
        "members",
        "type",
        "users",
        "groups",
        "servicePrincipals",
        "appId",
        "active",
        "format",
        "agreement",
        "stateVersion",
        "ops",
        "op",
        "plan",
        "plans",
        "snapshot",
        "checksum",
        "target",
        "key",
        "kind",
        "userType",
        "emails",
        "x",
    ]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "\\PC{0,12}".prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "user",
            "group",
            "servicePrincipal",
            "create",
            "guest",
            "u1",
            "g1"
        ])
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn templates_parse_or_say_why(text in "\\PC{0,40}") {
        for parsed in [Mapping::user_template(&text), Mapping::group_template(&text)] {
            if let Err(e) = parsed {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn random_bytes_are_no_plan(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(file) = serde_json::from_slice::<PlanFile>(&bytes) {
            let _ = idsync_runner::saved::intact(&file);
        }
    }

    #[test]
    fn random_json_is_a_plan_or_refused(v in json()) {
        if let Ok(file) = serde_json::from_value::<PlanFile>(v) {
            // Unsealed: refused before anything reads its operations.
            if file.checksum.is_none() {
                prop_assert!(!idsync_runner::saved::intact(&file));
            }
        }
    }

    #[test]
    fn random_json_is_a_directory_or_refused(v in json()) {
        if let Ok(d) = serde_json::from_value::<Directory>(v) {
            let _: Result<Snapshot, _> = d.try_into();
        }
    }
}
