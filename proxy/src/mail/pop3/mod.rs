//! POP3: the client-facing pre-login session and the upstream login helpers.

pub mod session;
pub mod upstream;

pub use session::{
    Pop3Config, Pop3Event, Pop3PreLogin, err_response, login_failed_response, ok_response,
};
