//! The web proxy (`http`/`https` listeners): Zimbra's web routing in front of the mailbox
//! servers' web ports.
//!
//! - [`routing`]: which account a request head belongs to (pure code).
//! - [`token`]: account ids out of Zimbra auth tokens and JWTs (routing only, no verification).
//! - [`proxy`]: the hyper server, route resolution and the pooled backend client.
//! - [`upstream`]: connections to the backends, plain or TLS (`webUpstreamTls`).

pub mod proxy;
pub mod routing;
pub mod token;
pub mod upstream;
