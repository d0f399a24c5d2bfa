//! One shutdown signal shared by every task: set once (SIGINT/SIGTERM or by hand), seen
//! by all.

use tokio::sync::watch;

/// Triggers shutdown. Cloning shares the same signal.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

/// Waits for shutdown.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl ShutdownHandle {
    pub(crate) fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
        }
    }

    /// Ask every consumer to stop: no new deliveries, in-flight handlers finish.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    pub(crate) fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown is triggered (at once if it already was).
    pub(crate) async fn cancelled(&mut self) {
        // An error means the sender is gone: treat as shutdown.
        let _ = self.rx.wait_for(|v| *v).await;
    }

    pub(crate) fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn os_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
