//! A read buffer for one side of an HTTP/1.x connection: bytes read but not yet used, with
//! room to read more, growing up to a limit (a head must fit whole) and back to its starting
//! size once drained.

use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug)]
pub struct ReadBuffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    initial: usize,
}

impl ReadBuffer {
    /// A buffer that allocates `initial` bytes on its first read.
    pub fn new(initial: usize) -> Self {
        Self {
            data: Vec::new(),
            start: 0,
            end: 0,
            initial,
        }
    }

    /// The bytes read and not yet consumed.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks the first `count` filled bytes as used.
    pub fn consume(&mut self, count: usize) {
        self.start = (self.start + count).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives back memory a long head or a large read made it grow to, once it is drained.
    pub fn shrink(&mut self) {
        if self.is_empty() && self.data.len() > self.initial {
            self.data = Vec::new();
        }
    }

    /// Reads once more from `io` (at least one byte of room is made, up to `limit` bytes held in
    /// all); `Ok(0)` is the end of the stream. A buffer already holding `limit` bytes gets an
    /// `InvalidInput` error.
    pub async fn read_from<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        limit: usize,
    ) -> std::io::Result<usize> {
        self.make_room(limit)?;
        let read = io.read(&mut self.data[self.end..]).await?;
        self.end += read;
        Ok(read)
    }

    fn make_room(&mut self, limit: usize) -> std::io::Result<()> {
        if self.end < self.data.len() {
            return Ok(());
        }
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end < self.data.len() {
                return Ok(());
            }
        }
        let held = self.end;
        if held >= limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "read buffer full",
            ));
        }
        let size = (self.data.len() * 2).clamp(self.initial, limit.max(self.initial));
        self.data.resize(size, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_grow_up_to_the_limit_and_shrink_once_drained() {
        let input = [7u8; 100];
        let mut io = &input[..];
        let mut buffer = ReadBuffer::new(16);
        let mut total = 0;
        while total < 64 {
            total += buffer.read_from(&mut io, 64).await.unwrap();
        }
        assert_eq!(buffer.filled().len(), 64);
        assert!(
            buffer.read_from(&mut io, 64).await.is_err(),
            "past the limit"
        );
        buffer.consume(60);
        assert_eq!(buffer.filled(), &[7; 4]);
        assert_eq!(buffer.read_from(&mut io, 64).await.unwrap(), 36);
        buffer.consume(40);
        assert!(buffer.is_empty());
        buffer.shrink();
        assert_eq!(
            buffer.read_from(&mut io, 64).await.unwrap(),
            0,
            "end of input"
        );
    }
}
