//! Graceful shutdown: one token, cancelled by SIGINT or SIGTERM or by the caller, that every
//! task of a component watches so that it stops taking work and drains.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A signal nobody has triggered yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A signal triggered by SIGINT or SIGTERM, whichever comes first.
    pub fn on_signals() -> Shutdown {
        let s = Shutdown::new();
        let trigger = s.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining");
            trigger.trigger();
        });
        s
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the shutdown starts.
    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// A future for APIs that take `impl Future<Output = ()>`.
    pub fn wait_owned(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let token = self.token.clone();
        async move { token.cancelled_owned().await }
    }

    /// A child signal, triggered with this one or on its own.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be stopped by SIGKILL; never return.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Waits for `fut` up to `grace`, for drain steps that must not hang a shutdown.
pub async fn with_grace<F: std::future::Future>(grace: Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(grace, fut).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_wakes_waiters_and_children() {
        let s = Shutdown::new();
        let child = s.child();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait().await }
        });
        assert!(!child.is_triggered());
        s.trigger();
        waiter.await.unwrap();
        assert!(child.is_triggered());
        assert!(
            with_grace(Duration::from_millis(10), std::future::pending::<()>())
                .await
                .is_none()
        );
    }
}
