//! `config::load`: the shipped config loads, and broken files report every problem with its key
//! path and line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sealpost::config::load::Severity;
use sealpost::config::{load, ConfigError, Loaded, Problem};

/// A config and policy written to a temporary directory.
struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
    policy: PathBuf,
}

const GOOD_POLICY: &str = "[defaults]\nmode = \"opportunistic\"\n";

/// A valid config; `{policy}` and `{key}` are replaced with absolute paths.
const GOOD_CONFIG: &str = r#"[server]
hostname = "relay.example.org"
policy = "{policy}"

[tls]
self_signed = true

[relay]
trusted_networks = ["10.0.0.0/8"]

[encryption]
active_key = "k1"

[[encryption.key]]
id = "k1"
file = "{key}"
"#;

impl Fixture {
    fn new(config: &str, policy: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k1.key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).unwrap();
        let text = config
            .replace("{policy}", path_str(&policy_path))
            .replace("{key}", path_str(&key));
        let config_path = dir.path().join("sealpost.toml");
        std::fs::write(&config_path, text).unwrap();
        Fixture {
            dir,
            config: config_path,
            policy: policy_path,
        }
    }

    fn load(&self) -> Result<Loaded, ConfigError> {
        load(&self.config)
    }

    /// The problems of a file that must not load.
    fn problems(&self) -> Vec<Problem> {
        match self.load() {
            Err(ConfigError::Invalid(problems)) => problems,
            Err(e) => panic!("expected Invalid, got {e}"),
            Ok(loaded) => panic!("expected Invalid, got a config: {:?}", loaded.warnings),
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// (severity, file, key path, line) of each problem, for exact comparisons.
fn summary(problems: &[Problem]) -> Vec<(Severity, PathBuf, String, usize)> {
    problems
        .iter()
        .map(|p| {
            let line = p.position.map_or(0, |(line, _)| line);
            (p.severity, p.file.clone(), p.path.clone(), line)
        })
        .collect()
}

fn find<'a>(problems: &'a [Problem], path: &str) -> &'a Problem {
    problems
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("no problem at {path}: {problems:#?}"))
}

#[test]
fn shipped_config_loads_without_problems() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Relative paths in the file resolve against the working directory: the crate root here.
    let loaded = load(&root.join("config/sealpost.toml")).unwrap_or_else(|e| match e {
        ConfigError::Invalid(problems) => panic!("shipped config is invalid: {problems:#?}"),
        other => panic!("{other}"),
    });
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    assert_eq!(loaded.config.server.hostname, "sealpost.localhost");
    assert_eq!(loaded.config.listeners.len(), 2);
    assert!(loaded.config.testing.is_none());
    assert_eq!(loaded.config_sha256.len(), 64);
    assert_eq!(loaded.policy_sha256.len(), 64);
}

#[test]
fn good_fixture_loads() {
    let fixture = Fixture::new(GOOD_CONFIG, GOOD_POLICY);
    let loaded = fixture.load().unwrap();
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    // The defaults apply to the sections the file leaves out.
    assert_eq!(loaded.config.listeners.len(), 2);
    assert_eq!(loaded.config.limits.max_recipients, 100);
}

const BROKEN_CONFIG: &str = r#"[server]
hostname = "relay.example.org"
policy = "{policy}"

[limits]
max_recipients = "ten"

[tls]
self_signed = true

[[listener]]
address = "127.0.0.1:2525"

[[listener]]
address = "not-an-addr"
kind = "implicit-tls"

[smtpd]
banner = "hello"

[relay]
trusted_networks = ["127.0.0.0/8", "0.0.0.0/0"]

[encryption]
active_key = "k2"

[[encryption.key]]
id = "k1"
file = "{key}"
"#;

#[test]
fn every_problem_is_reported_with_its_path_and_line() {
    let fixture = Fixture::new(BROKEN_CONFIG, GOOD_POLICY);
    let problems = fixture.problems();
    let file = fixture.config.clone();
    let expected = vec![
        (
            Severity::Error,
            file.clone(),
            "limits.max_recipients".to_string(),
            6,
        ),
        (
            Severity::Error,
            file.clone(),
            "listener[1].address".to_string(),
            15,
        ),
        (Severity::Error, file.clone(), "smtpd".to_string(), 18),
        (
            Severity::Warning,
            file.clone(),
            "relay.trusted_networks[1]".to_string(),
            22,
        ),
        (
            Severity::Error,
            file.clone(),
            "encryption.active_key".to_string(),
            25,
        ),
    ];
    assert_eq!(summary(&problems), expected, "{problems:#?}");

    assert!(find(&problems, "limits.max_recipients")
        .message
        .contains("\"ten\""));
    assert!(find(&problems, "smtpd")
        .message
        .contains("unknown section `smtpd`"));
    let open = find(&problems, "relay.trusted_networks[1]");
    assert!(
        open.message.contains("open relay for 0.0.0.0/0"),
        "{}",
        open.message
    );
    assert_eq!(open.position, Some((22, 36)));
    let active = find(&problems, "encryption.active_key");
    assert!(active.message.contains("`k2`") && active.message.contains("`k1`"));
    let shown = find(&problems, "listener[1].address").to_string();
    let prefix = format!("error: {}:15:1: listener[1].address: ", file.display());
    assert!(shown.starts_with(&prefix), "{shown}");
}

#[test]
fn a_bad_policy_mode_is_reported_in_the_policy_file() {
    let policy = "# delivery policy\n[defaults]\nmode = \"bogus\"\n";
    let fixture = Fixture::new(GOOD_CONFIG, policy);
    let problems = fixture.problems();
    let expected = vec![(
        Severity::Error,
        fixture.policy.clone(),
        "defaults.mode".to_string(),
        3,
    )];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
    assert!(
        problems[0].message.contains("bogus"),
        "{}",
        problems[0].message
    );
}

#[test]
fn policy_semantics_are_checked() {
    let policy = "[defaults]\nmode = \"require-tls\"\non_failure = \"plaintext\"\n";
    let fixture = Fixture::new(GOOD_CONFIG, policy);
    let problems = fixture.problems();
    let expected = vec![(
        Severity::Error,
        fixture.policy.clone(),
        "defaults.on_failure".to_string(),
        3,
    )];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
}

#[test]
fn modes_not_acted_on_yet_are_warned_about() {
    let policy = "[defaults]\nmode = \"portal\"\non_failure = \"bounce\"\n";
    let fixture = Fixture::new(GOOD_CONFIG, policy);
    // Warnings only: the relay would start.
    let problems = fixture
        .load()
        .expect("warnings do not stop the relay")
        .warnings;
    let expected = vec![
        (
            Severity::Warning,
            fixture.policy.clone(),
            "defaults.mode".to_string(),
            2,
        ),
        (
            Severity::Warning,
            fixture.policy.clone(),
            "defaults.on_failure".to_string(),
            3,
        ),
    ];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
    assert!(
        problems[0].message.contains("held"),
        "{}",
        problems[0].message
    );
}

#[test]
fn a_missing_policy_file_is_reported_at_server_policy() {
    let fixture = Fixture::new(GOOD_CONFIG, GOOD_POLICY);
    std::fs::remove_file(&fixture.policy).unwrap();
    let problems = fixture.problems();
    let expected = vec![(
        Severity::Error,
        fixture.config.clone(),
        "server.policy".to_string(),
        3,
    )];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
}

#[test]
fn a_missing_field_points_at_its_table() {
    let config = GOOD_CONFIG.replace("policy = \"{policy}\"\n", "");
    let fixture = Fixture::new(&config, GOOD_POLICY);
    let problems = fixture.problems();
    let expected = vec![(
        Severity::Error,
        fixture.config.clone(),
        "server.policy".to_string(),
        1,
    )];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
}

#[test]
fn semantic_problems_in_several_sections() {
    let config = format!(
        "{GOOD_CONFIG}\n[limits]\nmax_data_line = 10\ncommand_timeout = \"0s\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:2525\"\n\n[[listener]]\naddress = \"127.0.0.1:2525\"\n\n\
         [[auth.user]]\nname = \"app\"\npassword_hash = \"hunter2\"\n"
    );
    let fixture = Fixture::new(&config, GOOD_POLICY);
    let problems = fixture.problems();
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "limits.max_data_line",
            "limits.command_timeout",
            "listener[1].address",
            "auth.user[0].password_hash",
        ],
        "{problems:#?}"
    );
    assert!(!find(&problems, "auth.user[0].password_hash")
        .message
        .contains("hunter2"));
}

#[test]
fn tls_listeners_need_a_certificate() {
    let config = GOOD_CONFIG.replace("self_signed = true", "self_signed = false")
        + "\n[[listener]]\naddress = \"127.0.0.1:2465\"\nkind = \"implicit-tls\"\n";
    let fixture = Fixture::new(&config, GOOD_POLICY);
    let problems = fixture.problems();
    let expected = vec![(
        Severity::Error,
        fixture.config.clone(),
        "listener[0].kind".to_string(),
        20,
    )];
    assert_eq!(summary(&problems), expected, "{problems:#?}");
}

#[test]
fn the_testing_section_is_a_warning() {
    let config = format!("{GOOD_CONFIG}\n[testing]\nmx_port = 2526\n");
    let fixture = Fixture::new(&config, GOOD_POLICY);
    let loaded = fixture.load().unwrap();
    let expected = vec![(
        Severity::Warning,
        fixture.config.clone(),
        "testing".to_string(),
        18,
    )];
    assert_eq!(
        summary(&loaded.warnings),
        expected,
        "{:#?}",
        loaded.warnings
    );
    assert!(loaded.warnings[0]
        .message
        .contains("remove it in production"));
    assert_eq!(loaded.config.testing.and_then(|t| t.mx_port), Some(2526));
}

#[test]
fn a_syntax_error_is_one_positioned_problem() {
    let fixture = Fixture::new("[server]\nhostname = \n", GOOD_POLICY);
    let problems = fixture.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].position.map(|(line, _)| line), Some(2));
    assert!(problems[0].message.starts_with("invalid TOML"));
}

#[test]
fn an_unreadable_config_is_an_io_error() {
    let fixture = Fixture::new(GOOD_CONFIG, GOOD_POLICY);
    let missing = fixture.dir.path().join("absent.toml");
    assert!(matches!(load(&missing), Err(ConfigError::Io { .. })));
}
