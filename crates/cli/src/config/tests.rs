//! The configuration's tests: the shared sections, the environment, and the registry walk.
use super::*;
use idsync_engine::Deprovision;

fn parse_str(text: &str, env: &Env) -> Result<Config, ConfigErrors> {
    parse(text, "idsync.toml", Path::new("/cfg"), env)
}

const GOOD: &str = r#"
[state]
url = "/var/lib/idsync"

[source]
kind = "file"
path = "dir.json"

[scope]
groups = ["TEAM_ALPHA"]
search_depth = 2

[policy]
deprovision = "deactivate"
adopt_keys = ["user:jane@corp.example"]
max_deletions = 5

[targets.lake]
kind = "file"
profile = "lakefs"
path = "lake.json"
default_policies = ["FSReadAll"]

[targets.lake.mapping]
user_name = "waad|{id}"
"#;

#[test]
fn a_good_file() {
    let c = parse_str(GOOD, &Env::default()).unwrap();
    assert_eq!(c.state_url, "/var/lib/idsync");
    assert_eq!(c.source.kind(), "file");
    assert_eq!(c.source.describe(), "file /cfg/dir.json");
    assert_eq!(c.scope.search_depth, 2);
    let a = &c.agreements[0];
    assert_eq!(a.name, "lake");
    assert_eq!(a.policy.deprovision, Deprovision::Deactivate);
    assert_eq!(a.policy.max_deletions, Some(5));
    assert_eq!(a.mapping.user_name.as_str(), "waad|{id}");
    assert_eq!(a.mapping.group_policies, ["FSReadAll".to_string()].into());
    assert_eq!(
        a.policy.on_apply_error,
        idsync_engine::OnApplyError::Resume,
        "resume is the default"
    );
}

#[test]
fn on_apply_error_is_resume_or_rollback() {
    let text = GOOD.replace(
        "max_deletions = 5",
        "max_deletions = 5\non_apply_error = \"rollback\"",
    );
    let c = parse_str(&text, &Env::default()).unwrap();
    assert_eq!(
        c.agreements[0].policy.on_apply_error,
        idsync_engine::OnApplyError::Rollback
    );
    let text = GOOD.replace(
        "max_deletions = 5",
        "max_deletions = 5\non_apply_error = \"undo\"",
    );
    let e = parse_str(&text, &Env::default()).unwrap_err().to_string();
    assert!(
        e.contains("policy.on_apply_error: \"undo\" is not an apply error policy; use \"resume\" or \"rollback\""),
        "{e}"
    );
}

#[test]
fn edge_groups_are_omitted_or_kept_empty() {
    let c = parse_str(GOOD, &Env::default()).unwrap();
    assert_eq!(c.scope.edge_groups, idsync_engine::scope::EdgeGroups::Omit);
    let text = GOOD.replace(
        "search_depth = 2",
        "search_depth = 2\nedge_groups = \"empty\"",
    );
    let c = parse_str(&text, &Env::default()).unwrap();
    assert_eq!(c.scope.edge_groups, idsync_engine::scope::EdgeGroups::Empty);
    let text = GOOD.replace(
        "search_depth = 2",
        "search_depth = 2\nedge_groups = \"create\"",
    );
    let e = parse_str(&text, &Env::default()).unwrap_err().to_string();
    assert!(
        e.contains("scope.edge_groups: \"create\" is not a choice: \"omit\""),
        "{e}"
    );
}

#[test]
fn every_error_is_reported_with_its_line() {
    let text = r#"
[source]
kind = "file"
path = "dir.json"
colour = "blue"

[policy]
deprovision = "sometimes"
max_deletions = "five"

[targets.lake]
kind = "file"
path = "lake.json"
host = "https://nowhere"

[targets.lake.mapping]
user_name = "{nope"
"#;
    let e = parse_str(text, &Env::default()).unwrap_err();
    let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(
        lines[0].starts_with("idsync.toml:5: source.colour: unknown field `colour`"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("idsync.toml:8: policy.deprovision: \"sometimes\""),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("idsync.toml:9: policy.max_deletions: invalid type"),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].starts_with("idsync.toml:14: targets.lake.host: unknown field `host`"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].starts_with("idsync.toml:17: targets.lake.mapping.user_name: template"),
        "{}",
        lines[4]
    );
}

#[test]
fn syntax_errors_are_reported_with_lines() {
    let e = parse_str("[source]\nkind = \"file\nx = 1\n", &Env::default()).unwrap_err();
    assert!(e.0[0].location.starts_with("idsync.toml:2"), "{e}");
}

#[test]
fn the_existing_scripts_environment_names_work() {
    let env = Env::from_pairs([
        ("ENTRA_TENANT_ID", "tenant-1"),
        ("ENTRA_APPLICATION_ID", "app-1"),
        ("ENTRA_CLIENT_SECRET_VALUE", "s3cret-value"),
        ("LAKEFS_ENDPOINT", "https://org.lakefscloud.io"),
        ("LAKEFS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("LAKEFS_SECRET_ACCESS_KEY", "lakefs-secret"),
        (
            "LAKEFS_DEFAULT_POLICIES",
            "AuthManageOwnCredentials, FSReadAll",
        ),
        ("GROUP_FILTER", "LakeFSProject*"),
        ("DRY_RUN", "maybe"),
    ]);
    let e = parse_str("", &env).unwrap_err();
    let text = e.to_string();
    // Entra and lakeFS are configured completely by the scripts' variables alone: the one error
    // left is the deliberate DRY_RUN. Nothing leaks.
    assert!(text.contains("has 1 error"), "{text}");
    assert!(
        !text.contains("lakefs") && !text.contains("source."),
        "{text}"
    );
    assert!(
        text.contains("environment variable DRY_RUN: \"maybe\" is not a boolean"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret-value") && !text.contains("lakefs-secret"),
        "{text}"
    );
}

#[test]
fn the_environment_alone_chooses_an_entra_source() {
    let env = Env::from_pairs([
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "app-1"),
        ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
        ("LAKEFS_ENDPOINT", "https://lakefs.invalid"),
        ("LAKEFS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
        ("LAKEFS_SECRET_ACCESS_KEY", "lakefs-secret"),
    ]);
    let c = parse_str("", &env).unwrap();
    assert_eq!(c.source.kind(), "entra");
    assert_eq!(c.source.describe(), "entra tenant tenant-1");
    assert_eq!(c.agreements.len(), 1);
    assert_eq!(c.agreements[0].target.kind(), "lakefs");
    // A kind's own problem is reported with the file's line.
    let e = parse_str("[source]\nkind = \"entra\"\nauth = \"kerberos\"\n", &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("idsync.toml:3: source.auth: unknown sign-in method \"kerberos\""),
        "{e}"
    );
}

/// Every kind in the registry rejects a key it does not have, with its line, and every
/// variable a kind reads is documented in the README's table.
#[test]
fn every_kind_rejects_an_unknown_key_with_its_line_and_documents_its_variables() {
    let env = Env::default();
    for kind in registry::SOURCES {
        let text = format!(
            "[source]\nkind = \"{}\"\nno_such_key = 1\n\n[targets.t]\nkind = \"file\"\npath = \"t.json\"\n",
            kind.name()
        );
        let e = parse_str(&text, &env).unwrap_err().to_string();
        assert!(
            e.contains("idsync.toml:3: source.no_such_key: unknown field `no_such_key`"),
            "source kind {}: {e}",
            kind.name()
        );
    }
    for kind in registry::TARGETS {
        let text = format!(
            "[source]\nkind = \"file\"\npath = \"d.json\"\n\n[targets.t]\nkind = \"{}\"\nno_such_key = 1\n",
            kind.name()
        );
        let e = parse_str(&text, &env).unwrap_err().to_string();
        assert!(
            e.contains("idsync.toml:7: targets.t.no_such_key: unknown field `no_such_key`"),
            "target kind {}: {e}",
            kind.name()
        );
    }
    let readme = include_str!("../../../../README.md");
    for name in env_names() {
        assert!(
            readme.contains(&format!("`{name}`")),
            "the README's table of environment variables lacks `{name}`"
        );
    }
}

#[test]
fn a_group_regex_is_compiled_and_a_bad_one_reported_with_its_line() {
    let env = Env::from_pairs([]);
    let c = parse_str(
        &GOOD.replace("[scope]\n", "[scope]\ngroup_regex = \"^data-(eng|ops)$\"\n"),
        &env,
    )
    .unwrap();
    assert!(c.scope.selects("x", "data-ops") && !c.scope.selects("x", "data-opsx"));
    let e = parse_str(
        &GOOD.replace("[scope]\n", "[scope]\ngroup_regex = \"data-(\"\n"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("scope.group_regex: not a regular expression"),
        "{e}"
    );
}

#[test]
fn environment_overrides_the_file() {
    let env = Env::from_pairs([
        ("GROUP_FILTER", "team-*"),
        ("IDSYNC_STATE", "/tmp/st"),
        ("DRY_RUN", "1"),
    ]);
    let c = parse_str(GOOD, &env).unwrap();
    assert_eq!(c.scope.group_filter.as_deref(), Some("team-*"));
    assert_eq!(c.state_url, "/tmp/st");
    assert!(c.dry_run);
}

#[test]
fn environment_never_replaces_configured_targets_or_sources() {
    // Databricks CLI users have DATABRICKS_HOST set; Azure workload identity injects AZURE_*.
    let env = Env::from_pairs([
        ("DATABRICKS_HOST", "https://accounts.azuredatabricks.net"),
        ("AZURE_CLIENT_ID", "pod-identity"),
        ("AZURE_TENANT_ID", "tenant"),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com"),
        ("LAKEFS_ENDPOINT", "https://lakefs.invalid"),
    ]);
    let text = GOOD
        .replace("[targets.lake]", "[targets.databricks]")
        .replace("targets.lake.mapping", "targets.databricks.mapping");
    let c = parse_str(&text, &env).unwrap();
    assert_eq!(c.agreements.len(), 1);
    assert_eq!(c.agreements[0].name, "databricks");
    assert_eq!(c.agreements[0].target.kind(), "file");
    assert_eq!(c.source.kind(), "file");
}

#[test]
fn a_malformed_env_file_never_shows_its_secret() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join(".env");
    std::fs::write(
        &f,
        "GROUP_FILTER=x\nLAKEFS_SECRET_ACCESS_KEY=\"abc-secret-123\n",
    )
    .unwrap();
    let e = Env::load(&[f]).unwrap_err().to_string();
    assert!(!e.contains("abc-secret-123"), "{e}");
    assert!(e.contains(".env:2: cannot parse this line"), "{e}");
}

#[test]
fn a_config_without_source_or_targets_says_what_to_add() {
    let e = parse_str("", &Env::default()).unwrap_err().to_string();
    assert!(e.contains("source.kind: missing"), "{e}");
    assert!(e.contains("no target"), "{e}");
}

#[test]
fn a_groups_file_may_start_with_a_byte_order_mark() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("groups_to_sync.json");
    std::fs::write(&f, b"\xEF\xBB\xBF[\"TEAM_ALPHA\", \"\xC3\x89quipe\"]").unwrap();
    let names = read_groups_file(&f).unwrap();
    assert_eq!(names, ["TEAM_ALPHA", "Équipe"].map(String::from).into());
    std::fs::write(&f, b"{}").unwrap();
    assert!(
        read_groups_file(&f)
            .unwrap_err()
            .contains("not a JSON list of group names")
    );
}

#[cfg(unix)]
#[test]
fn a_secret_in_a_file_others_can_read_gets_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("idsync.toml");
    let text = "[source]\nkind = \"file\"\npath = \"d.json\"\n\n[targets.lake]\nkind = \"lakefs\"\nendpoint = \"https://lakefs.example\"\naccess_key_id = \"AKIA\"\nsecret_access_key = \"in-the-file\"\n";
    std::fs::write(&f, text).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = load(Some(&f), &Env::default()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("targets.lake.secret_access_key")
            && c.warnings[0].contains("chmod 600"),
        "{:?}",
        c.warnings
    );
    assert!(!c.warnings[0].contains("in-the-file"));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load(Some(&f), &Env::default()).unwrap().warnings.is_empty());
    // No secret in the file: no warning, whoever may read it.
    std::fs::write(
        &f,
        text.replace("secret_access_key = \"in-the-file\"\n", ""),
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = Env::from_pairs([("LAKEFS_SECRET_ACCESS_KEY", "from-env")]);
    assert!(load(Some(&f), &env).unwrap().warnings.is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    /// Random text as a configuration: parsed, or refused with every problem named with its
    /// file; never a panic.
    #[test]
    fn random_text_is_a_configuration_or_refused(text in "\\PC{0,200}") {
        if let Err(e) = parse_str(&text, &Env::default()) {
            proptest::prop_assert!(!e.0.is_empty());
        }
    }

    /// Random lines of the keys and sections a configuration has, with values of random types.
    #[test]
    fn random_sections_and_values_are_a_configuration_or_refused(
        lines in proptest::collection::vec(
            (
                proptest::sample::select(vec![
                    "[state]", "[source]", "[scope]", "[policy]", "[mapping]", "[run]",
                    "[targets.t]", "[targets.t.mapping]", "[targets.t.policy]", "",
                ]),
                proptest::sample::select(vec![
                    "kind", "path", "url", "endpoint", "host", "account_id", "groups",
                    "search_depth", "deprovision", "max_deletions", "max_deletions_percent",
                    "on_apply_error", "quarantine_after", "user_name", "group_name",
                    "lease_seconds", "worker_threads", "yield_attributes", "adopt_keys",
                ]),
                proptest::sample::select(vec![
                    "\"file\"", "\"lakefs\"", "\"scim\"", "\"databricks\"", "\"entra\"", "\"ldap\"",
                    "\"{userName|lower}\"", "\"{nope\"", "-1", "0", "99999999999", "1.5",
                    "true", "[\"a\", 1]", "{ x = 1 }", "\"rollback\"", "\"\"", "\"http://10.0.0.1\"",
                ]),
            ),
            0..12,
        )
    ) {
        let text: String = lines
            .iter()
            .map(|(section, key, value)| format!("{section}\n{key} = {value}\n"))
            .collect();
        if let Err(e) = parse_str(&text, &Env::default()) {
            proptest::prop_assert!(e.0.iter().all(|p| !p.to_string().is_empty()));
        }
    }
}

#[test]
fn s3_state_signs_in_as_the_entra_source_does() {
    let entra = r#"
[source]
kind = "entra"
tenant_id = "t1"
auth = "managed_identity"

[targets.lake]
kind = "file"
profile = "lakefs"
path = "lake.json"
"#;
    let state = |extra: &str| {
        format!(
            "[state]\nurl = \"s3://platform-state/idsync\"\nrole_arn = \"arn:aws:iam::1:role/idsync\"\nweb_identity = \"entra\"\naudience = \"api://idsync-state\"\n{extra}\n{entra}"
        )
    };
    let c = parse_str(&state(""), &Env::default()).unwrap();
    let w = c
        .state_options
        .web_identity
        .as_ref()
        .expect("a token source");
    assert_eq!(
        w.describe(),
        "Entra ID, managed identity, tenant t1, audience api://idsync-state"
    );

    let fails = |text: &str, key: &str, says: &str| {
        let e = parse_str(text, &Env::default()).unwrap_err();
        assert!(
            e.0.iter().any(|e| e.key == key && e.message.contains(says)),
            "{key}: {says}: {e}"
        );
    };
    fails(
        &state("").replace("audience = \"api://idsync-state\"\n", ""),
        "state.audience",
        "missing",
    );
    fails(
        &state("").replace("role_arn = \"arn:aws:iam::1:role/idsync\"\n", ""),
        "state.role_arn",
        "set the role's ARN",
    );
    fails(
        &state("web_identity_token_file = \"/var/run/token\""),
        "state.web_identity_token_file",
        "keep",
    );
    fails(
        &state("external_id = \"x\""),
        "state.external_id",
        "no external id",
    );
    fails(
        &state("").replace("s3://", "gs://"),
        "state.web_identity",
        "only S3",
    );
    fails(
        &state("").replace("= \"entra\"", "= \"azure\""),
        "state.web_identity",
        "is not a choice",
    );
    fails(
        &state("").replace("web_identity = \"entra\"\n", ""),
        "state.audience",
        "goes with web_identity",
    );
    // Another source has no Entra sign-in to lend.
    let file_source = state("").replace(
        "kind = \"entra\"\ntenant_id = \"t1\"\nauth = \"managed_identity\"",
        "kind = \"file\"\npath = \"dir.json\"",
    );
    fails(&file_source, "state.web_identity", "the source is file");
}

#[test]
fn notify_takes_its_webhook_from_the_environment_and_checks_each_key() {
    let secret = "T1/B2/abcdefSECRET";
    let url = format!("https://hooks.slack.com/services/{secret}");
    let env = Env::from_pairs([("IDSYNC_WEBHOOK_URL", url.as_str())]);
    let c = parse_str(GOOD, &env).unwrap();
    let n = c.notify.unwrap();
    assert_eq!(n.url.expose(), url);
    assert_eq!(n.on, crate::notify::On::Failure);
    assert_eq!(n.format, crate::notify::Format::Slack);
    assert_eq!(n.timeout, Duration::from_secs(20));
    assert!(!format!("{n:?}").contains(secret), "{n:?}");

    // No webhook, no notifications; a [notify] table without one is an error.
    assert!(parse_str(GOOD, &Env::default()).unwrap().notify.is_none());
    let text = format!("{GOOD}\n[notify]\non = \"change\"\n");
    let e = parse_str(&text, &Env::default()).unwrap_err().to_string();
    assert!(e.contains("no webhook: set IDSYNC_WEBHOOK_URL"), "{e}");

    let text = format!(
        "{GOOD}\n[notify]\non = \"always\"\nformat = \"discord\"\ntimeout = \"soon\"\nwebhook_url = \"http://hooks.example.com/{secret}\"\n"
    );
    let e = parse_str(&text, &Env::default()).unwrap_err().to_string();
    for want in [
        "notify.on",
        "\"always\" is not a choice",
        "notify.format",
        "\"discord\" is not a choice",
        "notify.timeout",
        "notify.webhook_url",
        "use https://",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    assert!(!e.contains(secret), "{e}");
    let text = format!("{GOOD}\n[notify]\nformat = \"teams\"\non = \"change\"\ntimeout = \"5s\"\n");
    let n = parse_str(&text, &env).unwrap().notify.unwrap();
    assert_eq!(n.format, crate::notify::Format::Teams);
    assert_eq!(n.on, crate::notify::On::Change);
    assert_eq!(n.timeout, Duration::from_secs(5));
}

#[test]
fn the_webhook_may_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("webhook");
    std::fs::write(&f, "https://hooks.slack.com/services/T1/B2/fromfile\n").unwrap();
    let path = f.display().to_string();
    let env = Env::from_pairs([("IDSYNC_WEBHOOK_URL_FILE", path.as_str())]);
    let n = parse_str(GOOD, &env).unwrap().notify.unwrap();
    assert_eq!(
        n.url.expose(),
        "https://hooks.slack.com/services/T1/B2/fromfile"
    );
    let missing = dir.path().join("nope").display().to_string();
    let env = Env::from_pairs([("IDSYNC_WEBHOOK_URL_FILE", missing.as_str())]);
    let e = parse_str(GOOD, &env).unwrap_err().to_string();
    assert!(
        e.contains("IDSYNC_WEBHOOK_URL_FILE") && e.contains("cannot read"),
        "{e}"
    );
}
