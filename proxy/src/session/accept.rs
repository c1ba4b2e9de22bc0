//! Accepting clients, for the mail and the web listeners alike: a connection is taken only once
//! the connection limit has room for it, and comes with what every session needs of its socket.
//!
//! Two system calls per connection are saved here, as nginx saves them: `TCP_NODELAY` is set
//! once on the listening socket, which Linux passes on to the connections it accepts (checked on
//! the first one; where it is not passed on, it is set on each), and a listener bound to one
//! address knows every connection's local address without `getsockname`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::proxy_header::ProxyHeaderPolicy;
use super::signalled;
use crate::listen::canonical;

/// Whether accepted connections have `TCP_NODELAY` from the listener.
const NODELAY_UNKNOWN: u8 = 0;
const NODELAY_INHERITED: u8 = 1;
const NODELAY_PER_CONNECTION: u8 = 2;

/// A listening socket and what its connections share.
pub struct Acceptor {
    listener: TcpListener,
    /// The listener's address when it is bound to one (not `0.0.0.0`, `::` or `::ffff:0.0.0.0`).
    local: Option<SocketAddr>,
    nodelay: AtomicU8,
    /// Set when every connection starts with a PROXY protocol header from a load balancer.
    proxy_header: Option<Arc<ProxyHeaderPolicy>>,
}

/// A client connection and its place among those the limit allows.
pub(crate) struct Accepted {
    pub permit: OwnedSemaphorePermit,
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    /// The proxy's address of the connection (`X-Proxy-IP`, the PROXY header); `None` when the
    /// client was gone before it could be read.
    pub local: Option<SocketAddr>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, proxy_header: Option<Arc<ProxyHeaderPolicy>>) -> Self {
        let local = listener
            .local_addr()
            .ok()
            .map(canonical)
            .filter(|address| !address.ip().is_unspecified());
        let nodelay = match socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
            Ok(()) => NODELAY_UNKNOWN,
            Err(_) => NODELAY_PER_CONNECTION,
        };
        Self {
            listener,
            local,
            nodelay: AtomicU8::new(nodelay),
            proxy_header,
        }
    }

    /// The PROXY protocol policy of this listener, for the connections' own tasks (which must
    /// not hold the listener itself: it closes at shutdown while sessions go on).
    pub(crate) fn proxy_header(&self) -> Option<Arc<ProxyHeaderPolicy>> {
        self.proxy_header.clone()
    }

    /// Readies an accepted connection: `TCP_NODELAY` (commands and answers are small and must
    /// not wait for an acknowledgement) and its local address.
    fn prepare(&self, tcp: &TcpStream) -> Option<SocketAddr> {
        match self.nodelay.load(Ordering::Relaxed) {
            NODELAY_INHERITED => {}
            NODELAY_PER_CONNECTION => {
                let _ = tcp.set_nodelay(true);
            }
            _ => {
                let inherited = tcp.nodelay().unwrap_or(false);
                let state = if inherited {
                    NODELAY_INHERITED
                } else {
                    let _ = tcp.set_nodelay(true);
                    NODELAY_PER_CONNECTION
                };
                self.nodelay.store(state, Ordering::Relaxed);
            }
        }
        self.local.or_else(|| tcp.local_addr().ok().map(canonical))
    }

    /// The next client, with its place among the connections `limit` allows: waits for a
    /// place, then for a connection. `None` once `stop` is signalled (or the limit closed).
    pub(crate) async fn accept(
        &self,
        limit: &Arc<Semaphore>,
        stop: &mut watch::Receiver<bool>,
        label: &str,
    ) -> Option<Accepted> {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.ok()?,
            () = signalled(stop) => return None,
        };
        loop {
            let accepted: io::Result<_> = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = signalled(stop) => return None,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let local = self.prepare(&tcp);
                    return Some(Accepted {
                        permit,
                        tcp,
                        peer: canonical(peer),
                        local,
                    });
                }
                Err(error) => {
                    // Out of descriptors, mostly: give sessions time to end rather than spin.
                    tracing::warn!(%error, listener = label, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The connection with its client's addresses: from the PROXY protocol header when its
/// listener expects one (`None` when the connection was refused for it, or `closing` turned
/// true first), else as accepted. Runs in the connection's own task: a slow header holds up no
/// other client.
pub(crate) async fn client_origin(
    proxy_header: Option<&ProxyHeaderPolicy>,
    mut accepted: Accepted,
    label: &'static str,
    closing: &watch::Receiver<bool>,
) -> Option<Accepted> {
    let Some(policy) = proxy_header else {
        return Some(accepted);
    };
    let mut closing = closing.clone();
    let read = tokio::select! {
        read = policy.read(&mut accepted.tcp, accepted.peer) => read,
        () = signalled(&mut closing) => return None,
    };
    match read {
        Ok(Some((client, local))) => {
            accepted.peer = client;
            accepted.local = Some(local);
            Some(accepted)
        }
        Ok(None) => Some(accepted),
        Err(refusal) => {
            policy.count_refusal(label, &refusal);
            tracing::info!(
                listener = label,
                source = %accepted.peer.ip(),
                %refusal,
                "connection closed before its session"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accept_one(bind: &str) -> (Accepted, Acceptor) {
        let acceptor = Acceptor::new(crate::listen::bind(bind).await.unwrap(), None);
        let port = acceptor.listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (_stop_sender, mut stop) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(1));
        let accepted = acceptor.accept(&limit, &mut stop, "test").await.unwrap();
        assert_eq!(
            accepted.peer,
            client.local_addr().unwrap(),
            "{bind}: an IPv4 client is an IPv4 peer"
        );
        (accepted, acceptor)
    }

    #[tokio::test]
    async fn a_connection_has_nodelay_and_its_local_address() {
        for (bind, bound_to_one) in [
            ("127.0.0.1:0", true),
            ("[::ffff:127.0.0.1]:0", true),
            ("0.0.0.0:0", false),
            ("[::ffff:0.0.0.0]:0", false),
            ("[::]:0", false),
        ] {
            let (accepted, acceptor) = accept_one(bind).await;
            assert!(accepted.tcp.nodelay().unwrap(), "{bind}");
            assert_eq!(
                accepted.local,
                accepted.tcp.local_addr().ok().map(canonical),
                "{bind}: the address getsockname gives, IPv4 for an IPv4 client"
            );
            assert_eq!(
                acceptor.local.is_some(),
                bound_to_one,
                "{bind}: only a listener bound to one address answers without getsockname"
            );
            if cfg!(target_os = "linux") {
                assert_eq!(
                    acceptor.nodelay.load(Ordering::Relaxed),
                    NODELAY_INHERITED,
                    "Linux passes TCP_NODELAY on from the listener"
                );
            }
        }
    }
}
