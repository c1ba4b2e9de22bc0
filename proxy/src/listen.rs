//! Listening sockets, for the client listeners, the health port, lookupd and metrics alike.
//!
//! `[::]:port` means every address of both families, as Go's `:port` does: the socket takes IPv4
//! clients too (as `::ffff:a.b.c.d`, which [`canonical`] turns back into IPv4 for logs, limits
//! and the addresses forwarded upstream), whatever `net.ipv6.bindv6only` says. On a kernel
//! without IPv6 (`ipv6.disable=1`) it falls back to `0.0.0.0:port`, so one configuration serves
//! IPv4-only, IPv6-only and dual-stack clusters.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel keeps per listener (a login storm after a restart).
const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `address` (`host:port`, `[v6]:port`; a name resolves to its first address).
pub async fn bind(address: &str) -> anyhow::Result<TcpListener> {
    let resolved = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("{address:?} is not a listen address"))?
        .next()
        .with_context(|| format!("{address:?} resolves to no address"))?;
    match listen_on(resolved) {
        Err(error) if resolved.ip() == Ipv6Addr::UNSPECIFIED && ipv6_unavailable(&error) => {
            let ipv4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, resolved.port()));
            tracing::info!(%error, listen = %ipv4, "IPv6 is not available here: listening on IPv4 only");
            listen_on(ipv4).with_context(|| format!("cannot listen on {ipv4}"))
        }
        other => other.with_context(|| format!("cannot listen on {resolved}")),
    }
}

fn listen_on(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    // A restarted proxy must bind while its predecessor's connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if address.ip() == Ipv6Addr::UNSPECIFIED {
        socket2::SockRef::from(&socket).set_only_v6(false)?;
    }
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Errors of a kernel without IPv6: no such address family, or no `::` to bind.
fn ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// `address` with an IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, how a `[::]` listener sees
/// IPv4 clients) written as the IPv4 address it is.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn the_ipv6_wildcard_takes_clients_of_both_families() {
        let listener = bind("[::]:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for client in ["127.0.0.1", "::1"] {
            let connecting = TcpStream::connect((client, port));
            let (connected, accepted) = tokio::join!(connecting, listener.accept());
            let local = connected.unwrap().local_addr().unwrap();
            let (_, peer) = accepted.unwrap();
            assert_eq!(canonical(peer), local, "client {client}");
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_that_names_the_address() {
        let taken = bind("127.0.0.1:0").await.unwrap();
        let address = taken.local_addr().unwrap().to_string();
        let error = format!("{:#}", bind(&address).await.unwrap_err());
        assert!(
            error.starts_with(&format!("cannot listen on {address}")),
            "{error}"
        );
        let error = format!("{:#}", bind("no port").await.unwrap_err());
        assert!(
            error.contains("\"no port\" is not a listen address"),
            "{error}"
        );
    }

    #[test]
    fn only_a_kernel_without_ipv6_falls_back() {
        assert!(ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EAFNOSUPPORT
        )));
        assert!(!ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EADDRINUSE
        )));
        assert!(!ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EACCES
        )));
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:993".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.7:993".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:993".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
