//! Bounded line reassembly for the line-oriented parts of the mail protocols: POP3 commands,
//! SASL responses and the upstream server's replies.
//!
//! Lines end at LF; a CR right before it is dropped, a bare LF is accepted as nginx does.

use super::wipe;

/// What [`LineReader::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// The input ended before a line did; everything was buffered.
    Incomplete,
    /// A whole line, without its CRLF.
    Line(Vec<u8>),
    /// The line reached the maximum length before its LF. Its bytes were dropped; the peer is
    /// to be disconnected because the rest of the line cannot be told from the next command.
    TooLong,
}

/// Collects one line at a time from arbitrarily split input, holding at most `max_len - 1`
/// bytes.
pub struct LineReader {
    buf: Vec<u8>,
    max_len: usize,
}

impl LineReader {
    /// `max_len` counts the whole line including its CRLF.
    pub fn new(max_len: usize) -> Self {
        LineReader {
            buf: Vec::new(),
            max_len,
        }
    }

    /// Takes bytes from `input` up to and including the first LF. Returns how many bytes were
    /// consumed, so that the caller keeps the rest (the next pipelined command) for later.
    pub fn push(&mut self, input: &[u8]) -> (usize, LineRead) {
        match input.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let consumed = lf + 1;
                if self.buf.len() + consumed > self.max_len {
                    self.clear();
                    return (consumed, LineRead::TooLong);
                }
                self.buf.extend_from_slice(&input[..lf]);
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                (consumed, LineRead::Line(std::mem::take(&mut self.buf)))
            }
            None => {
                if self.buf.len() + input.len() >= self.max_len {
                    self.clear();
                    return (input.len(), LineRead::TooLong);
                }
                self.buf.extend_from_slice(input);
                (input.len(), LineRead::Incomplete)
            }
        }
    }

    /// Bytes held for an unfinished line.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Forgets the unfinished line, overwriting it since it may hold a SASL response.
    pub fn clear(&mut self) {
        wipe(&mut self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_lines_without_crlf_and_reports_consumption() {
        let mut reader = LineReader::new(100);
        let input = b"USER bob\r\nPASS x\n";
        let (used, read) = reader.push(input);
        assert_eq!(used, 10);
        assert_eq!(read, LineRead::Line(b"USER bob".to_vec()));
        let (used, read) = reader.push(&input[10..]);
        assert_eq!(used, 7);
        assert_eq!(read, LineRead::Line(b"PASS x".to_vec()));
    }

    #[test]
    fn reassembles_a_line_fed_one_byte_at_a_time() {
        let mut reader = LineReader::new(100);
        let input = b"CAPA\r\n";
        for &b in &input[..input.len() - 1] {
            assert_eq!(reader.push(&[b]), (1, LineRead::Incomplete));
        }
        assert_eq!(reader.push(b"\n"), (1, LineRead::Line(b"CAPA".to_vec())));
        assert_eq!(reader.buffered_len(), 0);
    }

    #[test]
    fn a_line_of_exactly_the_maximum_fits() {
        let mut reader = LineReader::new(6);
        assert_eq!(reader.push(b"ABCD\r"), (5, LineRead::Incomplete));
        assert_eq!(reader.push(b"\n"), (1, LineRead::Line(b"ABCD".to_vec())));
    }

    #[test]
    fn a_line_over_the_maximum_is_refused_before_its_end_arrives() {
        let mut reader = LineReader::new(6);
        assert_eq!(reader.push(b"ABCDE"), (5, LineRead::Incomplete));
        assert_eq!(reader.push(b"F"), (1, LineRead::TooLong));
        assert_eq!(reader.buffered_len(), 0);
    }

    #[test]
    fn a_complete_line_over_the_maximum_is_refused() {
        let mut reader = LineReader::new(6);
        assert_eq!(reader.push(b"ABCDEF\r\nNEXT"), (8, LineRead::TooLong));
    }

    #[test]
    fn only_the_cr_right_before_lf_is_dropped() {
        let mut reader = LineReader::new(100);
        assert_eq!(
            reader.push(b"a\rb\r\r\n").1,
            LineRead::Line(b"a\rb\r".to_vec())
        );
    }
}
