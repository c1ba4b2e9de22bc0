//! The POP3 pre-login state machine (RFC 1939 AUTHORIZATION state with RFC 2449 CAPA, RFC 2595
//! STLS and RFC 5034 AUTH), as nginx's mail module and Zimbra's proxy answer it.
//!
//! The driver sends [`Pop3PreLogin::greeting`], passes every byte read from the client to
//! [`Pop3PreLogin::feed`] and carries out the returned events in order, exactly as for IMAP.

use crate::mail::line::{LineRead, LineReader};
use crate::mail::sasl::{self, Exchange, Mechanism, Step};
use crate::mail::{
    Credentials, Limits, LoginMechanism, PreLoginEvent, PreLoginMachine, SaslMechanisms, StartTls,
    wipe,
};

/// Zimbra's answer to a login before TLS under `starttls: only`.
const CLEARTEXT_REFUSED: &[u8] = b"-ERR cleartext logins disabled\r\n";

/// Listener settings for [`Pop3PreLogin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pop3Config {
    pub starttls: StartTls,
    /// The connection is already encrypted (implicit TLS, port 995).
    pub tls_active: bool,
    /// CAPA lines to list. `USER`, `SASL`, `STLS` and `IMPLEMENTATION` are derived from the TLS
    /// state, `mechanisms` and `implementation`, so any given here are ignored.
    pub capabilities: Vec<String>,
    /// Text of the `IMPLEMENTATION` CAPA line, if one is wanted.
    pub implementation: Option<String>,
    pub mechanisms: SaslMechanisms,
    pub limits: Limits,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            starttls: StartTls::default(),
            tls_active: false,
            capabilities: ["TOP", "UIDL"].map(String::from).to_vec(),
            implementation: Some("mailproxy".to_string()),
            mechanisms: SaslMechanisms::default(),
            limits: Limits::default(),
        }
    }
}

/// What the POP3 driver must do, in order; a login carries the credentials alone.
pub type Pop3Event = PreLoginEvent<Credentials>;

enum State {
    Command,
    UserGiven {
        login: Vec<u8>,
    },
    Authenticate {
        mechanism: Mechanism,
        exchange: Exchange,
    },
    AwaitingTls,
    LoggedIn,
    Closed,
}

/// One client connection before login.
pub struct Pop3PreLogin {
    config: Pop3Config,
    tls_active: bool,
    line: LineReader,
    state: State,
    errors: u32,
    pending: Vec<u8>,
}

impl PreLoginMachine for Pop3PreLogin {
    type Login = Credentials;

    fn credentials(login: &Credentials) -> &Credentials {
        login
    }

    fn greeting(&self) -> Vec<u8> {
        b"+OK POP3 ready\r\n".to_vec()
    }

    /// Processes client bytes, split anywhere, and returns what to do. Pipelined commands
    /// (RFC 2449 PIPELINING) are handled in order until one ends the pre-login phase.
    fn feed(&mut self, mut input: &[u8]) -> Vec<Pop3Event> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let used = match self.state {
                State::Command | State::UserGiven { .. } | State::Authenticate { .. } => {
                    let (used, read) = self.line.push(input);
                    match read {
                        LineRead::Incomplete => {}
                        LineRead::Line(mut line) => {
                            self.on_line(&line, &mut out);
                            wipe(&mut line);
                        }
                        LineRead::TooLong => {
                            reply(&mut out, b"-ERR line too long\r\n");
                            self.close(&mut out);
                        }
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

    /// Called by the driver once the TLS handshake after STLS succeeded. Whatever was said in
    /// plaintext is forgotten so that commands a man in the middle appended after STLS never
    /// run inside TLS (CVE-2011-0411).
    fn tls_established(&mut self) {
        self.tls_active = true;
        self.line.clear();
        if let State::AwaitingTls = self.state {
            self.state = State::Command;
        }
    }

    fn take_pending_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Bytes held for an unfinished line; bounded by the line limit.
    fn buffered_len(&self) -> usize {
        self.line.buffered_len()
    }
}

impl Pop3PreLogin {
    pub fn new(config: Pop3Config) -> Self {
        Pop3PreLogin {
            tls_active: config.tls_active,
            line: LineReader::new(config.limits.max_line_len),
            state: State::Command,
            errors: 0,
            pending: Vec::new(),
            config,
        }
    }

    fn cleartext_login_allowed(&self) -> bool {
        self.config.starttls.allows_cleartext_login(self.tls_active)
    }

    fn enabled_mechanisms(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.config.mechanisms.plain {
            names.push(Mechanism::Plain.name());
        }
        if self.config.mechanisms.login {
            names.push(Mechanism::Login.name());
        }
        names
    }

    fn capa(&self) -> Vec<u8> {
        let derived = |cap: &str| {
            let keyword = cap.split(' ').next().unwrap_or("").to_ascii_uppercase();
            matches!(
                keyword.as_str(),
                "USER" | "SASL" | "STLS" | "IMPLEMENTATION"
            )
        };
        let mut lines: Vec<String> = self
            .config
            .capabilities
            .iter()
            .filter(|cap| !cap.is_empty() && !cap.chars().any(char::is_control))
            .filter(|cap| !derived(cap))
            .cloned()
            .collect();
        if self.cleartext_login_allowed() {
            lines.push("USER".to_string());
            let mechanisms = self.enabled_mechanisms();
            if !mechanisms.is_empty() {
                lines.push(format!("SASL {}", mechanisms.join(" ")));
            }
        }
        if self.config.starttls.offers_starttls(self.tls_active) {
            lines.push("STLS".to_string());
        }
        if let Some(implementation) = &self.config.implementation
            && !implementation.chars().any(char::is_control)
        {
            lines.push(format!("IMPLEMENTATION {implementation}"));
        }
        let mut text = String::from("+OK Capability list follows\r\n");
        for line in lines {
            text.push_str(&line);
            text.push_str("\r\n");
        }
        text.push_str(".\r\n");
        text.into_bytes()
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<Pop3Event>) {
        let state = std::mem::replace(&mut self.state, State::Command);
        match state {
            State::Authenticate {
                mechanism,
                exchange,
            } => {
                let step = sasl::respond(exchange, line);
                self.sasl_step(mechanism, step, out);
            }
            State::UserGiven { login } => self.command(line, Some(login), out),
            _ => self.command(line, None, out),
        }
    }

    /// Handles a command line; `user` is the login from an earlier USER, if any. States other
    /// than `UserGiven` are set by the handlers, so commands that do not keep the USER forget it.
    fn command(&mut self, line: &[u8], user: Option<Vec<u8>>, out: &mut Vec<Pop3Event>) {
        let (keyword, argument) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (&line[..space], Some(&line[space + 1..])),
            None => (line, None),
        };
        let keyword = keyword.to_ascii_uppercase();
        match (keyword.as_slice(), argument) {
            (b"CAPA", None) => {
                reply(out, &self.capa());
                self.keep_user(user);
            }
            (b"NOOP", None) => {
                reply(out, b"+OK\r\n");
                self.keep_user(user);
            }
            (b"QUIT", None) => {
                reply(out, b"+OK POP3 proxy server signing off\r\n");
                self.close(out);
            }
            (b"STLS", None) if self.config.starttls.offers_starttls(self.tls_active) => {
                reply(out, b"+OK Begin TLS negotiation\r\n");
                out.push(Pop3Event::StartTls);
                self.line.clear();
                self.state = State::AwaitingTls;
            }
            (b"USER", Some(name)) => self.user(name, out),
            (b"PASS", Some(password)) => match user {
                Some(login) => self.logged_in(
                    login,
                    password.to_vec(),
                    None,
                    LoginMechanism::UserPass,
                    out,
                ),
                None => self.bad(out),
            },
            (b"AUTH", argument) => self.auth(argument, out),
            _ => {
                self.keep_user(user);
                self.bad(out);
            }
        }
    }

    fn keep_user(&mut self, user: Option<Vec<u8>>) {
        if let Some(login) = user {
            self.state = State::UserGiven { login };
        }
    }

    fn user(&mut self, name: &[u8], out: &mut Vec<Pop3Event>) {
        if !self.cleartext_login_allowed() {
            return self.refuse(CLEARTEXT_REFUSED, out);
        }
        let name = name.trim_ascii();
        if name.is_empty() || name.contains(&b' ') {
            return self.bad(out);
        }
        reply(out, b"+OK\r\n");
        self.state = State::UserGiven {
            login: name.to_vec(),
        };
    }

    fn auth(&mut self, argument: Option<&[u8]>, out: &mut Vec<Pop3Event>) {
        if !self.cleartext_login_allowed() {
            return self.refuse(CLEARTEXT_REFUSED, out);
        }
        let mut words = argument
            .unwrap_or(b"")
            .split(|&b| b == b' ')
            .filter(|word| !word.is_empty());
        let Some(mechanism) = words.next() else {
            let mut text = b"+OK methods supported:\r\n".to_vec();
            for name in self.enabled_mechanisms() {
                text.extend_from_slice(name.as_bytes());
                text.extend_from_slice(b"\r\n");
            }
            text.extend_from_slice(b".\r\n");
            return reply(out, &text);
        };
        let initial = words.next();
        if words.next().is_some() {
            return self.bad(out);
        }
        let enabled = |mechanism: &Mechanism| match mechanism {
            Mechanism::Plain => self.config.mechanisms.plain,
            Mechanism::Login => self.config.mechanisms.login,
        };
        let Some(mechanism) = Mechanism::parse(mechanism).filter(enabled) else {
            return self.refuse(b"-ERR mechanism not supported\r\n", out);
        };
        let step = sasl::start(mechanism, initial);
        self.sasl_step(mechanism, step, out);
    }

    fn sasl_step(&mut self, mechanism: Mechanism, step: Step, out: &mut Vec<Pop3Event>) {
        match step {
            Step::Continue(exchange) => {
                reply(out, format!("+ {}\r\n", exchange.challenge()).as_bytes());
                self.state = State::Authenticate {
                    mechanism,
                    exchange,
                };
            }
            Step::Done(outcome) => {
                let login_mechanism = match mechanism {
                    Mechanism::Plain => LoginMechanism::AuthPlain,
                    Mechanism::Login => LoginMechanism::AuthLogin,
                };
                self.logged_in(
                    outcome.login,
                    outcome.password,
                    outcome.authzid,
                    login_mechanism,
                    out,
                );
            }
            Step::Cancelled => self.refuse(b"-ERR authentication cancelled\r\n", out),
            Step::Malformed => self.bad(out),
        }
    }

    fn logged_in(
        &mut self,
        login: Vec<u8>,
        password: Vec<u8>,
        authzid: Option<Vec<u8>>,
        mechanism: LoginMechanism,
        out: &mut Vec<Pop3Event>,
    ) {
        match Credentials::from_client(login, password, authzid, mechanism) {
            Some(credentials) => {
                out.push(Pop3Event::Login(credentials));
                self.state = State::LoggedIn;
            }
            None => self.bad(out),
        }
    }

    fn bad(&mut self, out: &mut Vec<Pop3Event>) {
        self.refuse(b"-ERR invalid command\r\n", out);
    }

    /// Answers a command that is invalid or refused, counting it: a client that keeps trying
    /// what is refused is as likely to be another protocol's (ALPACA) as one that sends garbage.
    /// At the error limit the answer says so instead and the connection closes, since one
    /// command gets one status line in POP3.
    fn refuse(&mut self, answer: &[u8], out: &mut Vec<Pop3Event>) {
        self.errors += 1;
        if self.errors >= self.config.limits.max_errors.max(1) {
            reply(out, b"-ERR too many invalid commands\r\n");
            self.close(out);
        } else {
            reply(out, answer);
        }
    }

    fn close(&mut self, out: &mut Vec<Pop3Event>) {
        out.push(Pop3Event::Close);
        self.line.clear();
        self.state = State::Closed;
    }
}

/// Appends to the previous reply when there is one, so a pipelined batch is answered with one
/// write.
fn reply(out: &mut Vec<Pop3Event>, bytes: &[u8]) {
    if let Some(Pop3Event::Reply(last)) = out.last_mut() {
        last.extend_from_slice(bytes);
    } else {
        out.push(Pop3Event::Reply(bytes.to_vec()));
    }
}

/// `+OK <text>\r\n`, e.g. to relay the upstream's answer to PASS. CR and LF are dropped so it
/// stays one line.
pub fn ok_response(text: &[u8]) -> Vec<u8> {
    status_line(b"+OK", text)
}

/// `-ERR <text>\r\n`, e.g. `Login rejected from this IP` when throttling.
pub fn err_response(text: &[u8]) -> Vec<u8> {
    status_line(b"-ERR", text)
}

/// The answer to a login the upstream refused.
pub fn login_failed_response() -> Vec<u8> {
    err_response(b"LOGIN failed")
}

fn status_line(status: &[u8], text: &[u8]) -> Vec<u8> {
    let mut line = status.to_vec();
    if !text.is_empty() {
        line.push(b' ');
        line.extend(text.iter().filter(|&&b| b != b'\r' && b != b'\n'));
    }
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

    fn session(starttls: StartTlsMode, tls_active: bool) -> Pop3PreLogin {
        Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(starttls),
            tls_active,
            ..Pop3Config::default()
        })
    }

    fn plain() -> Pop3PreLogin {
        session(StartTlsMode::Off, false)
    }

    fn replies_only(events: Vec<Pop3Event>) -> String {
        let mut text = String::new();
        for event in events {
            match event {
                Pop3Event::Reply(bytes) => text.push_str(&String::from_utf8(bytes).unwrap()),
                other => panic!("unexpected {other:?}"),
            }
        }
        text
    }

    fn feed_replies(session: &mut Pop3PreLogin, input: &[u8]) -> String {
        replies_only(session.feed(input))
    }

    fn replies_then(mut events: Vec<Pop3Event>) -> (String, Pop3Event) {
        let last = events.pop().expect("no events");
        (replies_only(events), last)
    }

    fn expect_login(event: Pop3Event) -> Credentials {
        match event {
            Pop3Event::Login(credentials) => credentials,
            other => panic!("expected Login, got {other:?}"),
        }
    }

    #[test]
    fn greeting() {
        assert_eq!(plain().greeting(), b"+OK POP3 ready\r\n");
    }

    #[test]
    fn capa_by_tls_state() {
        assert_eq!(
            feed_replies(&mut session(StartTlsMode::Off, false), b"CAPA\r\n"),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\nIMPLEMENTATION mailproxy\r\n.\r\n"
        );
        assert_eq!(
            feed_replies(&mut session(StartTlsMode::On, false), b"capa\r\n"),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\nIMPLEMENTATION mailproxy\r\n.\r\n"
        );
        assert_eq!(
            feed_replies(&mut session(StartTlsMode::Only, false), b"CAPA\r\n"),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\nIMPLEMENTATION mailproxy\r\n.\r\n"
        );
        assert_eq!(
            feed_replies(&mut session(StartTlsMode::Only, true), b"CAPA\r\n"),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\nIMPLEMENTATION mailproxy\r\n.\r\n"
        );
    }

    #[test]
    fn configured_capabilities_cannot_override_derived_ones() {
        let mut s = Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(StartTlsMode::Only),
            capabilities: [
                "PIPELINING",
                "user",
                "SASL PLAIN",
                "STLS",
                "EXPIRE 31",
                "BAD\r\nX",
                "",
                "IMPLEMENTATION x",
            ]
            .map(String::from)
            .to_vec(),
            implementation: None,
            mechanisms: SaslMechanisms {
                plain: false,
                login: false,
            },
            ..Pop3Config::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"CAPA\r\n"),
            "+OK Capability list follows\r\nPIPELINING\r\nEXPIRE 31\r\nSTLS\r\n.\r\n"
        );
        s.tls_established();
        assert_eq!(
            feed_replies(&mut s, b"CAPA\r\n"),
            "+OK Capability list follows\r\nPIPELINING\r\nEXPIRE 31\r\nUSER\r\n.\r\n"
        );
    }

    #[test]
    fn user_pass() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"USER bob@example.com/tb\r\n"),
            "+OK\r\n"
        );
        let events = s.feed(b"PASS pass word \r\n");
        assert_eq!(events.len(), 1);
        let creds = expect_login(events.into_iter().next().unwrap());
        assert_eq!(creds.login, "bob@example.com/tb");
        assert_eq!(creds.password.expose(), b"pass word ");
        assert_eq!(creds.authzid, None);
        assert_eq!(creds.mechanism, LoginMechanism::UserPass);
    }

    #[test]
    fn empty_password_is_passed_on() {
        let mut s = plain();
        let creds = expect_login(s.feed(b"USER bob\r\nPASS \r\n").pop().unwrap());
        assert_eq!(creds.password.expose(), b"");
    }

    #[test]
    fn user_and_pass_arguments_are_checked() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"PASS x\r\nUSER\r\nUSER a b\r\nUSER  \r\n"),
            "-ERR invalid command\r\n-ERR invalid command\r\n-ERR invalid command\r\n-ERR invalid command\r\n"
        );
    }

    #[test]
    fn capa_and_noop_keep_the_user_other_commands_do_not() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"user bob\r\nNOOP\r\n"),
            "+OK\r\n+OK\r\n"
        );
        let creds = expect_login(s.feed(b"CAPA\r\npass pw\r\n").pop().unwrap());
        assert_eq!(creds.login, "bob");
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"USER bob\r\nAUTH\r\nPASS pw\r\n"),
            "+OK\r\n+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n-ERR invalid command\r\n"
        );
    }

    #[test]
    fn user_again_replaces_the_login() {
        let mut s = plain();
        let creds = expect_login(s.feed(b"USER a\r\nUSER b\r\nPASS pw\r\n").pop().unwrap());
        assert_eq!(creds.login, "b");
    }

    #[test]
    fn an_invalid_command_keeps_the_user() {
        let mut s = plain();
        let (text, last) = replies_then(s.feed(b"USER bob\r\nRETR 1\r\nPASS pw\r\n"));
        assert_eq!(text, "+OK\r\n-ERR invalid command\r\n");
        assert_eq!(expect_login(last).login, "bob");
    }

    #[test]
    fn quit_closes() {
        let mut s = plain();
        let (text, last) = replies_then(s.feed(b"QUIT\r\nUSER x\r\n"));
        assert_eq!(text, "+OK POP3 proxy server signing off\r\n");
        assert!(matches!(last, Pop3Event::Close));
        assert!(s.feed(b"USER x\r\n").is_empty());
    }

    #[test]
    fn unknown_commands_and_arguments_where_none_belong_are_errors() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"STAT\r\nAPOP a b\r\nCAPA x\r\n"),
            "-ERR invalid command\r\n-ERR invalid command\r\n-ERR invalid command\r\n"
        );
    }

    #[test]
    fn auth_without_mechanism_lists_them() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"AUTH\r\n"),
            "+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        );
    }

    #[test]
    fn auth_plain_with_initial_response() {
        let mut s = plain();
        let events = s.feed(format!("AUTH PLAIN {}\r\n", b64(b"admin\0bob\0pw")).as_bytes());
        assert_eq!(events.len(), 1);
        let creds = expect_login(events.into_iter().next().unwrap());
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.authzid.as_deref(), Some("admin"));
        assert_eq!(creds.password.expose(), b"pw");
        assert_eq!(creds.mechanism, LoginMechanism::AuthPlain);
    }

    #[test]
    fn auth_plain_with_continuation() {
        let mut s = plain();
        assert_eq!(feed_replies(&mut s, b"auth plain\r\n"), "+ \r\n");
        let creds = expect_login(
            s.feed(format!("{}\r\n", b64(b"\0bob\0pw")).as_bytes())
                .pop()
                .unwrap(),
        );
        assert_eq!(creds.login, "bob");
    }

    #[test]
    fn auth_login() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"AUTH LOGIN\r\n"),
            "+ VXNlcm5hbWU6\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, format!("{}\r\n", b64(b"bob")).as_bytes()),
            "+ UGFzc3dvcmQ6\r\n"
        );
        let creds = expect_login(
            s.feed(format!("{}\r\n", b64(b"pw")).as_bytes())
                .pop()
                .unwrap(),
        );
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"pw");
        assert_eq!(creds.mechanism, LoginMechanism::AuthLogin);
    }

    #[test]
    fn auth_login_with_initial_username() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, format!("AUTH LOGIN {}\r\n", b64(b"bob")).as_bytes()),
            "+ UGFzc3dvcmQ6\r\n"
        );
    }

    #[test]
    fn auth_cancel_and_errors() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                b"AUTH PLAIN\r\n*\r\nAUTH CRAM-MD5\r\nAUTH PLAIN a b\r\n"
            ),
            "+ \r\n-ERR authentication cancelled\r\n-ERR mechanism not supported\r\n-ERR invalid command\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"AUTH PLAIN\r\n%%%\r\n"),
            "+ \r\n-ERR invalid command\r\n"
        );
    }

    #[test]
    fn auth_plain_cannot_smuggle_commands_upstream() {
        let mut s = plain();
        assert_eq!(
            feed_replies(
                &mut s,
                format!("AUTH PLAIN {}\r\n", b64(b"\0bob\0pw\r\nDELE 1")).as_bytes()
            ),
            "-ERR invalid command\r\n"
        );
    }

    #[test]
    fn stls_only_without_a_certificate_refuses_every_login_and_offers_no_stls() {
        let mut s = Pop3PreLogin::new(Pop3Config {
            starttls: StartTls {
                mode: StartTlsMode::Only,
                certificate: false,
            },
            ..Pop3Config::default()
        });
        assert_eq!(
            feed_replies(&mut s, b"CAPA\r\nUSER bob\r\nSTLS\r\n"),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nIMPLEMENTATION mailproxy\r\n.\r\n-ERR cleartext logins disabled\r\n-ERR invalid command\r\n"
        );
    }

    #[test]
    fn starttls_only_refuses_cleartext_logins() {
        let mut s = session(StartTlsMode::Only, false);
        assert_eq!(
            feed_replies(&mut s, b"USER bob\r\nPASS pw\r\nAUTH PLAIN\r\nAUTH\r\n"),
            "-ERR cleartext logins disabled\r\n-ERR invalid command\r\n-ERR cleartext logins disabled\r\n-ERR cleartext logins disabled\r\n"
        );
    }

    #[test]
    fn starttls_only_prompts_for_nothing_before_refusing() {
        let mut s = Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(StartTlsMode::Only),
            limits: Limits {
                max_errors: 10,
                ..Limits::default()
            },
            ..Pop3Config::default()
        });
        let input = format!(
            "AUTH LOGIN\r\n{}\r\nAUTH PLAIN\r\nAUTH PLAIN {}\r\nAUTH LOGIN {}\r\n",
            b64(b"bob"),
            b64(b"\0bob\0pw"),
            b64(b"bob")
        );
        assert_eq!(
            feed_replies(&mut s, input.as_bytes()),
            "-ERR cleartext logins disabled\r\n-ERR invalid command\r\n-ERR cleartext logins disabled\r\n-ERR cleartext logins disabled\r\n-ERR cleartext logins disabled\r\n"
        );
    }

    fn max_errors(starttls: StartTlsMode, max_errors: u32) -> Pop3PreLogin {
        Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(starttls),
            limits: Limits {
                max_errors,
                ..Limits::default()
            },
            ..Pop3Config::default()
        })
    }

    #[test]
    fn unsupported_mechanisms_count_as_errors() {
        let mut s = max_errors(StartTlsMode::Off, 3);
        let (text, last) = replies_then(s.feed(b"AUTH FOO\r\nAUTH FOO\r\nAUTH FOO\r\nNOOP\r\n"));
        assert_eq!(
            text,
            "-ERR mechanism not supported\r\n-ERR mechanism not supported\r\n-ERR too many invalid commands\r\n"
        );
        assert!(matches!(last, Pop3Event::Close));
    }

    #[test]
    fn cancelled_authentications_count_as_errors() {
        let mut s = max_errors(StartTlsMode::Off, 2);
        let (text, last) = replies_then(s.feed(b"AUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n*\r\n"));
        assert_eq!(
            text,
            "+ \r\n-ERR authentication cancelled\r\n+ VXNlcm5hbWU6\r\n-ERR too many invalid commands\r\n"
        );
        assert!(matches!(last, Pop3Event::Close));
    }

    #[test]
    fn refused_cleartext_logins_count_as_errors() {
        let mut s = max_errors(StartTlsMode::Only, 3);
        let (text, last) = replies_then(s.feed(b"USER bob\r\nAUTH PLAIN\r\nAUTH\r\nCAPA\r\n"));
        assert_eq!(
            text,
            "-ERR cleartext logins disabled\r\n-ERR cleartext logins disabled\r\n-ERR too many invalid commands\r\n"
        );
        assert!(matches!(last, Pop3Event::Close));
    }

    #[test]
    fn stls_then_login_inside_tls() {
        let mut s = session(StartTlsMode::Only, false);
        let events = s.feed(b"STLS\r\nUSER evil\r\nPASS x\r\n");
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(&events[0], Pop3Event::Reply(r) if r == b"+OK Begin TLS negotiation\r\n"));
        assert!(matches!(events[1], Pop3Event::StartTls));
        assert!(s.feed(b"PASS y\r\n").is_empty());
        s.tls_established();
        assert_eq!(
            feed_replies(&mut s, b"PASS z\r\n"),
            "-ERR invalid command\r\n"
        );
        assert_eq!(
            feed_replies(&mut s, b"STLS\r\n"),
            "-ERR invalid command\r\n"
        );
        let creds = expect_login(s.feed(b"USER bob\r\nPASS pw\r\n").pop().unwrap());
        assert_eq!(creds.login, "bob");
    }

    #[test]
    fn stls_discards_a_partial_line_after_it() {
        let mut s = session(StartTlsMode::On, false);
        let events = s.feed(b"STLS\r\nUSER ev");
        assert!(matches!(events.last(), Some(Pop3Event::StartTls)));
        s.tls_established();
        assert_eq!(s.buffered_len(), 0);
        assert_eq!(feed_replies(&mut s, b"il\r\n"), "-ERR invalid command\r\n");
    }

    #[test]
    fn stls_is_refused_when_off() {
        let mut s = plain();
        assert_eq!(
            feed_replies(&mut s, b"STLS\r\n"),
            "-ERR invalid command\r\n"
        );
    }

    #[test]
    fn pipelined_commands_up_to_login() {
        let mut s = plain();
        let (text, last) = replies_then(s.feed(b"CAPA\r\nUSER bob\r\nPASS pw\r\nSTAT\r\nLIST\r\n"));
        assert!(text.starts_with("+OK Capability list follows\r\n"));
        assert!(text.ends_with(".\r\n+OK\r\n"));
        assert_eq!(expect_login(last).login, "bob");
        assert_eq!(s.take_pending_input(), b"STAT\r\nLIST\r\n");
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut s = plain();
        let mut text = String::new();
        let mut login = None;
        for &b in b"NOOP\r\nUSER bob\nPASS p w\r\n" {
            for event in s.feed(&[b]) {
                match event {
                    Pop3Event::Reply(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
                    Pop3Event::Login(credentials) => login = Some(credentials),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(text, "+OK\r\n+OK\r\n");
        let creds = login.expect("no login");
        assert_eq!(creds.login, "bob");
        assert_eq!(creds.password.expose(), b"p w");
    }

    #[test]
    fn too_many_errors_close() {
        let mut s = Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(StartTlsMode::Off),
            limits: Limits {
                max_errors: 3,
                ..Limits::default()
            },
            ..Pop3Config::default()
        });
        let (text, last) = replies_then(s.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNOOP\r\n"));
        assert_eq!(
            text,
            "-ERR invalid command\r\n-ERR invalid command\r\n-ERR too many invalid commands\r\n"
        );
        assert!(matches!(last, Pop3Event::Close));
    }

    #[test]
    fn too_long_line_closes() {
        let mut s = Pop3PreLogin::new(Pop3Config {
            starttls: StartTls::with_certificate(StartTlsMode::Off),
            limits: Limits {
                max_line_len: 32,
                ..Limits::default()
            },
            ..Pop3Config::default()
        });
        let (text, last) = replies_then(s.feed(&[b'A'; 40]));
        assert_eq!(text, "-ERR line too long\r\n");
        assert!(matches!(last, Pop3Event::Close));
        assert_eq!(s.buffered_len(), 0);
    }

    #[test]
    fn client_reply_helpers() {
        assert_eq!(ok_response(b"Logged in.\r"), b"+OK Logged in.\r\n");
        assert_eq!(ok_response(b""), b"+OK\r\n");
        assert_eq!(
            err_response(b"Login rejected from this IP"),
            b"-ERR Login rejected from this IP\r\n"
        );
        assert_eq!(login_failed_response(), b"-ERR LOGIN failed\r\n");
    }
}
