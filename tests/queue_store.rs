//! The queue end to end on a real SQLite file: key files, sealing, the store, group commit.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use sealpost::config::{Encryption, KeyRef};
use sealpost::ids::MessageId;
use sealpost::policy::{MessageFacts, Policy, PolicyFile};
use sealpost::queue::keys::keygen;
use sealpost::queue::sqlite::SqliteStore;
use sealpost::queue::{
    Envelope, KeyError, KeyRing, NewRecipient, Queue, QueueError, RecipientStatus,
};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn encryption(active: &str, keys: &[(&str, &Path)], create: bool) -> Encryption {
    Encryption {
        active_key: active.to_string(),
        create_if_missing: create,
        keys: keys
            .iter()
            .map(|(id, file)| KeyRef {
                id: id.to_string(),
                file: file.to_path_buf(),
            })
            .collect(),
    }
}

/// A key ring with one fresh key `k1` in `dir`.
fn keyring(dir: &Path) -> KeyRing {
    let file = dir.join("keys/k1.key");
    KeyRing::load(&encryption("k1", &[("k1", &file)], true))
        .unwrap()
        .0
}

fn envelope(recipients: &[&str], size: usize) -> Envelope {
    let policy = Policy::compile(&PolicyFile::default());
    let sender = "app@clinic.example";
    let recipients = recipients
        .iter()
        .map(|r| NewRecipient {
            address: r.to_string(),
            domain: r.rsplit('@').next().unwrap().to_ascii_lowercase(),
            decision: policy.decide(&MessageFacts {
                sender,
                recipient: r,
            }),
        })
        .collect();
    Envelope {
        id: MessageId::generate(),
        received_at: Utc::now(),
        sender: sender.to_string(),
        recipients,
        client_ip: "192.0.2.7".parse().unwrap(),
        auth_user: Some("app".to_string()),
        message_id_header: Some("<abc@clinic.example>".to_string()),
        size: size as u64,
        lane: sealpost::queue::Lane::Transactional,
    }
}

fn body(marker: &str, len: usize) -> Vec<u8> {
    let mut body = format!("Subject: results\r\n\r\n{marker}\r\n").into_bytes();
    body.resize(len.max(body.len()), b'x');
    body
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn assert_absent(dir: &Path, marker: &[u8]) {
    let all = files(dir);
    assert!(all
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "sqlite")));
    for path in all {
        let bytes = std::fs::read(&path).unwrap();
        let found = bytes.windows(marker.len()).any(|w| w == marker);
        assert!(!found, "plaintext marker found in {}", path.display());
    }
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    keygen(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    let first = std::fs::read(&path).unwrap();
    assert_eq!(first.len(), 32);

    let err = keygen(&path).unwrap_err();
    assert!(matches!(err, KeyError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), first);
}

#[test]
fn load_refuses_a_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    keygen(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyRing::load(&encryption("k", &[("k", &path)], false)).unwrap_err();
    assert!(
        matches!(err, KeyError::Permissions { mode: 0o644, .. }),
        "{err:?}"
    );
}

#[test]
fn load_refuses_a_key_of_the_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    for len in [31, 33] {
        let path = dir.path().join(format!("k{len}.key"));
        std::fs::write(&path, vec![7u8; len]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = KeyRing::load(&encryption("k", &[("k", &path)], false)).unwrap_err();
        assert!(
            matches!(err, KeyError::Length { len: l, .. } if l == len),
            "{err:?}"
        );
    }
}

#[test]
fn create_if_missing_creates_the_active_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/keys/k1.key");
    let cfg = encryption("k1", &[("k1", &path)], true);
    let (ring, created) = KeyRing::load(&cfg).unwrap();
    assert_eq!(created, vec![("k1".to_string(), path.clone())]);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 32);

    // Debug output names keys, never their bytes.
    let key = std::fs::read(&path).unwrap();
    let debug = format!("{ring:?}");
    assert!(debug.contains("k1"), "{debug}");
    assert!(!debug.contains(&hex::encode(&key)), "{debug}");
    assert!(!debug.contains(&format!("{:?}", &key[..4])), "{debug}");

    // A second start loads the existing key and creates nothing.
    let (_, created) = KeyRing::load(&cfg).unwrap();
    assert!(created.is_empty());
}

#[test]
fn missing_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("k1.key");
    let old = dir.path().join("k0.key");

    let err = KeyRing::load(&encryption("k1", &[("k1", &active)], false)).unwrap_err();
    assert!(
        matches!(err, KeyError::Missing { ref id, .. } if id == "k1"),
        "{err:?}"
    );

    keygen(&active).unwrap();
    let cfg = encryption("k1", &[("k1", &active), ("k0", &old)], true);
    let err = KeyRing::load(&cfg).unwrap_err();
    assert!(matches!(err, KeyError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("k0"), "{err}");
    assert!(!old.exists(), "an older key must never be generated");

    let err = KeyRing::load(&encryption("k9", &[("k1", &active)], false)).unwrap_err();
    assert!(
        matches!(err, KeyError::UnknownKey(ref id) if id == "k9"),
        "{err:?}"
    );
}

#[test]
fn seal_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring(dir.path());
    let id = MessageId::generate();
    let plain = body("round trip", 10_000);

    let sealed = ring.seal(&id, plain.clone()).unwrap();
    assert_eq!(sealed.key_id, "k1");
    assert_eq!(sealed.ciphertext.len(), plain.len() + 16);
    assert_ne!(&sealed.ciphertext[..plain.len()], &plain[..]);
    assert_eq!(ring.open(&id, sealed.clone()).unwrap(), plain);

    // A fresh nonce per message.
    let again = ring.seal(&id, plain.clone()).unwrap();
    assert_ne!(again.nonce, sealed.nonce);

    // Bound to its message id.
    let other = MessageId::generate();
    let err = ring.open(&other, sealed.clone()).unwrap_err();
    assert!(matches!(err, KeyError::Open(_)), "{err:?}");

    // Altered ciphertext, tag or nonce.
    for i in [0, plain.len() / 2, plain.len() + 3] {
        let mut bad = sealed.clone();
        bad.ciphertext[i] ^= 1;
        assert!(matches!(ring.open(&id, bad), Err(KeyError::Open(_))));
    }
    let mut bad = sealed.clone();
    bad.nonce[0] ^= 1;
    assert!(matches!(ring.open(&id, bad), Err(KeyError::Open(_))));

    let mut unknown = sealed;
    unknown.key_id = "nope".to_string();
    assert!(matches!(
        ring.open(&id, unknown),
        Err(KeyError::UnknownKey(_))
    ));
}

#[test]
fn rotation_keeps_old_messages_readable() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = dir.path().join("k1.key");
    let k2 = dir.path().join("k2.key");
    let (old_ring, _) = KeyRing::load(&encryption("k1", &[("k1", &k1)], true)).unwrap();
    let old_id = MessageId::generate();
    let old = old_ring
        .seal(&old_id, b"sealed before rotation".to_vec())
        .unwrap();
    assert_eq!(old.key_id, "k1");

    let cfg = encryption("k2", &[("k2", &k2), ("k1", &k1)], true);
    let (ring, created) = KeyRing::load(&cfg).unwrap();
    assert_eq!(created, vec![("k2".to_string(), k2.clone())]);
    assert_eq!(ring.open(&old_id, old).unwrap(), b"sealed before rotation");

    let new_id = MessageId::generate();
    let new = ring.seal(&new_id, b"sealed after".to_vec()).unwrap();
    assert_eq!(new.key_id, "k2");
    assert_eq!(ring.open(&new_id, new.clone()).unwrap(), b"sealed after");
    // The old ring does not know k2.
    assert!(matches!(
        old_ring.open(&new_id, new),
        Err(KeyError::UnknownKey(ref id)) if id == "k2"
    ));
}

async fn open_queue(dir: &Path, ring: Arc<KeyRing>) -> (Queue, Arc<SqliteStore>) {
    let store = Arc::new(
        SqliteStore::open(&dir.join("data/queue.sqlite"), 64)
            .await
            .unwrap(),
    );
    (Queue::new(store.clone(), ring), store)
}

#[tokio::test]
async fn store_keeps_messages_sealed_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(keyring(dir.path()));
    let (queue, _) = open_queue(dir.path(), ring.clone()).await;
    let marker = "MARKER-7c1e9a53-plaintext-must-not-reach-disk";

    let mut sent = Vec::new();
    for (i, rcpts) in [
        vec!["a@one.example"],
        vec!["b@Two.Example", "c@two.example"],
        vec!["d@three.example", "e@four.example", "f@five.example"],
    ]
    .into_iter()
    .enumerate()
    {
        let plain = body(marker, 10_000 + i);
        let env = envelope(&rcpts, plain.len());
        sent.push((env.clone(), plain.clone()));
        queue.enqueue(env, plain).await.unwrap();
    }

    check_listed(&queue, &sent).await;
    check_bodies(&queue, &sent).await;
    assert_absent(dir.path(), marker.as_bytes());
    // Envelopes are readable metadata: the database and its WAL are private to the relay.
    let data = dir.path().join("data");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("queue.sqlite")), 0o600);
    assert_eq!(mode(&data.join("queue.sqlite-wal")), 0o600);
    queue.close().await;
    assert_absent(dir.path(), marker.as_bytes());

    let late = queue.enqueue(envelope(&["z@late.example"], 1), b"x".to_vec());
    assert!(matches!(late.await, Err(QueueError::Closed)));

    let (queue, _) = open_queue(dir.path(), ring).await;
    check_listed(&queue, &sent).await;
    check_bodies(&queue, &sent).await;
    assert!(queue.get(&MessageId::generate()).await.unwrap().is_none());
    queue.close().await;
}

async fn check_listed(queue: &Queue, sent: &[(Envelope, Vec<u8>)]) {
    let listed = queue.list().await.unwrap();
    assert_eq!(listed.len(), sent.len());
    for (stored, (env, plain)) in listed.iter().zip(sent) {
        assert_eq!(stored.id, env.id);
        assert!(stored.body.is_none());
        assert_eq!(stored.sender, env.sender);
        assert_eq!(stored.client_ip, "192.0.2.7");
        assert_eq!(stored.auth_user.as_deref(), Some("app"));
        assert_eq!(stored.size, plain.len() as u64);
        assert_eq!(stored.key_id, "k1");
        assert_eq!(
            stored.received_at.timestamp_micros(),
            env.received_at.timestamp_micros()
        );
        assert_eq!(stored.recipients.len(), env.recipients.len());
        for (r, want) in stored.recipients.iter().zip(&env.recipients) {
            assert_eq!(r.address, want.address);
            assert_eq!(r.domain, want.domain);
            assert_eq!(r.decision, want.decision);
            assert_eq!(r.status, RecipientStatus::Queued);
            assert_eq!(r.attempts, 0);
            assert_eq!(r.next_attempt, Some(stored.received_at));
            assert!(r.last_reply.is_none());
        }
    }
}

async fn check_bodies(queue: &Queue, sent: &[(Envelope, Vec<u8>)]) {
    for (env, plain) in sent {
        let stored = queue.get(&env.id).await.unwrap().unwrap();
        assert_eq!(stored.recipients.len(), env.recipients.len());
        assert_eq!(stored.body.as_ref().unwrap().key_id, "k1");
        assert_eq!(&queue.open_body(&stored).unwrap(), plain);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_are_group_committed() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(keyring(dir.path()));
    let (queue, store) = open_queue(dir.path(), ring).await;

    let mut tasks = Vec::new();
    for i in 0..500 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let rcpt = format!("user{i}@d{}.example", i % 7);
            let env = envelope(&[&rcpt], 2_000);
            let id = env.id.clone();
            queue
                .enqueue(env, body("concurrent", 2_000))
                .await
                .map(|()| id)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap());
    }
    let listed = queue.list().await.unwrap();
    assert_eq!(listed.len(), 500);
    let mut listed: Vec<_> = listed.into_iter().map(|m| m.id).collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    assert!(
        store.commits() < 500,
        "{} transactions for 500 messages: no grouping",
        store.commits()
    );
    queue.close().await;
}

async fn claim(
    queue: &Queue,
    owner: &str,
    now: chrono::DateTime<Utc>,
    lease_until: chrono::DateTime<Utc>,
    limit: usize,
) -> Result<Vec<sealpost::queue::StoredMessage>, QueueError> {
    queue
        .claim(&sealpost::queue::Claim {
            lane: sealpost::queue::Lane::Transactional,
            owner,
            now,
            lease_until,
            limit,
            skip_domains: &[],
        })
        .await
}

/// Claims are exclusive while their lease lasts, come back when it runs out (a crashed
/// worker), and outcomes, retry and delete change what is due.
#[tokio::test]
async fn claims_leases_outcomes_retry_and_delete() {
    use sealpost::queue::{RecipientStatus, RecipientUpdate};
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(keyring(dir.path()));
    let (queue, _store) = open_queue(dir.path(), ring).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let env = envelope(&[&format!("r{i}@d.example")], 100);
        ids.push(env.id.clone());
        queue.enqueue(env, body("claim", 100)).await.unwrap();
    }
    let now = Utc::now() + chrono::Duration::seconds(1);
    let lease = now + chrono::Duration::minutes(10);
    let a = claim(&queue, "node-a", now, lease, 2).await.unwrap();
    assert_eq!(a.len(), 2);
    assert!(a
        .iter()
        .all(|m| m.body.is_some() && m.recipients.len() == 1));
    let b = claim(&queue, "node-b", now, lease, 10).await.unwrap();
    assert_eq!(b.len(), 1, "only the unclaimed recipient");
    assert!(claim(&queue, "node-b", now, lease, 10)
        .await
        .unwrap()
        .is_empty());

    // node-a crashes: after its lease, its recipients are claimable again.
    let later = lease + chrono::Duration::seconds(1);
    let again = claim(
        &queue,
        "node-c",
        later,
        later + chrono::Duration::minutes(10),
        10,
    )
    .await
    .unwrap();
    assert_eq!(again.len(), 3, "expired leases of a and b come back");

    // Outcomes: one delivered, one deferred an hour ahead, one failed.
    let rid = |m: &sealpost::queue::StoredMessage| m.recipients[0].id;
    let update = |id, status, next| RecipientUpdate {
        id,
        status,
        next_attempt: next,
        last_reply: Some("250 ok".into()),
        attempted: true,
        warned: false,
    };
    let hour = later + chrono::Duration::hours(1);
    let outcomes = [
        update(rid(&again[0]), RecipientStatus::Delivered, None),
        update(rid(&again[1]), RecipientStatus::Deferred, Some(hour)),
        update(rid(&again[2]), RecipientStatus::Failed, None),
    ];
    // node-a lost its leases to node-c: its late outcome changes nothing.
    assert_eq!(queue.finish(Some("node-a"), &outcomes).await.unwrap(), 0);
    // An operator cannot override a live lease either.
    assert_eq!(queue.finish(None, &outcomes[..1]).await.unwrap(), 0);
    assert_eq!(queue.finish(Some("node-c"), &outcomes).await.unwrap(), 3);
    let soon = later + chrono::Duration::minutes(1);
    assert!(claim(&queue, "n", soon, soon, 10).await.unwrap().is_empty());
    let listed = queue.list().await.unwrap();
    let deferred = listed
        .iter()
        .flat_map(|m| &m.recipients)
        .find(|r| r.status == RecipientStatus::Deferred)
        .unwrap();
    assert_eq!(deferred.attempts, 1);

    // queue retry makes it due now.
    assert_eq!(queue.retry(None).await.unwrap(), 1);
    let due = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        claim(&queue, "n", due, due + chrono::Duration::minutes(1), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // delete removes the message and its recipients.
    assert!(queue.delete(&ids[0]).await.unwrap());
    assert!(!queue.delete(&ids[0]).await.unwrap());
    assert_eq!(queue.list().await.unwrap().len(), 2);
    queue.close().await;
}

/// Saturated domains are left out of a claim; other domains are not held up by them.
#[tokio::test]
async fn claims_skip_saturated_domains() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(keyring(dir.path()));
    let (queue, _store) = open_queue(dir.path(), ring).await;
    queue
        .enqueue(envelope(&["a@busy.example"], 10), body("skip", 10))
        .await
        .unwrap();
    queue
        .enqueue(envelope(&["b@idle.example"], 10), body("skip", 10))
        .await
        .unwrap();
    let now = Utc::now() + chrono::Duration::seconds(1);
    let busy = vec!["busy.example".to_string()];
    let claimed = queue
        .claim(&sealpost::queue::Claim {
            lane: sealpost::queue::Lane::Transactional,
            owner: "n#1",
            now,
            lease_until: now + chrono::Duration::minutes(1),
            limit: 10,
            skip_domains: &busy,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].recipients[0].domain, "idle.example");
    queue.close().await;
}
