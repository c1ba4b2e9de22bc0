//! One ProxyPool reconcile: dereference, validate, build, apply, status. An invalid spec waits
//! for a change; a missing dependency is checked again later; API errors back off.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use mailproxy_crds::ProxyPool;
use mailproxy_crds::route_table::RouteTable;

use super::build::{self, Pool, deployment::RESTART_HASH_ANNOTATION};
use super::status::{self, Outcome};
use super::validate::{Problem, missing_dependency, valid_spec};
use super::{CONTROLLER, apply, dereference};
use crate::Context;
use crate::error::{Error, Result};
use crate::labels;

/// How soon a pool blocked on a missing Secret is checked again (Secrets are not watched).
const MISSING_RETRY: Duration = Duration::from_secs(10);

fn now() -> Time {
    Time(Timestamp::now())
}

/// While a pool waits for a Secret, the proxies already running keep serving: drains and new
/// servers still reach them through their route table (servers only; see
/// [`build::route_table::with_servers_of`]). Only a table the pool owns is written: a pool never
/// built, or a ConfigMap of that name that is someone else's, waits. Returns the table the
/// proxies have.
async fn route_table_while_waiting(
    ctx: &Context,
    namespace: &str,
    key: &str,
    valid: &Pool<'_>,
    deref: &dereference::Dereferenced,
) -> Result<Option<RouteTable>> {
    let Some(current) = deref.routes.as_ref() else {
        return Ok(None);
    };
    let owned = deref
        .children
        .get("ConfigMap")
        .is_some_and(|names| names.contains(&labels::names::routes(valid.name)));
    if !owned {
        return Ok(None);
    }
    let built = build::route_table::route_table(valid, &deref.servers);
    let Some(table) = build::route_table::with_servers_of(current, built) else {
        return Ok(None);
    };
    let routes = build::route_table::config_map(valid, &table);
    if build::route_table::too_large(&routes, &table).is_some() {
        // Said once the Secret is there and the whole pool is built.
        return Ok(None);
    }
    if apply::apply_route_table(&ctx.client, namespace, Some(current), &routes).await? {
        ctx.metrics.route_table_written();
        tracing::info!(pool = %key, version = %table.version(), "route table written while the pool waits for a Secret");
    }
    Ok(Some(table))
}

/// The status reason, message and next check of a pool that is not built: an invalid spec waits
/// for the user's change, a missing Secret (not watched) is looked for again soon.
fn blocked_by(problem: Problem) -> (&'static str, String, Action) {
    match problem {
        Problem::Invalid(message) => ("InvalidSpec", message, Action::await_change()),
        Problem::Missing { reason, message } => (reason, message, Action::requeue(MISSING_RETRY)),
    }
}

pub async fn reconcile(pool: Arc<ProxyPool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    if pool.metadata.deletion_timestamp.is_some() {
        // The garbage collector deletes the children through their owner references.
        return Ok(Action::await_change());
    }
    let namespace = pool
        .namespace()
        .ok_or_else(|| Error::NoNamespace(format!("ProxyPool {}", pool.name_any())))?;
    let key = format!("{namespace}/{}", pool.name_any());
    let reference = pool.object_ref(&());
    let client = &ctx.client;

    let deref = dereference::dereference(client, &pool, &namespace).await?;
    let blocked = |reason: &'static str,
                   message: String,
                   action: Action,
                   route_table: Option<RouteTable>| {
        let (ctx, pool, deref, key) = (&ctx, &pool, &deref, &key);
        async move {
            tracing::warn!(pool = %key, reason, message = message.as_str(), "ProxyPool not built");
            let status = status::status(
                pool,
                Outcome::Blocked {
                    reason,
                    message: &message,
                    route_table: route_table
                        .as_ref()
                        .map(|table| (table, table.servers.len())),
                },
                deref.deployment.as_ref(),
                &now(),
            );
            if status::write(&ctx.client, pool, status).await? {
                let reference = pool.object_ref(&());
                ctx.event(&reference, EventType::Warning, reason, "Validate", message)
                    .await;
            }
            ctx.succeeded(key);
            Ok(action)
        }
    };
    let valid = match valid_spec(&pool, &deref) {
        Ok(valid) => valid,
        Err(problem) => {
            let (reason, message, action) = blocked_by(problem);
            return blocked(reason, message, action, None).await;
        }
    };
    if let Some(problem) = missing_dependency(&valid, &deref) {
        let table = route_table_while_waiting(&ctx, &namespace, &key, &valid, &deref).await?;
        let (reason, message, action) = blocked_by(problem);
        return blocked(reason, message, action, table).await;
    }

    let desired = build::desired(&valid, &deref.servers, &ctx.settings.operator_pods);
    if let Some(message) = build::route_table::too_large(&desired.routes, &desired.route_table) {
        return blocked("RouteTableTooLarge", message, Action::await_change(), None).await;
    }
    let owner_uid = pool.uid().unwrap_or_default();
    let foreign =
        apply::foreign_children(client, &namespace, &deref, &desired, &owner_uid, valid.name)
            .await?;
    if !foreign.is_empty() {
        let message = format!(
            "{} already exist in namespace {namespace} and do not belong to this ProxyPool: the \
             operator does not take over objects it did not make; rename the pool, or delete or \
             rename those objects",
            foreign.join(", ")
        );
        // Checked again later: another pool's leftovers go once the garbage collector is done.
        return blocked(
            "NameConflict",
            message,
            Action::requeue(MISSING_RETRY),
            None,
        )
        .await;
    }
    let applied = match apply::apply_all(client, &namespace, &deref, &desired).await {
        Ok(applied) => applied,
        Err(error) => {
            let message = error.to_string();
            let status = status::status(
                &pool,
                Outcome::Failed { message: &message },
                deref.deployment.as_ref(),
                &now(),
            );
            if let Err(status_error) = status::write(client, &pool, status).await {
                tracing::debug!(error = %status_error, "cannot record the failure in the status");
            }
            ctx.event(
                &reference,
                EventType::Warning,
                "ApplyFailed",
                "Apply",
                message,
            )
            .await;
            return Err(error);
        }
    };

    for created in &applied.created {
        ctx.event(
            &reference,
            EventType::Normal,
            "Created",
            "Apply",
            format!("created {created}"),
        )
        .await;
    }
    for deleted in &applied.deleted {
        ctx.event(
            &reference,
            EventType::Normal,
            "Deleted",
            "Prune",
            format!("deleted {deleted}: this pool's spec no longer produces it"),
        )
        .await;
    }
    if applied.route_table_written {
        ctx.metrics.route_table_written();
        tracing::info!(
            pool = %key,
            version = %desired.route_table.version(),
            servers = desired.route_table.servers.len(),
            "route table written"
        );
        ctx.event(
            &reference,
            EventType::Normal,
            "RouteTableUpdated",
            "Apply",
            format!(
                "route table {} with {} MailboxServers",
                desired.route_table.version(),
                desired.route_table.servers.len()
            ),
        )
        .await;
    }
    let restart_hash = |d: &k8s_openapi::api::apps::v1::Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(RESTART_HASH_ANNOTATION).cloned())
    };
    if let Some(before) = deref.deployment.as_ref().and_then(restart_hash)
        && Some(&before) != restart_hash(&desired.deployment).as_ref()
    {
        ctx.event(
            &reference,
            EventType::Normal,
            "RollingRestart",
            "Apply",
            "the image, the TLS Secret or config.yaml (listeners, web, lookup secret, shutdown timing, PROXY protocol) changed: the proxies restart one by one".into(),
        )
        .await;
    }

    let status = status::status(
        &pool,
        Outcome::Reconciled {
            route_table: &desired.route_table,
            // Those in the table: a server whose address no proxy can use is left out.
            servers: desired.route_table.servers.len(),
        },
        Some(&applied.deployment),
        &now(),
    );
    status::write(client, &pool, status).await?;
    ctx.succeeded(&key);
    Ok(Action::requeue(ctx.settings.resync))
}
