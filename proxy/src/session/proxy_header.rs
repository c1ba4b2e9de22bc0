//! The PROXY protocol header (v1 text or v2 binary) that a load balancer in front of the proxies
//! sends first, so that sessions, logs, login limits and mailbox servers see the client's
//! address rather than the load balancer's. (The header the proxy sends to mailbox servers is
//! written in `proxy_protocol.rs`.)
//!
//! A listener that expects the header takes connections only from `trustedNetworks`: anyone
//! else could claim any address and so escape the per-IP login limits. Like nginx's
//! `listen ... proxy_protocol`, it closes connections whose header is missing, malformed or
//! late. The header is consumed to its last byte and no further: in HTTP the request follows
//! it in the same segment.
//!
//! The parsing is the `ppp` crate's; [`parse`] adds the limits and what the proxy takes from a
//! header, and is fuzzed (`proxy/fuzz`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mailproxy_crds::settings::IpBlock;
use ppp::v1::{IPv4, IPv6};
use ppp::{PartialResult, v1, v2};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::listen::canonical;

/// The longest header taken. A v1 header is at most 107 bytes; a v2 header's TLVs (cloud
/// load balancers add a few: endpoint ids, TLS details) stay well under this.
const LARGEST: usize = 4096;

/// The v2 signature, `\r\n\r\n\0\r\nQUIT\n`.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Where a listener takes PROXY protocol headers from, and how long it waits for one.
#[derive(Debug)]
pub struct ProxyHeaderPolicy {
    trusted: Vec<IpBlock>,
    timeout: Duration,
    refused: Family<RefusedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Why a connection was closed before its session started.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The connection does not come from a trusted network.
    Untrusted,
    /// What arrived is not a PROXY protocol header.
    Invalid(String),
    /// No complete header within the timeout.
    Timeout,
    /// The connection failed or closed first.
    Io(io::Error),
}

impl Refusal {
    /// The `reason` label of the refusal's metric.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::Invalid(_) => "invalid",
            Refusal::Timeout => "timeout",
            Refusal::Io(_) => "closed",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Untrusted => f.write_str(
                "the source is not in proxyProtocol.trustedNetworks; the connection is closed",
            ),
            Refusal::Invalid(reason) => write!(f, "no valid PROXY protocol header: {reason}"),
            Refusal::Timeout => f.write_str("no PROXY protocol header within the timeout"),
            Refusal::Io(error) => write!(f, "the connection ended before its header: {error}"),
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed to decide.
    Incomplete,
    /// Not a PROXY protocol header (or one the proxy does not take).
    Invalid(String),
    /// A header of `length` bytes. `addresses` is the client's address and the address it
    /// connected to, or `None` for a header that carries none (the load balancer's own health
    /// checks: v2 `LOCAL`, v1 `UNKNOWN`), whose connection keeps its socket's addresses.
    Header {
        length: usize,
        addresses: Option<(SocketAddr, SocketAddr)>,
    },
}

/// The longest v1 header, line end included.
const V1_LARGEST: usize = 107;

/// Parses the start of a connection.
pub fn parse(bytes: &[u8]) -> Parsed {
    if b"PROXY ".starts_with(bytes) || bytes.starts_with(b"PROXY ") {
        return parse_v1(bytes);
    }
    if bytes.len() >= 16 && bytes.starts_with(V2_SIGNATURE) {
        let announced = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if 16 + announced > LARGEST {
            return Parsed::Invalid(format!(
                "a v2 header of {} bytes, more than the {LARGEST} taken",
                16 + announced
            ));
        }
    }
    let header = match v2::Header::try_from(bytes) {
        Ok(header) => header,
        Err(error) if error.is_incomplete() => return Parsed::Incomplete,
        Err(error) => return Parsed::Invalid(format!("v2: {error}")),
    };
    let addresses = match (header.command, header.addresses) {
        (v2::Command::Local, _) | (v2::Command::Proxy, v2::Addresses::Unspecified) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(ip)) => Some(tcp4(ip)),
        (v2::Command::Proxy, v2::Addresses::IPv6(ip)) => Some(tcp6(ip)),
        (v2::Command::Proxy, v2::Addresses::Unix(_)) => {
            return Parsed::Invalid("a v2 header with UNIX socket addresses".into());
        }
    };
    Parsed::Header {
        length: header.len(),
        addresses,
    }
}

/// A v1 header is one line, ended by its first CRLF: `ppp` alone would take an `UNKNOWN`
/// line up to a later CR, bytes of the client's among them.
fn parse_v1(bytes: &[u8]) -> Parsed {
    let Some(end) = bytes.iter().position(|&byte| byte == b'\n') else {
        return if bytes.len() < V1_LARGEST {
            Parsed::Incomplete
        } else {
            Parsed::Invalid(format!("no v1 header end within {V1_LARGEST} bytes"))
        };
    };
    let line = &bytes[..=end];
    if line.len() > V1_LARGEST || !line.ends_with(b"\r\n") {
        return Parsed::Invalid(format!(
            "a v1 header is one line of at most {V1_LARGEST} bytes ended by CRLF"
        ));
    }
    match v1::Header::try_from(line) {
        Ok(header) if header.header.len() == line.len() => Parsed::Header {
            length: line.len(),
            addresses: match header.addresses {
                v1::Addresses::Tcp4(ip) => Some(tcp4(ip)),
                v1::Addresses::Tcp6(ip) => Some(tcp6(ip)),
                v1::Addresses::Unknown => None,
            },
        },
        Ok(_) => Parsed::Invalid("a v1 header with a CR inside its line".into()),
        Err(error) => Parsed::Invalid(format!("v1: {error}")),
    }
}

/// The client's address and the one it connected to, from either version's IPv4 addresses.
fn tcp4(ip: IPv4) -> (SocketAddr, SocketAddr) {
    (
        (ip.source_address, ip.source_port).into(),
        (ip.destination_address, ip.destination_port).into(),
    )
}

/// As [`tcp4`]; an IPv4 client in IPv6 form is an IPv4 client, as on the proxy's own sockets.
fn tcp6(ip: IPv6) -> (SocketAddr, SocketAddr) {
    (
        canonical((ip.source_address, ip.source_port).into()),
        canonical((ip.destination_address, ip.destination_port).into()),
    )
}

impl ProxyHeaderPolicy {
    pub fn new(trusted: Vec<IpBlock>, timeout: Duration) -> Self {
        Self {
            trusted,
            timeout,
            refused: Family::default(),
        }
    }

    /// `mailproxy_proxy_protocol_refused_total{listener,reason}`: a load balancer that sends no
    /// header, or one outside `trustedNetworks`, shows here before anyone reads a log.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailproxy_proxy_protocol_refused",
            "Connections closed before their session for their PROXY protocol header, by \
             listener and reason (untrusted, invalid, timeout, closed)",
            self.refused.clone(),
        );
    }

    pub(crate) fn count_refusal(&self, listener: &'static str, refusal: &Refusal) {
        self.refused
            .get_or_create(&RefusedLabels {
                listener,
                reason: refusal.reason(),
            })
            .inc();
    }

    /// Reads the header `tcp` starts with, from the peer `peer`: the client's address and the
    /// one it connected to, or `None` when the header carries none.
    pub(crate) async fn read(
        &self,
        tcp: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<Option<(SocketAddr, SocketAddr)>, Refusal> {
        let peer = peer.ip().to_canonical();
        if !self.trusted.iter().any(|block| block.contains(peer)) {
            return Err(Refusal::Untrusted);
        }
        tokio::time::timeout(self.timeout, read_header(tcp))
            .await
            .unwrap_or(Err(Refusal::Timeout))
    }
}

/// Peeks at what has arrived and consumes exactly the header. Bytes that leave the header
/// incomplete are all header, so they are consumed too, and the next peek waits for more
/// instead of seeing the same bytes again.
async fn read_header(tcp: &mut TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, Refusal> {
    let mut header = Vec::new();
    let mut window = vec![0; LARGEST];
    loop {
        let room = LARGEST - header.len();
        if room == 0 {
            return Err(Refusal::Invalid(format!(
                "no header end within {LARGEST} bytes"
            )));
        }
        let seen = tcp.peek(&mut window[..room]).await.map_err(Refusal::Io)?;
        if seen == 0 {
            return Err(Refusal::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let consumed = header.len();
        header.extend_from_slice(&window[..seen]);
        match parse(&header) {
            Parsed::Header { length, addresses } => {
                tcp.read_exact(&mut window[..length - consumed])
                    .await
                    .map_err(Refusal::Io)?;
                return Ok(addresses);
            }
            Parsed::Invalid(reason) => return Err(Refusal::Invalid(reason)),
            Parsed::Incomplete => {
                tcp.read_exact(&mut window[..seen])
                    .await
                    .map_err(Refusal::Io)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        let length = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(addresses);
        header.extend_from_slice(tlvs);
        header
    }

    fn v2_tcp4() -> Vec<u8> {
        // 203.0.113.9:40000 -> 192.0.2.1:143, and a NOOP TLV.
        v2(
            1,
            0x11,
            &[203, 0, 113, 9, 192, 0, 2, 1, 0x9c, 0x40, 0, 143],
            &[0x04, 0, 2, 0, 0],
        )
    }

    fn addresses(client: &str, local: &str) -> Option<(SocketAddr, SocketAddr)> {
        Some((client.parse().unwrap(), local.parse().unwrap()))
    }

    #[test]
    fn v1_and_v2_headers_give_the_clients_address_and_their_length() {
        let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 143\r\na LOGIN";
        assert_eq!(
            parse(v1),
            Parsed::Header {
                length: v1.len() - b"a LOGIN".len(),
                addresses: addresses("203.0.113.9:40000", "192.0.2.1:143"),
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 993\r\n";
        assert_eq!(
            parse(v6),
            Parsed::Header {
                length: v6.len(),
                addresses: addresses("[2001:db8::9]:40000", "[2001:db8::1]:993"),
            }
        );
        let mut bytes = v2_tcp4();
        let length = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&bytes),
            Parsed::Header {
                length,
                addresses: addresses("203.0.113.9:40000", "192.0.2.1:143"),
            }
        );
        let mut mapped = [0u8; 36];
        mapped[10..16].copy_from_slice(&[0xff, 0xff, 203, 0, 113, 9]);
        mapped[26..32].copy_from_slice(&[0xff, 0xff, 192, 0, 2, 1]);
        mapped[32..].copy_from_slice(&[0x9c, 0x40, 0, 143]);
        assert_eq!(
            parse(&v2(1, 0x21, &mapped, &[])),
            Parsed::Header {
                length: 52,
                addresses: addresses("203.0.113.9:40000", "192.0.2.1:143"),
            }
        );
    }

    #[test]
    fn health_checks_keep_the_sockets_addresses() {
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                length: 15,
                addresses: None
            }
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[], &[])),
            Parsed::Header {
                length: 16,
                addresses: None
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        for header in [
            b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 143\r\n".to_vec(),
            v2_tcp4(),
        ] {
            for end in 0..header.len() {
                assert_eq!(parse(&header[..end]), Parsed::Incomplete, "{end}");
            }
        }
    }

    #[test]
    fn other_protocols_and_oversized_headers_are_refused() {
        for bytes in [
            &b"a LOGIN alice secret\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXY TCP4 203.0.113.9 192.0.2.1 40000\r\n",
            b"PROXY TCP4 999.0.113.9 192.0.2.1 40000 143\r\n",
        ] {
            assert!(
                matches!(parse(bytes), Parsed::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Parsed::Invalid(reason) if reason.contains("4096")));
        // A v1 header ends at its first line end, whatever follows.
        assert!(matches!(
            parse(b"PROXY UNKNOWN 20033 \n\r~CPt"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(parse(b"PROXY UNKNOWN\rx\r\n"), Parsed::Invalid(_)));
        let unterminated = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&unterminated), Parsed::Invalid(_)));
    }

    async fn connected() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (client, server, peer)
    }

    fn policy(trusted: &str) -> ProxyHeaderPolicy {
        ProxyHeaderPolicy::new(
            vec![IpBlock::parse_trimmed(trusted).unwrap()],
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_consumed_and_what_follows_is_left() {
        let (mut client, mut server, peer) = connected().await;
        let header = v2_tcp4();
        let reading = tokio::spawn(async move {
            let addresses = policy("127.0.0.0/8").read(&mut server, peer).await;
            let mut rest = [0u8; 7];
            server.read_exact(&mut rest).await.unwrap();
            (addresses.unwrap(), rest)
        });
        for piece in header.chunks(5) {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        client.write_all(b"a LOGIN").await.unwrap();
        let (addresses, rest) = reading.await.unwrap();
        assert_eq!(
            addresses,
            super::tests::addresses("203.0.113.9:40000", "192.0.2.1:143")
        );
        assert_eq!(&rest, b"a LOGIN");
    }

    #[tokio::test]
    async fn untrusted_sources_late_and_bad_headers_are_refused() {
        let (_client, mut server, peer) = connected().await;
        assert!(matches!(
            policy("10.0.0.0/8").read(&mut server, peer).await,
            Err(Refusal::Untrusted)
        ));

        let (mut client, mut server, peer) = connected().await;
        client.write_all(b"PROXY TCP4 203.0.113.9").await.unwrap();
        let patient = ProxyHeaderPolicy::new(
            vec![IpBlock::parse_trimmed("127.0.0.1").unwrap()],
            Duration::from_millis(200),
        );
        assert!(matches!(
            patient.read(&mut server, peer).await,
            Err(Refusal::Timeout)
        ));

        let (mut client, mut server, peer) = connected().await;
        client.write_all(b"* OK not a header\r\n").await.unwrap();
        assert!(matches!(
            policy("127.0.0.1").read(&mut server, peer).await,
            Err(Refusal::Invalid(_))
        ));

        let (client, mut server, peer) = connected().await;
        drop(client);
        assert!(matches!(
            policy("127.0.0.1").read(&mut server, peer).await,
            Err(Refusal::Io(_))
        ));
    }
}
