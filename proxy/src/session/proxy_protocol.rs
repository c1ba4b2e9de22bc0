//! The PROXY protocol version 2 header (the haproxy specification, section 2.2): how a mailbox
//! server that supports it (Dovecot `haproxy = yes`) learns the client's address without an
//! IMAP ID or POP3 XOIP.

use std::net::{IpAddr, SocketAddr};

/// `\r\n\r\n\0\r\nQUIT\n`.
const SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

/// The header for a TCP connection from `client` to the proxy's `local` address. Mixed
/// families (an IPv4 client on a dual-stack socket) are sent as IPv6, the one family that holds
/// both.
pub(crate) fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    match (client.ip().to_canonical(), local.ip().to_canonical()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            header.push(TCP_OVER_IPV4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&source.octets());
            header.extend_from_slice(&destination.octets());
        }
        (source, destination) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            header.push(TCP_OVER_IPV6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&v6(source).octets());
            header.extend_from_slice(&v6(destination).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_specification() {
        let header = header(
            "203.0.113.7:50000".parse().unwrap(),
            "10.0.0.1:143".parse().unwrap(),
        );
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[203, 0, 113, 7, 10, 0, 0, 1]);
        expected.extend_from_slice(&[0xc3, 0x50, 0, 143]);
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_form() {
        let header = header(
            "[2001:db8::7]:1234".parse().unwrap(),
            "192.0.2.1:993".parse().unwrap(),
        );
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &header[16..32],
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            &header[32..48],
            &"::ffff:192.0.2.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&header[48..], &[0x04, 0xd2, 0x03, 0xe1]);
    }

    #[test]
    fn a_v4_mapped_client_on_a_dual_stack_socket_is_sent_as_ipv4() {
        let header = header(
            "[::ffff:198.51.100.9]:40000".parse().unwrap(),
            "[::ffff:10.0.0.1]:110".parse().unwrap(),
        );
        assert_eq!(&header[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&header[16..20], &[198, 51, 100, 9]);
    }
}
