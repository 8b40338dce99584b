//! Policy: one [`Decision`] per recipient.
//!
//! In this version every recipient receives the `[defaults]` of `config/policy.toml` with the
//! rule name `default`; the rule engine (matching domains, senders, headers, subject keywords)
//! comes later and only has to produce more of the same `Decision`s.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// How a recipient's mail must travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// STARTTLS when offered; plaintext otherwise (RFC 7435).
    Opportunistic,
    /// TLS is mandatory; on failure the `on_failure` action applies.
    RequireTls,
    /// TLS or the message is dropped for this recipient (audited).
    TlsExclusive,
    /// Escalate to the secure pickup portal.
    Portal,
}

impl Mode {
    /// The spelling used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Opportunistic => "opportunistic",
            Mode::RequireTls => "require-tls",
            Mode::TlsExclusive => "tls-exclusive",
            Mode::Portal => "portal",
        }
    }
}

/// Lowest TLS protocol version accepted for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TlsFloor {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// How the remote certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertCheck {
    /// Examine and record, never refuse (opportunistic).
    Examine,
    /// Must verify against the WebPKI roots for the MX host name.
    Pkix,
}

/// What happens when the required TLS cannot be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// Deliver without TLS (opportunistic only).
    Plaintext,
    /// Retry later.
    Defer,
    /// Fail permanently with a DSN.
    Bounce,
    /// Escalate to the portal.
    Portal,
    /// Drop silently, audited (tls-exclusive).
    Drop,
}

/// The policy decision for one recipient, recorded at intake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub mode: Mode,
    pub tls_floor: TlsFloor,
    pub certificate: CertCheck,
    pub on_failure: FailureAction,
    /// Name of the rule that decided; `default` for the file's `[defaults]`.
    pub rule: String,
}

/// `[defaults]` of the policy file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Delivery mode for recipients no rule matches.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Lowest TLS version accepted when TLS is used.
    #[serde(default = "default_floor")]
    pub tls_floor: TlsFloor,
    /// Certificate check; `examine` for opportunistic delivery.
    #[serde(default = "default_cert")]
    pub certificate: CertCheck,
    /// What to do when the required TLS cannot be had.
    #[serde(default = "default_failure")]
    pub on_failure: FailureAction,
}

fn default_mode() -> Mode {
    Mode::Opportunistic
}
fn default_floor() -> TlsFloor {
    TlsFloor::Tls12
}
fn default_cert() -> CertCheck {
    CertCheck::Examine
}
fn default_failure() -> FailureAction {
    FailureAction::Plaintext
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            mode: default_mode(),
            tls_floor: default_floor(),
            certificate: default_cert(),
            on_failure: default_failure(),
        }
    }
}

/// The policy file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub defaults: Defaults,
}

/// Compiled policy, asked once per recipient.
#[derive(Debug, Clone)]
pub struct Policy {
    defaults: Decision,
}

/// Facts about a message the policy may look at.
pub struct MessageFacts<'a> {
    pub sender: &'a str,
    pub recipient: &'a str,
}

impl Policy {
    pub fn compile(file: &PolicyFile) -> Policy {
        let d = &file.defaults;
        Policy {
            defaults: Decision {
                mode: d.mode,
                tls_floor: d.tls_floor,
                certificate: d.certificate.clone(),
                on_failure: d.on_failure,
                rule: "default".to_string(),
            },
        }
    }

    /// The decision for one recipient.
    pub fn decide(&self, _facts: &MessageFacts<'_>) -> Decision {
        self.defaults.clone()
    }
}

/// Semantic problems in a policy file, as (key path, message).
pub fn validate(file: &PolicyFile) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let d = &file.defaults;
    if d.mode == Mode::Opportunistic && d.certificate == CertCheck::Pkix {
        problems.push((
            "defaults.certificate".to_string(),
            "`pkix` needs a mode that requires TLS; opportunistic delivery only examines certificates".to_string(),
        ));
    }
    if d.mode != Mode::Opportunistic && d.on_failure == FailureAction::Plaintext {
        problems.push((
            "defaults.on_failure".to_string(),
            "`plaintext` fallback is only allowed with mode = \"opportunistic\"".to_string(),
        ));
    }
    problems
}

/// Settings that are accepted but not acted on yet, as (key path, warning) for `check`.
pub fn not_yet(file: &PolicyFile) -> Vec<(String, String)> {
    let d = &file.defaults;
    let mut out = Vec::new();
    match d.mode {
        Mode::Portal => out.push((
            "defaults.mode".to_string(),
            "the pickup portal does not exist yet: `portal` mail is held in the queue (never sent \
             by SMTP) until it expires with a DSN"
                .to_string(),
        )),
        Mode::TlsExclusive => out.push((
            "defaults.mode".to_string(),
            "`tls-exclusive` does not drop yet: without TLS the mail is deferred and retried, \
             like `require-tls`"
                .to_string(),
        )),
        _ => {}
    }
    // `plaintext` with a TLS-requiring mode is already an error from `validate`.
    let acted_on = matches!(
        d.on_failure,
        FailureAction::Defer | FailureAction::Plaintext
    );
    if d.mode != Mode::Opportunistic && !acted_on {
        out.push((
            "defaults.on_failure".to_string(),
            "`on_failure` is not acted on yet: when TLS cannot be had the mail is deferred"
                .to_string(),
        ));
    }
    out
}

/// Reads a policy file's text (parsing and diagnostics live in `config::load`).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}
