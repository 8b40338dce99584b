//! Loading, validation and diagnostics: every problem with its key path and line:column.
//!
//! `load` reports every problem it can find, not only the first one:
//! 1. the file is parsed twice, with `toml_edit` (which keeps the position of every key, used to
//!    locate problems) and into a `toml::Table`;
//! 2. each top-level section (and each `[[listener]]`, `[[auth.user]]`, `[[encryption.key]]`) is
//!    deserialized on its own, so a mistake in one does not hide mistakes in the others;
//! 3. semantic checks ([`validate`]) run on every piece that deserialized;
//! 4. the policy file named by `server.policy` goes through the same steps;
//! 5. each problem's key path is looked up in its file to give it a line and column.

#[path = "locate.rs"]
mod locate;
#[path = "validate.rs"]
mod validate;
#[path = "validate_delivery.rs"]
mod validate_delivery;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::policy::{Defaults, PolicyFile};

use self::locate::{Findings, KeyPath, Segment, Source};
use super::{
    default_listeners, Audit, Auth, Config, Delivery, Dns, Encryption, KeyRef, Limits, Listener,
    Queue, Relay, Server, Testing, Tls, User,
};

/// Whether a problem stops the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The relay refuses to start.
    Error,
    /// The relay starts, but the operator should look.
    Warning,
}

/// One problem found in the config or policy file.
#[derive(Debug, Clone)]
pub struct Problem {
    pub severity: Severity,
    /// File the problem is in.
    pub file: PathBuf,
    /// Dotted key path, e.g. `listener[1].address` or `limits.max_recipients`; empty for the
    /// file as a whole.
    pub path: String,
    /// 1-based line and column of the key or value, when known.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.file.display())?;
        if let Some((l, c)) = self.position {
            write!(f, ":{l}:{c}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself could not be read; check the path given with `--config`.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// At least one error (warnings are included too), in file order: config file, then policy.
    #[error("{} problem(s) in the configuration", .0.iter().filter(|p| p.severity == Severity::Error).count())]
    Invalid(Vec<Problem>),
}

/// A config and policy that passed every check.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub policy: PolicyFile,
    /// Hex SHA-256 of the config file's bytes.
    pub config_sha256: String,
    /// Hex SHA-256 of the policy file's bytes.
    pub policy_sha256: String,
    /// Warnings from both files, in file order.
    pub warnings: Vec<Problem>,
}

/// Top-level sections of the config file.
const CONFIG_SECTIONS: &[&str] = &[
    "server",
    "limits",
    "tls",
    "listener",
    "relay",
    "auth",
    "queue",
    "encryption",
    "audit",
    "dns",
    "delivery",
    "testing",
];

/// Top-level sections of the policy file.
const POLICY_SECTIONS: &[&str] = &["defaults"];

const TESTING_WARNING: &str = "the [testing] section is for tests only; it changes where mail is \
     delivered and which certificates are trusted — remove it in production";

/// Loads `path` and the policy file it names; reports every problem found.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let config_sha256 = sha256_hex(&bytes);
    let (source, table) = Source::parse(path, bytes).map_err(ConfigError::Invalid)?;
    let mut findings = Findings::default();
    let policy_path = policy_path(&table);
    let parts = decode_config(table, &mut findings);
    validate::config(&parts, &mut findings);
    let policy = policy_path.map(|p| load_policy(&p, &mut findings));
    let mut problems = source.problems(findings);
    let policy = policy.and_then(|outcome| {
        problems.extend(outcome.problems);
        outcome.loaded
    });
    finish(parts, policy, problems, config_sha256)
}

/// Turns the collected pieces into the result: `Invalid` as soon as one problem is an error.
fn finish(
    parts: Parts,
    policy: Option<(PolicyFile, String)>,
    mut problems: Vec<Problem>,
    config_sha256: String,
) -> Result<Loaded, ConfigError> {
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(ConfigError::Invalid(problems));
    }
    match (parts.assemble(), policy) {
        (Some(config), Some((policy, policy_sha256))) => Ok(Loaded {
            config,
            policy,
            config_sha256,
            policy_sha256,
            warnings: problems,
        }),
        _ => {
            problems.push(Problem {
                severity: Severity::Error,
                file: PathBuf::new(),
                path: String::new(),
                position: None,
                message: "internal error: the configuration passed every check but could not \
                          be assembled; please report this"
                    .to_string(),
            });
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Hex SHA-256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Deserializes one piece of a file; on failure records the error at its full key path.
fn decode<T: DeserializeOwned>(value: toml::Value, at: &KeyPath, out: &mut Findings) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let mut path = at.clone();
            for segment in e.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Seq { index } => {
                        path.push(Segment::Index(*index))
                    }
                    serde_path_to_error::Segment::Map { key }
                    | serde_path_to_error::Segment::Enum { variant: key } => {
                        path.push(Segment::Key(key.clone()))
                    }
                    serde_path_to_error::Segment::Unknown => {}
                }
            }
            let message = e.inner().message().to_string();
            if let Some(field) = missing_field(&message) {
                path.push(Segment::Key(field.to_string()));
            }
            out.error(path, message);
            None
        }
    }
}

/// The field named in serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .strip_suffix('`')
        .filter(|f| !f.contains('`'))
}

/// The elements of an array of tables such as `[[listener]]`.
fn decode_array(value: toml::Value, at: &KeyPath, out: &mut Findings) -> Option<Vec<toml::Value>> {
    match value {
        toml::Value::Array(items) => Some(items),
        other => {
            let name = at.to_string();
            out.error(
                at.clone(),
                format!(
                    "expected one or more [[{name}]] tables, found a {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// Deserializes each element of an array of tables on its own.
fn decode_each<T: DeserializeOwned>(
    value: toml::Value,
    at: &KeyPath,
    out: &mut Findings,
) -> Option<Vec<Option<T>>> {
    let items = decode_array(value, at, out)?;
    let decoded = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| decode(item, &at.index(i), out))
        .collect();
    Some(decoded)
}

/// Records an unknown top-level key.
fn unknown_section(name: &str, value: &toml::Value, known: &[&str], out: &mut Findings) {
    let expected = known
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let message = if value.is_table() || value.is_array() {
        format!("unknown section `{name}`; expected one of {expected}")
    } else {
        format!(
            "unknown key `{name}` outside any section (keys belong under a [section] header); \
             expected one of the sections {expected}"
        )
    };
    out.error(KeyPath::root().key(name), message);
}

/// The listeners: either the `[[listener]]` tables or the defaults.
#[derive(Debug)]
pub(crate) struct Listeners {
    /// `false` when the file has no `[[listener]]` and the defaults apply.
    pub given: bool,
    /// One entry per listener; `None` where it did not deserialize.
    pub items: Vec<Option<Listener>>,
}

/// The config file, section by section; `None` where a section did not deserialize (or a
/// required one is missing). Sections absent from the file hold their defaults.
#[derive(Debug)]
pub(crate) struct Parts {
    pub server: Option<Server>,
    pub limits: Option<Limits>,
    pub tls: Option<Tls>,
    pub listeners: Option<Listeners>,
    pub relay: Option<Relay>,
    /// `[auth]` without its users, which are in `users`.
    pub auth: Option<Auth>,
    pub users: Vec<Option<User>>,
    pub queue: Option<Queue>,
    /// `[encryption]` without its keys, which are in `keys`.
    pub encryption: Option<Encryption>,
    pub keys: Vec<Option<KeyRef>>,
    pub audit: Option<Audit>,
    pub dns: Option<Dns>,
    pub delivery: Option<Delivery>,
    /// `Some(None)` when there is no `[testing]`.
    pub testing: Option<Option<Testing>>,
}

impl Parts {
    /// Every section absent: defaults, and `None` for the required ones.
    fn absent() -> Parts {
        Parts {
            server: None,
            limits: Some(Limits::default()),
            tls: Some(Tls::default()),
            listeners: Some(Listeners {
                given: false,
                items: default_listeners().into_iter().map(Some).collect(),
            }),
            relay: Some(Relay::default()),
            auth: Some(Auth::default()),
            users: Vec::new(),
            queue: Some(Queue::default()),
            encryption: None,
            keys: Vec::new(),
            audit: Some(Audit::default()),
            dns: Some(Dns::default()),
            delivery: Some(Delivery::default()),
            testing: Some(None),
        }
    }

    /// The whole config, if every piece deserialized.
    fn assemble(self) -> Option<Config> {
        let mut auth = self.auth?;
        auth.users = self.users.into_iter().collect::<Option<Vec<_>>>()?;
        let mut encryption = self.encryption?;
        encryption.keys = self.keys.into_iter().collect::<Option<Vec<_>>>()?;
        let listeners = self
            .listeners?
            .items
            .into_iter()
            .collect::<Option<Vec<_>>>()?;
        Some(Config {
            server: self.server?,
            limits: self.limits?,
            tls: self.tls?,
            listeners,
            relay: self.relay?,
            auth,
            queue: self.queue?,
            encryption,
            audit: self.audit?,
            dns: self.dns?,
            delivery: self.delivery?,
            testing: self.testing?,
        })
    }
}

/// Deserializes each section of the config file on its own.
fn decode_config(table: toml::Table, out: &mut Findings) -> Parts {
    let mut parts = Parts::absent();
    for required in ["server", "encryption"] {
        if !table.contains_key(required) {
            out.error(
                KeyPath::root().key(required),
                format!("missing section [{required}]"),
            );
        }
    }
    for (name, value) in table {
        let at = KeyPath::root().key(&name);
        match name.as_str() {
            "server" => parts.server = decode(value, &at, out),
            "limits" => parts.limits = decode(value, &at, out),
            "tls" => parts.tls = decode(value, &at, out),
            "listener" => parts.listeners = decode_listeners(value, &at, out),
            "relay" => parts.relay = decode(value, &at, out),
            "auth" => (parts.auth, parts.users) = decode_auth(value, &at, out),
            "queue" => parts.queue = decode(value, &at, out),
            "encryption" => (parts.encryption, parts.keys) = decode_encryption(value, &at, out),
            "audit" => parts.audit = decode(value, &at, out),
            "dns" => parts.dns = decode(value, &at, out),
            "delivery" => parts.delivery = decode(value, &at, out),
            "testing" => {
                out.warn(at.clone(), TESTING_WARNING);
                parts.testing = decode(value, &at, out).map(Some);
            }
            _ => unknown_section(&name, &value, CONFIG_SECTIONS, out),
        }
    }
    parts
}

fn decode_listeners(value: toml::Value, at: &KeyPath, out: &mut Findings) -> Option<Listeners> {
    let items = decode_each(value, at, out)?;
    Some(Listeners { given: true, items })
}

/// Removes the array of tables `key` from `value` (a table) and deserializes its elements.
fn take_each<T: DeserializeOwned>(
    value: &mut toml::Value,
    key: &str,
    at: &KeyPath,
    out: &mut Findings,
) -> Option<Vec<Option<T>>> {
    let array = value.as_table_mut()?.remove(key)?;
    Some(decode_each(array, &at.key(key), out).unwrap_or_default())
}

/// `[auth]` and each `[[auth.user]]` on its own.
fn decode_auth(
    mut value: toml::Value,
    at: &KeyPath,
    out: &mut Findings,
) -> (Option<Auth>, Vec<Option<User>>) {
    let users = take_each(&mut value, "user", at, out).unwrap_or_default();
    (decode(value, at, out), users)
}

/// `[encryption]` and each `[[encryption.key]]` on its own.
fn decode_encryption(
    mut value: toml::Value,
    at: &KeyPath,
    out: &mut Findings,
) -> (Option<Encryption>, Vec<Option<KeyRef>>) {
    let keys = take_each(&mut value, "key", at, out).unwrap_or_default();
    if let Some(table) = value.as_table_mut() {
        // The keys are checked above; an empty list is reported by `validate`.
        table.insert("key".to_string(), toml::Value::Array(Vec::new()));
    }
    (decode(value, at, out), keys)
}

/// The policy path named by `server.policy`, when it is a string.
fn policy_path(table: &toml::Table) -> Option<PathBuf> {
    let policy = table.get("server")?.get("policy")?.as_str()?;
    Some(PathBuf::from(policy))
}

/// What became of the policy file: its problems and, when it deserialized, the file and its hash.
struct PolicyOutcome {
    problems: Vec<Problem>,
    loaded: Option<(PolicyFile, String)>,
}

/// Reads, parses and validates the policy file; a missing file is a problem at `server.policy`.
fn load_policy(path: &Path, config: &mut Findings) -> PolicyOutcome {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            let message = format!("cannot read the policy file {}: {e}", path.display());
            config.error(KeyPath::root().key("server").key("policy"), message);
            return PolicyOutcome {
                problems: Vec::new(),
                loaded: None,
            };
        }
    };
    let sha256 = sha256_hex(&bytes);
    let (source, table) = match Source::parse(path, bytes) {
        Ok(parsed) => parsed,
        Err(problems) => {
            return PolicyOutcome {
                problems,
                loaded: None,
            }
        }
    };
    let mut findings = Findings::default();
    let policy = decode_policy(table, &mut findings);
    if let Some(policy) = &policy {
        for (path, message) in crate::policy::validate(policy) {
            findings.error(KeyPath::parse(&path), message);
        }
        for (path, message) in crate::policy::not_yet(policy) {
            findings.warn(KeyPath::parse(&path), message);
        }
    }
    PolicyOutcome {
        problems: source.problems(findings),
        loaded: policy.map(|p| (p, sha256)),
    }
}

/// Deserializes each section of the policy file on its own.
fn decode_policy(table: toml::Table, out: &mut Findings) -> Option<PolicyFile> {
    let mut defaults = Some(Defaults::default());
    for (name, value) in table {
        let at = KeyPath::root().key(&name);
        match name.as_str() {
            "defaults" => defaults = decode(value, &at, out),
            _ => unknown_section(&name, &value, POLICY_SECTIONS, out),
        }
    }
    Some(PolicyFile {
        defaults: defaults?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CONFIG_SECTIONS` must name exactly the fields of `Config`.
    #[test]
    fn config_sections_match_the_struct() {
        let mut parts = Parts::absent();
        parts.server = Some(Server {
            hostname: "h.example".into(),
            data_dir: "d".into(),
            policy: "p".into(),
            shutdown_grace: std::time::Duration::from_secs(1),
        });
        parts.encryption = Some(Encryption {
            active_key: "k".into(),
            create_if_missing: false,
            keys: Vec::new(),
        });
        parts.users = vec![Some(User {
            name: "u".into(),
            password_hash: "x".into(),
        })];
        parts.testing = Some(Some(Testing::default()));
        let config = parts.assemble().expect("complete");
        let value = toml::Value::try_from(&config).expect("serializes");
        let mut keys: Vec<&str> = value
            .as_table()
            .expect("table")
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut sections = CONFIG_SECTIONS.to_vec();
        keys.sort_unstable();
        sections.sort_unstable();
        assert_eq!(keys, sections);
    }

    #[test]
    fn policy_sections_match_the_struct() {
        let value = toml::Value::try_from(PolicyFile::default()).expect("serializes");
        let keys: Vec<&str> = value
            .as_table()
            .expect("table")
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, POLICY_SECTIONS);
    }

    #[test]
    fn missing_field_names_the_field() {
        assert_eq!(missing_field("missing field `policy`"), Some("policy"));
        assert_eq!(missing_field("invalid type"), None);
    }
}
