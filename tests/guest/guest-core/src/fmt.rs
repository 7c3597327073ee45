//! A fixed-capacity line buffer implementing `core::fmt::Write` (no allocation): output that
//! does not fit is cut, never a panic.

/// A line of at most `N` bytes.
pub struct Line<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Line<N> {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; N],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Discards the contents.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl<const N: usize> Default for Line<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> core::fmt::Write for Line<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn truncates() {
        let mut l = Line::<8>::new();
        write!(l, "abc{}", 12345678).unwrap();
        assert_eq!(l.as_bytes(), b"abc12345");
        l.clear();
        write!(l, "{:#x}", 255).unwrap();
        assert_eq!(l.as_bytes(), b"0xff");
    }
}
