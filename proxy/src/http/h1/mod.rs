//! HTTP/1.x: the proxy's own relay of requests and responses, on httparse.
//!
//! hyper serves HTTP/2 (it multiplexes, which a relay cannot); HTTP/1.x, where requests come one
//! after the other on a connection, is relayed here instead, as nginx and Pingora do: a request
//! head is parsed in place, rewritten into the backend's head in one buffer, and the response
//! comes back the same way, all in the client connection's task. With hyper on both sides a
//! request cost two message parsers building header maps, a body channel per side and a task
//! wake-up between them: about 1.7 times nginx's CPU per request (docs/benchmarks.md).
//!
//! - [`head`]: request and response heads, parsed and rewritten (pure code).
//! - [`framing`]: where bodies end: lengths and the chunked coding (pure code).
//! - [`buffer`]: a connection side's read buffer.
//! - [`connection`]: one client connection's exchanges, its backend connection and upgrades.

pub mod buffer;
pub(crate) mod connection;
pub mod framing;
pub mod head;
pub mod rewind;
