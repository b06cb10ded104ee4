//! Leader election among `lain controlplane` replicas through etcd's election API under
//! `Keyspace::election()`: only the leader runs the engine.
//!
//! Each replica holds a lease kept alive by a heartbeat and campaigns with it. When the
//! leader dies its lease expires after the TTL and the next campaigner wins. A leader whose
//! heartbeat fails, or is not answered within a third of the TTL, stops (fail-stop) before
//! its lease can expire, rather than risk two writers.

use std::time::Duration;

use etcd_client::Client;
use lain_common::Shutdown;
use lain_state::Keyspace;

/// A won election: the lease and the heartbeat that keeps it.
pub struct Leadership {
    client: Client,
    lease: i64,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Triggered when the lease can no longer be kept alive.
    pub lost: Shutdown,
}

/// Campaigns as `id` until this replica leads; returns `None` if `shutdown` comes first.
pub async fn campaign(
    client: &Client,
    ks: &Keyspace,
    id: &str,
    ttl: Duration,
    shutdown: &Shutdown,
) -> Result<Option<Leadership>, etcd_client::Error> {
    let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(5);
    let mut lease_client = client.lease_client();
    let lease = lease_client.grant(ttl_secs, None).await?.id();
    let (mut keeper, mut responses) = lease_client.keep_alive(lease).await?;
    let lost = Shutdown::new();
    let trigger = lost.clone();
    let period = Duration::from_millis(u64::try_from(ttl_secs).unwrap_or(5) * 1000 / 3);
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            // A beat not answered within a period counts as lost: a connection that went
            // silent without closing would otherwise hold this wait past the lease's expiry,
            // while a standby takes over and both act as leader.
            let beat = async {
                keeper.keep_alive().await.is_ok()
                    && matches!(responses.message().await, Ok(Some(r)) if r.ttl() > 0)
            };
            let alive = tokio::time::timeout(period, beat).await.unwrap_or(false);
            if !alive {
                tracing::error!(lease, "election lease lost");
                trigger.trigger();
                return;
            }
        }
    });
    let mut election = client.election_client();
    let name = ks.election();
    let won = tokio::select! {
        _ = shutdown.wait() => None,
        _ = lost.wait() => None,
        r = election.campaign(name.as_str(), id, lease) => Some(r),
    };
    let leadership = Leadership {
        client: client.clone(),
        lease,
        heartbeat,
        lost,
    };
    match won {
        Some(Ok(_)) => Ok(Some(leadership)),
        Some(Err(e)) => {
            leadership.resign().await;
            Err(e)
        }
        None => {
            leadership.resign().await;
            Ok(None)
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &self.lease)
            .finish()
    }
}

impl Leadership {
    /// Gives up leadership at once by revoking the lease, so a standby takes over without
    /// waiting for the TTL.
    pub async fn resign(self) {
        self.heartbeat.abort();
        let _ = self.client.lease_client().revoke(self.lease).await;
    }
}
