//! mailproxy: the data plane of a Zimbra-style mail proxy fleet.
//!
//! - [`mail`]: the pre-login IMAP and POP3 protocol state machines (pure code, no sockets).
//! - [`route`]: route resolution: the route table, the route cache (embedded and memcached),
//!   the Route Lookup Handler client and login throttling.
//! - [`http`]: the web proxy (Zimbra web routing, HTTP/1.1, HTTP/2, WebSocket).
//! - [`lookupd`]: the reference Route Lookup Handler (`mailproxy lookupd`).
//! - [`session`]: the mail session driver (accept, pre-login, upstream login, relay).
//! - [`dns`]: host names to addresses (cached by TTL), and connections to named servers.
//! - [`mounted_file`]: following files Kubernetes replaces in place (Secrets, ConfigMaps).
//! - [`tls`]: certificates with SNI and reload, TLS to mailbox servers.
//! - [`serve`]: `mailproxy serve`, a configuration file turned into a running proxy
//!   ([`serve::Server`] starts one in-process).

pub mod dns;
pub mod http;
mod kept_connection;
pub mod listen;
pub mod lookupd;
pub mod mail;
pub mod mounted_file;
pub mod route;
pub mod serve;
pub mod session;
pub mod tls;
