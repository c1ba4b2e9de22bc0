//! IMAP: the client-facing pre-login session and the upstream login helpers.

pub mod parser;
pub mod session;
pub mod upstream;

pub use session::{
    ClientId, ImapConfig, ImapEvent, ImapLogin, ImapPreLogin, bye_response, login_failed_response,
    tagged_response,
};

/// Status of a tagged IMAP response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapStatus {
    Ok,
    No,
    Bad,
}

impl ImapStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ImapStatus::Ok => "OK",
            ImapStatus::No => "NO",
            ImapStatus::Bad => "BAD",
        }
    }
}
