//! Pre-login mail protocol state machines.
//!
//! Everything here is sans-IO: a session driver owns the sockets, feeds the bytes it reads into
//! [`imap::ImapPreLogin`] or [`pop3::Pop3PreLogin`] and acts on the events they return. Keeping
//! sockets and timers out of the protocol logic is what lets it be tested byte for byte and
//! fuzzed, and keeps every buffer it holds bounded by its configured limits.
//!
//! The module also holds what IMAP and POP3 share: the STARTTLS policy, the credentials a
//! session hands to the driver, the login suffix convention and the limits.

pub mod imap;
pub mod line;
pub mod pop3;
pub mod sasl;

use std::fmt;

/// STARTTLS policy of a plaintext listener (nginx `starttls off|on|only`): the route table's
/// setting, so that the state machines take exactly what the operator wrote.
pub use mailproxy_crds::settings::StartTlsMode;

/// The STARTTLS policy of one session: the route table's mode, and whether this proxy has a
/// certificate to honour it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartTls {
    pub mode: StartTlsMode,
    pub certificate: bool,
}

impl StartTls {
    /// A proxy with a certificate, doing what `mode` says.
    pub fn with_certificate(mode: StartTlsMode) -> Self {
        Self {
            mode,
            certificate: true,
        }
    }

    /// Whether STARTTLS/STLS is advertised and accepted: never without a certificate.
    pub(crate) fn offers_starttls(self, tls_active: bool) -> bool {
        self.certificate && self.mode != StartTlsMode::Off && !tls_active
    }

    /// Whether LOGIN, USER/PASS and AUTHENTICATE are accepted; `only` refuses them until TLS is
    /// up, which keeps passwords off the wire without trusting the client. It does so without a
    /// certificate too: a route table switched to `only` on such a proxy fails closed (nobody
    /// logs in) rather than open (passwords in cleartext).
    pub(crate) fn allows_cleartext_login(self, tls_active: bool) -> bool {
        tls_active || self.mode != StartTlsMode::Only
    }
}

impl Default for StartTls {
    fn default() -> Self {
        Self::with_certificate(StartTlsMode::default())
    }
}

/// How the client presented its credentials; the driver may log it and picks the upstream
/// login method from it (e.g. an authzid only survives through SASL PLAIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginMechanism {
    /// IMAP `LOGIN user pass`.
    Login,
    /// IMAP `AUTHENTICATE PLAIN`.
    AuthenticatePlain,
    /// IMAP `AUTHENTICATE LOGIN`.
    AuthenticateLogin,
    /// POP3 `USER` + `PASS`.
    UserPass,
    /// POP3 `AUTH PLAIN`.
    AuthPlain,
    /// POP3 `AUTH LOGIN`.
    AuthLogin,
}

/// SASL mechanisms a listener accepts from clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaslMechanisms {
    pub plain: bool,
    pub login: bool,
}

impl Default for SaslMechanisms {
    fn default() -> Self {
        SaslMechanisms {
            plain: true,
            login: true,
        }
    }
}

/// Bounds on what one client may make a pre-login session buffer.
///
/// Together they cap the memory of a session at `max_line_len + max_literal_len` bytes no matter
/// what the client announces, which is what makes a `{4294967296}` literal harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line, CRLF and IMAP literal announcements included but literal payloads
    /// excluded. A longer line closes the connection (nginx "client sent too long command").
    pub max_line_len: usize,
    /// Most literal payload bytes one IMAP command may carry, all its literals together.
    pub max_literal_len: usize,
    /// Invalid commands after which the connection is closed (nginx `max_errors`, a defence
    /// against cross-protocol attacks such as ALPACA). 0 behaves like 1.
    pub max_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_len: 8192,
            max_literal_len: 8192,
            max_errors: 5,
        }
    }
}

/// A password, kept as bytes because clients may send any 8-bit encoding and the upstream must
/// receive exactly what the client typed.
///
/// Its `Debug` never shows the bytes and they are overwritten on drop, so a stray `{:?}` in a
/// log line or a reused allocation does not leak them.
#[derive(Clone)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Self {
        Password(bytes)
    }

    /// The raw bytes, for building the upstream login and nothing else.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Best-effort overwrite of secret bytes; `black_box` keeps the optimiser from dropping the
/// stores as dead writes to memory about to be freed.
pub(crate) fn wipe(bytes: &mut Vec<u8>) {
    bytes.fill(0);
    std::hint::black_box(&bytes);
    bytes.clear();
}

/// What a pre-login state machine asks its driver to do, in order. `L` is what a login carries:
/// the credentials, and for IMAP the command's tag as well.
#[derive(Debug)]
pub enum PreLoginEvent<L> {
    /// Send these bytes to the client.
    Reply(Vec<u8>),
    /// Start the TLS handshake now (the protocol's OK has been queued just before), then call
    /// [`PreLoginMachine::tls_established`]. Input received until then is discarded.
    StartTls,
    /// The client logged in; route it and log in upstream. The answer to the client is the
    /// driver's to send.
    Login(L),
    /// Close the connection once the preceding replies are sent.
    Close,
}

/// A pre-login state machine (IMAP, POP3) as its driver, and its fuzz target, see it.
pub trait PreLoginMachine {
    /// What a [`PreLoginEvent::Login`] carries.
    type Login;

    /// The login's credentials.
    fn credentials(login: &Self::Login) -> &Credentials;

    /// What the client is sent on connecting.
    fn greeting(&self) -> Vec<u8>;

    /// Processes client bytes, split anywhere, and returns what to do. Pipelined commands are
    /// handled in order until one ends the pre-login phase.
    fn feed(&mut self, input: &[u8]) -> Vec<PreLoginEvent<Self::Login>>;

    /// Called by the driver once the TLS handshake after STARTTLS/STLS succeeded. Whatever was
    /// said in plaintext is forgotten, so that commands a man in the middle appended after
    /// STARTTLS never run inside TLS (CVE-2011-0411).
    fn tls_established(&mut self);

    /// Bytes the client sent after its login command (pipelined commands), to be forwarded
    /// upstream once the login is done.
    fn take_pending_input(&mut self) -> Vec<u8>;

    /// Bytes held for unfinished commands; bounded by the limits.
    fn buffered_len(&self) -> usize;
}

/// What a client logged in with, handed to the driver in a `Login` event.
///
/// `login` is exactly what the client sent, suffix included; see [`split_login_suffix`] for the
/// name to route by.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub login: String,
    pub password: Password,
    /// SASL PLAIN authorization identity, when the client asked to act as another user.
    pub authzid: Option<String>,
    pub mechanism: LoginMechanism,
}

impl Credentials {
    /// Validates what a client sent. Returns `None` for a login or authzid that is empty, not
    /// UTF-8 or holds control characters, and for a password holding NUL, CR or LF: such values
    /// would break the lookup request headers and cache keys, or inject commands into the
    /// upstream session (a SASL PLAIN blob can smuggle `\r\n` into a POP3 `PASS` line).
    pub(crate) fn from_client(
        login: Vec<u8>,
        password: Vec<u8>,
        authzid: Option<Vec<u8>>,
        mechanism: LoginMechanism,
    ) -> Option<Credentials> {
        let password = Password::new(password);
        if password
            .expose()
            .iter()
            .any(|&b| matches!(b, 0 | b'\r' | b'\n'))
        {
            return None;
        }
        let login = identity(login)?;
        let authzid = match authzid {
            Some(bytes) if !bytes.is_empty() => Some(identity(bytes)?),
            _ => None,
        };
        // `user\0user\0pass` (some clients always fill in the authzid) asks for nothing more
        // than `\0user\0pass`. Kept, it would go upstream next to the login as rewritten by the
        // route (`user@domain`, a suffix put back) and read as a request to act as another user.
        let authzid = authzid.filter(|authzid| !authzid.eq_ignore_ascii_case(&login));
        Some(Credentials {
            login,
            password,
            authzid,
            mechanism,
        })
    }
}

fn identity(bytes: Vec<u8>) -> Option<String> {
    if bytes.is_empty() || bytes.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// A login command for the upstream server, in pieces: after each piece but the last the
/// driver must read the server's `+` continuation before sending the next one (synchronising
/// literals, or a SASL exchange without initial response). Pieces carry the password, so
/// `Debug` shows only their lengths and they are overwritten on drop.
pub struct UpstreamCommand {
    pieces: Vec<Vec<u8>>,
}

impl UpstreamCommand {
    pub(crate) fn new(pieces: Vec<Vec<u8>>) -> Self {
        UpstreamCommand { pieces }
    }

    pub fn pieces(&self) -> &[Vec<u8>] {
        &self.pieces
    }
}

impl fmt::Debug for UpstreamCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamCommand")
            .field(
                "piece_lengths",
                &self.pieces.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drop for UpstreamCommand {
    fn drop(&mut self) {
        self.pieces.iter_mut().for_each(wipe);
    }
}

/// Client-type suffixes Zimbra accepts on a login name (`user@example.com/tb`). They select
/// server-side behaviour, so routing uses the bare name while the upstream gets the suffix back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginSuffix {
    /// `/tb`: Thunderbird.
    Tb,
    /// `/wm`: web mail.
    Wm,
    /// `/ni`: no IMAP idle.
    Ni,
}

impl LoginSuffix {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginSuffix::Tb => "/tb",
            LoginSuffix::Wm => "/wm",
            LoginSuffix::Ni => "/ni",
        }
    }
}

impl fmt::Display for LoginSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits `user@example.com/tb` into the name to route by and the suffix to re-append
/// upstream. Matching is case-sensitive, as in Zimbra; a login that is nothing but a suffix is
/// left whole, since an empty name cannot be routed.
pub fn split_login_suffix(login: &str) -> (&str, Option<LoginSuffix>) {
    for suffix in [LoginSuffix::Tb, LoginSuffix::Wm, LoginSuffix::Ni] {
        if let Some(name) = login.strip_suffix(suffix.as_str())
            && !name.is_empty()
        {
            return (name, Some(suffix));
        }
    }
    (login, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_split_off_for_routing() {
        assert_eq!(
            split_login_suffix("user@example.com/tb"),
            ("user@example.com", Some(LoginSuffix::Tb))
        );
        assert_eq!(
            split_login_suffix("user/wm"),
            ("user", Some(LoginSuffix::Wm))
        );
        assert_eq!(
            split_login_suffix("user@example.com/ni"),
            ("user@example.com", Some(LoginSuffix::Ni))
        );
    }

    #[test]
    fn logins_without_a_known_suffix_are_unchanged() {
        assert_eq!(
            split_login_suffix("user@example.com"),
            ("user@example.com", None)
        );
        assert_eq!(split_login_suffix("user/xx"), ("user/xx", None));
        assert_eq!(split_login_suffix("user/TB"), ("user/TB", None));
        assert_eq!(split_login_suffix("/tb"), ("/tb", None));
    }

    #[test]
    fn suffix_round_trips_to_the_original_login() {
        let (name, suffix) = split_login_suffix("a@b.c/tb");
        assert_eq!(format!("{name}{}", suffix.unwrap()), "a@b.c/tb");
    }

    #[test]
    fn credentials_debug_never_shows_the_password() {
        let creds = Credentials::from_client(
            b"user".to_vec(),
            b"hunter2-secret".to_vec(),
            Some(b"admin".to_vec()),
            LoginMechanism::Login,
        )
        .unwrap();
        let debug = format!("{creds:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(debug.contains("user"), "{debug}");
        assert!(debug.contains("admin"), "{debug}");
        assert_eq!(format!("{:#?}", creds.password), "<redacted>");
    }

    #[test]
    fn credentials_reject_values_that_could_inject_commands() {
        let mech = LoginMechanism::UserPass;
        assert!(
            Credentials::from_client(b"u".to_vec(), b"p\r\nDELE 1".to_vec(), None, mech).is_none()
        );
        assert!(Credentials::from_client(b"u".to_vec(), b"p\0".to_vec(), None, mech).is_none());
        assert!(Credentials::from_client(b"u\n".to_vec(), b"p".to_vec(), None, mech).is_none());
        assert!(Credentials::from_client(b"".to_vec(), b"p".to_vec(), None, mech).is_none());
        assert!(Credentials::from_client(b"\xff".to_vec(), b"p".to_vec(), None, mech).is_none());
        assert!(
            Credentials::from_client(b"u".to_vec(), b"p".to_vec(), Some(b"a\tb".to_vec()), mech)
                .is_none()
        );
    }

    #[test]
    fn credentials_keep_8bit_passwords_and_drop_empty_authzid() {
        let creds = Credentials::from_client(
            "usér".as_bytes().to_vec(),
            b"p\xe4ss word".to_vec(),
            Some(Vec::new()),
            LoginMechanism::AuthPlain,
        )
        .unwrap();
        assert_eq!(creds.login, "usér");
        assert_eq!(creds.password.expose(), b"p\xe4ss word");
        assert_eq!(creds.authzid, None);
        assert_eq!(creds.mechanism, LoginMechanism::AuthPlain);
    }

    #[test]
    fn an_authzid_naming_the_login_itself_is_dropped() {
        let with = |authzid: &[u8]| {
            Credentials::from_client(
                b"Bob".to_vec(),
                b"pw".to_vec(),
                Some(authzid.to_vec()),
                LoginMechanism::AuthPlain,
            )
            .unwrap()
            .authzid
        };
        assert_eq!(with(b"Bob"), None);
        assert_eq!(with(b"bob"), None);
        assert_eq!(with(b"admin").as_deref(), Some("admin"));
    }

    #[test]
    fn upstream_command_debug_shows_only_lengths() {
        let command =
            UpstreamCommand::new(vec![b"a LOGIN {3}\r\n".to_vec(), b"pw secret\r\n".to_vec()]);
        assert_eq!(
            format!("{command:?}"),
            "UpstreamCommand { piece_lengths: [13, 11] }"
        );
    }

    #[test]
    fn wipe_leaves_the_buffer_empty() {
        let mut secret = b"secret".to_vec();
        wipe(&mut secret);
        assert!(secret.is_empty());
    }

    #[test]
    fn starttls_policy() {
        let with = StartTls::with_certificate;
        assert!(!with(StartTlsMode::Off).offers_starttls(false));
        assert!(with(StartTlsMode::On).offers_starttls(false));
        assert!(with(StartTlsMode::Only).offers_starttls(false));
        assert!(!with(StartTlsMode::Only).offers_starttls(true));
        assert!(with(StartTlsMode::Off).allows_cleartext_login(false));
        assert!(with(StartTlsMode::On).allows_cleartext_login(false));
        assert!(!with(StartTlsMode::Only).allows_cleartext_login(false));
        assert!(with(StartTlsMode::Only).allows_cleartext_login(true));
    }

    #[test]
    fn without_a_certificate_starttls_is_never_offered_and_only_fails_closed() {
        let without = |mode| StartTls {
            mode,
            certificate: false,
        };
        for mode in [StartTlsMode::Off, StartTlsMode::On, StartTlsMode::Only] {
            assert!(!without(mode).offers_starttls(false), "{mode:?}");
        }
        assert!(without(StartTlsMode::On).allows_cleartext_login(false));
        assert!(!without(StartTlsMode::Only).allows_cleartext_login(false));
    }
}
