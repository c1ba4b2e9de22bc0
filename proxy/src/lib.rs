//! mailproxy: the data plane of a Zimbra-style mail proxy fleet.
//!
//! - [`mail`]: the pre-login IMAP and POP3 protocol state machines (pure code, no sockets).
//! - [`route`]: route resolution: the route table, the route cache (embedded and memcached),
//!   the Route Lookup Handler client and login throttling.
//! - [`lookupd`]: the reference Route Lookup Handler (`mailproxy lookupd`).

pub mod lookupd;
pub mod mail;
pub mod route;
