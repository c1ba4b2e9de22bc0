//! IMAP: the pre-login conversation, the upstream login and the answers to the client.

use mailproxy_crds::mailbox_server::OriginForwarding;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::upstream::{UpstreamConnection, UpstreamError};
use super::{
    Dialect, LoginFailure, Outcome, PreLogin, SessionContext, Settings, UpstreamAccepted,
    UpstreamLogin, answer_until_login,
};
use crate::mail::imap::upstream::{
    ImapResponse, ServerCapabilities, UntaggedLines, authenticate_plain_command, id_command,
    login_command, parse_response,
};
use crate::mail::imap::{
    ClientId, ImapConfig, ImapLogin, ImapPreLogin, ImapStatus, bye_response, login_failed_response,
    tagged_response,
};
use crate::mail::{Limits, LoginMechanism, PreLoginMachine, wipe};

/// The proxy's own tags on the upstream connection; the client's tag goes on the answer.
const CAPABILITY_TAG: &str = "P0";
const ID_TAG: &str = "P1";
const LOGIN_TAG: &str = "P2";

/// Greets the client and answers it until it logs in. `Err` ends the session.
pub(super) async fn pre_login(
    client: super::Stream,
    settings: &Settings,
    deadline: Instant,
    tls: Option<&TlsAcceptor>,
) -> Result<PreLogin, Outcome> {
    let mut machine = ImapPreLogin::new(ImapConfig {
        starttls: settings.starttls,
        tls_active: client.is_tls(),
        limits: Limits {
            max_errors: settings.max_errors,
            ..Limits::default()
        },
        ..ImapConfig::default()
    });
    let goodbye = bye_response("Autologout; no login in time");
    let (client, ImapLogin { tag, credentials }) =
        answer_until_login(&mut machine, client, &goodbye, deadline, tls).await?;
    let mechanism = credentials.mechanism;
    Ok(PreLogin {
        client,
        credentials,
        pending: machine.take_pending_input(),
        dialect: Dialect::Imap {
            tag,
            mechanism,
            client_id: machine.client_id().clone(),
        },
    })
}

/// Logs in to the mailbox server: greeting, capabilities, ID with the client's address
/// pipelined with LOGIN (literals) or AUTHENTICATE PLAIN. Returns the text of the server's
/// tagged OK, and the untagged lines it sent with it for the client.
pub(super) async fn log_in_upstream(
    context: &SessionContext,
    upstream: &mut UpstreamConnection,
    request: &UpstreamLogin<'_>,
    client_id: &ClientId,
) -> Result<UpstreamAccepted, LoginFailure> {
    let greeting = upstream.line().await?;
    let ready = match parse_response(&greeting, LOGIN_TAG) {
        ImapResponse::Untagged(text) => starts_with_ignore_case(text, b"OK"),
        _ => false,
    };
    if !ready {
        return Err(UpstreamError::Protocol("the IMAP greeting is not * OK").into());
    }
    let capabilities = match ServerCapabilities::from_line(&greeting) {
        Some(capabilities) => capabilities,
        None => ask_capabilities(upstream).await?,
    };
    let id = (request.target.mail.origin == OriginForwarding::Id).then(|| {
        id_command(
            ID_TAG,
            request.connection.client_ip(),
            client_id,
            &context.via,
        )
    });
    let credentials = request.credentials;
    let sasl = credentials.authzid.is_some() || capabilities.login_disabled;
    let command = if sasl {
        if !capabilities.auth_plain {
            return Err(UpstreamError::Protocol(
                "the IMAP server offers neither LOGIN nor AUTHENTICATE PLAIN",
            )
            .into());
        }
        authenticate_plain_command(
            LOGIN_TAG,
            credentials.authzid.as_deref(),
            request.login,
            &credentials.password,
            capabilities.sasl_ir,
        )
    } else {
        login_command(
            LOGIN_TAG,
            request.login,
            &credentials.password,
            capabilities.literal_plus,
        )
        .ok_or(UpstreamError::Protocol("the login cannot be sent to IMAP"))?
    };
    let mut untagged = UntaggedLines::default();
    let pieces = command.pieces();
    for (index, piece) in pieces.iter().enumerate() {
        match (index, &id) {
            // ID is pipelined with the start of the login: one round trip less per login, and
            // the server still takes the client's address from ID before it runs the login.
            (0, Some(id)) => {
                // One write for both: a loopback or LAN send costs more than the copy, which
                // holds the password and is wiped like the pieces are.
                let mut first = [id.as_slice(), piece].concat();
                let sent = upstream.send(&first).await;
                wipe(&mut first);
                sent?;
                // A server that does not support ID says BAD: the login goes on regardless.
                tagged(upstream, ID_TAG).await?;
            }
            _ => upstream.send(piece).await?,
        }
        let last = index + 1 == pieces.len();
        loop {
            let line = upstream.line().await?;
            match parse_response(&line, LOGIN_TAG) {
                ImapResponse::Untagged(_) => untagged.push(&line),
                ImapResponse::Continuation(_) if !last => break,
                ImapResponse::Tagged {
                    status: ImapStatus::Ok,
                    text,
                } if last => {
                    return Ok(UpstreamAccepted {
                        preamble: untagged.into_bytes(),
                        text: text.to_vec(),
                    });
                }
                ImapResponse::Tagged {
                    status: ImapStatus::No | ImapStatus::Bad,
                    text,
                } => return Err(LoginFailure::Refused(text.to_vec())),
                ImapResponse::Continuation(_)
                | ImapResponse::Tagged { .. }
                | ImapResponse::Other => {
                    return Err(UpstreamError::Protocol("unexpected answer to the login").into());
                }
            }
        }
    }
    Err(UpstreamError::Protocol("the login command was empty").into())
}

/// For servers whose greeting carries no capabilities (Zimbra's own).
async fn ask_capabilities(
    upstream: &mut UpstreamConnection,
) -> Result<ServerCapabilities, UpstreamError> {
    upstream
        .send(format!("{CAPABILITY_TAG} CAPABILITY\r\n").as_bytes())
        .await?;
    let mut capabilities = ServerCapabilities::default();
    loop {
        let line = upstream.line().await?;
        match parse_response(&line, CAPABILITY_TAG) {
            ImapResponse::Untagged(_) => {
                if let Some(listed) = ServerCapabilities::from_line(&line) {
                    capabilities = listed;
                }
            }
            ImapResponse::Tagged { .. } => return Ok(capabilities),
            ImapResponse::Continuation(_) | ImapResponse::Other => {
                return Err(UpstreamError::Protocol("unexpected answer to CAPABILITY"));
            }
        }
    }
}

/// Reads up to the tagged answer of `tag`, whatever its status.
async fn tagged(upstream: &mut UpstreamConnection, tag: &str) -> Result<(), UpstreamError> {
    loop {
        let line = upstream.line().await?;
        match parse_response(&line, tag) {
            ImapResponse::Untagged(_) => {}
            ImapResponse::Tagged { .. } => return Ok(()),
            ImapResponse::Continuation(_) | ImapResponse::Other => {
                return Err(UpstreamError::Protocol("unexpected answer to ID"));
            }
        }
    }
}

fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

pub(super) fn user_rejected(tag: &str, mechanism: LoginMechanism) -> Vec<u8> {
    let mut answer = bye_response("Login rejected for this user");
    answer.extend_from_slice(&login_failed_response(tag, mechanism));
    answer
}

pub(super) fn refused(tag: &str, message: &str) -> Vec<u8> {
    tagged_response(tag, ImapStatus::No, message.as_bytes())
}

pub(super) fn unavailable(tag: &str) -> Vec<u8> {
    tagged_response(
        tag,
        ImapStatus::No,
        b"[UNAVAILABLE] Service temporarily unavailable, try again later",
    )
}

pub(super) fn login_failed(
    tag: &str,
    mechanism: LoginMechanism,
    backend_text: Option<&[u8]>,
) -> Vec<u8> {
    match backend_text {
        Some(text) => tagged_response(tag, ImapStatus::No, text),
        None => login_failed_response(tag, mechanism),
    }
}

pub(super) fn logged_in(tag: &str, accepted: UpstreamAccepted) -> Vec<u8> {
    let mut answer = accepted.preamble;
    answer.extend_from_slice(&tagged_response(tag, ImapStatus::Ok, &accepted.text));
    answer
}
