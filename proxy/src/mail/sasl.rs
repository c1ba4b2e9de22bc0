//! The SASL PLAIN and LOGIN exchanges, shared by IMAP `AUTHENTICATE` and POP3 `AUTH`.
//!
//! Only the client side of the exchange lives here (decoding what the client sends and which
//! challenge comes next); each protocol wraps the challenges in its own continuation syntax.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use super::{Password, wipe};

/// Base64 as clients actually send it: standard alphabet, padding optional, since some clients
/// strip the `=` and refusing them would gain nothing.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `Username:`, the first AUTH LOGIN challenge.
pub const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
/// `Password:`, the second AUTH LOGIN challenge.
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// A SASL mechanism the proxy implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// Parses a mechanism name case-insensitively, as RFC 4422 requires.
    pub fn parse(name: &[u8]) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// Where an exchange stands while the proxy waits for the client's next line.
#[derive(Debug)]
pub(crate) enum Exchange {
    Plain,
    LoginUsername,
    LoginPassword { username: Vec<u8> },
}

impl Exchange {
    /// The base64 challenge text to send in the continuation for this state.
    pub(crate) fn challenge(&self) -> &'static str {
        match self {
            Exchange::Plain => "",
            Exchange::LoginUsername => LOGIN_USERNAME_CHALLENGE,
            Exchange::LoginPassword { .. } => LOGIN_PASSWORD_CHALLENGE,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Exchange::LoginPassword { username } = self {
            wipe(username);
        }
    }
}

/// Raw identities and secret out of a finished exchange, still to be validated.
pub(crate) struct Outcome {
    pub(crate) authzid: Option<Vec<u8>>,
    pub(crate) login: Vec<u8>,
    pub(crate) password: Vec<u8>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field(
                "authzid",
                &self.authzid.as_deref().map(String::from_utf8_lossy),
            )
            .field("login", &String::from_utf8_lossy(&self.login))
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The result of feeding an exchange one client message.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send `exchange.challenge()` as a continuation and wait for another line.
    Continue(Exchange),
    Done(Outcome),
    /// The client answered `*`.
    Cancelled,
    /// Not base64, or not what the mechanism expects.
    Malformed,
}

/// Starts an exchange. `initial` is the initial response (SASL-IR / RFC 5034) with `=` standing
/// for an empty one.
pub(crate) fn start(mechanism: Mechanism, initial: Option<&[u8]>) -> Step {
    let exchange = match mechanism {
        Mechanism::Plain => Exchange::Plain,
        Mechanism::Login => Exchange::LoginUsername,
    };
    match initial {
        None => Step::Continue(exchange),
        Some(b"=") => respond(exchange, b""),
        Some(response) => respond(exchange, response),
    }
}

/// Feeds the client's line (without CRLF) to an exchange.
pub(crate) fn respond(exchange: Exchange, line: &[u8]) -> Step {
    if line == b"*" {
        return Step::Cancelled;
    }
    let Some(decoded) = decode_base64(line) else {
        return Step::Malformed;
    };
    match exchange {
        Exchange::Plain => decode_plain(decoded).map_or(Step::Malformed, Step::Done),
        Exchange::LoginUsername => Step::Continue(Exchange::LoginPassword { username: decoded }),
        Exchange::LoginPassword { ref username } => Step::Done(Outcome {
            authzid: None,
            login: username.clone(),
            password: decoded,
        }),
    }
}

/// Decodes base64, tolerating surrounding spaces some clients add.
pub fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    LENIENT.decode(text.trim_ascii()).ok()
}

/// Splits a decoded PLAIN message, `authzid NUL authcid NUL passwd` (RFC 4616); an empty
/// authzid means "the same as authcid".
fn decode_plain(mut message: Vec<u8>) -> Option<Outcome> {
    let outcome = {
        let mut fields = message.split(|&b| b == 0);
        let authzid = fields.next()?;
        let login = fields.next()?;
        let password = fields.next()?;
        if fields.next().is_some() || login.is_empty() {
            None
        } else {
            Some(Outcome {
                authzid: (!authzid.is_empty()).then(|| authzid.to_vec()),
                login: login.to_vec(),
                password: password.to_vec(),
            })
        }
    };
    wipe(&mut message);
    outcome
}

/// Base64 of a PLAIN message, for logging in upstream with `AUTHENTICATE PLAIN`/`AUTH PLAIN`:
/// as secret as the password it encodes, so it is one.
pub fn encode_plain(authzid: Option<&str>, login: &str, password: &[u8]) -> Password {
    let mut message =
        Vec::with_capacity(login.len() + password.len() + 2 + authzid.map_or(0, str::len));
    message.extend_from_slice(authzid.unwrap_or("").as_bytes());
    message.push(0);
    message.extend_from_slice(login.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    // Encoded into a buffer of exactly the right size, so that no grown copy is left unwiped.
    let length = base64::encoded_len(message.len(), true).expect("a login is far below usize");
    let mut encoded = vec![0; length];
    base64::engine::general_purpose::STANDARD
        .encode_slice(&message, &mut encoded)
        .expect("the buffer has the encoded length");
    wipe(&mut message);
    Password::new(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes()
    }

    fn done(step: Step) -> Outcome {
        match step {
            Step::Done(outcome) => outcome,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    #[test]
    fn mechanism_names_are_case_insensitive() {
        assert_eq!(Mechanism::parse(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse(b"Login"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse(b"CRAM-MD5"), None);
        assert_eq!(Mechanism::Plain.name(), "PLAIN");
    }

    #[test]
    fn plain_with_initial_response() {
        let outcome = done(start(Mechanism::Plain, Some(&b64(b"\0bob\0secret"))));
        assert_eq!(outcome.authzid, None);
        assert_eq!(outcome.login, b"bob");
        assert_eq!(outcome.password, b"secret");
    }

    #[test]
    fn plain_with_authzid_and_empty_password() {
        let outcome = done(start(Mechanism::Plain, Some(&b64(b"admin\0bob\0"))));
        assert_eq!(outcome.authzid.as_deref(), Some(&b"admin"[..]));
        assert_eq!(outcome.login, b"bob");
        assert_eq!(outcome.password, b"");
    }

    #[test]
    fn plain_without_initial_response_asks_with_an_empty_challenge() {
        let Step::Continue(exchange) = start(Mechanism::Plain, None) else {
            panic!("expected a continuation");
        };
        assert_eq!(exchange.challenge(), "");
        let outcome = done(respond(exchange, &b64(b"\0bob\0pw")));
        assert_eq!(outcome.login, b"bob");
        assert_eq!(outcome.password, b"pw");
    }

    #[test]
    fn plain_accepts_missing_padding_and_surrounding_spaces() {
        let encoded = b64(b"\0bob\0pw");
        let unpadded: Vec<u8> = encoded.iter().copied().filter(|&b| b != b'=').collect();
        assert_ne!(unpadded, encoded);
        assert_eq!(done(respond(Exchange::Plain, &unpadded)).login, b"bob");
        let mut spaced = b" ".to_vec();
        spaced.extend_from_slice(&encoded);
        spaced.push(b' ');
        assert_eq!(done(respond(Exchange::Plain, &spaced)).login, b"bob");
    }

    #[test]
    fn plain_rejects_malformed_messages() {
        for message in [&b"bob\0secret"[..], b"\0\0pw", b"a\0b\0c\0d", b"", b"nonul"] {
            assert!(
                matches!(respond(Exchange::Plain, &b64(message)), Step::Malformed),
                "{message:?}"
            );
        }
        assert!(matches!(
            respond(Exchange::Plain, b"!!notbase64"),
            Step::Malformed
        ));
        assert!(matches!(
            start(Mechanism::Plain, Some(b"=")),
            Step::Malformed
        ));
    }

    #[test]
    fn star_cancels_at_any_step() {
        assert!(matches!(respond(Exchange::Plain, b"*"), Step::Cancelled));
        assert!(matches!(
            respond(Exchange::LoginUsername, b"*"),
            Step::Cancelled
        ));
        let exchange = Exchange::LoginPassword {
            username: b"bob".to_vec(),
        };
        assert!(matches!(respond(exchange, b"*"), Step::Cancelled));
    }

    #[test]
    fn login_asks_username_then_password() {
        let Step::Continue(exchange) = start(Mechanism::Login, None) else {
            panic!("expected a continuation");
        };
        assert_eq!(exchange.challenge(), LOGIN_USERNAME_CHALLENGE);
        let Step::Continue(exchange) = respond(exchange, &b64(b"bob")) else {
            panic!("expected a continuation");
        };
        assert_eq!(exchange.challenge(), LOGIN_PASSWORD_CHALLENGE);
        let outcome = done(respond(exchange, &b64(b"pw")));
        assert_eq!(outcome.authzid, None);
        assert_eq!(outcome.login, b"bob");
        assert_eq!(outcome.password, b"pw");
    }

    #[test]
    fn login_with_initial_response_skips_the_username_challenge() {
        let Step::Continue(exchange) = start(Mechanism::Login, Some(&b64(b"bob"))) else {
            panic!("expected a continuation");
        };
        assert_eq!(exchange.challenge(), LOGIN_PASSWORD_CHALLENGE);
    }

    #[test]
    fn challenges_decode_to_the_prompts() {
        assert_eq!(
            decode_base64(LOGIN_USERNAME_CHALLENGE.as_bytes()).unwrap(),
            b"Username:"
        );
        assert_eq!(
            decode_base64(LOGIN_PASSWORD_CHALLENGE.as_bytes()).unwrap(),
            b"Password:"
        );
    }

    #[test]
    fn encode_plain_round_trips() {
        let encoded = encode_plain(Some("admin"), "bob", b"p\xe4ss");
        let outcome = done(respond(Exchange::Plain, encoded.expose()));
        assert_eq!(outcome.authzid.as_deref(), Some(&b"admin"[..]));
        assert_eq!(outcome.login, b"bob");
        assert_eq!(outcome.password, b"p\xe4ss");
        assert_eq!(encode_plain(None, "bob", b"pw").expose(), b"AGJvYgBwdw==");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let step = respond(Exchange::Plain, &b64(b"\0bob\0hunter2"));
        let debug = format!("{step:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("bob"), "{debug}");
    }
}
