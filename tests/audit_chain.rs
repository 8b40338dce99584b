//! The audit log end to end: write through `AuditLog`, check with `verify`, tamper with copies.

use std::path::{Path, PathBuf};

use sealpost::audit::{
    canonical_json, verify, AuditError, AuditEvent, AuditLog, VerifyError, GENESIS,
};
use sealpost::ids::SessionId;
use serde_json::Value;

fn stopped(i: u64) -> AuditEvent {
    AuditEvent::ServiceStopped {
        reason: format!("reason {i}"),
    }
}

fn connected(port: u16) -> AuditEvent {
    AuditEvent::SessionConnected {
        session: SessionId(u64::from(port)),
        client_ip: "127.0.0.1".parse().unwrap(),
        client_port: port,
        listener: "submission".to_owned(),
    }
}

/// A log of five records (seq 1..=5) in a fresh directory.
async fn five_line_log() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).await.unwrap();
    let mut seqs = Vec::new();
    for i in 1..=5u16 {
        let event = if i % 2 == 0 {
            connected(i)
        } else {
            stopped(i.into())
        };
        seqs.push(log.record(event).await.unwrap());
    }
    log.close().await;
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A copy of the log in the same directory with its lines replaced.
fn tampered(path: &Path, name: &str, lines: &[String]) -> PathBuf {
    let copy = path.with_file_name(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&copy, text).unwrap();
    copy
}

fn broken_at(path: &Path) -> (u64, String) {
    match verify(path) {
        Err(VerifyError::Broken { line, reason }) => (line, reason),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

fn parse(line: &str) -> serde_json::Map<String, Value> {
    match serde_json::from_str(line).unwrap() {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Recomputes a line's hash the way a tamperer would, so only the chain can catch the change.
fn rehash(mut record: serde_json::Map<String, Value>) -> String {
    record.remove("hash");
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        canonical_json(&Value::Object(record.clone())).as_bytes(),
    );
    record.insert("hash".to_owned(), hex::encode(digest).into());
    canonical_json(&Value::Object(record))
}

#[tokio::test]
async fn written_log_verifies_and_has_the_documented_shape() {
    let (_dir, path) = five_line_log().await;
    let report = verify(&path).unwrap();
    assert_eq!(report.lines, 5);
    let lines = lines(&path);
    let mut prev = GENESIS.to_owned();
    for (i, line) in lines.iter().enumerate() {
        let record = parse(line);
        assert_eq!(record["seq"], (i + 1) as u64);
        assert_eq!(record["prev"], prev.as_str());
        let ts = record["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "{ts}");
        chrono::DateTime::parse_from_rfc3339(ts).unwrap();
        assert_eq!(record["hash"].as_str().unwrap().len(), 64);
        prev = record["hash"].as_str().unwrap().to_owned();
    }
    assert_eq!(report.head, prev);
    let third = parse(&lines[2]);
    assert_eq!(third["event"], "service.stopped");
    assert_eq!(third["reason"], "reason 3");
    let second = parse(&lines[1]);
    assert_eq!(second["event"], "session.connected");
    assert_eq!(second["client_ip"], "127.0.0.1");
}

#[tokio::test]
async fn reopening_continues_the_chain() {
    let (_dir, path) = five_line_log().await;
    let log = AuditLog::open(&path).await.unwrap();
    assert_eq!(log.record(stopped(6)).await.unwrap(), 6);
    assert_eq!(log.record(stopped(7)).await.unwrap(), 7);
    log.close().await;
    assert_eq!(verify(&path).unwrap().lines, 7);
}

#[tokio::test]
async fn record_after_close_is_refused_on_every_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/audit.jsonl");
    let log = AuditLog::open(&path).await.unwrap();
    let other = log.clone();
    assert_eq!(other.record(stopped(1)).await.unwrap(), 1);
    log.close().await;
    assert!(matches!(
        other.record(stopped(2)).await,
        Err(AuditError::Closed)
    ));
    other.close().await;
    assert_eq!(verify(&path).unwrap().lines, 1);
}

#[tokio::test]
async fn edited_field_names_its_line() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    lines[2] = lines[2].replace("reason 3", "reason X");
    let (line, reason) = broken_at(&tampered(&path, "edited", &lines));
    assert_eq!(
        (line, reason.as_str()),
        (3, "content changed (hash mismatch)")
    );
}

#[tokio::test]
async fn deleted_line_breaks_the_chain_where_it_was() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    lines.remove(2);
    let (line, reason) = broken_at(&tampered(&path, "deleted", &lines));
    assert_eq!(line, 3);
    assert_eq!(
        reason,
        "chain broken: prev does not match line 2's hash (a line was removed, inserted or reordered)"
    );
}

#[tokio::test]
async fn swapped_lines_name_the_first() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    lines.swap(1, 2);
    let (line, reason) = broken_at(&tampered(&path, "swapped", &lines));
    assert_eq!(line, 2);
    assert!(
        reason.starts_with("chain broken: prev does not match line 1's hash"),
        "{reason}"
    );
}

#[tokio::test]
async fn removed_first_line_is_named() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    lines.remove(0);
    let (line, reason) = broken_at(&tampered(&path, "headless", &lines));
    assert_eq!(line, 1);
    assert!(reason.contains("64 zeros"), "{reason}");
}

#[tokio::test]
async fn shortened_hash_is_a_mismatch() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    let mut record = parse(&lines[4]);
    let hash = record["hash"].as_str().unwrap()[..60].to_owned();
    record.insert("hash".to_owned(), hash.into());
    lines[4] = canonical_json(&Value::Object(record));
    let (line, reason) = broken_at(&tampered(&path, "short_hash", &lines));
    assert_eq!(
        (line, reason.as_str()),
        (5, "content changed (hash mismatch)")
    );
}

#[tokio::test]
async fn rehashed_edit_is_caught_by_the_next_line() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    let mut record = parse(&lines[2]);
    record.insert("reason".to_owned(), "forged".into());
    lines[2] = rehash(record);
    let (line, reason) = broken_at(&tampered(&path, "rehashed", &lines));
    assert_eq!(line, 4);
    assert!(
        reason.starts_with("chain broken: prev does not match line 3's hash"),
        "{reason}"
    );
}

#[tokio::test]
async fn rehashed_seq_is_a_sequence_gap() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    let mut record = parse(&lines[2]);
    record.insert("seq".to_owned(), 9.into());
    lines[2] = rehash(record);
    let (line, reason) = broken_at(&tampered(&path, "reseq", &lines));
    assert_eq!(
        (line, reason.as_str()),
        (3, "sequence gap: expected seq 3, found 9")
    );
}

#[tokio::test]
async fn reformatted_and_garbage_lines_are_named() {
    let (_dir, path) = five_line_log().await;
    let mut spaced = lines(&path);
    spaced[1] = spaced[1].replacen(':', ": ", 1);
    let (line, reason) = broken_at(&tampered(&path, "spaced", &spaced));
    assert_eq!(line, 2);
    assert!(reason.contains("canonical form"), "{reason}");

    let mut garbage = lines(&path);
    garbage[3] = "not json at all".to_owned();
    let (line, reason) = broken_at(&tampered(&path, "garbage", &garbage));
    assert_eq!(line, 4);
    assert!(reason.starts_with("not valid JSON"), "{reason}");
}

#[tokio::test]
async fn interrupted_write_is_reported_then_dropped_on_reopen() {
    let (_dir, path) = five_line_log().await;
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 20]).unwrap();
    let (line, reason) = broken_at(&path);
    assert_eq!(line, 5);
    assert!(reason.contains("no trailing newline"), "{reason}");

    let log = AuditLog::open(&path).await.unwrap();
    assert_eq!(log.record(stopped(5)).await.unwrap(), 5);
    log.close().await;
    assert_eq!(verify(&path).unwrap().lines, 5);
}

#[tokio::test]
async fn corrupt_last_line_refuses_to_open() {
    let (_dir, path) = five_line_log().await;
    let mut lines = lines(&path);
    lines[4] = lines[4].replace("reason 5", "reason X");
    let copy = tampered(&path, "corrupt_tail", &lines);
    match AuditLog::open(&copy).await {
        Err(AuditError::Corrupt { reason, .. }) => assert!(reason.contains("hash mismatch")),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, opened"),
    }
}

#[tokio::test]
async fn empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let report = verify(&empty).unwrap();
    assert_eq!((report.lines, report.head.as_str()), (0, GENESIS));
    let missing = dir.path().join("missing.jsonl");
    assert!(matches!(verify(&missing), Err(VerifyError::Io { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_get_distinct_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).await.unwrap();
    let tasks: Vec<_> = (0..200u16)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(connected(i)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap());
    }
    log.close().await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    assert_eq!(verify(&path).unwrap().lines, 200);
}

#[tokio::test]
async fn dropping_every_handle_flushes_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).await.unwrap();
    assert_eq!(log.record(stopped(1)).await.unwrap(), 1);
    drop(log);
    // The writer thread ends on its own; a new writer continues the chain.
    let log = AuditLog::open(&path).await.unwrap();
    assert_eq!(log.record(stopped(2)).await.unwrap(), 2);
    log.close().await;
    assert_eq!(verify(&path).unwrap().lines, 2);
}
