//! At-rest keys: AES-256-GCM with a key id stored beside each message.
//!
//! Each body is sealed with the active key under a fresh random 96-bit nonce; the message id is
//! the associated data, so a ciphertext moved to another message's row fails to open. Older keys
//! stay configured (and loaded) for as long as queued messages still carry their id.

use std::collections::HashMap;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{Encryption, KeyRef};
use crate::ids::MessageId;

use super::SealedBody;

/// Length of a key file: one raw AES-256 key.
pub const KEY_LEN: usize = 32;

/// Errors loading or using at-rest keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} must hold exactly 32 bytes, found {len}")]
    Length { path: PathBuf, len: usize },
    #[error("key file {path} for active key `{id}` does not exist; create it with `sealpost keygen {path}` or set `encryption.create_if_missing = true`")]
    Missing { id: String, path: PathBuf },
    #[error(
        "message sealed with key `{0}`, which is not configured; add it to [[encryption.key]]"
    )]
    UnknownKey(String),
    #[error("body of {0} failed authentication: wrong key or altered data")]
    Open(String),
    #[error("encryption failed: {0}")]
    Seal(String),
}

impl KeyError {
    fn io(path: &Path, source: io::Error) -> KeyError {
        KeyError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The configured keys.
pub struct KeyRing {
    /// Id of the key new bodies are sealed with; always present in `keys`.
    active: String,
    keys: HashMap<String, LessSafeKey>,
    rng: SystemRandom,
}

/// Lists key ids only: key material never reaches logs.
impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("keys", &ids)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Loads every configured key. With `create_if_missing`, a missing active key file is
    /// created (mode 0600); the returned list names the key ids created (for `key.created`).
    pub fn load(cfg: &Encryption) -> Result<(KeyRing, Vec<(String, PathBuf)>), KeyError> {
        if !cfg.keys.iter().any(|k| k.id == cfg.active_key) {
            return Err(KeyError::UnknownKey(cfg.active_key.clone()));
        }
        let mut keys = HashMap::with_capacity(cfg.keys.len());
        let mut created = Vec::new();
        for key in &cfg.keys {
            let active = key.id == cfg.active_key;
            if active && cfg.create_if_missing && !exists(&key.file)? {
                create_parent(&key.file)?;
                keygen(&key.file)?;
                created.push((key.id.clone(), key.file.clone()));
            }
            keys.insert(key.id.clone(), read_key(key, active)?);
        }
        let ring = KeyRing {
            active: cfg.active_key.clone(),
            keys,
            rng: SystemRandom::new(),
        };
        Ok((ring, created))
    }

    /// Id of the key new bodies are sealed with.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Seals a body with the active key; the message id is the associated data.
    ///
    /// The body is encrypted in place and the 16-byte tag appended; give `body` 16 bytes of
    /// spare capacity to avoid a reallocation.
    pub fn seal(&self, id: &MessageId, mut body: Vec<u8>) -> Result<SealedBody, KeyError> {
        let key = self
            .keys
            .get(&self.active)
            .ok_or_else(|| KeyError::UnknownKey(self.active.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| KeyError::Seal("system random generator failed".to_string()))?;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.as_str().as_bytes()),
            &mut body,
        )
        .map_err(|_| KeyError::Seal(format!("body of {id} is too large to seal")))?;
        Ok(SealedBody {
            key_id: self.active.clone(),
            nonce,
            ciphertext: body,
        })
    }

    /// Opens a body sealed by [`seal`](Self::seal) with any configured key.
    pub fn open(&self, id: &MessageId, body: SealedBody) -> Result<Vec<u8>, KeyError> {
        let key = self
            .keys
            .get(&body.key_id)
            .ok_or_else(|| KeyError::UnknownKey(body.key_id.clone()))?;
        let mut data = body.ciphertext;
        let len = key
            .open_in_place(
                Nonce::assume_unique_for_key(body.nonce),
                Aad::from(id.as_str().as_bytes()),
                &mut data,
            )
            .map_err(|_| KeyError::Open(id.to_string()))?
            .len();
        data.truncate(len);
        Ok(data)
    }
}

/// Writes a new random 32-byte key to `path` with mode 0600; refuses to overwrite.
pub fn keygen(path: &Path) -> Result<(), KeyError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KeyError::io(path, io::Error::other("system random generator failed")))?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => KeyError::io(
                path,
                io::Error::new(e.kind(), "already exists; refusing to overwrite a key"),
            ),
            _ => KeyError::io(path, e),
        });
    let written = file.and_then(|f| write_key(path, f, &key));
    wipe(&mut key);
    written?;
    sync_parent(path)
}

/// Writes and fsyncs the key; removes the file again if that fails, so no short key is left.
fn write_key(path: &Path, mut file: File, key: &[u8]) -> Result<(), KeyError> {
    let result = file.write_all(key).and_then(|()| file.sync_all());
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(KeyError::io(path, e));
    }
    Ok(())
}

/// Makes the new directory entry durable (best effort on file systems that refuse).
fn sync_parent(path: &Path) -> Result<(), KeyError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match File::open(parent).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() != io::ErrorKind::InvalidInput => Err(KeyError::io(parent, e)),
        _ => Ok(()),
    }
}

/// Creates the key file's parent directories with mode 0700.
fn create_parent(path: &Path) -> Result<(), KeyError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| KeyError::io(dir, e)),
        _ => Ok(()),
    }
}

fn exists(path: &Path) -> Result<bool, KeyError> {
    path.try_exists().map_err(|e| KeyError::io(path, e))
}

/// Reads one key file, checking its mode (on the open handle) and length.
fn read_key(key: &KeyRef, active: bool) -> Result<LessSafeKey, KeyError> {
    let path = &key.file;
    let mut file = File::open(path).map_err(|e| missing(key, active, e))?;
    let meta = file.metadata().map_err(|e| KeyError::io(path, e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.clone(),
            mode,
        });
    }
    // One byte more than a key, so a longer file is reported with a length, not truncated.
    let mut buf = [0u8; KEY_LEN + 1];
    let len = read_up_to(&mut file, &mut buf).map_err(|e| KeyError::io(path, e))?;
    let result = if len == KEY_LEN {
        UnboundKey::new(&AES_256_GCM, &buf[..KEY_LEN])
            .map(LessSafeKey::new)
            .map_err(|_| KeyError::Length {
                path: path.clone(),
                len,
            })
    } else {
        let len = if len > KEY_LEN {
            meta.len() as usize
        } else {
            len
        };
        Err(KeyError::Length {
            path: path.clone(),
            len,
        })
    };
    wipe(&mut buf);
    result
}

/// Maps a failure to open a key file to the error the operator needs.
fn missing(key: &KeyRef, active: bool, e: io::Error) -> KeyError {
    match e.kind() {
        io::ErrorKind::NotFound if active => KeyError::Missing {
            id: key.id.clone(),
            path: key.file.clone(),
        },
        io::ErrorKind::NotFound => KeyError::io(
            &key.file,
            io::Error::new(
                e.kind(),
                format!(
                    "older key `{}` is configured but its file does not exist; restore the file, \
                     or remove the key from [[encryption.key]] once no queued message uses it",
                    key.id
                ),
            ),
        ),
        _ => KeyError::io(&key.file, e),
    }
}

/// Reads until `buf` is full or end of file.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Overwrites key bytes that are no longer needed (best effort: `black_box` keeps the
/// compiler from dropping the stores).
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}
