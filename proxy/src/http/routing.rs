//! Which mailbox server a web request belongs to, from its head alone (pure code, no I/O).
//!
//! Zimbra's web proxy order (see docs/routing.md, "HTTP"):
//!
//! 1. REST paths `/home/~user/...`, `/home/user/...`, `/service/home/~user/...`,
//!    `/service/home/user/...` (`/home/~/...` is the token's account: rule 4);
//! 2. `/Microsoft-Server-ActiveSync` and `/ews/Exchange.asmx`: the Basic-auth user, else the
//!    `User=` query argument; `dom\user` becomes `user@dom`;
//! 3. CalDAV `/dav/<user>/...` and `/principals/users/<user>/...`;
//! 4. the `ZM_AUTH_TOKEN` cookie (`ZM_ADMIN_AUTH_TOKEN` for the admin console) or the
//!    `zauthtoken` query argument: the token's account id;
//! 5. `Authorization: Bearer <JWT>` or the `zjwt` query argument: the JWT's `sub`;
//! 6. otherwise, the balancer (client-IP affinity over the table's web backends).
//!
//! A rule whose credential or name is unusable (not UTF-8, control characters, a token that does
//! not parse) does not match, and the next rule is tried. Only user names and account ids leave
//! this module: passwords and tokens never do.

use base64::Engine;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, Uri};
use percent_encoding::percent_decode_str;

use super::token::{auth_token_account_id, jwt_subject};

/// Longest user name taken from a request.
const MAX_USER_LEN: usize = 320;

/// Which rule named the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UserSource {
    /// `/home/user/...`, `/service/home/~user/...`.
    Rest,
    /// `/Microsoft-Server-ActiveSync`.
    ActiveSync,
    /// `/ews/Exchange.asmx`.
    Ews,
    /// `/dav/<user>/`, `/principals/users/<user>/`.
    CalDav,
}

/// Which credential carried the account id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenSource {
    /// `ZM_AUTH_TOKEN` cookie or `zauthtoken` query argument.
    AuthToken,
    /// `ZM_ADMIN_AUTH_TOKEN` cookie.
    AdminAuthToken,
    /// A JWT's `sub` (`Authorization: Bearer`, `zjwt`).
    Jwt,
}

/// Where a request goes, before any lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebRoute {
    /// Route by account name (`Auth-Method: username`).
    User { name: String, kind: UserSource },
    /// Route by account id (`Auth-Method: zimbraId`).
    AccountId { id: String, kind: TokenSource },
    /// No account: any web backend, with client-IP affinity.
    Balanced,
}

impl WebRoute {
    /// The `route` label of the metrics and the access log.
    pub fn label(&self) -> &'static str {
        match self {
            WebRoute::User { kind, .. } => match kind {
                UserSource::Rest => "rest",
                UserSource::ActiveSync => "activesync",
                UserSource::Ews => "ews",
                UserSource::CalDav => "caldav",
            },
            WebRoute::AccountId { kind, .. } => match kind {
                TokenSource::AuthToken => "auth_token",
                TokenSource::AdminAuthToken => "admin_auth_token",
                TokenSource::Jwt => "jwt",
            },
            WebRoute::Balanced => "balanced",
        }
    }
}

/// The route of a request head.
pub fn detect(uri: &Uri, headers: &HeaderMap) -> WebRoute {
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    if let Some(name) = rest_user(path) {
        return user(name, UserSource::Rest);
    }
    if let Some(kind) = exchange_kind(path)
        && let Some(name) = basic_user(headers).or_else(|| query_arg(query, "User", true))
        && let Some(name) = qualify_windows_name(&name)
    {
        return user(name, kind);
    }
    if let Some(name) = caldav_user(path) {
        return user(name, UserSource::CalDav);
    }
    if let Some(route) = auth_token(headers, query) {
        return route;
    }
    let jwt = bearer(headers).or_else(|| query_arg(query, "zjwt", false));
    if let Some(id) = jwt.as_deref().and_then(jwt_subject) {
        return WebRoute::AccountId {
            id,
            kind: TokenSource::Jwt,
        };
    }
    WebRoute::Balanced
}

fn user(name: String, kind: UserSource) -> WebRoute {
    WebRoute::User { name, kind }
}

/// `/home/~user/...`, `/home/user/...` and the same under `/service`.
fn rest_user(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/service/home/")
        .or_else(|| path.strip_prefix("/home/"))?;
    let segment = rest.split('/').next().unwrap_or("");
    let segment = segment.strip_prefix('~').unwrap_or(segment);
    decode_user(segment)
}

/// `/dav/<user>/...`, `/principals/users/<user>/...` (also under `/service`).
fn caldav_user(path: &str) -> Option<String> {
    let path = path.strip_prefix("/service").unwrap_or(path);
    let rest = path
        .strip_prefix("/dav/")
        .or_else(|| path.strip_prefix("/principals/users/"))?;
    decode_user(rest.split('/').next().unwrap_or(""))
}

fn exchange_kind(path: &str) -> Option<UserSource> {
    let matches = |prefix: &str| {
        path.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
    };
    if matches("/Microsoft-Server-ActiveSync") {
        Some(UserSource::ActiveSync)
    } else if matches("/ews/Exchange.asmx") {
        Some(UserSource::Ews)
    } else {
        None
    }
}

/// A percent-decoded path segment or query value that can name an account.
fn decode_user(raw: &str) -> Option<String> {
    let name = percent_decode_str(raw).decode_utf8().ok()?;
    usable_name(&name).then(|| name.into_owned())
}

fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name != "~"
        && name.len() <= MAX_USER_LEN
        && !name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '/')
}

/// `dom\user` → `user@dom`; other names unchanged.
fn qualify_windows_name(name: &str) -> Option<String> {
    let name = match name.split_once('\\') {
        Some((domain, user)) if !domain.is_empty() && !user.is_empty() => {
            format!("{user}@{domain}")
        }
        Some(_) => return None,
        None => name.to_string(),
    };
    usable_name(&name).then_some(name)
}

/// The user of `Authorization: Basic` (the password is dropped here).
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&decoded[..colon]).ok()?;
    usable_name(name).then(|| name.to_string())
}

/// The token of `Authorization: Bearer`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The first value of a query argument, percent-decoded (`+` is a space, as forms write it).
fn query_arg(query: &str, name: &str, ignore_case: bool) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let found = if ignore_case {
            key.eq_ignore_ascii_case(name)
        } else {
            key == name
        };
        if !found {
            return None;
        }
        let value = value.replace('+', " ");
        let value = percent_decode_str(&value).decode_utf8().ok()?;
        (!value.is_empty()).then(|| value.into_owned())
    })
}

/// Rule 4: a Zimbra auth token in a cookie or the query.
fn auth_token(headers: &HeaderMap, query: &str) -> Option<WebRoute> {
    let mut user_token = None;
    let mut admin_token = None;
    for value in headers.get_all(COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            let Some((name, token)) = pair.trim().split_once('=') else {
                continue;
            };
            let token = token.trim().trim_matches('"');
            match name.trim() {
                "ZM_AUTH_TOKEN" if user_token.is_none() => user_token = Some(token.to_string()),
                "ZM_ADMIN_AUTH_TOKEN" if admin_token.is_none() => {
                    admin_token = Some(token.to_string())
                }
                _ => {}
            }
        }
    }
    let candidates = [
        (user_token, TokenSource::AuthToken),
        (admin_token, TokenSource::AdminAuthToken),
        (
            query_arg(query, "zauthtoken", false),
            TokenSource::AuthToken,
        ),
    ];
    candidates.into_iter().find_map(|(token, kind)| {
        let id = auth_token_account_id(&token?)?;
        Some(WebRoute::AccountId { id, kind })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::token::tests::{jwt, zimbra_token};
    use http::HeaderValue;

    const ID: &str = "8f6e0a34-1b7c-4d0e-9a2f-3c5b7d9e1f20";

    fn route(uri: &str, headers: &[(&str, &str)]) -> WebRoute {
        let uri: Uri = uri.parse().expect("test URI");
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        detect(&uri, &map)
    }

    fn user_route(name: &str, kind: UserSource) -> WebRoute {
        WebRoute::User {
            name: name.into(),
            kind,
        }
    }

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    #[test]
    fn rest_paths_name_the_user() {
        for uri in [
            "/home/alice@example.com/Inbox",
            "/home/~alice@example.com/Inbox?fmt=rss",
            "/service/home/alice@example.com/Calendar.ics",
            "/service/home/~alice@example.com/",
            "/home/alice%40example.com/Briefcase/a%20b.txt",
            "/home/alice@example.com",
        ] {
            assert_eq!(
                route(uri, &[]),
                user_route("alice@example.com", UserSource::Rest),
                "{uri}"
            );
        }
        assert_eq!(
            route("/home/j%C3%BCrgen/", &[]),
            user_route("jürgen", UserSource::Rest)
        );
    }

    #[test]
    fn the_tilde_path_is_the_tokens_account() {
        let token = zimbra_token(&[("id", ID)]);
        let cookie = format!("ZM_AUTH_TOKEN={token}");
        let expected = WebRoute::AccountId {
            id: ID.into(),
            kind: TokenSource::AuthToken,
        };
        assert_eq!(route("/home/~/Inbox", &[("cookie", &cookie)]), expected);
        assert_eq!(route("/service/home/~/", &[("cookie", &cookie)]), expected);
        assert_eq!(route("/home/~/Inbox", &[]), WebRoute::Balanced);
        assert_eq!(route("/home//x", &[]), WebRoute::Balanced);
    }

    #[test]
    fn bad_names_in_paths_fall_through() {
        for uri in [
            "/home/%FF%FE/",
            "/home/a%0Ab/",
            "/home/a%20b/",
            "/home/a%2Fb/",
            "/dav/%00/",
            "/homer/alice/",
        ] {
            assert_eq!(route(uri, &[]), WebRoute::Balanced, "{uri}");
        }
        let long = format!("/home/{}/", "a".repeat(MAX_USER_LEN + 1));
        assert_eq!(route(&long, &[]), WebRoute::Balanced);
    }

    #[test]
    fn exchange_paths_use_basic_auth_then_the_query() {
        let auth = basic("EXAMPLE\\bob:secret:with:colons");
        assert_eq!(
            route(
                "/Microsoft-Server-ActiveSync?Cmd=Sync&User=other",
                &[("authorization", &auth)]
            ),
            user_route("bob@EXAMPLE", UserSource::ActiveSync)
        );
        assert_eq!(
            route(
                "/Microsoft-Server-ActiveSync?Cmd=Sync&User=example.com%5Ccarol&DeviceId=1",
                &[]
            ),
            user_route("carol@example.com", UserSource::ActiveSync)
        );
        assert_eq!(
            route("/microsoft-server-activesync?user=dave@example.com", &[]),
            user_route("dave@example.com", UserSource::ActiveSync)
        );
        assert_eq!(
            route(
                "/ews/Exchange.asmx",
                &[("authorization", &basic("erin@example.com:pw"))]
            ),
            user_route("erin@example.com", UserSource::Ews)
        );
        // A broken Basic header falls back to the query argument.
        assert_eq!(
            route(
                "/ews/Exchange.asmx?User=frank",
                &[("authorization", "Basic !!!")]
            ),
            user_route("frank", UserSource::Ews)
        );
        // Neither: the balancer (no token either).
        assert_eq!(
            route("/Microsoft-Server-ActiveSync", &[]),
            WebRoute::Balanced
        );
        assert_eq!(
            route("/Microsoft-Server-ActiveSync?User=%5Cx", &[]),
            WebRoute::Balanced
        );
        assert_eq!(
            route("/Microsoft-Server-ActiveSyncX?User=a", &[]),
            WebRoute::Balanced
        );
    }

    #[test]
    fn caldav_paths_name_the_user() {
        for uri in [
            "/dav/alice@example.com/Calendar/",
            "/dav/alice%40example.com",
            "/principals/users/alice@example.com/",
            "/service/dav/alice@example.com/Contacts/1.vcf",
        ] {
            assert_eq!(
                route(uri, &[]),
                user_route("alice@example.com", UserSource::CalDav),
                "{uri}"
            );
        }
    }

    #[test]
    fn rest_comes_before_exchange_and_tokens() {
        let token = zimbra_token(&[("id", ID)]);
        assert_eq!(
            route(
                "/home/alice/x",
                &[("cookie", &format!("ZM_AUTH_TOKEN={token}"))]
            ),
            user_route("alice", UserSource::Rest)
        );
    }

    #[test]
    fn auth_tokens_in_cookies_and_the_query() {
        let token = zimbra_token(&[("id", ID), ("exp", "13:1700000000000")]);
        let account = |kind| WebRoute::AccountId {
            id: ID.into(),
            kind,
        };
        assert_eq!(
            route(
                "/",
                &[(
                    "cookie",
                    &format!("JSESSIONID=1; ZM_AUTH_TOKEN={token}; x=y")
                )]
            ),
            account(TokenSource::AuthToken)
        );
        assert_eq!(
            route(
                "/zimbraAdmin/",
                &[
                    ("cookie", "a=b"),
                    ("cookie", &format!("ZM_ADMIN_AUTH_TOKEN={token}"))
                ]
            ),
            account(TokenSource::AdminAuthToken)
        );
        assert_eq!(
            route(&format!("/service/soap?zauthtoken={token}"), &[]),
            account(TokenSource::AuthToken)
        );
        // A broken cookie does not hide a good query token.
        assert_eq!(
            route(
                &format!("/x?zauthtoken={token}"),
                &[("cookie", "ZM_AUTH_TOKEN=garbage")]
            ),
            account(TokenSource::AuthToken)
        );
    }

    #[test]
    fn jwts_in_the_header_and_the_query() {
        let token = jwt(&format!(r#"{{"sub":"{ID}"}}"#));
        let account = WebRoute::AccountId {
            id: ID.into(),
            kind: TokenSource::Jwt,
        };
        assert_eq!(
            route("/", &[("authorization", &format!("Bearer {token}"))]),
            account
        );
        assert_eq!(route(&format!("/x?a=1&zjwt={token}"), &[]), account);
        // The Zimbra token wins over the JWT.
        let zimbra = zimbra_token(&[("id", "other-id")]);
        assert_eq!(
            route(
                "/",
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("cookie", &format!("ZM_AUTH_TOKEN={zimbra}"))
                ]
            ),
            WebRoute::AccountId {
                id: "other-id".into(),
                kind: TokenSource::AuthToken
            }
        );
    }

    #[test]
    fn garbage_goes_to_the_balancer() {
        for (uri, headers) in [
            ("/", vec![]),
            ("/zimbra/", vec![("cookie", "ZM_AUTH_TOKEN=")]),
            ("/", vec![("cookie", "ZM_AUTH_TOKEN")]),
            ("/", vec![("cookie", ";;;==;")]),
            ("/", vec![("cookie", "ZM_AUTH_TOKEN=0_ab_zz")]),
            ("/", vec![("authorization", "Bearer")]),
            ("/", vec![("authorization", "Bearer a.b.c")]),
            ("/", vec![("authorization", "Negotiate abc")]),
            ("/?zjwt=&zauthtoken=", vec![]),
            ("/?zjwt=%FF", vec![]),
            ("/?&&=&", vec![]),
        ] {
            assert_eq!(
                route(uri, &headers),
                WebRoute::Balanced,
                "{uri} {headers:?}"
            );
        }
        // A header value that is not visible ASCII.
        let mut map = HeaderMap::new();
        map.insert(
            COOKIE,
            HeaderValue::from_bytes(b"ZM_AUTH_TOKEN=\xff").unwrap(),
        );
        assert_eq!(detect(&Uri::from_static("/"), &map), WebRoute::Balanced);
    }

    #[test]
    fn labels() {
        assert_eq!(WebRoute::Balanced.label(), "balanced");
        assert_eq!(user_route("a", UserSource::CalDav).label(), "caldav");
    }
}
