//! Chain verification for `sealpost audit verify`, and the canonical form shared with the writer.
//!
//! A line's canonical content is its JSON object without `hash`, keys sorted by their UTF-8 bytes
//! at every depth, no whitespace, scalars as `serde_json` writes them. `hash` is the lowercase hex
//! SHA-256 of that text. The line on disk is the canonical form of the object *with* `hash`, so
//! a reformatted line (or one with duplicate keys) is reported even when its values are intact.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A verified log.
#[derive(Debug)]
pub struct VerifyReport {
    /// Number of records checked.
    pub lines: u64,
    /// `hash` of the last record (the chain head); [`GENESIS`] for an empty log.
    pub head: String,
}

/// Why verification failed, naming the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: {reason}")]
    Broken { line: u64, reason: String },
}

/// Serializes `value` with object keys sorted (recursively) and no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // A string key always serializes.
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(val, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Lowercase hex SHA-256 of `text`.
pub(crate) fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// Adds `hash` to a record object (which must not have one) and returns the line to write,
/// without its newline, and the hash.
pub(crate) fn seal(record: Map<String, Value>) -> (String, String) {
    let mut value = Value::Object(record);
    let hash = sha256_hex(&canonical_json(&value));
    if let Value::Object(map) = &mut value {
        map.insert("hash".to_owned(), Value::String(hash.clone()));
    }
    (canonical_json(&value), hash)
}

/// The chain fields of one record whose own hash checked out.
#[derive(Debug)]
pub(crate) struct Record {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
}

/// Parses one line (without its newline) and checks its hash and canonical form; the error is
/// the reason to report.
pub(crate) fn check_record(line: &[u8]) -> Result<Record, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(mut map) = value else {
        return Err("not a JSON object".to_owned());
    };
    let hash = take_string(&mut map, "hash")?;
    let seq = map
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("missing or invalid field `seq` (want an unsigned integer)")?;
    let prev = map
        .get("prev")
        .and_then(Value::as_str)
        .ok_or("missing or invalid field `prev` (want a string)")?
        .to_owned();
    let (sealed, expected) = seal(map);
    if expected != hash {
        return Err("content changed (hash mismatch)".to_owned());
    }
    if sealed.as_bytes() != line {
        return Err("line is not in canonical form (reformatted or duplicate keys)".to_owned());
    }
    Ok(Record { seq, prev, hash })
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<String, String> {
    match map.remove(key) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(format!("missing or invalid field `{key}` (want a string)")),
    }
}

/// Checks every line of the log at `path`: its own hash, its link to the previous line, and the
/// sequence. Names the first bad line.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut chain = Chain::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        chain.check_line(&buf)?;
    }
    Ok(VerifyReport {
        lines: chain.lines,
        head: chain.head().to_owned(),
    })
}

/// The state of a verification in progress: lines checked and the last record's hash and seq.
#[derive(Default)]
struct Chain {
    lines: u64,
    last: Option<Record>,
}

impl Chain {
    fn head(&self) -> &str {
        self.last.as_ref().map_or(GENESIS, |r| r.hash.as_str())
    }

    /// Checks one raw line, including its trailing newline if it has one.
    fn check_line(&mut self, raw: &[u8]) -> Result<(), VerifyError> {
        let line = self.lines + 1;
        let broken = |reason: String| VerifyError::Broken { line, reason };
        let Some(body) = raw.strip_suffix(b"\n") else {
            return Err(broken(
                "incomplete last line (no trailing newline): an interrupted write, never \
                 acknowledged; the writer drops it when it next opens the log"
                    .to_owned(),
            ));
        };
        let record = check_record(body).map_err(broken)?;
        self.check_link(&record).map_err(broken)?;
        self.lines = line;
        self.last = Some(record);
        Ok(())
    }

    fn check_link(&self, record: &Record) -> Result<(), String> {
        let line = self.lines + 1;
        if record.prev != self.head() {
            return Err(if line == 1 {
                "chain broken: prev of the first line is not 64 zeros (lines were removed from \
                 the start)"
                    .to_owned()
            } else {
                format!(
                    "chain broken: prev does not match line {}'s hash (a line was removed, \
                     inserted or reordered)",
                    line - 1
                )
            });
        }
        let expected = self.last.as_ref().map_or(1, |r| r.seq + 1);
        if record.seq != expected {
            return Err(format!(
                "sequence gap: expected seq {expected}, found {}",
                record.seq
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_recursively_without_whitespace() {
        let v = json!({"b": [ {"z": 1, "a": "x"} ], "a": null, "c": {"y": true, "x": "é\"\n"}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":null,"b":[{"a":"x","z":1}],"c":{"x":"é\"\n","y":true}}"#
        );
    }

    fn sealed_line(seq: u64, prev: &str) -> (String, String) {
        let map = json!({"seq": seq, "prev": prev, "ts": "2024-01-01T00:00:00.000Z",
                         "event": "service.stopped", "reason": "test"});
        let Value::Object(map) = map else {
            unreachable!()
        };
        seal(map)
    }

    #[test]
    fn sealed_line_checks_out() {
        let (line, hash) = sealed_line(1, GENESIS);
        let rec = check_record(line.as_bytes()).unwrap();
        assert_eq!((rec.seq, rec.prev.as_str(), rec.hash), (1, GENESIS, hash));
    }

    #[test]
    fn reformatted_line_is_not_canonical() {
        let (line, _) = sealed_line(1, GENESIS);
        let spaced = line.replacen(',', ", ", 1);
        let err = check_record(spaced.as_bytes()).unwrap_err();
        assert!(err.contains("canonical form"), "{err}");
    }

    #[test]
    fn duplicate_key_is_not_canonical() {
        let (line, _) = sealed_line(1, GENESIS);
        let dup = line.replacen('{', r#"{"reason":"smuggled","#, 1);
        let err = check_record(dup.as_bytes()).unwrap_err();
        assert!(err.contains("canonical form"), "{err}");
    }

    #[test]
    fn missing_hash_and_bad_json_are_named() {
        assert!(check_record(b"{\"seq\":1}").unwrap_err().contains("`hash`"));
        assert!(check_record(b"{\"seq\":1")
            .unwrap_err()
            .starts_with("not valid JSON"));
        assert_eq!(check_record(b"[1]").unwrap_err(), "not a JSON object");
    }

    #[test]
    fn sequence_gap_is_named() {
        let mut chain = Chain::default();
        let (l1, h1) = sealed_line(1, GENESIS);
        chain.check_line(format!("{l1}\n").as_bytes()).unwrap();
        let (l2, _) = sealed_line(3, &h1);
        let err = chain.check_line(format!("{l2}\n").as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: sequence gap: expected seq 2, found 3"
        );
    }
}
