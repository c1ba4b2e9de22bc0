//! The route table a proxy serves with, and its two sources behind one interface: a watched
//! file (standalone proxies, `mailproxy lookupd`) and a watched ConfigMap (pods of a ProxyPool).
//!
//! A source publishes each new table through a [`TableHandle`]; readers take the current table
//! with one atomic load, so a reload never blocks a login and never drops a session. A table that
//! fails to parse is logged and ignored: the proxy keeps serving the last good one.

mod addresses;
mod configmap;
mod file;

use std::sync::Arc;

pub(crate) use addresses::ip_literal;
pub use addresses::{AddressIndex, REFRESH_INTERVAL, ServerAddresses};
pub use configmap::ConfigMapSource;
pub use file::watch_file;
use mailproxy_crds::route_table::RouteTable;
use tokio::sync::watch;

/// The live route table: cheap to clone, one per task that needs routing.
#[derive(Clone, Debug)]
pub struct TableHandle {
    receiver: watch::Receiver<Arc<RouteTable>>,
}

impl TableHandle {
    /// A handle on a table that never changes (tests, benchmarks, one-shot commands).
    pub fn fixed(table: RouteTable) -> Self {
        let (_, receiver) = watch::channel(Arc::new(table));
        Self { receiver }
    }

    /// The table now.
    pub fn current(&self) -> Arc<RouteTable> {
        self.receiver.borrow().clone()
    }

    /// Waits for the next table; `None` when the source has stopped for good.
    pub async fn changed(&mut self) -> Option<Arc<RouteTable>> {
        self.receiver.changed().await.ok()?;
        Some(self.receiver.borrow_and_update().clone())
    }
}

/// The writing side a source keeps.
#[derive(Debug)]
struct TablePublisher {
    sender: watch::Sender<Arc<RouteTable>>,
}

impl TablePublisher {
    fn new(initial: RouteTable) -> (Self, TableHandle) {
        let (sender, receiver) = watch::channel(Arc::new(initial));
        (Self { sender }, TableHandle { receiver })
    }

    /// Publishes a table when its content differs from the live one; says whether it did.
    fn publish(&self, table: RouteTable) -> bool {
        self.sender.send_if_modified(|current| {
            if **current == table {
                return false;
            }
            tracing::info!(version = %table.version(), "route table updated");
            *current = Arc::new(table);
            true
        })
    }
}
