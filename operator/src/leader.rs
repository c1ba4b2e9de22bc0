//! Leader election on a coordination.k8s.io/v1 Lease (through `kube-lease-manager`): every
//! replica campaigns; only the holder runs the controllers, so only one replica writes. Losing
//! the Lease stops the controllers (in-flight reconciles are cancelled) until it is won back.

use std::sync::Arc;

use anyhow::Context as _;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::{Context, Metrics, Settings, mailbox_server, proxy_pool};

/// Runs both controllers until the future is dropped.
pub async fn run_controllers(ctx: Arc<Context>) {
    let pools = proxy_pool::controller(&ctx);
    let servers = mailbox_server::controller(&ctx);
    let state = Arc::new(mailbox_server::State { ctx: ctx.clone() });
    tokio::join!(
        proxy_pool::run(pools, ctx),
        mailbox_server::run(servers, state)
    );
}

async fn until(leading: &mut watch::Receiver<bool>, value: bool) -> anyhow::Result<()> {
    leading
        .wait_for(|leading| *leading == value)
        .await
        .map(|_| ())
        .context("the leader election task stopped")
}

/// Campaigns for the Lease and runs the controllers while holding it, until `shutdown`
/// resolves; then releases the Lease so that another replica takes over at once.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.lease_duration.as_secs())
        .with_grace(settings.lease_grace.as_secs())
        .build()
        .await
        .with_context(|| {
            format!(
                "cannot create or read Lease {}/{}: grant the operator get, create and patch on \
                 leases.coordination.k8s.io in that namespace",
                settings.lease_namespace, settings.lease_name
            )
        })?;
    let (mut leading, lease_task) = manager.watch().await;
    tokio::pin!(shutdown);
    let outcome = loop {
        tracing::info!(identity = %settings.identity, lease = %settings.lease_name, "waiting for leadership");
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            won = until(&mut leading, true) => if let Err(error) = won { break Err(error) },
        }
        metrics.set_leader(true);
        tracing::info!(identity = %settings.identity, "leading: starting the controllers");
        let ctx = Arc::new(Context::new(
            client.clone(),
            settings.clone(),
            metrics.clone(),
        ));
        let ended = tokio::select! {
            () = &mut shutdown => Some(Ok(())),
            lost = until(&mut leading, false) => match lost {
                Ok(()) => {
                    tracing::warn!(identity = %settings.identity, "lost leadership: stopping the controllers");
                    None
                }
                Err(error) => Some(Err(error)),
            },
            () = run_controllers(ctx) => Some(Err(anyhow::anyhow!("the controllers stopped"))),
        };
        metrics.set_leader(false);
        if let Some(ended) = ended {
            break ended;
        }
    };
    drop(leading);
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!("leader Lease released"),
        Ok(Err(error)) => tracing::warn!(%error, "cannot release the leader Lease"),
        Err(error) => tracing::warn!(%error, "the leader election task failed"),
    }
    outcome
}
