//! Semantic checks on the deserialized sections: each runs on whatever deserialized, so one
//! broken section does not hide the problems of the others.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::locate::{Findings, KeyPath};
use super::{Listeners, Parts};
use crate::config::{
    Auth, Encryption, KeyRef, Limits, Listener, ListenerKind, Queue, Relay, Server, Testing, Tls,
    User,
};

/// Every semantic check on the config file.
pub(crate) fn config(parts: &Parts, out: &mut Findings) {
    if let Some(server) = &parts.server {
        check_server(server, out);
    }
    if let Some(limits) = &parts.limits {
        check_limits(limits, out);
    }
    if let Some(tls) = &parts.tls {
        check_tls(tls, out);
    }
    if let Some(listeners) = &parts.listeners {
        check_listeners(listeners, parts.tls.as_ref(), out);
    }
    if let Some(relay) = &parts.relay {
        check_relay(relay, !parts.users.is_empty(), out);
    }
    if let Some(auth) = &parts.auth {
        check_auth(auth, out);
    }
    check_users(&parts.users, out);
    if let Some(queue) = &parts.queue {
        check_queue(queue, out);
    }
    if let Some(encryption) = &parts.encryption {
        check_encryption(encryption, &parts.keys, out);
    }
    if let Some(Some(testing)) = &parts.testing {
        check_testing(testing, out);
    }
    if let Some(audit) = &parts.audit {
        non_empty_path(&audit.path, section("audit").key("path"), out);
    }
    if let Some(delivery) = &parts.delivery {
        super::validate_delivery::check(delivery, out);
    }
}

pub(super) fn section(name: &str) -> KeyPath {
    KeyPath::root().key(name)
}

fn check_server(server: &Server, out: &mut Findings) {
    let at = section("server");
    let name = &server.hostname;
    if let Some(message) = hostname_problem(name) {
        out.error(at.key("hostname"), message);
    } else if !name.contains('.') {
        out.warn(
            at.key("hostname"),
            format!(
                "`{name}` is not a fully-qualified domain name; receiving servers may refuse an \
                 EHLO name without a dot"
            ),
        );
    }
    non_empty_path(&server.data_dir, at.key("data_dir"), out);
}

/// Why `name` cannot be the greeting and EHLO host name, if it cannot.
pub(super) fn hostname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(
            "must not be empty: set the host name used in the greeting and EHLO, \
             e.g. \"relay.example.org\""
                .to_string(),
        );
    }
    if name.parse::<IpAddr>().is_ok() || name.starts_with('[') {
        return Some(format!("`{name}` is an address; use a host name"));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Some(format!(
            "`{name}` is not a valid host name: dot-separated labels of 1 to 63 letters, digits \
             and `-`, at most 253 characters"
        ));
    }
    None
}

/// Largest `max_message_size` accepted: below SQLite's 1,000,000,000-byte value limit with room
/// for the `Received:` header and the AES-GCM tag.
const MAX_MESSAGE_SIZE: u64 = 900 * 1024 * 1024;

fn check_limits(limits: &Limits, out: &mut Findings) {
    let at = section("limits");
    let mut min = |key: &str, value: u64, min: u64, why: &str| {
        if value < min {
            out.error(
                at.key(key),
                format!("{value} is too small; use at least {min}{why}"),
            );
        }
    };
    let size_why = " bytes; smaller limits refuse ordinary mail";
    min("max_message_size", limits.max_message_size, 1024, size_why);
    min("max_recipients", as_u64(limits.max_recipients), 1, "");
    let command_why = " (RFC 5321 section 4.5.3.1.4: command lines of 512 octets)";
    min(
        "max_command_line",
        as_u64(limits.max_command_line),
        512,
        command_why,
    );
    let line_why = " (RFC 5322 recommends lines of at most 78 characters; RFC 5321 allows 998)";
    min("max_data_line", as_u64(limits.max_data_line), 78, line_why);
    min("max_connections", as_u64(limits.max_connections), 1, "");
    min(
        "max_connections_per_ip",
        as_u64(limits.max_connections_per_ip),
        1,
        "",
    );
    min("max_bad_commands", as_u64(limits.max_bad_commands), 1, "");
    if limits.max_message_size > MAX_MESSAGE_SIZE {
        out.error(
            at.key("max_message_size"),
            format!(
                "{} is too large; at most {MAX_MESSAGE_SIZE} bytes (the queue stores a message \
                 as one database value, and SQLite values stop at 1 GB)",
                limits.max_message_size
            ),
        );
    }
    at_least_a_second(&at, "command_timeout", limits.command_timeout, out);
    at_least_a_second(&at, "data_timeout", limits.data_timeout, out);
    if (1..100).contains(&limits.max_recipients) {
        out.warn(
            at.key("max_recipients"),
            "RFC 5321 section 4.5.3.1.8 asks servers to accept at least 100 recipients per message",
        );
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn at_least_a_second(at: &KeyPath, key: &str, value: Duration, out: &mut Findings) {
    if value < Duration::from_secs(1) {
        out.error(at.key(key), "must be at least \"1s\"");
    }
}

fn check_tls(tls: &Tls, out: &mut Findings) {
    let at = section("tls");
    let hint = "give both `cert` and `key`, or neither and `self_signed = true`";
    match (&tls.cert, &tls.key) {
        (Some(_), None) => out.error(at.key("cert"), format!("`cert` without `key`: {hint}")),
        (None, Some(_)) => out.error(at.key("key"), format!("`key` without `cert`: {hint}")),
        _ => {}
    }
    if let Some(cert) = &tls.cert {
        readable_file(cert, "certificate", at.key("cert"), out);
    }
    if let Some(key) = &tls.key {
        readable_file(key, "private key", at.key("key"), out);
    }
}

fn check_listeners(listeners: &Listeners, tls: Option<&Tls>, out: &mut Findings) {
    let at = section("listener");
    if listeners.given && listeners.items.is_empty() {
        out.error(
            at.clone(),
            "no listeners: add a [[listener]] with an `address`",
        );
    }
    let mut seen: Vec<(usize, SocketAddr)> = Vec::new();
    for (i, listener) in listeners.items.iter().enumerate() {
        let Some(listener) = listener else { continue };
        let here = if listeners.given {
            at.index(i)
        } else {
            at.clone()
        };
        let address = listener.address;
        if let Some((j, _)) = seen.iter().find(|(_, other)| conflicts(*other, address)) {
            out.error(
                here.key("address"),
                format!("{address} conflicts with listener[{j}]; each listener needs its own port"),
            );
        }
        seen.push((i, address));
        if let Some(tls) = tls {
            check_certificate(listener, &here, listeners.given, tls, out);
        }
    }
}

/// Whether two listeners cannot both bind (port 0 picks a free port, so never conflicts).
fn conflicts(a: SocketAddr, b: SocketAddr) -> bool {
    let same_family = a.is_ipv4() == b.is_ipv4();
    let overlap =
        a.ip() == b.ip() || (same_family && (a.ip().is_unspecified() || b.ip().is_unspecified()));
    a.port() == b.port() && a.port() != 0 && overlap
}

/// A listener that speaks TLS needs a certificate (an incomplete `[tls]` is reported there).
fn check_certificate(
    listener: &Listener,
    here: &KeyPath,
    given: bool,
    tls: &Tls,
    out: &mut Findings,
) {
    if tls.self_signed || tls.cert.is_some() || tls.key.is_some() {
        return;
    }
    let (key, what, fix) = match listener.kind {
        ListenerKind::ImplicitTls => ("kind", "implicit TLS", ""),
        ListenerKind::Smtp if listener.starttls => {
            ("starttls", "STARTTLS", ", or starttls = false")
        }
        ListenerKind::Smtp => return,
    };
    let (path, which) = if given {
        (here.key(key), "")
    } else {
        (here.clone(), "the default listener ")
    };
    out.error(
        path,
        format!(
            "{what} on {which}{} needs a certificate: set [tls] cert and key, or self_signed = true{fix}",
            listener.address
        ),
    );
}

fn check_relay(relay: &Relay, has_users: bool, out: &mut Findings) {
    let at = section("relay").key("trusted_networks");
    for (i, net) in relay.trusted_networks.iter().enumerate() {
        if !is_internal(net) {
            out.warn(
                at.index(i),
                format!(
                    "{net} is not a private, loopback or link-local network: sealpost would be an \
                     open relay for {net} (anyone there may send mail through it without AUTH)"
                ),
            );
        }
        if net.trunc() != *net {
            out.warn(
                at.index(i),
                format!("{net} has host bits set; it means {}", net.trunc()),
            );
        }
    }
    if relay.trusted_networks.is_empty() && !has_users {
        out.warn(
            at,
            "no trusted networks and no [[auth.user]]: nobody can relay mail through sealpost",
        );
    }
}

/// Inside private (RFC 1918), loopback, link-local or unique-local (RFC 4193) space.
fn is_internal(net: &IpNet) -> bool {
    const INTERNAL: [&str; 8] = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fe80::/10",
        "fc00::/7",
    ];
    INTERNAL
        .iter()
        .filter_map(|range| range.parse::<IpNet>().ok())
        .any(|range| range.contains(net))
}

fn check_auth(auth: &Auth, out: &mut Findings) {
    let at = section("auth");
    if auth.max_failures == 0 {
        out.error(
            at.key("max_failures"),
            "must be at least 1: failed AUTH attempts from one IP before it is locked out",
        );
    }
    at_least_a_second(&at, "lockout", auth.lockout, out);
}

fn check_users(users: &[Option<User>], out: &mut Findings) {
    let at = section("auth").key("user");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, user) in users.iter().enumerate() {
        let Some(user) = user else { continue };
        let here = at.index(i);
        if user.name.trim().is_empty() {
            out.error(here.key("name"), "must not be empty");
        } else if let Some(j) = seen.get(user.name.as_str()) {
            let message = format!("user `{}` is already defined in auth.user[{j}]", user.name);
            out.error(here.key("name"), message);
        } else {
            seen.insert(&user.name, i);
        }
        if let Some(message) = password_problem(&user.password_hash) {
            out.error(here.key("password_hash"), message);
        }
    }
}

/// Why `hash` is not a usable Argon2 PHC string, if it is not. Never repeats the value.
fn password_problem(hash: &str) -> Option<String> {
    let hint = "create one with `sealpost hash-password`";
    let parsed = match argon2::PasswordHash::new(hash) {
        Ok(parsed) if hash.starts_with("$argon2") => parsed,
        Ok(parsed) => {
            return Some(format!("uses `{}`, not Argon2; {hint}", parsed.algorithm));
        }
        Err(e) => {
            return Some(format!(
                "not an Argon2 PHC string ($argon2id$…): {e}; {hint}"
            ))
        }
    };
    if let Err(e) = argon2::Algorithm::try_from(parsed.algorithm) {
        return Some(format!("unknown Argon2 variant ({e}); {hint}"));
    }
    if let Err(e) = argon2::Params::try_from(&parsed) {
        return Some(format!("invalid Argon2 parameters ({e}); {hint}"));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Some(format!("has no salt or no hash; {hint}"));
    }
    None
}

fn check_queue(queue: &Queue, out: &mut Findings) {
    let at = section("queue");
    if queue.max_batch == 0 {
        out.error(at.key("max_batch"), "must be at least 1");
    }
    non_empty_path(&queue.path, at.key("path"), out);
}

fn check_encryption(encryption: &Encryption, keys: &[Option<KeyRef>], out: &mut Findings) {
    let at = section("encryption");
    if keys.is_empty() {
        out.error(
            at.key("key"),
            "no keys: add an [[encryption.key]] with `id` and `file` (`sealpost keygen PATH` \
             writes a key file)",
        );
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let Some(key) = key else { continue };
        let here = at.key("key").index(i);
        if !valid_key_id(&key.id) {
            let message = format!(
                "`{}` is not a valid key id: 1 to 32 letters, digits, `-` or `_`",
                key.id
            );
            out.error(here.key("id"), message);
        } else if let Some(j) = seen.get(key.id.as_str()) {
            let message = format!("key id `{}` is already used by encryption.key[{j}]", key.id);
            out.error(here.key("id"), message);
        } else {
            seen.insert(&key.id, i);
        }
        check_key_file(encryption, key, here.key("file"), out);
    }
    let all_decoded = keys.iter().all(Option::is_some);
    if all_decoded && !keys.is_empty() && !seen.contains_key(encryption.active_key.as_str()) {
        active_key_unknown(encryption, &seen, at.key("active_key"), out);
    }
}

fn active_key_unknown(
    encryption: &Encryption,
    seen: &HashMap<&str, usize>,
    at: KeyPath,
    out: &mut Findings,
) {
    let mut ids: Vec<_> = seen.iter().map(|(id, i)| (*i, format!("`{id}`"))).collect();
    ids.sort();
    let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    out.error(
        at,
        format!(
            "`{}` is not the id of any [[encryption.key]] (configured: {})",
            encryption.active_key,
            ids.join(", ")
        ),
    );
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The checks the key ring makes at start: the file exists (unless it will be created), is
/// private to its owner and holds exactly 32 bytes.
fn check_key_file(encryption: &Encryption, key: &KeyRef, at: KeyPath, out: &mut Findings) {
    let file = key.file.display();
    let active = key.id == encryption.active_key;
    match std::fs::metadata(&key.file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && active && encryption.create_if_missing => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && active => out.error(
            at,
            format!(
                "the active key's file {file} does not exist; create it with `sealpost keygen \
                 {file}` or set `create_if_missing = true`"
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => out.error(
            at,
            format!(
                "the file {file} of older key `{}` does not exist; restore it, or remove the key \
                 once no queued message uses it",
                key.id
            ),
        ),
        Err(e) => out.error(at, format!("cannot read key file {file}: {e}")),
        Ok(meta) if !meta.is_file() => out.error(at, format!("{file} is not a regular file")),
        Ok(meta) if meta.mode() & 0o077 != 0 => out.error(
            at,
            format!(
                "key file {file} is readable by group or others (mode {:o}); run `chmod 600 {file}`",
                meta.mode() & 0o7777
            ),
        ),
        Ok(meta) if meta.len() != 32 => out.error(
            at,
            format!("key file {file} must hold exactly 32 bytes, found {}", meta.len()),
        ),
        Ok(_) => {}
    }
}

fn check_testing(testing: &Testing, out: &mut Findings) {
    let at = section("testing").key("extra_roots");
    for (i, root) in testing.extra_roots.iter().enumerate() {
        readable_file(root, "trust anchor", at.index(i), out);
    }
}

/// Reports `file` unless it is an existing regular file.
fn readable_file(file: &Path, what: &str, at: KeyPath, out: &mut Findings) {
    match std::fs::metadata(file) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => out.error(
            at,
            format!("{what} {} is not a regular file", file.display()),
        ),
        Err(e) => out.error(
            at,
            format!(
                "cannot read {what} {}: {e} (relative paths are resolved against the directory \
                 sealpost is started in)",
                file.display()
            ),
        ),
    }
}

fn non_empty_path(path: &Path, at: KeyPath, out: &mut Findings) {
    if path.as_os_str().is_empty() {
        out.error(at, "must not be empty");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(hostname_problem("sealpost.localhost").is_none());
        assert!(hostname_problem("relay-1.example.org").is_none());
        for bad in [
            "",
            "a..b",
            "-a.example",
            "a_b.example",
            "127.0.0.1",
            "[127.0.0.1]",
        ] {
            assert!(hostname_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn internal_networks() {
        for net in [
            "127.0.0.0/8",
            "10.1.0.0/16",
            "::1/128",
            "fd00::/8",
            "192.168.1.0/24",
        ] {
            assert!(is_internal(&net.parse().expect("net")), "{net}");
        }
        for net in [
            "0.0.0.0/0",
            "8.8.8.0/24",
            "::/0",
            "2001:db8::/32",
            "172.0.0.0/8",
        ] {
            assert!(!is_internal(&net.parse().expect("net")), "{net}");
        }
    }

    #[test]
    fn listener_conflicts() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(conflicts(a("127.0.0.1:25"), a("127.0.0.1:25")));
        assert!(conflicts(a("0.0.0.0:25"), a("127.0.0.1:25")));
        assert!(!conflicts(a("[::]:25"), a("127.0.0.1:25")));
        assert!(!conflicts(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!conflicts(a("127.0.0.1:25"), a("127.0.0.1:587")));
    }

    #[test]
    fn password_hashes() {
        let good = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQxMjM0$\
                    n6sN9zI4MZz1+yvu7iJ/1M9S3Po3HyNrkPKnRL7R6Hk";
        assert_eq!(password_problem(good), None);
        assert!(password_problem("hunter2").is_some());
        assert!(password_problem("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_some());
        assert!(password_problem("$argon2id$v=19$m=19456,t=2,p=1").is_some());
    }

    #[test]
    fn key_ids() {
        assert!(valid_key_id("k1"));
        assert!(valid_key_id("2024-01_a"));
        assert!(!valid_key_id(""));
        assert!(!valid_key_id("k 1"));
        assert!(!valid_key_id(&"x".repeat(33)));
    }
}
