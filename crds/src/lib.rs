//! The mailproxy API.
//!
//! - [`MailboxServer`]: a mailbox backend the fleet routes to.
//! - [`ProxyPool`]: a fleet of proxies, its memcached route cache and the servers it fronts.
//! - [`route_table::RouteTable`]: the static routing state the operator compiles for each pool
//!   and its proxies read.
//!
//! - [`cache_key`]: the memcached key format the proxies cache routes under and the operator
//!   purges.
//!
//! [`manifests`] renders the CustomResourceDefinitions committed beside this crate, so that
//! `kubectl apply -f crds/` installs the API.

pub mod cache_key;
pub mod mailbox_server;
pub mod manifests;
pub mod proxy_config;
pub mod proxy_pool;
pub mod route_table;
pub mod settings;

pub use mailbox_server::{MailboxServer, MailboxServerSpec, MailboxServerStatus};
pub use proxy_pool::{ProxyPool, ProxyPoolSpec, ProxyPoolStatus};

/// The API group of every mailproxy resource.
pub const GROUP: &str = "mailproxy.io";
/// The served and stored API version.
pub const VERSION: &str = "v1alpha1";
