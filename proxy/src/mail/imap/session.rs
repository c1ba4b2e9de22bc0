//! The IMAP pre-login state machine (RFC 3501 not-authenticated state, as nginx's mail module
//! and Zimbra's proxy answer it).
//!
//! The driver sends [`ImapPreLogin::greeting`], then passes every byte read from the client to
//! [`ImapPreLogin::feed`] and carries out the returned events in order. After `Login` the driver
//! owns the connection; after `StartTls` it performs the handshake and calls
//! [`ImapPreLogin::tls_established`]; after `Close` it closes.

use super::ImapStatus;
use super::parser::{CommandFramer, FrameEvent, ParseError, Token, parse_command};
use crate::mail::line::{LineRead, LineReader};
use crate::mail::sasl::{self, Exchange, Mechanism, Step};
use crate::mail::{
    Credentials, Limits, LoginMechanism, PreLoginEvent, PreLoginMachine, SaslMechanisms, StartTls,
};

/// Zimbra's answer to a login before TLS under `starttls: only`.
const CLEARTEXT_REFUSED: &str = "cleartext logins disabled";

/// RFC 2971 caps ID values at 1024 octets; longer ones are cut rather than refused, since the
/// ID is informational.
const MAX_ID_VALUE_LEN: usize = 1024;

/// Listener settings for [`ImapPreLogin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImapConfig {
    pub starttls: StartTls,
    /// The connection is already encrypted (implicit TLS, port 993).
    pub tls_active: bool,
    /// Capabilities to advertise. `IMAP4rev1` always comes first, and `STARTTLS`,
    /// `LOGINDISABLED` and `AUTH=` entries are derived from the TLS state and `mechanisms`, so
    /// any given here are ignored: advertising them regardless of state would invite clients to
    /// send passwords in the clear or to commands that are refused.
    pub capabilities: Vec<String>,
    pub mechanisms: SaslMechanisms,
    pub limits: Limits,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            starttls: StartTls::default(),
            tls_active: false,
            capabilities: ["IMAP4rev1", "ID", "LITERAL+", "SASL-IR"]
                .map(String::from)
                .to_vec(),
            mechanisms: SaslMechanisms::default(),
            limits: Limits::default(),
        }
    }
}

/// What the IMAP driver must do, in order.
pub type ImapEvent = PreLoginEvent<ImapLogin>;

/// An IMAP login: the answer to the client is tagged with `tag`.
#[derive(Debug)]
pub struct ImapLogin {
    pub tag: String,
    pub credentials: Credentials,
}

/// The `name` and `version` the client gave in its ID command, for the upstream ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientId {
    pub name: Option<String>,
    pub version: Option<String>,
}

enum State {
    Command,
    Authenticate {
        tag: String,
        mechanism: Mechanism,
        exchange: Exchange,
    },
    AwaitingTls,
    LoggedIn,
    Closed,
}

/// One client connection before login.
pub struct ImapPreLogin {
    config: ImapConfig,
    tls_active: bool,
    framer: CommandFramer,
    sasl_line: LineReader,
    state: State,
    errors: u32,
    client_id: ClientId,
    pending: Vec<u8>,
}

impl PreLoginMachine for ImapPreLogin {
    type Login = ImapLogin;

    fn credentials(login: &ImapLogin) -> &Credentials {
        &login.credentials
    }

    /// The untagged greeting, with capabilities so that clients need not ask.
    fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] IMAP4rev1 proxy server ready\r\n",
            self.capabilities()
        )
        .into_bytes()
    }

    fn feed(&mut self, mut input: &[u8]) -> Vec<ImapEvent> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let used = match self.state {
                State::Command => {
                    let (used, event) = self.framer.push(input);
                    if let Some(event) = event {
                        self.on_frame(event, &mut out);
                    }
                    used
                }
                State::Authenticate { .. } => {
                    let (used, read) = self.sasl_line.push(input);
                    match read {
                        LineRead::Incomplete => {}
                        LineRead::Line(line) => self.on_sasl_line(line, &mut out),
                        LineRead::TooLong => self.too_long(&mut out),
                    }
                    used
                }
                State::LoggedIn => {
                    self.pending.extend_from_slice(input);
                    input.len()
                }
                State::AwaitingTls | State::Closed => input.len(),
            };
            input = &input[used..];
        }
        out
    }

    /// Called by the driver once the TLS handshake after STARTTLS succeeded. Everything learnt
    /// in plaintext is forgotten: bytes a man in the middle appended after STARTTLS must not
    /// run as commands inside TLS (CVE-2011-0411), and neither may his ID.
    fn tls_established(&mut self) {
        self.tls_active = true;
        self.framer.reset();
        self.framer
            .refuse_login_literals(!self.cleartext_login_allowed());
        self.sasl_line.clear();
        self.client_id = ClientId::default();
        if let State::AwaitingTls = self.state {
            self.state = State::Command;
        }
    }

    fn take_pending_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Bytes held for unfinished commands; bounded by the line and literal limits.
    fn buffered_len(&self) -> usize {
        self.framer.buffered_len() + self.sasl_line.buffered_len()
    }
}

impl ImapPreLogin {
    pub fn new(config: ImapConfig) -> Self {
        let mut framer = CommandFramer::new(&config.limits);
        framer.refuse_login_literals(!config.starttls.allows_cleartext_login(config.tls_active));
        ImapPreLogin {
            tls_active: config.tls_active,
            framer,
            sasl_line: LineReader::new(config.limits.max_line_len),
            state: State::Command,
            errors: 0,
            client_id: ClientId::default(),
            pending: Vec::new(),
            config,
        }
    }

    /// What the client said about itself in ID, if anything.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    fn capabilities(&self) -> String {
        let derived = |cap: &str| {
            let upper = cap.to_ascii_uppercase();
            upper == "IMAP4REV1"
                || upper == "STARTTLS"
                || upper == "LOGINDISABLED"
                || upper.starts_with("AUTH=")
        };
        let mut caps = vec!["IMAP4rev1"];
        caps.extend(
            self.config
                .capabilities
                .iter()
                .map(String::as_str)
                .filter(|cap| !cap.is_empty() && cap.bytes().all(|b| b.is_ascii_graphic()))
                .filter(|cap| !derived(cap)),
        );
        if self.config.starttls.offers_starttls(self.tls_active) {
            caps.push("STARTTLS");
        }
        if self.cleartext_login_allowed() {
            if self.config.mechanisms.plain {
                caps.push("AUTH=PLAIN");
            }
            if self.config.mechanisms.login {
                caps.push("AUTH=LOGIN");
            }
        } else {
            caps.push("LOGINDISABLED");
        }
        caps.join(" ")
    }

    fn cleartext_login_allowed(&self) -> bool {
        self.config.starttls.allows_cleartext_login(self.tls_active)
    }

    fn on_frame(&mut self, event: FrameEvent, out: &mut Vec<ImapEvent>) {
        match event {
            FrameEvent::Continuation => reply(out, b"+ OK\r\n"),
            FrameEvent::TooLong => self.too_long(out),
            FrameEvent::LiteralTooLarge { tag, synchronizing } => {
                let tag = tag.as_deref().unwrap_or("*");
                reply(out, format!("{tag} BAD literal too large\r\n").as_bytes());
                if synchronizing {
                    self.count_error(out);
                } else {
                    self.close(out);
                }
            }
            FrameEvent::LoginLiteralRefused { tag, synchronizing } => {
                let tag = tag.as_deref().unwrap_or("*");
                if synchronizing {
                    self.refuse(tag, CLEARTEXT_REFUSED, out);
                } else {
                    // The password is on its way and nothing will unsend it. Closing rather
                    // than framing the literal (and any after it) only to discard it keeps
                    // the bytes out of this process, and a client that sends passwords in the
                    // clear despite LOGINDISABLED is not one to go on serving.
                    reply(out, format!("{tag} NO {CLEARTEXT_REFUSED}\r\n").as_bytes());
                    self.close(out);
                }
            }
            FrameEvent::Complete(raw) => match parse_command(raw) {
                Ok(command) => self.dispatch(&command.tag, &command.name, &command.args, out),
                Err(ParseError::NoTag) => self.bad("*", out),
                Err(ParseError::Syntax { tag }) => self.bad(&tag, out),
            },
        }
    }

    fn dispatch(&mut self, tag: &str, name: &str, args: &[Token], out: &mut Vec<ImapEvent>) {
        match name {
            "CAPABILITY" if args.is_empty() => {
                let caps = self.capabilities();
                reply(
                    out,
                    format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n").as_bytes(),
                );
            }
            "NOOP" if args.is_empty() => {
                reply(out, format!("{tag} OK NOOP completed\r\n").as_bytes());
            }
            "LOGOUT" if args.is_empty() => {
                reply(
                    out,
                    format!(
                        "* BYE IMAP4rev1 proxy server logging out\r\n{tag} OK LOGOUT completed\r\n"
                    )
                    .as_bytes(),
                );
                self.close(out);
            }
            "ID" => match parse_id(args) {
                Some(client_id) => {
                    self.client_id = client_id;
                    reply(
                        out,
                        format!("* ID NIL\r\n{tag} OK ID completed\r\n").as_bytes(),
                    );
                }
                None => self.bad(tag, out),
            },
            "STARTTLS"
                if args.is_empty() && self.config.starttls.offers_starttls(self.tls_active) =>
            {
                reply(
                    out,
                    format!("{tag} OK Begin TLS negotiation now\r\n").as_bytes(),
                );
                out.push(ImapEvent::StartTls);
                self.framer.reset();
                self.state = State::AwaitingTls;
            }
            "LOGIN" => self.login(tag, args, out),
            "AUTHENTICATE" => self.authenticate(tag, args, out),
            _ => self.bad(tag, out),
        }
    }

    fn login(&mut self, tag: &str, args: &[Token], out: &mut Vec<ImapEvent>) {
        if !self.cleartext_login_allowed() {
            return self.refuse(tag, CLEARTEXT_REFUSED, out);
        }
        let [user, password] = args else {
            return self.bad(tag, out);
        };
        let (Some(user), Some(password)) = (user.astring(), password.astring()) else {
            return self.bad(tag, out);
        };
        let outcome = sasl::Outcome {
            authzid: None,
            login: user.to_vec(),
            password: password.to_vec(),
        };
        self.logged_in(tag.to_string(), outcome, LoginMechanism::Login, out);
    }

    fn authenticate(&mut self, tag: &str, args: &[Token], out: &mut Vec<ImapEvent>) {
        if !self.cleartext_login_allowed() {
            return self.refuse(tag, CLEARTEXT_REFUSED, out);
        }
        let (mechanism, initial) = match args {
            [Token::Atom(mechanism)] => (mechanism, None),
            [Token::Atom(mechanism), Token::Atom(initial)] => (mechanism, Some(&initial[..])),
            _ => return self.bad(tag, out),
        };
        let enabled = |mechanism: &Mechanism| match mechanism {
            Mechanism::Plain => self.config.mechanisms.plain,
            Mechanism::Login => self.config.mechanisms.login,
        };
        let Some(mechanism) = Mechanism::parse(mechanism).filter(enabled) else {
            return self.refuse(tag, "mechanism not supported", out);
        };
        let step = sasl::start(mechanism, initial);
        self.sasl_step(tag.to_string(), mechanism, step, out);
    }

    fn on_sasl_line(&mut self, mut line: Vec<u8>, out: &mut Vec<ImapEvent>) {
        let state = std::mem::replace(&mut self.state, State::Command);
        if let State::Authenticate {
            tag,
            mechanism,
            exchange,
        } = state
        {
            let step = sasl::respond(exchange, &line);
            self.sasl_step(tag, mechanism, step, out);
        }
        crate::mail::wipe(&mut line);
    }

    fn sasl_step(
        &mut self,
        tag: String,
        mechanism: Mechanism,
        step: Step,
        out: &mut Vec<ImapEvent>,
    ) {
        match step {
            Step::Continue(exchange) => {
                reply(out, format!("+ {}\r\n", exchange.challenge()).as_bytes());
                self.state = State::Authenticate {
                    tag,
                    mechanism,
                    exchange,
                };
            }
            Step::Done(outcome) => {
                let login_mechanism = match mechanism {
                    Mechanism::Plain => LoginMechanism::AuthenticatePlain,
                    Mechanism::Login => LoginMechanism::AuthenticateLogin,
                };
                self.logged_in(tag, outcome, login_mechanism, out);
            }
            Step::Cancelled => {
                reply(
                    out,
                    format!("{tag} BAD AUTHENTICATE aborted\r\n").as_bytes(),
                );
                self.count_error(out);
            }
            Step::Malformed => self.bad(&tag, out),
        }
    }

    fn logged_in(
        &mut self,
        tag: String,
        outcome: sasl::Outcome,
        mechanism: LoginMechanism,
        out: &mut Vec<ImapEvent>,
    ) {
        match Credentials::from_client(outcome.login, outcome.password, outcome.authzid, mechanism)
        {
            Some(credentials) => {
                out.push(ImapEvent::Login(ImapLogin { tag, credentials }));
                self.state = State::LoggedIn;
            }
            None => self.bad(&tag, out),
        }
    }

    fn too_long(&mut self, out: &mut Vec<ImapEvent>) {
        reply(out, b"* BAD client sent too long command\r\n");
        self.close(out);
    }

    /// `<tag> NO <text>`, counted like an invalid command: a client that keeps trying what is
    /// refused is as likely to be another protocol's (ALPACA) as one that sends garbage.
    fn refuse(&mut self, tag: &str, text: &str, out: &mut Vec<ImapEvent>) {
        reply(out, format!("{tag} NO {text}\r\n").as_bytes());
        self.count_error(out);
    }

    fn bad(&mut self, tag: &str, out: &mut Vec<ImapEvent>) {
        reply(out, format!("{tag} BAD invalid command\r\n").as_bytes());
        self.count_error(out);
    }

    fn count_error(&mut self, out: &mut Vec<ImapEvent>) {
        self.errors += 1;
        if self.errors >= self.config.limits.max_errors.max(1) {
            reply(out, b"* BYE Too many invalid commands\r\n");
            self.close(out);
        }
    }

    fn close(&mut self, out: &mut Vec<ImapEvent>) {
        out.push(ImapEvent::Close);
        self.framer.reset();
        self.sasl_line.clear();
        self.state = State::Closed;
    }
}

/// Appends to the previous reply when there is one, so a pipelined batch is answered with one
/// write.
fn reply(out: &mut Vec<ImapEvent>, bytes: &[u8]) {
    if let Some(ImapEvent::Reply(last)) = out.last_mut() {
        last.extend_from_slice(bytes);
    } else {
        out.push(ImapEvent::Reply(bytes.to_vec()));
    }
}

/// Reads `ID NIL` or `ID ("key" "value"|NIL ...)`, keeping `name` and `version`.
fn parse_id(args: &[Token]) -> Option<ClientId> {
    let pairs = match args {
        [nil] if nil.is_nil() => return Some(ClientId::default()),
        [Token::LParen, pairs @ .., Token::RParen] => pairs,
        _ => return None,
    };
    if pairs.len() % 2 != 0 {
        return None;
    }
    let mut client_id = ClientId::default();
    for pair in pairs.chunks_exact(2) {
        let (key, value) = (&pair[0], &pair[1]);
        if key.is_nil() {
            return None;
        }
        let key = key.astring()?;
        let value = if value.is_nil() {
            None
        } else {
            Some(id_value(value.astring()?))
        };
        if key.eq_ignore_ascii_case(b"name") {
            client_id.name = value;
        } else if key.eq_ignore_ascii_case(b"version") {
            client_id.version = value;
        }
    }
    Some(client_id)
}

/// Makes an ID value safe to log and to quote upstream: UTF-8, no control characters (a literal
/// could carry CRLF), at most [`MAX_ID_VALUE_LEN`] bytes.
fn id_value(bytes: &[u8]) -> String {
    let mut value = String::new();
    for c in String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control())
    {
        if value.len() + c.len_utf8() > MAX_ID_VALUE_LEN {
            break;
        }
        value.push(c);
    }
    value
}

/// `<tag> <status> <text>\r\n`, e.g. to relay the upstream's answer to a login under the
/// client's tag. CR and LF in `text` are dropped so it stays one line.
pub fn tagged_response(tag: &str, status: ImapStatus, text: &[u8]) -> Vec<u8> {
    let mut line = format!("{tag} {} ", status.as_str()).into_bytes();
    line.extend(text.iter().filter(|&&b| b != b'\r' && b != b'\n'));
    line.extend_from_slice(b"\r\n");
    line
}

/// The answer to a login the upstream refused (Zimbra's wording).
pub fn login_failed_response(tag: &str, mechanism: LoginMechanism) -> Vec<u8> {
    let text: &[u8] = match mechanism {
        LoginMechanism::AuthenticatePlain | LoginMechanism::AuthenticateLogin => {
            b"AUTHENTICATE failed"
        }
        _ => b"LOGIN failed",
    };
    tagged_response(tag, ImapStatus::No, text)
}

/// `* BYE <text>\r\n`, e.g. `Login rejected from this IP` when throttling.
pub fn bye_response(text: &str) -> Vec<u8> {
    let mut line = b"* BYE ".to_vec();
    line.extend(text.bytes().filter(|&b| b != b'\r' && b != b'\n'));
    line.extend_from_slice(b"\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::StartTlsMode;
    use base64::Engine;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn session(starttls: StartTlsMode, tls_active: bool) -> ImapPreLogin {
        ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(starttls),
            tls_active,
            ..ImapConfig::default()
        })
    }

    fn plain() -> ImapPreLogin {
        session(StartTlsMode::Off, false)
    }

    fn with_limits(limits: Limits) -> ImapPreLogin {
        ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(StartTlsMode::Off),
            limits,
            ..ImapConfig::default()
        })
    }

    /// The replies of a feed concatenated, asserting that no other event occurred.
    fn replies_only(events: Vec<ImapEvent>) -> String {
        let mut text = String::new();
        for event in events {
            match event {
                ImapEvent::Reply(bytes) => text.push_str(&String::from_utf8(bytes).unwrap()),
                other => panic!("unexpected {other:?}"),
            }
        }
        text
    }

    fn feed_replies(session: &mut ImapPreLogin, input: &[u8]) -> String {
        replies_only(session.feed(input))
    }

    /// Splits events into the reply text before the terminal event and that event.
    fn replies_then(events: Vec<ImapEvent>) -> (String, ImapEvent) {
        let mut events = events;
        let last = events.pop().expect("no events");
        (replies_only(events), last)
    }

    fn expect_login(event: ImapEvent) -> (String, Credentials) {
        match event {
            ImapEvent::Login(ImapLogin { tag, credentials }) => (tag, credentials),
            other => panic!("expected Login, got {other:?}"),
        }
    }

    #[test]
    fn greeting_lists_capabilities_by_tls_state() {
        let greeting = |s: ImapPreLogin| String::from_utf8(s.greeting()).unwrap();
        assert_eq!(
            greeting(session(StartTlsMode::Off, false)),
            "* OK [CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN] IMAP4rev1 proxy server ready\r\n"
        );
        assert_eq!(
            greeting(session(StartTlsMode::On, false)),
            "* OK [CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR STARTTLS AUTH=PLAIN AUTH=LOGIN] IMAP4rev1 proxy server ready\r\n"
        );
        assert_eq!(
            greeting(session(StartTlsMode::Only, false)),
            "* OK [CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR STARTTLS LOGINDISABLED] IMAP4rev1 proxy server ready\r\n"
        );
        assert_eq!(
            greeting(session(StartTlsMode::Only, true)),
            "* OK [CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN] IMAP4rev1 proxy server ready\r\n"
        );
    }

    #[test]
    fn configured_capabilities_cannot_override_derived_ones() {
        let s = ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(StartTlsMode::Only),
            capabilities: [
                "IDLE",
                "imap4rev1",
                "STARTTLS",
                "AUTH=PLAIN",
                "logindisabled",
                "",
                "BAD CAP",
                "UIDPLUS",
            ]
            .map(String::from)
            .to_vec(),
            mechanisms: SaslMechanisms {
                plain: false,
                login: true,
            },
            ..ImapConfig::default()
        });
        assert_eq!(
            String::from_utf8(s.greeting()).unwrap(),
            "* OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS STARTTLS LOGINDISABLED] IMAP4rev1 proxy server ready\r\n"
        );
        let mut s = ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(StartTlsMode::Off),
            mechanisms: SaslMechanisms {
                plain: false,
                login: true,
            },
            ..ImapConfig::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"c CAPABILITY\r\n"),
            "* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n"
        );
    }

    #[test]
    fn capability_noop_and_case_insensitive_names() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a1 capability\r\n"),
            "* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN\r\na1 OK CAPABILITY completed\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"a2 NoOp\r\n"),
            "a2 OK NOOP completed\r\n"
        );
    }

    #[test]
    fn commands_that_take_no_arguments_refuse_them() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a CAPABILITY x\r\nb NOOP y\r\nc LOGOUT z\r\n"),
            "a BAD invalid command\r\nb BAD invalid command\r\nc BAD invalid command\r\n"
        );
    }

    #[test]
    fn logout_says_bye_then_ok_then_closes() {
        let mut s = plain();
        let (text, last) = replies_then(s.feed(b"z LOGOUT\r\nq NOOP\r\n"));
        assert_eq!(
            text,
            "* BYE IMAP4rev1 proxy server logging out\r\nz OK LOGOUT completed\r\n"
        );
        assert!(matches!(last, ImapEvent::Close));
        assert!(s.feed(b"q NOOP\r\n").is_empty());
    }

    #[test]
    fn unknown_and_postlogin_commands_are_bad() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"t SELECT INBOX\r\n"),
            "t BAD invalid command\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"t FOO\r\n"),
            "t BAD invalid command\r\n"
        );
    }

    #[test]
    fn missing_or_invalid_tag_gets_untagged_bad() {
        let mut s = plain();
        assert_eq!(feed_replies(&mut s, b"\r\n"), "* BAD invalid command\r\n");
        assert_eq!(
            feed_replies(&mut s, b"+ NOOP\r\n"),
            "* BAD invalid command\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"tag\r\n"),
            "tag BAD invalid command\r\n"
        );
    }

    #[test]
    fn login_with_atoms() {
        let mut s = plain();
        let (tag, creds) = expect_login(
            s.feed(b"a1 LOGIN bob@example.com secret\r\n")
                .pop()
                .unwrap(),
        );
        assert_eq!(tag, "a1");
        assert_eq!(creds.login, "bob@example.com");
        assert_eq!(creds.password.expose(), b"secret");
        assert_eq!(creds.authzid, None);
        assert_eq!(creds.mechanism, LoginMechanism::Login);
    }

    #[test]
    fn login_with_quoted_escapes() {
        let mut s = plain();
        let events = s.feed(b"a1 LOGIN \"bob\" \"p a\\\"s\\\\s\"\r\n");
        assert_eq!(events.len(), 1);
        let (_, creds) = expect_login(events.into_iter().next().unwrap());
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"p a\"s\\s");
    }

    #[test]
    fn login_with_synchronising_literals_gets_continuations() {
        let mut s = plain();
        assert_eq!(feed_replies(&mut s, b"a LOGIN {15}\r\n"), "+ OK\r\n");
        assert_eq!(feed_replies(&mut s, b"bob@example.com {4}\r\n"), "+ OK\r\n");
        let events = s.feed(b"p \"w\r\n");
        assert_eq!(events.len(), 1);
        let (tag, creds) = expect_login(events.into_iter().next().unwrap());
        assert_eq!(tag, "a");
        assert_eq!(creds.login, "bob@example.com");
        assert_eq!(creds.password.expose(), b"p \"w");
    }

    #[test]
    fn password_literal_with_crlf_is_refused() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a LOGIN bob {4+}\r\np\r\nw\r\n"),
            "a BAD invalid command\r\n"
        );
    }

    #[test]
    fn login_with_non_synchronising_literals_gets_no_continuation() {
        let mut s = plain();
        let events = s.feed(b"a LOGIN {3+}\r\nbob {2+}\r\npw\r\n");
        assert_eq!(events.len(), 1, "{events:?}");
        let (_, creds) = expect_login(events.into_iter().next().unwrap());
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"pw");
    }

    #[test]
    fn login_arguments_are_checked() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                b"a LOGIN bob\r\nb LOGIN a b c\r\nc LOGIN (a) b\r\nd LOGIN \"\" pw\r\n"
            ),
            "a BAD invalid command\r\nb BAD invalid command\r\nc BAD invalid command\r\nd BAD invalid command\r\n"
        );
    }

    #[test]
    fn login_keeps_the_suffix_for_the_driver_to_split() {
        let mut s = plain();
        let (_, creds) = expect_login(s.feed(b"a LOGIN bob@example.com/tb pw\r\n").pop().unwrap());
        assert_eq!(creds.login, "bob@example.com/tb");
        assert_eq!(
            crate::mail::split_login_suffix(&creds.login),
            ("bob@example.com", Some(crate::mail::LoginSuffix::Tb))
        );
    }

    #[test]
    fn pipelined_commands_are_answered_in_order_up_to_login() {
        let mut s = plain();
        let (text, last) =
            replies_then(s.feed(b"1 NOOP\r\n2 CAPABILITY\r\n3 LOGIN bob pw\r\n4 SELECT INBOX\r\n"));
        assert_eq!(
            text,
            "1 OK NOOP completed\r\n* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN\r\n2 OK CAPABILITY completed\r\n"
        );
        let (tag, _) = expect_login(last);
        assert_eq!(tag, "3");
        assert_eq!(s.take_pending_input(), b"4 SELECT INBOX\r\n");
        assert!(s.feed(b"5 NOOP\r\n").is_empty());
        assert_eq!(s.take_pending_input(), b"5 NOOP\r\n");
        assert!(s.take_pending_input().is_empty());
    }

    #[test]
    fn one_byte_at_a_time_matches_one_feed() {
        let input: &[u8] = b"1 ID (\"name\" \"Thunderbird\" \"version\" {4}\r\n1.0a)\r\n2 LOGIN {3}\r\nbob \"pw\"\r\n";
        let mut s = plain();
        let mut text = String::new();
        let mut login = None;
        for &b in input {
            for event in s.feed(&[b]) {
                match event {
                    ImapEvent::Reply(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
                    ImapEvent::Login(ImapLogin { tag, credentials }) => {
                        login = Some((tag, credentials))
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(text, "+ OK\r\n* ID NIL\r\n1 OK ID completed\r\n+ OK\r\n");
        let (tag, creds) = login.expect("no login");
        assert_eq!(tag, "2");
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"pw");
        assert_eq!(
            s.client_id(),
            &ClientId {
                name: Some("Thunderbird".into()),
                version: Some("1.0a".into())
            }
        );
    }

    #[test]
    fn id_is_answered_locally_and_remembered() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                b"i ID (\"NAME\" \"Mail\" \"os\" \"x\" \"Version\" \"16.0\")\r\n"
            ),
            "* ID NIL\r\ni OK ID completed\r\n"
        );
        assert_eq!(s.client_id().name.as_deref(), Some("Mail"));
        assert_eq!(s.client_id().version.as_deref(), Some("16.0"));
        assert_eq!(
            feed_replies(&mut s, b"j ID NIL\r\n"),
            "* ID NIL\r\nj OK ID completed\r\n"
        );
        assert_eq!(s.client_id(), &ClientId::default());
        assert_eq!(
            feed_replies(&mut s, b"k ID (\"name\" NIL \"version\" \"2\")\r\n"),
            "* ID NIL\r\nk OK ID completed\r\n"
        );
        assert_eq!(s.client_id().name, None);
        assert_eq!(s.client_id().version.as_deref(), Some("2"));
    }

    #[test]
    fn id_values_are_sanitised() {
        let mut s = plain();
        let mut input = b"i ID (\"name\" {5+}\r\na\r\nb\x07 \"version\" \"".to_vec();
        input.extend(std::iter::repeat_n(b'v', 2000));
        input.extend_from_slice(b"\")\r\n");
        assert_eq!(
            feed_replies(&mut s, &input),
            "* ID NIL\r\ni OK ID completed\r\n"
        );
        assert_eq!(s.client_id().name.as_deref(), Some("ab"));
        assert_eq!(
            s.client_id().version.as_ref().map(String::len),
            Some(MAX_ID_VALUE_LEN)
        );
    }

    #[test]
    fn malformed_id_is_bad() {
        let mut s = with_limits(Limits {
            max_errors: 10,
            ..Limits::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"a ID\r\nb ID (\"name\")\r\nc ID (NIL \"x\")\r\nd ID \"name\" \"x\"\r\ne ID ((\"a\") \"b\")\r\n"),
            "a BAD invalid command\r\nb BAD invalid command\r\nc BAD invalid command\r\nd BAD invalid command\r\ne BAD invalid command\r\n"
        );
    }

    #[test]
    fn authenticate_plain_with_sasl_ir() {
        let mut s = plain();
        let line = format!("a AUTHENTICATE PLAIN {}\r\n", b64(b"admin\0bob\0pw"));
        let events = s.feed(line.as_bytes());
        assert_eq!(events.len(), 1);
        let (tag, creds) = expect_login(events.into_iter().next().unwrap());
        assert_eq!(tag, "a");
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.authzid.as_deref(), Some("admin"));
        assert_eq!(creds.password.expose(), b"pw");
        assert_eq!(creds.mechanism, LoginMechanism::AuthenticatePlain);
    }

    #[test]
    fn authenticate_plain_with_continuation() {
        let mut s = plain();
        assert_eq!(feed_replies(&mut s, b"a authenticate plain\r\n"), "+ \r\n");
        let events = s.feed(format!("{}\r\n", b64(b"\0bob\0pw")).as_bytes());
        assert_eq!(events.len(), 1);
        let (tag, creds) = expect_login(events.into_iter().next().unwrap());
        assert_eq!(tag, "a");
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.authzid, None);
    }

    #[test]
    fn authenticate_response_is_a_raw_line_not_a_command() {
        let mut s = plain();
        assert_eq!(feed_replies(&mut s, b"a AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        assert_eq!(
            feed_replies(&mut s, b"b NOOP\r\n"),
            "a BAD invalid command\r\n"
        );
    }

    #[test]
    fn cancelled_authenticate_returns_to_commands() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a AUTHENTICATE PLAIN\r\n*\r\nb NOOP\r\n"),
            "+ \r\na BAD AUTHENTICATE aborted\r\nb OK NOOP completed\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"c AUTHENTICATE LOGIN\r\n"),
            "+ VXNlcm5hbWU6\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, format!("{}\r\n*\r\n", b64(b"bob")).as_bytes()),
            "+ UGFzc3dvcmQ6\r\nc BAD AUTHENTICATE aborted\r\n"
        );
    }

    #[test]
    fn authenticate_login_asks_for_username_then_password() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a AUTHENTICATE LOGIN\r\n"),
            "+ VXNlcm5hbWU6\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, format!("{}\r\n", b64(b"bob")).as_bytes()),
            "+ UGFzc3dvcmQ6\r\n"
        );
        let (tag, creds) = expect_login(
            s.feed(format!("{}\r\n", b64(b"pw")).as_bytes())
                .pop()
                .unwrap(),
        );
        assert_eq!(tag, "a");
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"pw");
        assert_eq!(creds.mechanism, LoginMechanism::AuthenticateLogin);
    }

    #[test]
    fn authenticate_login_with_initial_username() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                format!("a AUTHENTICATE LOGIN {}\r\n", b64(b"bob")).as_bytes()
            ),
            "+ UGFzc3dvcmQ6\r\n"
        );
    }

    #[test]
    fn authenticate_errors() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                b"a AUTHENTICATE CRAM-MD5\r\nb AUTHENTICATE\r\nc AUTHENTICATE PLAIN !!!\r\n"
            ),
            "a NO mechanism not supported\r\nb BAD invalid command\r\nc BAD invalid command\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"d AUTHENTICATE PLAIN\r\nnot base64!\r\n"),
            "+ \r\nd BAD invalid command\r\n"
        );
    }

    #[test]
    fn disabled_mechanism_is_not_supported() {
        let mut s = ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(StartTlsMode::Off),
            mechanisms: SaslMechanisms {
                plain: true,
                login: false,
            },
            ..ImapConfig::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"a AUTHENTICATE LOGIN\r\n"),
            "a NO mechanism not supported\r\n"
        );
    }

    #[test]
    fn starttls_only_without_a_certificate_refuses_every_login_and_offers_no_starttls() {
        let mut s = ImapPreLogin::new(ImapConfig {
            starttls: StartTls {
                mode: StartTlsMode::Only,
                certificate: false,
            },
            ..ImapConfig::default()
        });
        assert_eq!(
            String::from_utf8(s.greeting()).unwrap(),
            "* OK [CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR LOGINDISABLED] IMAP4rev1 proxy server ready\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"a LOGIN bob pw\r\nb STARTTLS\r\n"),
            "a NO cleartext logins disabled\r\nb BAD invalid command\r\n"
        );
    }

    #[test]
    fn starttls_only_refuses_cleartext_logins() {
        let mut s = session(StartTlsMode::Only, false);
        let input = format!(
            "a LOGIN bob pw\r\nb AUTHENTICATE PLAIN {}\r\nc CAPABILITY\r\n",
            b64(b"\0bob\0pw")
        );
        assert_eq!(
            feed_replies(&mut s, input.as_bytes()),
            "a NO cleartext logins disabled\r\nb NO cleartext logins disabled\r\n* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR STARTTLS LOGINDISABLED\r\nc OK CAPABILITY completed\r\n"
        );
    }

    #[test]
    fn starttls_then_login_inside_tls() {
        let mut s = session(StartTlsMode::Only, false);
        let events = s.feed(b"s STARTTLS\r\n");
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[0], ImapEvent::Reply(r) if r == b"s OK Begin TLS negotiation now\r\n")
        );
        assert!(matches!(events[1], ImapEvent::StartTls));
        s.tls_established();
        assert_eq!(
            feed_replies(&mut s, b"c CAPABILITY\r\n"),
            "* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"d STARTTLS\r\n"),
            "d BAD invalid command\r\n"
        );
        let (_, creds) = expect_login(s.feed(b"l LOGIN bob pw\r\n").pop().unwrap());
        assert_eq!(creds.login, "bob");
    }

    #[test]
    fn starttls_discards_plaintext_sent_after_it() {
        let mut s = session(StartTlsMode::On, false);
        let events =
            s.feed(b"i ID (\"name\" \"evil\")\r\ns STARTTLS\r\nx LOGIN evil pw\r\ny LOGIN {3}\r\n");
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[0], ImapEvent::Reply(r) if r == b"* ID NIL\r\ni OK ID completed\r\ns OK Begin TLS negotiation now\r\n")
        );
        assert!(matches!(events[1], ImapEvent::StartTls));
        assert!(s.feed(b"z LOGIN evil2 pw\r\n").is_empty());
        s.tls_established();
        assert_eq!(s.buffered_len(), 0);
        assert_eq!(s.client_id(), &ClientId::default());
        assert_eq!(
            feed_replies(&mut s, b"n NOOP\r\n"),
            "n OK NOOP completed\r\n"
        );
    }

    #[test]
    fn starttls_discards_a_partial_command_after_it() {
        let mut s = session(StartTlsMode::On, false);
        let events = s.feed(b"s STARTTLS\r\nx LOG");
        assert!(matches!(events.last(), Some(ImapEvent::StartTls)));
        s.tls_established();
        assert_eq!(
            feed_replies(&mut s, b"IN a b\r\n"),
            "IN BAD invalid command\r\n"
        );
    }

    #[test]
    fn starttls_is_bad_when_off_or_already_tls() {
        let mut off = session(StartTlsMode::Off, false);
        assert_eq!(
            feed_replies(&mut off, b"s STARTTLS\r\n"),
            "s BAD invalid command\r\n"
        );
        let mut tls = session(StartTlsMode::Only, true);
        assert_eq!(
            feed_replies(&mut tls, b"s STARTTLS\r\n"),
            "s BAD invalid command\r\n"
        );
    }

    #[test]
    fn too_many_errors_close_the_connection() {
        let mut s = with_limits(Limits {
            max_errors: 3,
            ..Limits::default()
        });
        let (text, last) = replies_then(s.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nq NOOP\r\n"));
        assert_eq!(
            text,
            "GET BAD invalid command\r\nHost: BAD invalid command\r\n* BAD invalid command\r\n* BYE Too many invalid commands\r\n"
        );
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn valid_commands_do_not_count_as_errors() {
        let mut s = with_limits(Limits {
            max_errors: 2,
            ..Limits::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"a FOO\r\nb NOOP\r\nc CAPABILITY\r\nd ID NIL\r\n"),
            "a BAD invalid command\r\nb OK NOOP completed\r\n* CAPABILITY IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n* ID NIL\r\nd OK ID completed\r\n"
        );
        let (_, last) = replies_then(s.feed(b"e FOO\r\n"));
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn unsupported_mechanisms_count_as_errors() {
        let mut s = with_limits(Limits {
            max_errors: 3,
            ..Limits::default()
        });
        let (text, last) = replies_then(
            s.feed(b"x AUTHENTICATE FOO\r\nx AUTHENTICATE FOO\r\nx AUTHENTICATE FOO\r\nx NOOP\r\n"),
        );
        assert_eq!(
            text,
            "x NO mechanism not supported\r\nx NO mechanism not supported\r\nx NO mechanism not supported\r\n* BYE Too many invalid commands\r\n"
        );
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn cancelled_authentications_count_as_errors() {
        let mut s = with_limits(Limits {
            max_errors: 2,
            ..Limits::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"a AUTHENTICATE PLAIN\r\n*\r\n"),
            "+ \r\na BAD AUTHENTICATE aborted\r\n"
        );
        let (text, last) = replies_then(s.feed(b"b AUTHENTICATE LOGIN\r\n*\r\n"));
        assert_eq!(
            text,
            "+ VXNlcm5hbWU6\r\nb BAD AUTHENTICATE aborted\r\n* BYE Too many invalid commands\r\n"
        );
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn refused_cleartext_logins_count_as_errors() {
        let mut s = ImapPreLogin::new(ImapConfig {
            starttls: StartTls::with_certificate(StartTlsMode::Only),
            limits: Limits {
                max_errors: 3,
                ..Limits::default()
            },
            ..ImapConfig::default()
        });
        let (text, last) =
            replies_then(s.feed(b"a LOGIN bob pw\r\nb AUTHENTICATE PLAIN\r\nc LOGIN bob {2}\r\n"));
        assert_eq!(
            text,
            "a NO cleartext logins disabled\r\nb NO cleartext logins disabled\r\nc NO cleartext logins disabled\r\n* BYE Too many invalid commands\r\n"
        );
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn starttls_only_never_invites_a_login_literal() {
        let mut s = session(StartTlsMode::Only, false);
        assert_eq!(
            feed_replies(&mut s, b"a LOGIN bob {8}\r\n"),
            "a NO cleartext logins disabled\r\n"
        );
        assert_eq!(s.buffered_len(), 0);
        assert_eq!(
            feed_replies(&mut s, b"b NOOP\r\nc login {3}\r\n"),
            "b OK NOOP completed\r\nc NO cleartext logins disabled\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"d AUTHENTICATE PLAIN {12}\r\n"),
            "d NO cleartext logins disabled\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"e ID (\"name\" {4}\r\n"),
            "+ OK\r\n",
            "other commands' literals are still welcome"
        );
        assert_eq!(
            feed_replies(&mut s, b"mutt)\r\n"),
            "* ID NIL\r\ne OK ID completed\r\n"
        );
    }

    #[test]
    fn starttls_only_closes_on_a_non_synchronising_login_literal() {
        let mut s = session(StartTlsMode::Only, false);
        let (text, last) = replies_then(s.feed(b"a LOGIN bob {8+}\r\npassword\r\nb NOOP\r\n"));
        assert_eq!(text, "a NO cleartext logins disabled\r\n");
        assert!(matches!(last, ImapEvent::Close));
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn login_literals_are_invited_once_tls_is_up_or_when_cleartext_is_allowed() {
        let mut s = session(StartTlsMode::Only, false);
        assert!(matches!(
            s.feed(b"s STARTTLS\r\n").last(),
            Some(ImapEvent::StartTls)
        ));
        s.tls_established();
        assert_eq!(feed_replies(&mut s, b"a LOGIN bob {2}\r\n"), "+ OK\r\n");
        assert_eq!(
            expect_login(s.feed(b"pw\r\n").pop().unwrap()).1.login,
            "bob"
        );
        for mut s in [
            session(StartTlsMode::Only, true),
            session(StartTlsMode::On, false),
        ] {
            assert_eq!(feed_replies(&mut s, b"a LOGIN bob {2}\r\n"), "+ OK\r\n");
        }
    }

    #[test]
    fn too_long_command_closes() {
        let mut s = with_limits(Limits {
            max_line_len: 64,
            ..Limits::default()
        });
        let mut input = b"a LOGIN ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        let (text, last) = replies_then(s.feed(&input));
        assert_eq!(text, "* BAD client sent too long command\r\n");
        assert!(matches!(last, ImapEvent::Close));
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn too_long_sasl_response_closes() {
        let mut s = with_limits(Limits {
            max_line_len: 64,
            ..Limits::default()
        });
        assert_eq!(feed_replies(&mut s, b"a AUTHENTICATE PLAIN\r\n"), "+ \r\n");
        let (text, last) = replies_then(s.feed(&[b'A'; 100]));
        assert_eq!(text, "* BAD client sent too long command\r\n");
        assert!(matches!(last, ImapEvent::Close));
    }

    #[test]
    fn four_gib_synchronising_literal_is_refused_and_the_session_goes_on() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"a LOGIN {4294967296}\r\nb NOOP\r\n"),
            "a BAD literal too large\r\nb OK NOOP completed\r\n"
        );
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn oversized_non_synchronising_literal_closes() {
        let mut s = plain();
        let (text, last) = replies_then(s.feed(b"a LOGIN bob {4294967296+}\r\nxxxx"));
        assert_eq!(text, "a BAD literal too large\r\n");
        assert!(matches!(last, ImapEvent::Close));
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn client_reply_helpers() {
        assert_eq!(
            tagged_response("a1", ImapStatus::Ok, b"[CAPABILITY IMAP4rev1] Logged in\r"),
            b"a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
        );
        assert_eq!(
            login_failed_response("a1", LoginMechanism::Login),
            b"a1 NO LOGIN failed\r\n"
        );
        assert_eq!(
            login_failed_response("a1", LoginMechanism::AuthenticatePlain),
            b"a1 NO AUTHENTICATE failed\r\n"
        );
        assert_eq!(
            bye_response("Login rejected for this user\r\n"),
            b"* BYE Login rejected for this user\r\n"
        );
    }
}
