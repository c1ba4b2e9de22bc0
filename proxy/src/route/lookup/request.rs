//! The lookup request for one login.
//!
//! Only where an account lives is asked, so the request never carries the password: Zimbra's
//! proxy sends a fixed placeholder in `Auth-Pass`, and so does this one.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::Empty;

use super::client::HandlerUrl;
use super::{AuthMethod, escape_auth_user};
use crate::route::LoginContext;

/// What `Auth-Pass` carries: the handler routes, the mailbox server checks the password.
pub const PASSWORD_PLACEHOLDER: &str = "_password_";

/// The optional shared secret a `mailproxy lookupd` can require.
pub const SECRET_HEADER: &str = "x-mailproxy-lookup-secret";

/// A login that cannot be written as request headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the {header} header cannot carry {value:?}")]
    InvalidHeader { header: &'static str, value: String },
}

/// Builds the `GET` for one handler. `secret` is already a header value so that a bad secret is
/// refused once, when the client is configured, not on every login.
pub fn build_request(
    handler: &HandlerUrl,
    login: &LoginContext,
    method: AuthMethod,
    secret: Option<&HeaderValue>,
) -> Result<Request<Empty<Bytes>>, RequestError> {
    let mut request = Request::new(Empty::new());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = handler.uri().clone();
    let headers = request.headers_mut();
    let mut put = |name: &'static str, value: &str| -> Result<(), RequestError> {
        let value = HeaderValue::from_str(value).map_err(|_| RequestError::InvalidHeader {
            header: name,
            value: value.chars().take(64).collect(),
        })?;
        headers.insert(HeaderName::from_static(name), value);
        Ok(())
    };
    put("host", handler.host_header())?;
    put("auth-method", method.as_str())?;
    put("auth-user", &escape_auth_user(&login.user))?;
    put("auth-pass", PASSWORD_PLACEHOLDER)?;
    put("auth-protocol", login.protocol.as_str())?;
    put("auth-login-attempt", &login.attempt.to_string())?;
    put("client-ip", &login.client_ip.to_string())?;
    if let Some(proxy_ip) = login.proxy_ip {
        put("x-proxy-ip", &proxy_ip.to_string())?;
    }
    if let Some(host) = &login.virtual_host {
        put("x-proxy-host", host)?;
    }
    if let Some(secret) = secret {
        headers.insert(HeaderName::from_static(SECRET_HEADER), secret.clone());
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::route::Protocol;

    fn login(user: &str) -> LoginContext {
        LoginContext {
            user: user.to_string(),
            protocol: Protocol::ImapSsl,
            client_ip: "203.0.113.7".parse::<IpAddr>().unwrap(),
            proxy_ip: Some("10.1.2.3".parse().unwrap()),
            virtual_host: None,
            attempt: 2,
        }
    }

    fn header<'a>(request: &'a Request<Empty<Bytes>>, name: &str) -> Option<&'a str> {
        request.headers().get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn mail_login_request_has_zimbra_headers_and_no_password() {
        let handler: HandlerUrl = "http://mbs1:7072/service/extension/nginx-lookup"
            .parse()
            .unwrap();
        let request =
            build_request(&handler, &login("a b%@x.org"), AuthMethod::Username, None).unwrap();
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/service/extension/nginx-lookup");
        assert_eq!(header(&request, "host"), Some("mbs1:7072"));
        assert_eq!(header(&request, "auth-method"), Some("username"));
        assert_eq!(header(&request, "auth-user"), Some("a%20b%25@x.org"));
        assert_eq!(header(&request, "auth-pass"), Some("_password_"));
        assert_eq!(header(&request, "auth-protocol"), Some("imapssl"));
        assert_eq!(header(&request, "auth-login-attempt"), Some("2"));
        assert_eq!(header(&request, "client-ip"), Some("203.0.113.7"));
        assert_eq!(header(&request, "x-proxy-ip"), Some("10.1.2.3"));
        assert_eq!(header(&request, "x-proxy-host"), None);
        assert_eq!(header(&request, SECRET_HEADER), None);
    }

    #[test]
    fn web_token_request_carries_virtual_host_and_secret() {
        let handler: HandlerUrl = "https://[2001:db8::5]:7072/lookup".parse().unwrap();
        let mut web = login("6a3c1c1e-0000-4000-8000-000000000001");
        web.protocol = Protocol::Http;
        web.proxy_ip = None;
        web.virtual_host = Some("mail.example.com".to_string());
        web.attempt = 0;
        let secret = HeaderValue::from_static("s3cret");
        let request = build_request(&handler, &web, AuthMethod::ZimbraId, Some(&secret)).unwrap();
        assert_eq!(header(&request, "host"), Some("[2001:db8::5]:7072"));
        assert_eq!(header(&request, "auth-method"), Some("zimbraId"));
        assert_eq!(header(&request, "auth-protocol"), Some("http"));
        assert_eq!(header(&request, "auth-login-attempt"), Some("0"));
        assert_eq!(header(&request, "x-proxy-host"), Some("mail.example.com"));
        assert_eq!(header(&request, "x-proxy-ip"), None);
        assert_eq!(header(&request, SECRET_HEADER), Some("s3cret"));
    }

    #[test]
    fn unsendable_virtual_host_is_an_error_not_a_panic() {
        let handler: HandlerUrl = "http://h:1/".parse().unwrap();
        let mut web = login("u");
        web.virtual_host = Some("evil\r\nAuth-Status: OK".to_string());
        let error = build_request(&handler, &web, AuthMethod::Username, None).unwrap_err();
        assert_eq!(
            error,
            RequestError::InvalidHeader {
                header: "x-proxy-host",
                value: "evil\r\nAuth-Status: OK".to_string()
            }
        );
    }
}
