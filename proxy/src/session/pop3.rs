//! POP3: the pre-login conversation, the upstream login and the answers to the client.

use mailproxy_crds::mailbox_server::OriginForwarding;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::upstream::{UpstreamConnection, UpstreamError};
use super::{
    Dialect, LoginFailure, Outcome, PreLogin, Settings, UpstreamLogin, answer_until_login,
};
use crate::mail::pop3::upstream::{
    Pop3Reply, auth_plain_command, parse_reply, pass_command, user_command, xoip_command,
};
use crate::mail::pop3::{
    Pop3Config, Pop3PreLogin, err_response, login_failed_response, ok_response,
};
use crate::mail::{Limits, PreLoginMachine};

/// Greets the client and answers it until it logs in. `Err` ends the session.
pub(super) async fn pre_login(
    client: super::Stream,
    settings: &Settings,
    deadline: Instant,
    tls: Option<&TlsAcceptor>,
) -> Result<PreLogin, Outcome> {
    let mut machine = Pop3PreLogin::new(Pop3Config {
        starttls: settings.starttls,
        tls_active: client.is_tls(),
        limits: Limits {
            max_errors: settings.max_errors,
            ..Limits::default()
        },
        ..Pop3Config::default()
    });
    let goodbye = err_response(b"no login in time, closing");
    let (client, credentials) =
        answer_until_login(&mut machine, client, &goodbye, deadline, tls).await?;
    Ok(PreLogin {
        client,
        credentials,
        pending: machine.take_pending_input(),
        dialect: Dialect::Pop3,
    })
}

/// Logs in to the mailbox server: greeting, XOIP with the client's address, then USER/PASS, or
/// AUTH PLAIN when an authorization identity has to travel. Returns the text of the final +OK.
pub(super) async fn log_in_upstream(
    upstream: &mut UpstreamConnection,
    request: &UpstreamLogin<'_>,
) -> Result<Vec<u8>, LoginFailure> {
    let greeting = upstream.line().await?;
    if !matches!(parse_reply(&greeting), Pop3Reply::Ok(_)) {
        return Err(UpstreamError::Protocol("the POP3 greeting is not +OK").into());
    }
    if request.target.mail.origin == OriginForwarding::Id {
        upstream
            .send(&xoip_command(request.connection.client_ip()))
            .await?;
        // A server without XOIP says -ERR: the login goes on regardless.
        if matches!(parse_reply(&upstream.line().await?), Pop3Reply::Other) {
            return Err(UpstreamError::Protocol("unexpected answer to XOIP").into());
        }
    }
    let credentials = request.credentials;
    if let Some(authzid) = credentials.authzid.as_deref() {
        let command = auth_plain_command(Some(authzid), request.login, &credentials.password, true);
        let mut answer = Vec::new();
        for piece in command.pieces() {
            upstream.send(piece).await?;
            answer = upstream.line().await?;
            if !matches!(parse_reply(&answer), Pop3Reply::Continuation(_)) {
                break;
            }
        }
        return final_reply(&answer);
    }
    let user = user_command(request.login)
        .ok_or(UpstreamError::Protocol("the login cannot be sent to POP3"))?;
    upstream.send(&user).await?;
    match parse_reply(&upstream.line().await?) {
        Pop3Reply::Ok(_) => {}
        Pop3Reply::Err(text) => return Err(LoginFailure::Refused(text.to_vec())),
        Pop3Reply::Continuation(_) | Pop3Reply::Other => {
            return Err(UpstreamError::Protocol("unexpected answer to USER").into());
        }
    }
    let pass = pass_command(&credentials.password).ok_or(UpstreamError::Protocol(
        "the password cannot be sent to POP3",
    ))?;
    for piece in pass.pieces() {
        upstream.send(piece).await?;
    }
    final_reply(&upstream.line().await?)
}

fn final_reply(line: &[u8]) -> Result<Vec<u8>, LoginFailure> {
    match parse_reply(line) {
        Pop3Reply::Ok(text) => Ok(text.to_vec()),
        Pop3Reply::Err(text) => Err(LoginFailure::Refused(text.to_vec())),
        Pop3Reply::Continuation(_) | Pop3Reply::Other => {
            Err(UpstreamError::Protocol("unexpected answer to the login").into())
        }
    }
}

pub(super) fn user_rejected() -> Vec<u8> {
    err_response(b"Login rejected for this user")
}

pub(super) fn refused(message: &str) -> Vec<u8> {
    err_response(message.as_bytes())
}

pub(super) fn unavailable() -> Vec<u8> {
    err_response(b"[SYS/TEMP] Service temporarily unavailable, try again later")
}

pub(super) fn login_failed(backend_text: Option<&[u8]>) -> Vec<u8> {
    match backend_text {
        Some(text) => err_response(text),
        None => login_failed_response(),
    }
}

pub(super) fn logged_in(backend_text: &[u8]) -> Vec<u8> {
    ok_response(backend_text)
}
