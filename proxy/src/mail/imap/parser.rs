//! IMAP command framing and tokenizing.
//!
//! Framing ([`CommandFramer`]) and tokenizing ([`parse_command`]) are separate steps because a
//! command only ends at a CRLF that is not followed by literal data, which framing must find
//! without understanding the command; tokenizing then works on a complete, bounded command.
//!
//! Framing tracks quoted strings so that `"{5}"` at the end of a line is not mistaken for a
//! literal announcement, and it never reserves more memory than the configured limits whatever
//! size a literal announces. The one thing it reads of a command is its name, and only while
//! cleartext logins are refused: the `+` that invites a literal must never go to a LOGIN or
//! AUTHENTICATE then, or the client would send its password in the clear before being told no.

use crate::mail::{Limits, wipe};

/// A complete command as framed: text pieces, each followed by the literal it announced (the
/// `{n}` / `{n+}` announcement and CRLFs are removed). Only the last piece has no literal.
#[derive(Debug, Default)]
pub struct RawCommand {
    segments: Vec<Segment>,
}

/// The text and literals of a command: a LOGIN's password among them, so `Debug` shows only
/// their lengths.
#[derive(Default)]
struct Segment {
    text: Vec<u8>,
    literal: Option<Vec<u8>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("text_len", &self.text.len())
            .field("literal_len", &self.literal.as_ref().map(Vec::len))
            .finish()
    }
}

/// What [`CommandFramer::push`] found.
#[derive(Debug)]
pub enum FrameEvent {
    /// A synchronising literal was announced and accepted: the client waits for a `+`
    /// continuation before sending its bytes.
    Continuation,
    Complete(RawCommand),
    /// The command text reached the line limit; the connection has to be closed because what
    /// follows cannot be told apart from the next command.
    TooLong,
    /// A literal announced more bytes than the literal budget allows. The partial command has
    /// been dropped. After a synchronising literal the client sends nothing more for this
    /// command, so the session can go on; after a non-synchronising one the literal bytes are
    /// already on their way and the session has to close.
    LiteralTooLarge {
        tag: Option<String>,
        synchronizing: bool,
    },
    /// A LOGIN or AUTHENTICATE announced a literal while cleartext logins are refused (see
    /// [`CommandFramer::refuse_login_literals`]). The partial command has been dropped and no
    /// continuation is due; as for `LiteralTooLarge`, after a non-synchronising literal its bytes
    /// are already on their way.
    LoginLiteralRefused {
        tag: Option<String>,
        synchronizing: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Text { in_quote: bool, escaped: bool },
    Literal { remaining: usize },
}

const TEXT_START: State = State::Text {
    in_quote: false,
    escaped: false,
};

/// Reassembles commands, literals included, from arbitrarily split input.
pub struct CommandFramer {
    max_line_len: usize,
    max_literal_len: usize,
    state: State,
    segments: Vec<Segment>,
    text: Vec<u8>,
    literal: Vec<u8>,
    text_total: usize,
    literal_total: usize,
    refuse_login_literals: bool,
}

struct LiteralSpec {
    start: usize,
    len: u64,
    synchronizing: bool,
}

impl CommandFramer {
    pub fn new(limits: &Limits) -> Self {
        CommandFramer {
            max_line_len: limits.max_line_len,
            max_literal_len: limits.max_literal_len,
            state: TEXT_START,
            segments: Vec::new(),
            text: Vec::new(),
            literal: Vec::new(),
            text_total: 0,
            literal_total: 0,
            refuse_login_literals: false,
        }
    }

    /// While set, a literal announced by a LOGIN or AUTHENTICATE ends the command with
    /// [`FrameEvent::LoginLiteralRefused`] instead of being accepted.
    pub fn refuse_login_literals(&mut self, refuse: bool) {
        self.refuse_login_literals = refuse;
    }

    /// Consumes input until a command completes or something needs the session's attention.
    /// Returns how many bytes were used; the rest belongs to what comes next.
    pub fn push(&mut self, input: &[u8]) -> (usize, Option<FrameEvent>) {
        let mut used = 0;
        while used < input.len() {
            match self.state {
                State::Literal { remaining } => {
                    let take = remaining.min(input.len() - used);
                    self.literal.extend_from_slice(&input[used..used + take]);
                    used += take;
                    let remaining = remaining - take;
                    if remaining == 0 {
                        self.finish_literal();
                    } else {
                        self.state = State::Literal { remaining };
                    }
                }
                State::Text { in_quote, escaped } => {
                    let b = input[used];
                    used += 1;
                    self.text_total += 1;
                    if b == b'\n' {
                        if let Some(event) = self.end_of_line(in_quote) {
                            return (used, Some(event));
                        }
                        continue;
                    }
                    if self.text_total >= self.max_line_len {
                        self.reset();
                        return (used, Some(FrameEvent::TooLong));
                    }
                    self.text.push(b);
                    self.state = match (in_quote, escaped, b) {
                        (true, true, _) => State::Text {
                            in_quote: true,
                            escaped: false,
                        },
                        (true, false, b'\\') => State::Text {
                            in_quote: true,
                            escaped: true,
                        },
                        (true, false, b'"') | (false, _, b'"') => State::Text {
                            in_quote: !in_quote,
                            escaped: false,
                        },
                        _ => State::Text {
                            in_quote,
                            escaped: false,
                        },
                    };
                }
            }
        }
        (used, None)
    }

    /// Handles an LF in command text: either a literal starts or the command is complete.
    fn end_of_line(&mut self, in_quote: bool) -> Option<FrameEvent> {
        if self.text.last() == Some(&b'\r') {
            self.text.pop();
        }
        let spec = if in_quote {
            None
        } else {
            literal_spec(&self.text)
        };
        let Some(spec) = spec else {
            self.segments.push(Segment {
                text: std::mem::take(&mut self.text),
                literal: None,
            });
            let command = RawCommand {
                segments: std::mem::take(&mut self.segments),
            };
            self.reset();
            return Some(FrameEvent::Complete(command));
        };
        let first_line = self
            .segments
            .first()
            .map_or(&self.text, |segment| &segment.text);
        if self.refuse_login_literals && names_login(first_line) {
            let tag = tag_of(first_line);
            self.reset();
            return Some(FrameEvent::LoginLiteralRefused {
                tag,
                synchronizing: spec.synchronizing,
            });
        }
        let budget = (self.max_literal_len - self.literal_total) as u64;
        if spec.len > budget {
            let tag = tag_of(first_line);
            self.reset();
            return Some(FrameEvent::LiteralTooLarge {
                tag,
                synchronizing: spec.synchronizing,
            });
        }
        let len = spec.len as usize;
        self.text.truncate(spec.start);
        self.segments.push(Segment {
            text: std::mem::take(&mut self.text),
            literal: None,
        });
        self.literal_total += len;
        self.literal = Vec::with_capacity(len);
        if len == 0 {
            self.finish_literal();
        } else {
            self.state = State::Literal { remaining: len };
        }
        spec.synchronizing.then_some(FrameEvent::Continuation)
    }

    fn finish_literal(&mut self) {
        let literal = std::mem::take(&mut self.literal);
        if let Some(segment) = self.segments.last_mut() {
            segment.literal = Some(literal);
        }
        self.state = TEXT_START;
    }

    /// Bytes held for the command being assembled; never more than the line limit plus the
    /// literal budget.
    pub fn buffered_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| s.text.len() + s.literal.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
            + self.text.len()
            + self.literal.len()
    }

    /// Drops the command being assembled, overwriting it since it may hold a password.
    pub fn reset(&mut self) {
        for mut segment in self.segments.drain(..) {
            wipe(&mut segment.text);
            if let Some(literal) = segment.literal.as_mut() {
                wipe(literal);
            }
        }
        wipe(&mut self.text);
        wipe(&mut self.literal);
        self.state = TEXT_START;
        self.text_total = 0;
        self.literal_total = 0;
    }
}

/// Finds a `{n}` or `{n+}` announcement ending the line. Overlong digit strings saturate so they
/// are refused as too large rather than misread.
fn literal_spec(line: &[u8]) -> Option<LiteralSpec> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let inner = &body[open + 1..];
    let (digits, synchronizing) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = digits.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(LiteralSpec {
        start: open,
        len,
        synchronizing,
    })
}

/// Whether a line ends in a literal announcement, i.e. is continued by literal bytes.
pub(crate) fn announces_literal(line: &[u8]) -> bool {
    literal_spec(line).is_some()
}

/// Whether the first line of a command names LOGIN or AUTHENTICATE. Read more loosely than
/// [`parse_command`] would (any tag, extra spaces, a literal glued to the name): a command that
/// would fail to parse must not be invited to send a password either.
fn names_login(line: &[u8]) -> bool {
    let Some(space) = line.iter().position(u8::is_ascii_whitespace) else {
        return false;
    };
    let rest = line[space..].trim_ascii_start();
    let end = rest
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b'{')
        .unwrap_or(rest.len());
    let name = &rest[..end];
    name.eq_ignore_ascii_case(b"LOGIN") || name.eq_ignore_ascii_case(b"AUTHENTICATE")
}

/// The tag of a command line, if it starts with a valid one.
pub fn tag_of(line: &[u8]) -> Option<String> {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let tag = &line[..end];
    if tag.is_empty() || !tag.iter().all(|&b| is_tag_char(b)) {
        return None;
    }
    Some(String::from_utf8_lossy(tag).into_owned())
}

/// RFC 3501 `tag`: ASTRING-CHAR except `+`.
fn is_tag_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b)
        && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b'+')
}

/// Bytes that end an atom. Wider than RFC 3501's ATOM-CHAR on purpose: clients put `\`, `%`,
/// `*`, `]` and 8-bit bytes in unquoted passwords and user names, and the upstream server is
/// the one to judge them.
fn ends_atom(b: u8) -> bool {
    b <= b' ' || b == 0x7f || matches!(b, b'(' | b')' | b'"' | b'{')
}

/// One argument token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Atom(Vec<u8>),
    /// A quoted string (escapes resolved) or a literal.
    String(Vec<u8>),
    LParen,
    RParen,
}

impl Token {
    /// RFC 3501 `astring` (atom or string), as LOGIN takes.
    pub fn astring(&self) -> Option<&[u8]> {
        match self {
            Token::Atom(bytes) | Token::String(bytes) => Some(bytes),
            Token::LParen | Token::RParen => None,
        }
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Token::Atom(atom) if atom.eq_ignore_ascii_case(b"NIL"))
    }
}

/// A tokenized command. The command name is upper-cased since IMAP names are case-insensitive.
/// The arguments of a LOGIN are a password, so `Debug` counts arguments and shows none.
#[derive(PartialEq, Eq)]
pub struct Command {
    pub tag: String,
    pub name: String,
    pub args: Vec<Token>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("tag", &self.tag)
            .field("name", &self.name)
            .field("args", &self.args.len())
            .finish()
    }
}

impl Drop for Command {
    fn drop(&mut self) {
        for arg in &mut self.args {
            if let Token::Atom(bytes) | Token::String(bytes) = arg {
                wipe(bytes);
            }
        }
    }
}

/// Why a framed command could not be tokenized.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No valid tag: the answer is `* BAD`.
    NoTag,
    /// Valid tag, invalid rest: the answer is `<tag> BAD`.
    Syntax { tag: String },
}

/// Deepest parenthesis nesting accepted; pre-login commands need one level (ID).
const MAX_DEPTH: u32 = 8;

/// Tokenizes a framed command: `tag SP name *(SP argument)`.
pub fn parse_command(mut raw: RawCommand) -> Result<Command, ParseError> {
    let result = tokenize(&raw);
    for segment in &mut raw.segments {
        wipe(&mut segment.text);
        if let Some(literal) = segment.literal.as_mut() {
            wipe(literal);
        }
    }
    result
}

fn tokenize(raw: &RawCommand) -> Result<Command, ParseError> {
    let first = raw.segments.first().ok_or(ParseError::NoTag)?;
    let tag = tag_of(&first.text).ok_or(ParseError::NoTag)?;
    let syntax = || ParseError::Syntax { tag: tag.clone() };
    let rest = first.text.get(tag.len() + 1..).ok_or_else(syntax)?;
    let name_len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let name = &rest[..name_len];
    if name.is_empty() || !name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(syntax());
    }
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let mut lexer = Lexer {
        tokens: Vec::new(),
        need_separator: true,
        depth: 0,
    };
    for (index, segment) in raw.segments.iter().enumerate() {
        let text = if index == 0 {
            &rest[name_len..]
        } else {
            &segment.text[..]
        };
        lexer.text(text).ok_or_else(syntax)?;
        if let Some(literal) = &segment.literal {
            lexer.literal(literal).ok_or_else(syntax)?;
        }
    }
    if lexer.depth != 0 {
        return Err(syntax());
    }
    Ok(Command {
        tag: tag.clone(),
        name,
        args: std::mem::take(&mut lexer.tokens),
    })
}

/// Argument lexer. Tokens are separated by spaces (runs of spaces are tolerated) except next to
/// parentheses.
struct Lexer {
    tokens: Vec<Token>,
    /// The previous token needs a space (or `)`) before anything else.
    need_separator: bool,
    depth: u32,
}

impl Lexer {
    /// Lexes one text piece; `None` on a syntax error.
    fn text(&mut self, text: &[u8]) -> Option<()> {
        let mut i = 0;
        while let Some(&b) = text.get(i) {
            match b {
                b' ' => {
                    self.need_separator = false;
                    i += 1;
                }
                b')' => {
                    self.depth = self.depth.checked_sub(1)?;
                    self.tokens.push(Token::RParen);
                    self.need_separator = true;
                    i += 1;
                }
                _ if self.need_separator => return None,
                b'(' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return None;
                    }
                    self.tokens.push(Token::LParen);
                    i += 1;
                }
                b'"' => {
                    let (value, len) = quoted(&text[i + 1..])?;
                    self.tokens.push(Token::String(value));
                    self.need_separator = true;
                    i += 1 + len;
                }
                _ if ends_atom(b) => return None,
                _ => {
                    let len = text[i..]
                        .iter()
                        .position(|&b| ends_atom(b))
                        .unwrap_or(text.len() - i);
                    self.tokens.push(Token::Atom(text[i..i + len].to_vec()));
                    self.need_separator = true;
                    i += len;
                }
            }
        }
        Some(())
    }

    fn literal(&mut self, literal: &[u8]) -> Option<()> {
        if self.need_separator {
            return None;
        }
        self.tokens.push(Token::String(literal.to_vec()));
        self.need_separator = true;
        Some(())
    }
}

/// Reads a quoted string body after the opening quote. Returns the unescaped value and how many
/// bytes were read including the closing quote. Only `\"` and `\\` are escapes (RFC 3501
/// quoted-specials); CR, LF and NUL cannot appear in a quoted string.
fn quoted(text: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut value = Vec::new();
    let mut i = 0;
    loop {
        match *text.get(i)? {
            b'"' => return Some((value, i + 1)),
            b'\\' => {
                let escaped = *text.get(i + 1)?;
                if escaped != b'"' && escaped != b'\\' {
                    return None;
                }
                value.push(escaped);
                i += 2;
            }
            b'\r' | b'\n' | 0 => return None,
            b => {
                value.push(b);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(line: usize, literal: usize) -> Limits {
        Limits {
            max_line_len: line,
            max_literal_len: literal,
            max_errors: 5,
        }
    }

    /// Feeds everything and collects events, checking every byte is accounted for.
    fn frame_all(framer: &mut CommandFramer, mut input: &[u8]) -> Vec<FrameEvent> {
        let mut events = Vec::new();
        while !input.is_empty() {
            let (used, event) = framer.push(input);
            assert!(used > 0 && used <= input.len());
            input = &input[used..];
            events.extend(event);
        }
        events
    }

    fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let mut framer = CommandFramer::new(&Limits::default());
        let mut events = frame_all(&mut framer, line);
        assert_eq!(events.len(), 1, "{events:?}");
        match events.pop() {
            Some(FrameEvent::Complete(raw)) => parse_command(raw),
            other => panic!("expected a complete command, got {other:?}"),
        }
    }

    #[test]
    fn debug_never_shows_a_password() {
        let input = b"a LOGIN bob {11+}\r\nhunter2-pw!\r\n";
        let mut framer = CommandFramer::new(&Limits::default());
        let events = frame_all(&mut framer, input);
        let framed = format!("{events:?}");
        assert!(!framed.contains("hunter2"), "{framed}");
        assert!(framed.contains("literal_len: Some(11)"), "{framed}");
        let command = format!("{:?}", parse(input).unwrap());
        assert!(!command.contains("hunter2"), "{command}");
        assert!(command.contains("LOGIN"), "{command}");
    }

    fn atom(s: &str) -> Token {
        Token::Atom(s.as_bytes().to_vec())
    }

    fn string(s: &[u8]) -> Token {
        Token::String(s.to_vec())
    }

    #[test]
    fn tag_name_and_atoms() {
        let cmd = parse(b"a001 login bob secret\r\n").unwrap();
        assert_eq!(cmd.tag, "a001");
        assert_eq!(cmd.name, "LOGIN");
        assert_eq!(cmd.args, vec![atom("bob"), atom("secret")]);
    }

    #[test]
    fn bare_lf_ends_a_command() {
        let cmd = parse(b"1 NOOP\n").unwrap();
        assert_eq!((cmd.tag.as_str(), cmd.name.as_str()), ("1", "NOOP"));
        assert!(cmd.args.is_empty());
    }

    #[test]
    fn quoted_strings_with_escapes() {
        let cmd = parse(b"t LOGIN \"bob smith\" \"p\\\"w\\\\d\"\r\n").unwrap();
        assert_eq!(cmd.args, vec![string(b"bob smith"), string(b"p\"w\\d")]);
    }

    #[test]
    fn quoted_string_rejects_unknown_escapes_and_unterminated_quotes() {
        assert_eq!(
            parse(b"t LOGIN \"a\\n\" b\r\n"),
            Err(ParseError::Syntax { tag: "t".into() })
        );
        assert_eq!(
            parse(b"t LOGIN \"abc\r\n"),
            Err(ParseError::Syntax { tag: "t".into() })
        );
    }

    #[test]
    fn empty_quoted_string() {
        let cmd = parse(b"t LOGIN bob \"\"\r\n").unwrap();
        assert_eq!(cmd.args, vec![atom("bob"), string(b"")]);
    }

    #[test]
    fn atoms_may_hold_backslash_percent_star_bracket_and_8bit() {
        let cmd = parse(b"t LOGIN b\\o%b* p]\xe4\r\n").unwrap();
        assert_eq!(
            cmd.args,
            vec![
                Token::Atom(b"b\\o%b*".to_vec()),
                Token::Atom(b"p]\xe4".to_vec())
            ]
        );
    }

    #[test]
    fn parenthesised_lists() {
        let cmd = parse(b"t ID (\"name\" \"x\" \"version\" NIL)\r\n").unwrap();
        assert_eq!(
            cmd.args,
            vec![
                Token::LParen,
                string(b"name"),
                string(b"x"),
                string(b"version"),
                atom("NIL"),
                Token::RParen
            ]
        );
        assert!(cmd.args[4].is_nil());
    }

    #[test]
    fn unbalanced_or_glued_tokens_are_syntax_errors() {
        for line in [
            &b"t ID (\"a\" \"b\"\r\n"[..],
            b"t ID \"a\")\r\n",
            b"t LOGIN \"a\"\"b\"\r\n",
            b"t LOGIN a\"b\"\r\n",
            b"t LOGIN a{b\r\n",
            b"t LOGIN a\tb\r\n",
            b"t LOGIN a\rb\r\n",
            b"t ID ((((((((((x))))))))))\r\n",
        ] {
            assert_eq!(
                parse(line),
                Err(ParseError::Syntax { tag: "t".into() }),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn tag_validation() {
        assert_eq!(parse(b"\r\n"), Err(ParseError::NoTag));
        assert_eq!(parse(b" NOOP\r\n"), Err(ParseError::NoTag));
        assert_eq!(parse(b"a+b NOOP\r\n"), Err(ParseError::NoTag));
        assert_eq!(parse(b"* NOOP\r\n"), Err(ParseError::NoTag));
        assert_eq!(parse(b"a\"b NOOP\r\n"), Err(ParseError::NoTag));
        assert_eq!(
            parse(b"abc\r\n"),
            Err(ParseError::Syntax { tag: "abc".into() })
        );
        assert_eq!(
            parse(b"abc \r\n"),
            Err(ParseError::Syntax { tag: "abc".into() })
        );
        assert_eq!(parse(b"a]1 NOOP\r\n").unwrap().tag, "a]1");
    }

    #[test]
    fn command_names_are_alphanumeric() {
        assert_eq!(
            parse(b"t NO\"OP\r\n"),
            Err(ParseError::Syntax { tag: "t".into() })
        );
        assert_eq!(
            parse(b"t  NOOP\r\n"),
            Err(ParseError::Syntax { tag: "t".into() })
        );
        assert_eq!(parse(b"t x-foo\r\n").unwrap().name, "X-FOO");
    }

    #[test]
    fn runs_of_spaces_between_arguments_are_tolerated() {
        let cmd = parse(b"t LOGIN  a   b \r\n").unwrap();
        assert_eq!(cmd.args, vec![atom("a"), atom("b")]);
    }

    #[test]
    fn synchronising_literals_ask_for_continuation() {
        let mut framer = CommandFramer::new(&Limits::default());
        let events = frame_all(&mut framer, b"a LOGIN {3}\r\n");
        assert!(matches!(events[..], [FrameEvent::Continuation]));
        let events = frame_all(&mut framer, b"bob {6}\r\n");
        assert!(matches!(events[..], [FrameEvent::Continuation]));
        let mut events = frame_all(&mut framer, b"se\"c t\r\n");
        let Some(FrameEvent::Complete(raw)) = events.pop() else {
            panic!("expected a command");
        };
        assert!(events.is_empty());
        let cmd = parse_command(raw).unwrap();
        assert_eq!(cmd.args, vec![string(b"bob"), string(b"se\"c t")]);
    }

    #[test]
    fn non_synchronising_literals_do_not() {
        let mut framer = CommandFramer::new(&Limits::default());
        let mut events = frame_all(&mut framer, b"a LOGIN {3+}\r\nbob {2+}\r\n\r\n\r\n");
        assert_eq!(events.len(), 1, "{events:?}");
        let Some(FrameEvent::Complete(raw)) = events.pop() else {
            panic!("expected a command");
        };
        let cmd = parse_command(raw).unwrap();
        assert_eq!(cmd.args, vec![string(b"bob"), string(b"\r\n")]);
    }

    #[test]
    fn literal_bytes_are_never_taken_for_commands() {
        let mut framer = CommandFramer::new(&Limits::default());
        let input = b"a LOGIN {12+}\r\nb LOGOUT\r\n\r\n pw\r\nc NOOP\r\n";
        let events = frame_all(&mut framer, input);
        assert_eq!(events.len(), 2, "{events:?}");
        let mut commands = events.into_iter().map(|event| match event {
            FrameEvent::Complete(raw) => parse_command(raw).unwrap(),
            other => panic!("unexpected {other:?}"),
        });
        let login = commands.next().unwrap();
        assert_eq!(login.args, vec![string(b"b LOGOUT\r\n\r\n"), atom("pw")]);
        assert_eq!(commands.next().unwrap().name, "NOOP");
    }

    #[test]
    fn zero_length_literal() {
        let mut framer = CommandFramer::new(&Limits::default());
        let events = frame_all(&mut framer, b"a LOGIN bob {0}\r\n\r\n");
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[0], FrameEvent::Continuation));
        let FrameEvent::Complete(raw) = events.into_iter().nth(1).unwrap() else {
            panic!("expected a command");
        };
        assert_eq!(
            parse_command(raw).unwrap().args,
            vec![atom("bob"), string(b"")]
        );
    }

    #[test]
    fn literal_announcement_inside_quotes_is_text() {
        let cmd = parse(b"t LOGIN bob \"{5}\"\r\n").unwrap();
        assert_eq!(cmd.args, vec![atom("bob"), string(b"{5}")]);
    }

    #[test]
    fn malformed_announcements_are_not_literals() {
        for line in [
            &b"t LOGIN a {}\r\n"[..],
            b"t LOGIN a {+}\r\n",
            b"t LOGIN a {1x}\r\n",
            b"t LOGIN a {-1}\r\n",
        ] {
            assert_eq!(parse(line), Err(ParseError::Syntax { tag: "t".into() }));
        }
    }

    #[test]
    fn literal_must_follow_a_separator() {
        let mut framer = CommandFramer::new(&Limits::default());
        let events = frame_all(&mut framer, b"t LOGIN bob{2+}\r\npw\r\n");
        let [FrameEvent::Complete(_)] = &events[..] else {
            panic!("expected one command, got {events:?}");
        };
        let Some(FrameEvent::Complete(raw)) = events.into_iter().next() else {
            unreachable!()
        };
        assert_eq!(
            parse_command(raw),
            Err(ParseError::Syntax { tag: "t".into() })
        );
    }

    #[test]
    fn literal_cannot_be_the_command_name() {
        let mut framer = CommandFramer::new(&Limits::default());
        let events = frame_all(&mut framer, b"t {5+}\r\nLOGIN\r\n");
        let Some(FrameEvent::Complete(raw)) = events.into_iter().next() else {
            panic!("expected a command");
        };
        assert_eq!(
            parse_command(raw),
            Err(ParseError::Syntax { tag: "t".into() })
        );
    }

    #[test]
    fn four_gib_literal_is_refused_without_allocating() {
        let mut framer = CommandFramer::new(&limits(8192, 8192));
        let events = frame_all(&mut framer, b"x1 LOGIN {4294967296}\r\n");
        assert_eq!(events.len(), 1);
        assert!(matches!(
            &events[0],
            FrameEvent::LiteralTooLarge { tag: Some(tag), synchronizing: true } if tag == "x1"
        ));
        assert_eq!(framer.buffered_len(), 0);
        assert_eq!(framer.literal.capacity(), 0);
        let events = frame_all(&mut framer, b"x2 LOGIN {99999999999999999999999999+}\r\n");
        assert!(matches!(
            &events[..],
            [FrameEvent::LiteralTooLarge {
                synchronizing: false,
                ..
            }]
        ));
    }

    #[test]
    fn literal_budget_covers_all_literals_of_a_command() {
        let mut framer = CommandFramer::new(&limits(100, 10));
        let events = frame_all(&mut framer, b"t LOGIN {6+}\r\nabcdef {5+}\r\n");
        assert!(matches!(
            &events[..],
            [FrameEvent::LiteralTooLarge { tag: Some(tag), synchronizing: false }] if tag == "t"
        ));
        let events = frame_all(&mut framer, b"t LOGIN {6+}\r\nabcdef {4+}\r\nwxyz\r\n");
        assert!(matches!(&events[..], [FrameEvent::Complete(_)]));
    }

    #[test]
    fn refused_login_literals_are_never_invited() {
        let mut framer = CommandFramer::new(&Limits::default());
        framer.refuse_login_literals(true);
        for (input, tag, synchronizing) in [
            (&b"a LOGIN bob {8}\r\n"[..], Some("a"), true),
            (b"b login {3}\r\n", Some("b"), true),
            (b"c AUTHENTICATE PLAIN {12}\r\n", Some("c"), true),
            (b"d  LOGIN{3}\r\n", Some("d"), true),
            (b"+ LOGIN bob {8}\r\n", None, true),
            (b"e LOGIN bob {8+}\r\npassword\r\n", Some("e"), false),
            (b"f LOGIN {4294967296}\r\n", Some("f"), true),
        ] {
            let (used, event) = framer.push(input);
            let text = String::from_utf8_lossy(input);
            assert_eq!(
                used,
                input.iter().position(|&b| b == b'\n').unwrap() + 1,
                "{text}"
            );
            match event {
                Some(FrameEvent::LoginLiteralRefused {
                    tag: refused,
                    synchronizing: sync,
                }) => {
                    assert_eq!(refused.as_deref(), tag, "{text}");
                    assert_eq!(sync, synchronizing, "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
            assert_eq!(framer.buffered_len(), 0);
        }
        let events = frame_all(&mut framer, b"g NOOP\r\n");
        assert!(
            matches!(&events[..], [FrameEvent::Complete(_)]),
            "{events:?}"
        );
    }

    #[test]
    fn only_login_literals_are_refused() {
        let mut framer = CommandFramer::new(&Limits::default());
        framer.refuse_login_literals(true);
        let events = frame_all(&mut framer, b"a ID (\"name\" {4}\r\n");
        assert!(matches!(&events[..], [FrameEvent::Continuation]));
        let events = frame_all(&mut framer, b"mutt)\r\nb LOGIN \"{3}\"\r\n");
        assert!(matches!(
            &events[..],
            [FrameEvent::Complete(_), FrameEvent::Complete(_)]
        ));
        framer.refuse_login_literals(false);
        let events = frame_all(&mut framer, b"c LOGIN bob {2}\r\n");
        assert!(matches!(&events[..], [FrameEvent::Continuation]));
    }

    #[test]
    fn literal_too_large_reports_a_missing_tag() {
        let mut framer = CommandFramer::new(&limits(100, 10));
        let events = frame_all(&mut framer, b"+ LOGIN {11}\r\n");
        assert!(matches!(
            &events[..],
            [FrameEvent::LiteralTooLarge { tag: None, .. }]
        ));
    }

    #[test]
    fn too_long_line_is_reported_before_its_end() {
        let mut framer = CommandFramer::new(&limits(16, 100));
        let (used, event) = framer.push(b"t LOGIN aaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
        assert_eq!(used, 16);
        assert!(matches!(event, Some(FrameEvent::TooLong)));
        assert_eq!(framer.buffered_len(), 0);
    }

    #[test]
    fn line_limit_counts_text_across_literals_but_not_literal_bytes() {
        let mut framer = CommandFramer::new(&limits(20, 100));
        let events = frame_all(&mut framer, b"t LOGIN {40+}\r\n");
        assert!(events.is_empty());
        let events = frame_all(&mut framer, &[b'x'; 40]);
        assert!(events.is_empty());
        let events = frame_all(&mut framer, b" p\r\n");
        assert!(matches!(&events[..], [FrameEvent::Complete(_)]));
        let events = frame_all(&mut framer, b"t LOGIN {1+}\r\nx ppppppp\r\n");
        assert!(matches!(&events[..], [FrameEvent::TooLong, ..]));
    }

    #[test]
    fn a_line_of_exactly_the_limit_fits() {
        let mut framer = CommandFramer::new(&limits(8, 10));
        let events = frame_all(&mut framer, b"t NOOP\r\n");
        assert!(matches!(&events[..], [FrameEvent::Complete(_)]));
        let events = frame_all(&mut framer, b"t NOOPS\r\n");
        assert!(matches!(&events[..], [FrameEvent::TooLong, ..]));
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_commands() {
        let input = b"a LOGIN {3}\r\nbob \"p\\\"w\"\r\nb ID (\"name\" {2+}\r\nmu)\r\n";
        let mut framer = CommandFramer::new(&Limits::default());
        let mut events = Vec::new();
        for &b in input.iter() {
            let (used, event) = framer.push(&[b]);
            assert_eq!(used, 1);
            events.extend(event);
        }
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(events[0], FrameEvent::Continuation));
        let mut commands = events.into_iter().skip(1).map(|event| match event {
            FrameEvent::Complete(raw) => parse_command(raw).unwrap(),
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(
            commands.next().unwrap().args,
            vec![string(b"bob"), string(b"p\"w")]
        );
        assert_eq!(
            commands.next().unwrap().args,
            vec![Token::LParen, string(b"name"), string(b"mu"), Token::RParen]
        );
    }

    #[test]
    fn push_stops_at_each_complete_command() {
        let mut framer = CommandFramer::new(&Limits::default());
        let input = b"a NOOP\r\nb NOOP\r\n";
        let (used, event) = framer.push(input);
        assert_eq!(used, 8);
        assert!(matches!(event, Some(FrameEvent::Complete(_))));
        let (used, event) = framer.push(&input[8..]);
        assert_eq!(used, 8);
        assert!(matches!(event, Some(FrameEvent::Complete(_))));
    }
}
