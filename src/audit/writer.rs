//! Appending writer with group commit.
//!
//! One dedicated thread owns the file. [`AuditLog::record`] queues the event and waits; the thread
//! takes one request, drains whatever else is already queued (up to [`MAX_BATCH`]), assigns
//! `seq` and `ts`, writes all lines in one `write`, calls `fdatasync` once and only then
//! acknowledges every request of the batch.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::verify::{check_record, seal, GENESIS};
use super::AuditEvent;

/// Requests queued for the writer thread before `record` waits for room.
const QUEUE: usize = 4096;
/// Most records written (and fsynced) together.
const MAX_BATCH: usize = 1024;
/// How much of the end of an existing log `open` reads to find its last line.
const MAX_TAIL: u64 = 4 << 20;
/// Fields the chain adds to every record; no event may use them.
const CHAIN_FIELDS: [&str; 4] = ["seq", "ts", "prev", "hash"];

/// Errors of the audit writer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit file could not be opened, read or written.
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The last line of the existing log is not a valid audit record; run `sealpost audit verify`.
    #[error(
        "audit log {path}: last line is not a valid record ({reason}); run `sealpost audit verify`"
    )]
    Corrupt { path: String, reason: String },
    /// The event could not be turned into a record (nothing was written for it).
    #[error("audit event cannot be encoded: {0}")]
    Encode(String),
    /// The writer task has stopped.
    #[error("audit writer has stopped")]
    Closed,
}

type Ack = oneshot::Sender<Result<u64, AuditError>>;

enum Request {
    Record(Box<AuditEvent>, Ack),
    Close,
}

/// Handle to the audit log; cheap to clone. The writer thread ends after [`AuditLog::close`] or
/// once every handle is dropped (after writing what was queued).
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Request>,
    done: watch::Receiver<bool>,
}

impl AuditLog {
    /// Opens (creating if needed) the log and continues its chain. An incomplete last line (an
    /// interrupted write, never acknowledged) is cut off with a warning; a complete last line
    /// that is not a valid record is [`AuditError::Corrupt`].
    pub async fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let owned = path.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || Writer::open(owned))
            .await
            .map_err(|e| io_error(path)(io::Error::other(e)))??;
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done_tx, done) = watch::channel(false);
        std::thread::Builder::new()
            .name("sealpost-audit".to_owned())
            .spawn(move || writer.run(rx, Done(done_tx)))
            .map_err(io_error(path))?;
        Ok(AuditLog { tx, done })
    }

    /// Appends one event; returns its `seq` once the line is durable (fsynced).
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (ack, wait) = oneshot::channel();
        self.tx
            .send(Request::Record(Box::new(event), ack))
            .await
            .map_err(|_| AuditError::Closed)?;
        wait.await.map_err(|_| AuditError::Closed)?
    }

    /// Stops accepting records (later `record` calls return [`AuditError::Closed`]), writes and
    /// fsyncs everything already queued, and waits for the writer thread to finish.
    pub async fn close(&self) {
        // Fails only when the writer already stopped accepting; then just wait for it.
        let _ = self.tx.send(Request::Close).await;
        let mut done = self.done.clone();
        let _ = done.wait_for(|finished| *finished).await;
    }
}

/// An advisory `flock(2)` lock, released on drop.
struct FileLock(std::os::fd::RawFd);

impl FileLock {
    fn exclusive(file: &File) -> io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: flock on a descriptor we own for the lifetime of the lock.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(fd))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `exclusive`, which is still open.
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

/// Marks the writer thread finished when dropped, even if it panicked.
struct Done(watch::Sender<bool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The writer thread's state: the file and the chain head as durably written.
struct Writer {
    path: PathBuf,
    file: File,
    /// Length of the file up to the last fsynced batch.
    len: u64,
    /// `seq` of the last record written (0 for an empty log).
    seq: u64,
    /// `hash` of the last record written ([`GENESIS`] for an empty log).
    head: String,
    /// Set when a failed write could not be undone: the file's end is unknown, so nothing more
    /// may be chained onto it until the log is reopened.
    poisoned: Option<String>,
}

/// One queued event and whoever waits for it.
type Pending = (AuditEvent, Ack);

impl Writer {
    fn open(path: PathBuf) -> Result<Writer, AuditError> {
        let mut file = open_file(&path).map_err(io_error(&path))?;
        let lock = FileLock::exclusive(&file).map_err(io_error(&path))?;
        let (start, tail) = read_tail(&mut file).map_err(io_error(&path))?;
        let corrupt = |reason: String| AuditError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        let (len, last) = split_tail(start, &tail).map_err(corrupt)?;
        let file_len = start + tail.len() as u64;
        if len < file_len {
            drop_partial_tail(&file, &path, len, file_len).map_err(io_error(&path))?;
        }
        let (seq, head) = match last {
            None => (0, GENESIS.to_owned()),
            Some(line) => check_record(line)
                .map(|r| (r.seq, r.hash))
                .map_err(corrupt)?,
        };
        drop(lock);
        Ok(Writer {
            path,
            file,
            len,
            seq,
            head,
            poisoned: None,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Request>, _done: Done) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            take(first, &mut batch, &mut rx);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(request) => take(request, &mut batch, &mut rx),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Writes the batch in one write and one fdatasync, then acknowledges each request.
    fn commit(&mut self, batch: &mut Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        if let Some(reason) = &self.poisoned {
            let err = io::Error::other(reason.clone());
            for (_, ack) in batch.drain(..) {
                let _ = ack.send(Err(self.io_err(&err)));
            }
            return;
        }
        // Another process (an admin command such as `queue show --body`) may append to the
        // same log: hold an exclusive lock for the batch and continue from its records.
        let _lock = match self.lock_and_resync() {
            Ok(lock) => lock,
            Err(err) => {
                for (_, ack) in batch.drain(..) {
                    let _ = ack.send(Err(self.io_err(&err)));
                }
                return;
            }
        };
        let (buf, seq, head, outcomes) = self.encode_batch(batch);
        let written = self.append(buf.as_bytes());
        if let Err(err) = &written {
            tracing::error!(path = %self.path.display(), error = %err, "audit write failed");
            self.roll_back();
        } else {
            (self.seq, self.head) = (seq, head);
        }
        for (ack, outcome) in outcomes {
            let outcome = match &written {
                Ok(()) => outcome,
                Err(err) => Err(self.io_err(err)),
            };
            let _ = ack.send(outcome);
        }
    }

    /// Turns the batch into lines chained onto the current head; returns the bytes to append,
    /// the head after them and each request's outcome.
    fn encode_batch(&self, batch: &mut Vec<Pending>) -> (String, u64, String, Vec<(Ack, Outcome)>) {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let (mut seq, mut head) = (self.seq, self.head.clone());
        let mut buf = String::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for (event, ack) in batch.drain(..) {
            match encode(&event, seq + 1, &ts, &head) {
                Ok((line, hash)) => {
                    buf.push_str(&line);
                    buf.push('\n');
                    (seq, head) = (seq + 1, hash);
                    outcomes.push((ack, Ok(seq)));
                }
                Err(err) => outcomes.push((ack, Err(err))),
            }
        }
        (buf, seq, head, outcomes)
    }

    /// Takes the cross-process lock; if the file grew since our last write, re-reads the chain
    /// head from its last complete line.
    fn lock_and_resync(&mut self) -> io::Result<FileLock> {
        let lock = FileLock::exclusive(&self.file)?;
        let len = self.file.metadata()?.len();
        if len != self.len {
            let (start, tail) = read_tail(&mut self.file)?;
            let (complete, last) = split_tail(start, &tail).map_err(io::Error::other)?;
            if let Some(line) = last {
                let record = check_record(line).map_err(io::Error::other)?;
                (self.seq, self.head) = (record.seq, record.hash);
            }
            if complete < len {
                self.file.set_len(complete)?;
            }
            self.len = complete;
        }
        Ok(lock)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Cuts off whatever a failed write may have left; if that fails too, refuses further writes.
    fn roll_back(&mut self) {
        let undone = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all());
        if let Err(err) = undone {
            tracing::error!(path = %self.path.display(), error = %err,
                "cannot undo a failed audit write; refusing further records until restart");
            self.poisoned = Some(format!(
                "an earlier write failed and could not be undone ({err}); restart to reopen the log"
            ));
        }
    }

    fn io_err(&self, err: &io::Error) -> AuditError {
        io_error(&self.path)(io::Error::new(err.kind(), err.to_string()))
    }
}

type Outcome = Result<u64, AuditError>;

/// Adds a request to the batch; a close request stops the queue from accepting more, and the
/// writer ends once what was already queued is written.
fn take(request: Request, batch: &mut Vec<Pending>, rx: &mut mpsc::Receiver<Request>) {
    match request {
        Request::Record(event, ack) => batch.push((*event, ack)),
        Request::Close => rx.close(),
    }
}

/// The sealed line (without newline) and its hash for one event.
fn encode(
    event: &AuditEvent,
    seq: u64,
    ts: &str,
    prev: &str,
) -> Result<(String, String), AuditError> {
    let value = serde_json::to_value(event).map_err(|e| AuditError::Encode(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(AuditError::Encode("event is not a JSON object".to_owned()));
    };
    if let Some(field) = CHAIN_FIELDS.iter().find(|f| map.contains_key(**f)) {
        return Err(AuditError::Encode(format!(
            "event has a field named `{field}`"
        )));
    }
    map.insert("seq".to_owned(), seq.into());
    map.insert("ts".to_owned(), ts.into());
    map.insert("prev".to_owned(), prev.into());
    Ok(seal(map))
}

/// Opens the log for appending, creating it (and its directory) if needed; a new file's
/// directory entry is fsynced so the file survives a crash.
fn open_file(path: &Path) -> io::Result<File> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let existed = path.exists();
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    let file = options.open(path)?;
    if !existed {
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(file)
}

/// Reads the last [`MAX_TAIL`] bytes (or fewer) of the file; returns their offset and them.
fn read_tail(file: &mut File) -> io::Result<(u64, Vec<u8>)> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(MAX_TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    Ok((start, tail))
}

/// Splits the end of the file (`tail`, read from offset `start`) into the length of its complete
/// lines and the last complete line (without newline), if any.
fn split_tail(start: u64, tail: &[u8]) -> Result<(u64, Option<&[u8]>), String> {
    let too_long = || format!("no line break in the last {MAX_TAIL} bytes");
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(end) => &tail[..=end],
        None if start == 0 => return Ok((0, None)),
        None => return Err(too_long()),
    };
    let body = &complete[..complete.len() - 1];
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(end) => &body[end + 1..],
        None if start == 0 => body,
        None => return Err(too_long()),
    };
    Ok((start + complete.len() as u64, Some(line)))
}

/// Truncates an incomplete last line left by an interrupted write. Its request was never
/// acknowledged (acks follow the fsync), so nothing that was promised is lost.
fn drop_partial_tail(file: &File, path: &Path, keep: u64, len: u64) -> io::Result<()> {
    file.set_len(keep)?;
    file.sync_all()?;
    tracing::warn!(
        path = %path.display(),
        dropped_bytes = len - keep,
        "audit log ended with an incomplete line from an interrupted write; dropped it"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_tail_finds_complete_length_and_last_line() {
        assert_eq!(split_tail(0, b""), Ok((0, None)));
        assert_eq!(split_tail(0, b"partial"), Ok((0, None)));
        assert_eq!(split_tail(0, b"a\n"), Ok((2, Some(&b"a"[..]))));
        assert_eq!(split_tail(0, b"a\nbc\n"), Ok((5, Some(&b"bc"[..]))));
        assert_eq!(split_tail(0, b"a\nbc\npart"), Ok((5, Some(&b"bc"[..]))));
        assert_eq!(split_tail(10, b"xx\nbc\n"), Ok((16, Some(&b"bc"[..]))));
        assert!(split_tail(10, b"xxbc\n").is_err());
        assert!(split_tail(10, b"xxbc").is_err());
    }

    #[test]
    fn encode_chains_fields_and_seals() {
        let event = AuditEvent::ServiceStopped {
            reason: "test".to_owned(),
        };
        let (line, hash) = encode(&event, 7, "2024-01-01T00:00:00.000000Z", GENESIS).unwrap();
        let record = check_record(line.as_bytes()).unwrap();
        assert_eq!((record.seq, record.prev.as_str()), (7, GENESIS));
        assert_eq!(record.hash, hash);
        assert!(
            line.starts_with(r#"{"event":"service.stopped","hash":""#),
            "{line}"
        );
        assert!(line.contains(r#""reason":"test""#));
    }

    #[tokio::test]
    async fn open_rejects_a_corrupt_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"not\":\"a record\"}\n").unwrap();
        let err = AuditLog::open(&path).await.err().unwrap();
        assert!(matches!(err, AuditError::Corrupt { .. }), "{err}");
    }
}
