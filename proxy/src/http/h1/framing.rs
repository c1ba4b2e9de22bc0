//! Where an HTTP/1.x message body ends (RFC 9112 §6): after a length, after the last chunk of
//! the chunked coding, or at the connection's close. Pure code, no I/O.
//!
//! Chunked bodies are passed through as they are (framing, extensions and trailers included), so
//! the decoder only has to find the body's end; it also says which bytes are chunk data, for an
//! HTTP/1.0 client that cannot take the chunked coding. It is strict (CRLF line ends, hex sizes
//! that fit in 64 bits, bounded extension and trailer lines): a proxy and a backend that disagree
//! on where a body ends are how requests get smuggled.

use std::ops::Range;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

/// A chunked body that breaks the coding's grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("a chunk size is not hexadecimal")]
    BadSize,
    #[error("a chunk size does not fit in 64 bits")]
    SizeTooLarge,
    #[error("a chunk line does not end with CRLF")]
    BadLineEnd,
    #[error("a chunk extension is longer than {MAX_EXTENSION} bytes or holds a control byte")]
    BadExtension,
    #[error("the trailer section is longer than {MAX_TRAILERS} bytes or holds a control byte")]
    BadTrailer,
}

/// Longest chunk extension (`;name=value...`) on one size line.
const MAX_EXTENSION: usize = 4096;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In a chunk size; `digits` read so far.
    Size { digits: u8 },
    /// After the size: an extension, up to the CR.
    Extension { length: usize },
    /// The LF of a size line.
    SizeLf,
    /// `remaining` bytes of chunk data.
    Data { remaining: u64 },
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerLineStart,
    /// Inside a trailer line.
    TrailerLine,
    /// The LF of a trailer line.
    TrailerLf,
    /// The LF of the final CRLF.
    EndLf,
    /// The body has ended.
    Done,
}

/// What one [`ChunkedDecoder::advance`] call found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that belong to the body (framing included).
    pub consumed: usize,
    /// The chunk data among them (empty when none).
    pub data: Range<usize>,
}

/// Follows a chunked body through the bytes that carry it.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: State::Size { digits: 0 },
            size: 0,
            trailer_bytes: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Whether the last chunk and the trailer section have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `input` up to the end of the body or the end of the first run of chunk data,
    /// whichever comes first; call again with the rest. Bytes after the body are not consumed.
    pub fn advance(&mut self, input: &[u8]) -> Result<Step, ChunkedError> {
        let mut at = 0;
        while at < input.len() {
            if let State::Data { remaining } = self.state {
                let available = (input.len() - at) as u64;
                let take = remaining.min(available) as usize;
                let data = at..at + take;
                let remaining = remaining - take as u64;
                self.state = if remaining == 0 {
                    State::DataCr
                } else {
                    State::Data { remaining }
                };
                return Ok(Step {
                    consumed: data.end,
                    data,
                });
            }
            if self.state == State::Done {
                break;
            }
            self.byte(input[at])?;
            at += 1;
        }
        Ok(Step {
            consumed: at,
            data: at..at,
        })
    }

    fn byte(&mut self, byte: u8) -> Result<(), ChunkedError> {
        self.state = match self.state {
            State::Size { digits } => match hex_value(byte) {
                Some(value) => {
                    if self.size >> 60 != 0 {
                        return Err(ChunkedError::SizeTooLarge);
                    }
                    self.size = self.size << 4 | u64::from(value);
                    State::Size {
                        digits: digits.saturating_add(1),
                    }
                }
                None if digits == 0 => return Err(ChunkedError::BadSize),
                None => match byte {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(ChunkedError::BadLineEnd),
                    b';' | b' ' | b'\t' => State::Extension { length: 1 },
                    _ => return Err(ChunkedError::BadSize),
                },
            },
            State::Extension { length } => match byte {
                b'\r' => State::SizeLf,
                _ if length >= MAX_EXTENSION || is_forbidden_control(byte) => {
                    return Err(ChunkedError::BadExtension);
                }
                _ => State::Extension { length: length + 1 },
            },
            State::SizeLf => match byte {
                b'\n' if self.size == 0 => State::TrailerLineStart,
                b'\n' => State::Data {
                    remaining: std::mem::take(&mut self.size),
                },
                _ => return Err(ChunkedError::BadLineEnd),
            },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(ChunkedError::BadLineEnd),
            },
            State::DataLf => match byte {
                b'\n' => State::Size { digits: 0 },
                _ => return Err(ChunkedError::BadLineEnd),
            },
            State::TrailerLineStart => match byte {
                b'\r' => State::EndLf,
                _ => self.trailer_byte(byte)?,
            },
            State::TrailerLine => match byte {
                b'\r' => State::TrailerLf,
                _ => self.trailer_byte(byte)?,
            },
            State::TrailerLf => match byte {
                b'\n' => State::TrailerLineStart,
                _ => return Err(ChunkedError::BadLineEnd),
            },
            State::EndLf => match byte {
                b'\n' => State::Done,
                _ => return Err(ChunkedError::BadLineEnd),
            },
            State::Data { .. } | State::Done => self.state,
        };
        Ok(())
    }

    fn trailer_byte(&mut self, byte: u8) -> Result<State, ChunkedError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILERS || is_forbidden_control(byte) {
            return Err(ChunkedError::BadTrailer);
        }
        Ok(State::TrailerLine)
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Control bytes other than HTAB (a bare LF included: lines end with CRLF only).
fn is_forbidden_control(byte: u8) -> bool {
    (byte < 0x20 && byte != b'\t') || byte == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `piece` bytes; returns (body bytes consumed, chunk data).
    fn run(input: &[u8], piece: usize) -> Result<(usize, Vec<u8>, bool), ChunkedError> {
        let mut decoder = ChunkedDecoder::default();
        let mut data = Vec::new();
        let mut consumed = 0;
        for piece in input.chunks(piece) {
            let mut at = 0;
            loop {
                let step = decoder.advance(&piece[at..])?;
                data.extend_from_slice(&piece[at..][step.data.clone()]);
                at += step.consumed;
                consumed += step.consumed;
                if step.consumed == 0 || at == piece.len() || decoder.is_done() {
                    break;
                }
            }
            if decoder.is_done() {
                break;
            }
        }
        Ok((consumed, data, decoder.is_done()))
    }

    #[test]
    fn a_body_ends_after_the_last_chunk_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1;name=value\r\n \r\n0\r\n\r\nGET /next";
        for piece in 1..body.len() {
            let (consumed, data, done) = run(body, piece).unwrap();
            assert!(done, "piece {piece}");
            assert_eq!(consumed, body.len() - b"GET /next".len(), "piece {piece}");
            assert_eq!(data, b"hello ", "piece {piece}");
        }
    }

    #[test]
    fn trailers_belong_to_the_body() {
        let body = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\nrest";
        let (consumed, data, done) = run(body, 64).unwrap();
        assert!(done);
        assert_eq!(&body[consumed..], b"rest");
        assert_eq!(data, b"abc");
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        let (consumed, data, done) = run(b"a\r\n01234", 64).unwrap();
        assert!(!done);
        assert_eq!(consumed, 8);
        assert_eq!(data, b"01234");
    }

    #[test]
    fn big_sizes_are_counted_not_buffered() {
        let mut decoder = ChunkedDecoder::default();
        assert_eq!(decoder.advance(b"FFFFFFFF\r\n").unwrap().consumed, 10);
        let step = decoder.advance(&[0; 100]).unwrap();
        assert_eq!(
            step,
            Step {
                consumed: 100,
                data: 0..100
            }
        );
        assert!(!decoder.is_done());
    }

    #[test]
    fn broken_codings_are_errors() {
        for (body, error) in [
            (&b"x\r\n"[..], ChunkedError::BadSize),
            (b"\r\n", ChunkedError::BadSize),
            (b"-1\r\n", ChunkedError::BadSize),
            (b"5\nhello", ChunkedError::BadLineEnd),
            (b"3\r\nabcX", ChunkedError::BadLineEnd),
            (b"3\r\nabc\rX", ChunkedError::BadLineEnd),
            (b"10000000000000000\r\n", ChunkedError::SizeTooLarge),
            (b"0;a\x00b\r\n", ChunkedError::BadExtension),
            (b"0\r\nX: \x01\r\n", ChunkedError::BadTrailer),
            (b"0\r\n\rX", ChunkedError::BadLineEnd),
        ] {
            assert_eq!(run(body, 64).unwrap_err(), error, "{body:?}");
        }
    }

    #[test]
    fn sixteen_hex_digits_fit() {
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.advance(b"000000000000000F\r\n").is_ok());
        let mut decoder = ChunkedDecoder::default();
        assert!(decoder.advance(b"FFFFFFFFFFFFFFFF\r\n").is_ok());
    }

    #[test]
    fn endless_extensions_and_trailers_are_cut_off() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_EXTENSION));
        assert_eq!(run(&long, 512).unwrap_err(), ChunkedError::BadExtension);
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 6 + 1 {
            trailers.extend(b"X: abc\r\n");
        }
        assert_eq!(run(&trailers, 512).unwrap_err(), ChunkedError::BadTrailer);
    }
}
