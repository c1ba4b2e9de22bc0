//! The web proxy (`http`/`https` listeners): Zimbra's web routing in front of the mailbox
//! servers' web ports.
//!
//! - [`routing`]: which account a request head belongs to (pure code).
//! - [`token`]: account ids out of Zimbra auth tokens and JWTs (routing only, no verification).
//! - [`proxy`]: the listeners, route resolution, metrics and access log, and HTTP/2 (hyper
//!   server, pooled backend client).
//! - [`h1`]: HTTP/1.x, relayed by the proxy itself.
//! - [`h2_idle`]: when an HTTP/2 connection has been idle long enough to close.
//! - [`upstream`]: connections to the backends, plain or TLS (`webUpstreamTls`).

pub mod h1;
mod h2_idle;
pub mod idle_body;
pub mod proxy;
pub mod routing;
pub mod token;
pub mod upstream;
