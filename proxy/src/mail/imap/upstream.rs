//! The proxy's own side of the upstream IMAP session: the commands it sends before handing the
//! connection over, and reading the server's answers. Pure functions; the driver does the IO.
//!
//! Zimbra's order is: read the greeting (learn the capabilities), send
//! [`id_command`] so the mailbox logs the real client, then log in with [`login_command`] or
//! [`authenticate_plain_command`] and relay the tagged result to the client, after the untagged
//! lines the server sent with it ([`UntaggedLines`]).

use std::net::IpAddr;

use super::parser::announces_literal;
use super::{ClientId, ImapStatus};
use crate::mail::{Password, UpstreamCommand, sasl};

/// An IMAP quoted string. CR, LF and NUL cannot be represented in one, so they are dropped:
/// the values quoted here are informational and dropping beats failing the login.
pub fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\r' | '\n' | '\0' => {}
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// `<tag> ID ("X-ORIGINATING-IP" "<ip>" "name" "<ua>" "version" "<ver>" "X-VIA" "<via>")`,
/// which a mailbox that trusts the proxy uses as the client's address in its logs and
/// throttling. `name` and `version` are left out when the client did not send them.
pub fn id_command(tag: &str, client_ip: IpAddr, client: &ClientId, via: &str) -> Vec<u8> {
    let mut fields = vec![quote("X-ORIGINATING-IP"), quote(&client_ip.to_string())];
    if let Some(name) = &client.name {
        fields.push(quote("name"));
        fields.push(quote(name));
    }
    if let Some(version) = &client.version {
        fields.push(quote("version"));
        fields.push(quote(version));
    }
    fields.push(quote("X-VIA"));
    fields.push(quote(via));
    format!("{tag} ID ({})\r\n", fields.join(" ")).into_bytes()
}

/// `LOGIN` with both arguments as literals, so that any byte but NUL (spaces, quotes, 8-bit
/// passwords) reaches the server unchanged. With `literal_plus` (the server advertised
/// LITERAL+) it is one piece; otherwise three, each literal waiting for the server's `+`.
/// `None` when the login or password holds NUL, which no IMAP literal can carry.
pub fn login_command(
    tag: &str,
    login: &str,
    password: &Password,
    literal_plus: bool,
) -> Option<UpstreamCommand> {
    let password = password.expose();
    if login.as_bytes().contains(&0) || password.contains(&0) {
        return None;
    }
    let plus = if literal_plus { "+" } else { "" };
    let mut pieces = vec![
        format!("{tag} LOGIN {{{}{plus}}}\r\n", login.len()).into_bytes(),
        format!("{login} {{{}{plus}}}\r\n", password.len()).into_bytes(),
        [password, b"\r\n"].concat(),
    ];
    if literal_plus {
        pieces = vec![pieces.concat()];
    }
    Some(UpstreamCommand::new(pieces))
}

/// `AUTHENTICATE PLAIN`, the only upstream login that carries an authzid. With `sasl_ir` (the
/// server advertised SASL-IR) the credentials ride on the command line; otherwise they follow
/// the server's `+`.
pub fn authenticate_plain_command(
    tag: &str,
    authzid: Option<&str>,
    login: &str,
    password: &Password,
    sasl_ir: bool,
) -> UpstreamCommand {
    let encoded = sasl::encode_plain(authzid, login, password.expose());
    let encoded = encoded.expose();
    let pieces = if sasl_ir {
        vec![[tag.as_bytes(), b" AUTHENTICATE PLAIN ", encoded, b"\r\n"].concat()]
    } else {
        vec![
            format!("{tag} AUTHENTICATE PLAIN\r\n").into_bytes(),
            [encoded, b"\r\n"].concat(),
        ]
    };
    UpstreamCommand::new(pieces)
}

/// One line from the upstream server, classified against the tag of the proxy's command.
#[derive(Debug, PartialEq, Eq)]
pub enum ImapResponse<'a> {
    /// `+ text`: send the next piece.
    Continuation(&'a [u8]),
    /// `* text`: informational; the command is still running.
    Untagged(&'a [u8]),
    /// The result of the proxy's command.
    Tagged { status: ImapStatus, text: &'a [u8] },
    /// Anything else, e.g. another tag: a protocol error from the server.
    Other,
}

/// Classifies a line (without CRLF) read from the upstream server.
pub fn parse_response<'a>(line: &'a [u8], tag: &str) -> ImapResponse<'a> {
    if let Some(rest) = line.strip_prefix(b"+") {
        return ImapResponse::Continuation(rest.strip_prefix(b" ").unwrap_or(rest));
    }
    if line == b"*" {
        return ImapResponse::Untagged(b"");
    }
    if let Some(rest) = line.strip_prefix(b"* ") {
        return ImapResponse::Untagged(rest);
    }
    let Some(rest) = line
        .strip_prefix(tag.as_bytes())
        .and_then(|rest| rest.strip_prefix(b" "))
    else {
        return ImapResponse::Other;
    };
    let word_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let (word, text) = rest.split_at(word_len);
    let status = if word.eq_ignore_ascii_case(b"OK") {
        ImapStatus::Ok
    } else if word.eq_ignore_ascii_case(b"NO") {
        ImapStatus::No
    } else if word.eq_ignore_ascii_case(b"BAD") {
        ImapStatus::Bad
    } else {
        return ImapResponse::Other;
    };
    ImapResponse::Tagged {
        status,
        text: text.strip_prefix(b" ").unwrap_or(text),
    }
}

/// Most untagged lines of the login passed on to the client, and most bytes they may take.
const MAX_FORWARDED_LINES: usize = 16;
const MAX_FORWARDED_BYTES: usize = 16 * 1024;

/// Untagged lines the server sent while running the login (`* OK [ALERT] ...`,
/// `* CAPABILITY ...`), to be passed on to the client ahead of its tagged OK, as they would
/// reach a client logging in directly. Bounded by [`MAX_FORWARDED_LINES`] and
/// [`MAX_FORWARDED_BYTES`] so that a server cannot make the proxy buffer without limit; a
/// line that does not fit is dropped.
#[derive(Debug, Default)]
pub struct UntaggedLines {
    bytes: Vec<u8>,
    lines: usize,
}

impl UntaggedLines {
    /// Keeps `line` (an untagged response without its CRLF) if it is one to pass on and fits.
    /// Answers to the proxy's own ID are left out: the client did not ask, and they describe
    /// the server to the proxy. So is a line announcing a literal: its bytes arrive as lines
    /// of their own, which the bounds could drop and leave the client waiting for.
    pub fn push(&mut self, line: &[u8]) {
        let id_answer = line
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case(b"* ID "));
        let size = line.len() + 2;
        if id_answer
            || announces_literal(line)
            || self.lines == MAX_FORWARDED_LINES
            || self.bytes.len() + size > MAX_FORWARDED_BYTES
        {
            return;
        }
        self.bytes.extend_from_slice(line);
        self.bytes.extend_from_slice(b"\r\n");
        self.lines += 1;
    }

    /// The kept lines, each with its CRLF, in the order they came.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// What the upstream server supports, as far as the proxy's login cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerCapabilities {
    pub literal_plus: bool,
    pub sasl_ir: bool,
    pub auth_plain: bool,
    pub id: bool,
    /// LOGIN is refused (cleartext upstream link to a server requiring TLS): use
    /// AUTHENTICATE, or fail.
    pub login_disabled: bool,
}

impl ServerCapabilities {
    /// Reads the capabilities from a greeting or OK carrying `[CAPABILITY ...]`, or from an
    /// untagged `* CAPABILITY ...` line. `None` when the line has no capability list (Zimbra's
    /// own greeting), in which case the driver asks with `CAPABILITY`.
    pub fn from_line(line: &[u8]) -> Option<ServerCapabilities> {
        let list = if let Some(rest) = strip_prefix_ignore_case(line, b"* CAPABILITY ") {
            rest
        } else {
            const CODE: &[u8] = b"[CAPABILITY ";
            let start = line
                .windows(CODE.len())
                .position(|window| window.eq_ignore_ascii_case(CODE))?;
            let rest = &line[start + CODE.len()..];
            &rest[..rest.iter().position(|&b| b == b']')?]
        };
        let mut caps = ServerCapabilities::default();
        for word in list.split(|&b| b == b' ') {
            let flag = match word.to_ascii_uppercase().as_slice() {
                b"LITERAL+" => &mut caps.literal_plus,
                b"SASL-IR" => &mut caps.sasl_ir,
                b"AUTH=PLAIN" => &mut caps.auth_plain,
                b"ID" => &mut caps.id,
                b"LOGINDISABLED" => &mut caps.login_disabled,
                _ => continue,
            };
            *flag = true;
        }
        Some(caps)
    }
}

fn strip_prefix_ignore_case<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &line[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(command: &UpstreamCommand) -> Vec<String> {
        command
            .pieces()
            .iter()
            .map(|piece| String::from_utf8_lossy(piece).into_owned())
            .collect()
    }

    #[test]
    fn quote_escapes_and_drops_line_breaks() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote("a\r\nb\0c"), "\"abc\"");
        assert_eq!(quote(""), "\"\"");
    }

    #[test]
    fn id_command_matches_zimbra() {
        let client = ClientId {
            name: Some("Thunder \"bird\"".into()),
            version: Some("115.0".into()),
        };
        assert_eq!(
            String::from_utf8(id_command(
                "P1",
                "203.0.113.7".parse().unwrap(),
                &client,
                "proxy-1"
            ))
            .unwrap(),
            "P1 ID (\"X-ORIGINATING-IP\" \"203.0.113.7\" \"name\" \"Thunder \\\"bird\\\"\" \"version\" \"115.0\" \"X-VIA\" \"proxy-1\")\r\n"
        );
    }

    #[test]
    fn id_command_leaves_out_unknown_fields_and_handles_ipv6() {
        assert_eq!(
            String::from_utf8(id_command(
                "P1",
                "2001:db8::1".parse().unwrap(),
                &ClientId::default(),
                "px"
            ))
            .unwrap(),
            "P1 ID (\"X-ORIGINATING-IP\" \"2001:db8::1\" \"X-VIA\" \"px\")\r\n"
        );
    }

    #[test]
    fn login_with_synchronising_literals_is_three_pieces() {
        let password = Password::new(b"p w\xe4".to_vec());
        let command = login_command("P2", "bob@example.com", &password, false).unwrap();
        assert_eq!(
            command.pieces(),
            [
                b"P2 LOGIN {15}\r\n".to_vec(),
                b"bob@example.com {4}\r\n".to_vec(),
                b"p w\xe4\r\n".to_vec()
            ]
        );
    }

    #[test]
    fn login_with_literal_plus_is_one_piece() {
        let password = Password::new(b"pw".to_vec());
        let command = login_command("P2", "bob", &password, true).unwrap();
        assert_eq!(pieces(&command), ["P2 LOGIN {3+}\r\nbob {2+}\r\npw\r\n"]);
    }

    #[test]
    fn login_refuses_nul() {
        assert!(login_command("P", "bob", &Password::new(b"p\0w".to_vec()), true).is_none());
        assert!(login_command("P", "b\0b", &Password::new(b"pw".to_vec()), true).is_none());
    }

    #[test]
    fn login_literals_carry_any_other_byte() {
        let password = Password::new(b"\"\r\n{3}".to_vec());
        let command = login_command("P", "bob", &password, true).unwrap();
        assert_eq!(
            command.pieces()[0],
            b"P LOGIN {3+}\r\nbob {6+}\r\n\"\r\n{3}\r\n"
        );
    }

    #[test]
    fn authenticate_plain_with_and_without_sasl_ir() {
        let password = Password::new(b"pw".to_vec());
        let command = authenticate_plain_command("P3", None, "bob", &password, true);
        assert_eq!(pieces(&command), ["P3 AUTHENTICATE PLAIN AGJvYgBwdw==\r\n"]);
        let command = authenticate_plain_command("P3", Some("admin"), "bob", &password, false);
        assert_eq!(
            pieces(&command),
            ["P3 AUTHENTICATE PLAIN\r\n", "YWRtaW4AYm9iAHB3\r\n"]
        );
    }

    #[test]
    fn responses_are_classified() {
        assert_eq!(
            parse_response(b"+ OK", "P1"),
            ImapResponse::Continuation(b"OK")
        );
        assert_eq!(parse_response(b"+", "P1"), ImapResponse::Continuation(b""));
        assert_eq!(
            parse_response(b"* OK ready", "P1"),
            ImapResponse::Untagged(b"OK ready")
        );
        assert_eq!(
            parse_response(b"P1 OK [CAPABILITY IMAP4rev1] Logged in", "P1"),
            ImapResponse::Tagged {
                status: ImapStatus::Ok,
                text: b"[CAPABILITY IMAP4rev1] Logged in"
            }
        );
        assert_eq!(
            parse_response(b"P1 no [AUTHENTICATIONFAILED] Authentication failed.", "P1"),
            ImapResponse::Tagged {
                status: ImapStatus::No,
                text: b"[AUTHENTICATIONFAILED] Authentication failed."
            }
        );
        assert_eq!(
            parse_response(b"P1 BAD", "P1"),
            ImapResponse::Tagged {
                status: ImapStatus::Bad,
                text: b""
            }
        );
        assert_eq!(parse_response(b"P10 OK done", "P1"), ImapResponse::Other);
        assert_eq!(parse_response(b"P1 MAYBE", "P1"), ImapResponse::Other);
        assert_eq!(parse_response(b"", "P1"), ImapResponse::Other);
    }

    #[test]
    fn untagged_lines_are_kept_in_order_but_not_id_answers_or_literals() {
        let mut lines = UntaggedLines::default();
        for line in [
            &b"* OK [ALERT] Password expires in 3 days"[..],
            b"* ID (\"name\" \"Dovecot\")",
            b"* id NIL",
            b"* CAPABILITY IMAP4rev1 IDLE",
            b"* OK [ALERT] {12}",
            b"* IDLE-ish NO",
        ] {
            lines.push(line);
        }
        assert_eq!(
            String::from_utf8(lines.into_bytes()).unwrap(),
            "* OK [ALERT] Password expires in 3 days\r\n* CAPABILITY IMAP4rev1 IDLE\r\n* IDLE-ish NO\r\n"
        );
    }

    #[test]
    fn untagged_lines_are_bounded_in_number_and_size() {
        let mut lines = UntaggedLines::default();
        for n in 0..100 {
            lines.push(format!("* OK line {n}").as_bytes());
        }
        let kept = String::from_utf8(lines.into_bytes()).unwrap();
        assert_eq!(kept.lines().count(), MAX_FORWARDED_LINES);
        assert!(kept.ends_with("* OK line 15\r\n"), "{kept}");

        let mut lines = UntaggedLines::default();
        let long = [b"* OK ".as_slice(), &[b'x'; 6000]].concat();
        for _ in 0..3 {
            lines.push(&long);
        }
        lines.push(b"* OK [ALERT] still fits");
        let kept = lines.into_bytes();
        assert!(kept.len() <= MAX_FORWARDED_BYTES);
        assert_eq!(
            kept.len(),
            2 * (long.len() + 2) + b"* OK [ALERT] still fits\r\n".len()
        );
    }

    #[test]
    fn capabilities_from_a_dovecot_greeting() {
        let caps = ServerCapabilities::from_line(
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot (Debian) ready.",
        )
        .unwrap();
        assert_eq!(
            caps,
            ServerCapabilities {
                literal_plus: true,
                sasl_ir: true,
                auth_plain: true,
                id: true,
                login_disabled: false
            }
        );
    }

    #[test]
    fn capabilities_from_a_capability_response() {
        let caps = ServerCapabilities::from_line(b"* CAPABILITY IMAP4rev1 literal+ LOGINDISABLED")
            .unwrap();
        assert!(caps.literal_plus && caps.login_disabled);
        assert!(!caps.sasl_ir && !caps.auth_plain && !caps.id);
    }

    #[test]
    fn greeting_without_capabilities() {
        assert_eq!(
            ServerCapabilities::from_line(b"* OK mail.example.com Zimbra IMAP4rev1 server ready"),
            None
        );
        assert_eq!(
            ServerCapabilities::from_line(b"* OK [CAPABILITY IMAP4rev1"),
            None
        );
    }
}
