//! The proxy's own side of the upstream POP3 session. Pure functions; the driver does the IO.
//!
//! Zimbra's order is: read the greeting, send [`xoip_command`] so the mailbox logs the real
//! client, then [`user_command`] and [`pass_command`] (or [`auth_plain_command`] when an
//! authzid has to travel), relaying the final status to the client.

use std::net::IpAddr;

use crate::mail::{Password, UpstreamCommand, sasl};

/// `XOIP <client ip>`: the originating client address for a mailbox that trusts the proxy.
pub fn xoip_command(client_ip: IpAddr) -> Vec<u8> {
    format!("XOIP {client_ip}\r\n").into_bytes()
}

/// `USER <login>`. `None` if the login holds CR, LF or NUL, which would end the line early
/// and let the rest run as another command.
pub fn user_command(login: &str) -> Option<Vec<u8>> {
    if has_line_break(login.as_bytes()) {
        return None;
    }
    Some(format!("USER {login}\r\n").into_bytes())
}

/// `PASS <password>`, one piece. `None` if the password holds CR, LF or NUL.
pub fn pass_command(password: &Password) -> Option<UpstreamCommand> {
    let password = password.expose();
    if has_line_break(password) {
        return None;
    }
    Some(UpstreamCommand::new(vec![
        [b"PASS ", password, b"\r\n"].concat(),
    ]))
}

/// `AUTH PLAIN`, with the credentials as initial response (RFC 5034) or, when
/// `initial_response` is false, after the server's `+`.
pub fn auth_plain_command(
    authzid: Option<&str>,
    login: &str,
    password: &Password,
    initial_response: bool,
) -> UpstreamCommand {
    let encoded = sasl::encode_plain(authzid, login, password.expose());
    let encoded = encoded.expose();
    let pieces = if initial_response {
        vec![[b"AUTH PLAIN ", encoded, b"\r\n"].concat()]
    } else {
        vec![b"AUTH PLAIN\r\n".to_vec(), [encoded, b"\r\n"].concat()]
    };
    UpstreamCommand::new(pieces)
}

fn has_line_break(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0))
}

/// One status line from the upstream server.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop3Reply<'a> {
    /// `+OK text`
    Ok(&'a [u8]),
    /// `-ERR text`
    Err(&'a [u8]),
    /// `+ text`: an AUTH continuation.
    Continuation(&'a [u8]),
    /// Anything else: a protocol error from the server.
    Other,
}

/// Classifies a line (without CRLF) read from the upstream server. The status words are
/// matched case-insensitively, as lenient servers exist.
pub fn parse_reply(line: &[u8]) -> Pop3Reply<'_> {
    let word_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let (word, text) = line.split_at(word_len);
    let text = text.strip_prefix(b" ").unwrap_or(text);
    if word.eq_ignore_ascii_case(b"+OK") {
        Pop3Reply::Ok(text)
    } else if word.eq_ignore_ascii_case(b"-ERR") {
        Pop3Reply::Err(text)
    } else if word == b"+" {
        Pop3Reply::Continuation(text)
    } else {
        Pop3Reply::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoip_for_both_families() {
        assert_eq!(
            xoip_command("198.51.100.9".parse().unwrap()),
            b"XOIP 198.51.100.9\r\n"
        );
        assert_eq!(
            xoip_command("2001:db8::9".parse().unwrap()),
            b"XOIP 2001:db8::9\r\n"
        );
    }

    #[test]
    fn user_and_pass() {
        assert_eq!(
            user_command("bob@example.com/tb").unwrap(),
            b"USER bob@example.com/tb\r\n"
        );
        let pass = pass_command(&Password::new(b"p w\xe4".to_vec())).unwrap();
        assert_eq!(pass.pieces(), [b"PASS p w\xe4\r\n".to_vec()]);
    }

    #[test]
    fn line_breaks_cannot_inject_commands() {
        assert!(user_command("bob\r\nDELE 1").is_none());
        assert!(user_command("bob\0").is_none());
        assert!(pass_command(&Password::new(b"pw\nDELE 1".to_vec())).is_none());
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let password = Password::new(b"pw".to_vec());
        let command = auth_plain_command(None, "bob", &password, true);
        assert_eq!(command.pieces(), [b"AUTH PLAIN AGJvYgBwdw==\r\n".to_vec()]);
        let command = auth_plain_command(Some("admin"), "bob", &password, false);
        assert_eq!(
            command.pieces(),
            [b"AUTH PLAIN\r\n".to_vec(), b"YWRtaW4AYm9iAHB3\r\n".to_vec()]
        );
    }

    #[test]
    fn replies_are_classified() {
        assert_eq!(
            parse_reply(b"+OK Dovecot ready."),
            Pop3Reply::Ok(b"Dovecot ready.")
        );
        assert_eq!(parse_reply(b"+OK"), Pop3Reply::Ok(b""));
        assert_eq!(parse_reply(b"+ok fine"), Pop3Reply::Ok(b"fine"));
        assert_eq!(
            parse_reply(b"-ERR [AUTH] Authentication failed."),
            Pop3Reply::Err(b"[AUTH] Authentication failed.")
        );
        assert_eq!(parse_reply(b"+ "), Pop3Reply::Continuation(b""));
        assert_eq!(
            parse_reply(b"+ VXNlcm5hbWU6"),
            Pop3Reply::Continuation(b"VXNlcm5hbWU6")
        );
        assert_eq!(parse_reply(b"+OKAY"), Pop3Reply::Other);
        assert_eq!(parse_reply(b""), Pop3Reply::Other);
    }
}
