//! One shutdown signal shared by every task: a `CancellationToken`, set once
//! (SIGINT/SIGTERM or by hand), seen by all.

use tokio_util::sync::CancellationToken;

/// Triggers shutdown. Cloning shares the same signal.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle {
    token: CancellationToken,
}

/// Waits for shutdown.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownSignal {
    token: CancellationToken,
}

impl ShutdownHandle {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Ask every consumer to stop: no new deliveries, in-flight handlers finish.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown was asked for.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            token: self.token.clone(),
        }
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown is triggered (at once if it already was).
    pub(crate) async fn cancelled(&mut self) {
        self.token.cancelled().await;
    }

    pub(crate) fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
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
