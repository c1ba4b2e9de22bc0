//! Account ids out of web credentials, for routing only.
//!
//! - A Zimbra auth token (`ZM_AUTH_TOKEN` / `ZM_ADMIN_AUTH_TOKEN` cookie, `zauthtoken` query
//!   argument) is `<keyver>_<hmac>_<hex data>`; the hex data decodes to `field=len:value;...`
//!   and its `id` field is the account's zimbraId.
//! - A JWT (`Authorization: Bearer`, `zjwt` query argument) carries the account id in its `sub`
//!   claim.
//!
//! **Nothing here verifies a signature or an expiry.** The proxy only decides which mailbox
//! server gets the request; the mailbox server checks the credential itself, exactly as with
//! Zimbra's proxy. A forged token can at worst send a request to the wrong mailbox server, which
//! then refuses it. Every function accepts arbitrary input and never panics.

use base64::Engine;

/// Longest credential we look into: a real token is a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Longest account id accepted (a zimbraId is a 36-character UUID).
const MAX_ID_LEN: usize = 256;

/// The `id` field of a Zimbra auth token, if the token is well formed.
pub fn auth_token_account_id(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut parts = token.trim().splitn(3, '_');
    let keyver = parts.next()?;
    let hmac = parts.next()?;
    let data = parts.next()?;
    if keyver.is_empty() || !keyver.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if hmac.is_empty() || !hmac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let decoded = decode_hex(data)?;
    let id = token_field(&decoded, b"id")?;
    let id = std::str::from_utf8(id).ok()?;
    valid_id(id).then(|| id.to_string())
}

/// The `sub` claim of a JWT (`header.payload.signature`), if its payload is a JSON object with a
/// string `sub`. The signature is not checked (see the module documentation).
pub fn jwt_subject(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut parts = token.trim().split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = payload.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    valid_id(sub).then(|| sub.to_string())
}

/// An id we are willing to put in a lookup request and a cache key.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| {
            let high = (pair[0] as char).to_digit(16)?;
            let low = (pair[1] as char).to_digit(16)?;
            u8::try_from(high * 16 + low).ok()
        })
        .collect()
}

/// The value of `name` in Zimbra's `field=len:value;field=len:value;...` encoding. The length
/// prefix makes values with `;` or `=` inside unambiguous.
fn token_field<'a>(mut data: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    while !data.is_empty() {
        let equals = data.iter().position(|&b| b == b'=')?;
        let field = &data[..equals];
        let rest = &data[equals + 1..];
        let colon = rest.iter().position(|&b| b == b':')?;
        let length = std::str::from_utf8(&rest[..colon]).ok()?;
        if length.is_empty() || length.len() > 6 || !length.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let length: usize = length.parse().ok()?;
        let rest = &rest[colon + 1..];
        let value = rest.get(..length)?;
        data = match rest[length..].split_first() {
            Some((b';', rest)) => rest,
            None => &[],
            Some(_) => return None,
        };
        if field == name {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A token as Zimbra writes it: `<keyver>_<hmac>_<hex of field=len:value;...>`.
    pub(crate) fn zimbra_token(fields: &[(&str, &str)]) -> String {
        let data: String = fields
            .iter()
            .map(|(key, value)| format!("{key}={}:{value};", value.len()))
            .collect();
        let hex: String = data.bytes().map(|b| format!("{b:02x}")).collect();
        format!("0_8d3f2e1c9a0b7d6e5f4a3b2c1d0e9f8a7b6c5d4e_{hex}")
    }

    pub(crate) fn jwt(claims: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2lnbmF0dXJl",
            engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            engine.encode(claims)
        )
    }

    const ID: &str = "8f6e0a34-1b7c-4d0e-9a2f-3c5b7d9e1f20";

    #[test]
    fn the_id_of_a_zimbra_token() {
        let token = zimbra_token(&[("id", ID), ("exp", "13:1700000000000"), ("type", "zimbra")]);
        assert_eq!(auth_token_account_id(&token).as_deref(), Some(ID));
        // Not first, and with separators inside an earlier value.
        let token = zimbra_token(&[("name", "a;b=c:d"), ("id", ID)]);
        assert_eq!(auth_token_account_id(&token).as_deref(), Some(ID));
        // Upper-case hex is hex too.
        let upper = token.to_uppercase();
        assert_eq!(auth_token_account_id(&upper).as_deref(), Some(ID));
    }

    #[test]
    fn broken_zimbra_tokens_have_no_id() {
        for token in [
            String::new(),
            "_".into(),
            "__".into(),
            "0__".into(),
            "x_ab_6964".into(),
            "0_zz_6964".into(),
            "0_ab_6".into(),
            "0_ab_zz".into(),
            // id=5:abc; (length longer than the data)
            "0_ab_69643d353a6162633b".into(),
            // id=3:abc (no ';' is fine at the end) but the id has a space
            zimbra_token(&[("id", "a c")]),
            zimbra_token(&[("exp", "1")]),
            zimbra_token(&[("id", "")]),
            format!("0_ab_{}", "00".repeat(MAX_TOKEN_LEN)),
            "0_ab_69643a333a616263".into(),       // id:3:abc (no '=')
            "0_ab_69643d2d313a61".into(),         // id=-1:a
            "0_ab_69643d333a616263786964".into(), // trailing garbage after the value
        ] {
            assert_eq!(auth_token_account_id(&token), None, "{token:?}");
        }
        assert_eq!(
            auth_token_account_id("0_ab_69643d333a616263").as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn the_sub_of_a_jwt() {
        let token = jwt(&format!(r#"{{"sub":"{ID}","exp":1700000000,"jti":"x"}}"#));
        assert_eq!(jwt_subject(&token).as_deref(), Some(ID));
        // Padding someone added anyway.
        let engine = base64::engine::general_purpose::URL_SAFE;
        let padded = format!("e30.{}.sig", engine.encode(r#"{"sub":"abcd"}"#));
        assert_eq!(jwt_subject(&padded).as_deref(), Some("abcd"));
    }

    #[test]
    fn broken_jwts_have_no_subject() {
        for token in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            "e30.!!!.sig".into(),
            jwt("not json"),
            jwt("[1,2]"),
            jwt(r#"{"sub":1}"#),
            jwt(r#"{"sub":""}"#),
            jwt(r#"{"sub":"a\nb"}"#),
            jwt(r#"{"iss":"x"}"#),
        ] {
            assert_eq!(jwt_subject(&token), None, "{token:?}");
        }
    }
}
