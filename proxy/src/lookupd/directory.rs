//! The lookupd directory file: which MailboxServer holds each account, for mailbox backends
//! that have no Zimbra LDAP to ask.
//!
//! A line-based text format, so that it diffs well in a ConfigMap and is written by any script:
//!
//! ```text
//! # Blank lines and words from a `#` on are ignored.
//! default-domain example.com            # qualifies logins without '@'
//! account alice@example.com mbs-1       # account -> MailboxServer name (in the route table)
//! account bob mbs-2                     # unqualified: bob@example.com
//! alias al@example.com alice@example.com
//! alias postmaster alice                # postmaster@example.com -> alice@example.com
//! ```
//!
//! Names compare case-insensitively (they are kept in lower case). `default-domain` may appear
//! once, anywhere: it applies to every line. An alias names an account, not another alias; its
//! account may be listed here or pinned in the route table. A file with any bad line is
//! rejected whole, with the line number, so a typo never silently drops accounts.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// A directory file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("directory line {line}: {message}")]
pub struct DirectoryError {
    pub line: usize,
    pub message: String,
}

/// The parsed directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    default_domain: Option<String>,
    accounts: HashMap<String, String>,
    aliases: HashMap<String, String>,
}

impl Directory {
    pub fn parse(text: &str) -> Result<Self, DirectoryError> {
        let mut default_domain: Option<(usize, String)> = None;
        let mut accounts = Vec::new();
        let mut aliases = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let fail = |message: String| DirectoryError {
                line: number,
                message,
            };
            let words: Vec<&str> = line
                .split_whitespace()
                .take_while(|word| !word.starts_with('#'))
                .collect();
            match words.as_slice() {
                [] => {}
                ["default-domain", domain] => {
                    if let Some((first, _)) = &default_domain {
                        return Err(fail(format!(
                            "second default-domain (the first is on line {first})"
                        )));
                    }
                    if domain.contains('@') {
                        return Err(fail(format!("default-domain {domain:?} contains '@'")));
                    }
                    default_domain = Some((number, domain.to_ascii_lowercase()));
                }
                ["account", account, server] => accounts.push((number, *account, *server)),
                ["alias", alias, account] => aliases.push((number, *alias, *account)),
                [keyword @ ("default-domain" | "account" | "alias"), ..] => {
                    let expected = match *keyword {
                        "default-domain" => "default-domain <domain>",
                        "account" => "account <account> <server>",
                        _ => "alias <login> <account>",
                    };
                    return Err(fail(format!("expected `{expected}`")));
                }
                [other, ..] => {
                    return Err(fail(format!(
                        "unknown entry {other:?}: expected default-domain, account or alias"
                    )));
                }
            }
        }
        let mut directory = Directory {
            default_domain: default_domain.map(|(_, domain)| domain),
            ..Directory::default()
        };
        for (line, account, server) in accounts {
            let account = directory.qualify(account);
            if directory.accounts.contains_key(&account) {
                return Err(DirectoryError {
                    line,
                    message: format!("account {account} is listed twice"),
                });
            }
            directory.accounts.insert(account, server.to_string());
        }
        for (line, alias, account) in aliases {
            let (alias, account) = (directory.qualify(alias), directory.qualify(account));
            let problem = if directory.accounts.contains_key(&alias) {
                "is also an account"
            } else if alias == account {
                "names itself"
            } else {
                match directory.aliases.entry(alias.clone()) {
                    Entry::Occupied(_) => "is listed twice",
                    Entry::Vacant(entry) => {
                        entry.insert(account);
                        continue;
                    }
                }
            };
            return Err(DirectoryError {
                line,
                message: format!("alias {alias} {problem}"),
            });
        }
        Ok(directory)
    }

    /// The login in lower case, with the default domain appended when it has no `@`.
    pub fn qualify(&self, login: &str) -> String {
        let login = login.to_ascii_lowercase();
        match &self.default_domain {
            Some(domain) if !login.contains('@') => format!("{login}@{domain}"),
            _ => login,
        }
    }

    /// The account a qualified login stands for (itself unless it is an alias).
    pub fn account_of<'a>(&'a self, qualified: &'a str) -> &'a str {
        self.aliases
            .get(qualified)
            .map_or(qualified, String::as_str)
    }

    /// The MailboxServer name of an account listed here.
    pub fn server_of(&self, account: &str) -> Option<&str> {
        self.accounts.get(account).map(String::as_str)
    }

    pub fn default_domain(&self) -> Option<&str> {
        self.default_domain.as_deref()
    }

    /// Number of accounts and aliases, for the reload log.
    pub fn counts(&self) -> (usize, usize) {
        (self.accounts.len(), self.aliases.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/lookupd-directory.txt");

    #[test]
    fn example_file_parses() {
        let directory = Directory::parse(EXAMPLE).unwrap();
        assert_eq!(directory.default_domain(), Some("example.com"));
        assert_eq!(directory.server_of("alice@example.com"), Some("mbs-1"));
        assert_eq!(directory.server_of("bob@example.com"), Some("mbs-2"));
        let postmaster = directory.qualify("Postmaster");
        assert_eq!(directory.account_of(&postmaster), "alice@example.com");
    }

    #[test]
    fn qualifies_lowercases_and_resolves_aliases() {
        let directory = Directory::parse(
            "default-domain Example.COM\n\
             account Carol mbs-3 # trailing comment\n\
             alias c carol\n\
             alias x@other.org carol@example.com\n",
        )
        .unwrap();
        assert_eq!(directory.qualify("CAROL"), "carol@example.com");
        assert_eq!(directory.qualify("a@B.org"), "a@b.org");
        assert_eq!(directory.server_of("carol@example.com"), Some("mbs-3"));
        assert_eq!(directory.account_of("c@example.com"), "carol@example.com");
        assert_eq!(directory.account_of("x@other.org"), "carol@example.com");
        assert_eq!(
            directory.account_of("nobody@example.com"),
            "nobody@example.com"
        );
        assert_eq!(directory.counts(), (1, 2));
    }

    #[test]
    fn without_default_domain_names_stay_as_given() {
        let directory = Directory::parse("account dave mbs-1\n").unwrap();
        assert_eq!(directory.qualify("Dave"), "dave");
        assert_eq!(directory.server_of("dave"), Some("mbs-1"));
    }

    #[test]
    fn bad_lines_are_rejected_with_their_number() {
        let cases = [
            ("account a", 1, "expected `account <account> <server>`"),
            ("\n\nalias a", 3, "expected `alias <login> <account>`"),
            ("default-domain", 1, "expected `default-domain <domain>`"),
            ("user a b", 1, "unknown entry \"user\""),
            (
                "default-domain a.b\ndefault-domain c.d",
                2,
                "second default-domain",
            ),
            ("default-domain a@b", 1, "contains '@'"),
            ("account a@b s\naccount A@B t", 2, "listed twice"),
            ("account a@b s\nalias a@b x@y", 2, "also an account"),
            ("alias a@b x@y\nalias a@b z@y", 2, "listed twice"),
            ("alias a@b a@b", 1, "names itself"),
        ];
        for (text, line, message) in cases {
            let error = Directory::parse(text).unwrap_err();
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.message.contains(message), "{text:?}: {error}");
        }
    }
}
