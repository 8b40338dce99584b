//! Shutdown signal and drain guard, after mini-redis: one `watch` channel tells every task to
//! stop; every session holds a [`DrainGuard`]; the drain is complete when all guards are dropped.

use tokio::sync::{mpsc, watch};

/// Sends the shutdown signal and waits for the drain.
pub struct Shutdown {
    notify: watch::Sender<bool>,
    guard_tx: Option<mpsc::Sender<()>>,
    guard_rx: mpsc::Receiver<()>,
}

/// Listens for the shutdown signal; cheap to clone.
#[derive(Clone)]
pub struct Signal {
    rx: watch::Receiver<bool>,
}

/// Held by every session; the drain completes when all are dropped.
#[derive(Clone)]
pub struct DrainGuard {
    _tx: mpsc::Sender<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (notify, _) = watch::channel(false);
        let (guard_tx, guard_rx) = mpsc::channel(1);
        Shutdown {
            notify,
            guard_tx: Some(guard_tx),
            guard_rx,
        }
    }

    pub fn signal(&self) -> Signal {
        Signal {
            rx: self.notify.subscribe(),
        }
    }

    pub fn guard(&self) -> DrainGuard {
        DrainGuard {
            // `guard_tx` is only taken by `drain`, which consumes self.
            _tx: self.guard_tx.clone().expect("guard_tx present until drain"),
        }
    }

    /// Tells every task to stop, then waits until every guard is dropped or `grace` passes.
    /// Returns true when the drain completed within the grace period.
    pub async fn drain(mut self, grace: std::time::Duration) -> bool {
        let _ = self.notify.send(true);
        self.guard_tx.take();
        tokio::time::timeout(grace, self.guard_rx.recv())
            .await
            .is_ok()
    }
}

impl Signal {
    /// Completes once shutdown has been requested.
    pub async fn recv(&mut self) {
        // An error means the sender is gone, which is also a shutdown.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }
}
