//! Host names to addresses, and connections to servers named either way.
//!
//! A MailboxServer is most often named by its Service's cluster name (`dovecot.mail.svc`), and
//! every login, web connection and lookupd answer needs its address. The C library's resolver
//! would cost each of them a thread of tokio's blocking pool and, in a pod (`ndots:5` in
//! resolv.conf), a DNS query for every search domain tried before the name resolves. Names go
//! through hickory's resolver instead: asynchronous, with resolv.conf's name servers, search
//! list and ndots, /etc/hosts, and a cache that keeps each answer for its DNS TTL (5 s for a
//! Kubernetes Service by CoreDNS's default), so a login storm costs a few queries, not one each.

use std::io;
use std::net::{IpAddr, SocketAddr};

use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use tokio::net::TcpStream;

/// Longest time an answer is kept, whatever its TTL: a record changed by hand (a server moved to
/// a new address) is followed within this, as the route table's names are re-resolved.
const POSITIVE_MAX_TTL: Duration = Duration::from_secs(60);

/// How long one of several addresses of a name may take to accept a connection before the next
/// is tried (on a LAN, an answer takes milliseconds; a dropped SYN is retried after 1 s).
const ADDRESS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest time "no such name" is kept: a MailboxServer created before its DNS record is
/// reachable seconds after the record appears, not after the zone's negative TTL (up to hours).
const NEGATIVE_MAX_TTL: Duration = Duration::from_secs(5);

/// Resolves host names and connects to servers; cheap to clone, one per process.
#[derive(Clone)]
pub struct Dns {
    names: Names,
}

#[derive(Clone)]
enum Names {
    Cached(Box<TokioResolver>),
    /// Without a readable resolv.conf: the C library's resolver, one lookup per call.
    System,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.names {
            Names::Cached(_) => "cached",
            Names::System => "system",
        };
        f.debug_struct("Dns").field("names", &kind).finish()
    }
}

impl Dns {
    /// Names resolved as `/etc/resolv.conf` says, with a cache. A system without a readable
    /// resolv.conf (or one hickory cannot read) resolves through the C library instead, with a
    /// warning: everything still works, at the cost of a lookup per connection.
    pub fn from_system_config() -> Self {
        let resolver =
            TokioResolver::builder_tokio().and_then(|builder| with_options(builder).build());
        let names = match resolver {
            Ok(resolver) => Names::Cached(Box::new(resolver)),
            Err(error) => {
                tracing::warn!(%error, "cannot set up the caching DNS resolver from /etc/resolv.conf; host names are resolved by the C library, once per connection");
                Names::System
            }
        };
        Self { names }
    }

    /// The addresses of `host` (an IP literal, bracketed or not, is its own address), IPv4 ones
    /// first. Never empty on success.
    pub async fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let addresses: Vec<IpAddr> = match &self.names {
            Names::Cached(resolver) => {
                // Relaxed: the proxies take `_` in host names (`mbs_1.example.com`), which the
                // IDNA rules of a plain `&str` lookup refuse.
                let name = Name::from_str_relaxed(host).map_err(|error| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{host:?} is not a host name: {error}"),
                    )
                })?;
                match resolver.lookup_ip(name).await {
                    Ok(found) => found.iter().collect(),
                    Err(error) if error.is_nx_domain() || error.is_no_records_found() => Vec::new(),
                    Err(error) => {
                        return Err(io::Error::other(format!("{host} did not resolve: {error}")));
                    }
                }
            }
            Names::System => tokio::net::lookup_host((host, 0))
                .await
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("{host} did not resolve: {error}"))
                })?
                .map(|address| address.ip())
                .collect(),
        };
        // IPv4 first, as Zimbra's lookup servlet (and `mailproxy lookupd`) picks, and as most
        // clusters route: a connection tries them in this order.
        let mut addresses = addresses;
        addresses.sort_by_key(IpAddr::is_ipv6);
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{host} did not resolve: no A or AAAA record for it or any of its \
                     search-list expansions, in DNS or /etc/hosts"
                ),
            ));
        }
        Ok(addresses)
    }

    /// Connects to `host:port`, trying the host's addresses in order until one accepts (the
    /// error is the last address's, named by it). Each address but the last has
    /// [`ADDRESS_ATTEMPT_TIMEOUT`]: one that drops connections (a pod gone from a headless
    /// Service) does not use up the caller's whole timeout. Small writes go out at once
    /// (`TCP_NODELAY`): commands and answers are small and each waits for the other side.
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        self.connect_giving_each(host, port, ADDRESS_ATTEMPT_TIMEOUT)
            .await
    }

    async fn connect_giving_each(
        &self,
        host: &str,
        port: u16,
        attempt: Duration,
    ) -> io::Result<TcpStream> {
        let addresses = self.lookup(host).await?;
        let last = addresses.len() - 1;
        let mut last_error = None;
        for (index, ip) in addresses.into_iter().enumerate() {
            let address = SocketAddr::new(ip, port);
            let connecting = TcpStream::connect(address);
            let connected = if index < last {
                tokio::time::timeout(attempt, connecting)
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no answer within {attempt:?}"),
                        ))
                    })
            } else {
                connecting.await
            };
            match connected {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(error) => {
                    last_error = Some(io::Error::new(error.kind(), format!("{address}: {error}")))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other(format!("{host} has no address"))))
    }
}

/// Both address families (a handler may answer with a server's IPv6 address, which must be
/// recognised as that server), asked at once. Answers are kept for their TTL within
/// [`POSITIVE_MAX_TTL`] and [`NEGATIVE_MAX_TTL`].
fn with_options(
    mut builder: ResolverBuilder<TokioRuntimeProvider>,
) -> ResolverBuilder<TokioRuntimeProvider> {
    let options: &mut ResolverOpts = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.positive_max_ttl = Some(POSITIVE_MAX_TTL);
    options.negative_max_ttl = Some(NEGATIVE_MAX_TTL);
    builder
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use tokio::net::{TcpListener, UdpSocket};

    use super::*;

    /// A DNS server on a loopback UDP port that answers `A` queries for names under `test.`
    /// with 127.0.0.1 (`two.*.test`: 127.0.0.2 then 127.0.0.1), `AAAA` queries for `dual.*`
    /// with ::1, everything else with no records (all kept for an hour), and counts the queries.
    async fn dns_server() -> (Dns, Arc<AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        tokio::spawn(async move {
            let mut buffer = [0; 512];
            loop {
                let (length, peer) = socket.recv_from(&mut buffer).await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                answer.metadata.message_type = MessageType::Response;
                answer.metadata.recursion_available = true;
                for question in &query.queries {
                    answer.add_query(question.clone());
                    let name = question.name().to_ascii();
                    if question.query_type() == RecordType::AAAA && name.starts_with("dual.") {
                        answer.add_answer(Record::from_rdata(
                            question.name().clone(),
                            3600,
                            RData::AAAA(rdata::AAAA::new(0, 0, 0, 0, 0, 0, 0, 1)),
                        ));
                    } else if question.query_type() == RecordType::A && name.ends_with(".test.") {
                        let last = if name.starts_with("two.") { 2 } else { 1 };
                        for host in (1..=last).rev() {
                            answer.add_answer(Record::from_rdata(
                                question.name().clone(),
                                3600,
                                RData::A(rdata::A::new(127, 0, 0, host)),
                            ));
                        }
                    } else {
                        // No such record: the zone's SOA gives the answer's TTL, as real
                        // servers do.
                        let zone = Name::from_ascii("test.").unwrap();
                        let soa = rdata::SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 3600);
                        answer.add_authority(Record::from_rdata(zone, 3600, RData::SOA(soa)));
                    }
                }
                answer.metadata.response_code = ResponseCode::NoError;
                let bytes = answer.to_vec().unwrap();
                socket.send_to(&bytes, peer).await.unwrap();
            }
        });
        let mut udp = ConnectionConfig::udp();
        udp.port = port;
        let server = NameServerConfig::new(IpAddr::from([127, 0, 0, 1]), true, vec![udp]);
        let config = ResolverConfig::from_name_servers(vec![server]);
        let builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        let resolver = with_options(builder).build().unwrap();
        let dns = Dns {
            names: Names::Cached(Box::new(resolver)),
        };
        (dns, queries)
    }

    #[tokio::test]
    async fn a_name_is_asked_once_then_answered_from_the_cache() {
        let (dns, queries) = dns_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        dns.connect("mbox.mail.test", port).await.unwrap();
        let first = queries.load(Ordering::SeqCst);
        assert!(first >= 1, "the first connection asked the DNS server");
        for _ in 0..10 {
            dns.connect("mbox.mail.test", port).await.unwrap();
        }
        assert_eq!(queries.load(Ordering::SeqCst), first);
        assert_eq!(
            dns.lookup("mbox.mail.test").await.unwrap(),
            [IpAddr::from([127, 0, 0, 1])]
        );
    }

    #[tokio::test]
    async fn a_name_without_addresses_says_so() {
        let (dns, _) = dns_server().await;
        let error = dns.connect("nowhere.example", 1).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error
                .to_string()
                .contains("nowhere.example did not resolve: no A or AAAA record"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn every_address_of_a_name_is_tried_in_turn() {
        let (dns, _) = dns_server().await;
        // Nothing listens on 127.0.0.2, so the first address refuses.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = dns.connect("two.mail.test", port).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), listener.local_addr().unwrap());
        drop(listener);
        let error = dns.connect("two.mail.test", port).await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("127.0.0.1:{port}: ")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn both_families_are_found_ipv4_first() {
        let (dns, _) = dns_server().await;
        assert_eq!(
            dns.lookup("dual.mail.test").await.unwrap(),
            [
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1])
            ]
        );
    }

    /// A listener whose accept queue is full drops new connections' SYNs, as a host that is
    /// gone would: the next address is tried once the attempt's time is up.
    #[tokio::test]
    async fn a_silent_address_is_given_up_for_the_next() {
        let (dns, _) = dns_server().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        silent
            .bind(&SocketAddr::from(([127, 0, 0, 2], port)).into())
            .unwrap();
        silent.listen(0).unwrap();
        let _queued = std::net::TcpStream::connect(("127.0.0.2", port)).unwrap();
        let attempt = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let connecting = dns.connect_giving_each("two.mail.test", port, attempt);
        let stream = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("the silent address was given up")
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), listener.local_addr().unwrap());
        assert!(started.elapsed() >= attempt, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn names_with_underscores_resolve() {
        let (dns, _) = dns_server().await;
        assert_eq!(
            dns.lookup("mbs_1.mail.test").await.unwrap(),
            [IpAddr::from([127, 0, 0, 1])]
        );
    }

    #[tokio::test]
    async fn localhost_resolves_cached_and_through_the_c_library() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for dns in [
            Dns::from_system_config(),
            Dns {
                names: Names::System,
            },
        ] {
            let stream = dns.connect("localhost", port).await.unwrap();
            assert_eq!(stream.peer_addr().unwrap().port(), port);
            assert!(stream.nodelay().unwrap());
        }
    }

    #[tokio::test]
    async fn ip_literals_need_no_name_server() {
        let (dns, queries) = dns_server().await;
        for literal in ["::1", "[::1]"] {
            assert_eq!(
                dns.lookup(literal).await.unwrap(),
                [IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1])]
            );
        }
        assert_eq!(queries.load(Ordering::SeqCst), 0);
    }
}
