//! Little-endian encoding with bounds-checked decoding.

/// Appends values to a buffer.
#[derive(Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// `u32` length, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
}

/// Reads values, failing with the offset on any overrun.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the file, for error messages.
    base: u64,
}

/// A decoding failure: where and what.
#[derive(Debug)]
pub struct DecErr {
    pub offset: u64,
    pub what: String,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8], base: u64) -> Self {
        Self { buf, pos: 0, base }
    }
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }
    pub fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// How many of `n` items of at least `each` encoded bytes the rest of
    /// the input can hold: what to reserve room for before decoding them
    /// (a crafted count cannot make a reservation larger than the input).
    pub fn room_for(&self, n: usize, each: usize) -> usize {
        n.min((self.buf.len() - self.pos) / each.max(1))
    }
    pub fn err(&self, what: impl Into<String>) -> DecErr {
        DecErr {
            offset: self.offset(),
            what: what.into(),
        }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecErr> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format!(
                "needs {n} more bytes, {} left (truncated?)",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u16(&mut self) -> Result<u16, DecErr> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    pub fn u32(&mut self) -> Result<u32, DecErr> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, DecErr> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn i32(&mut self) -> Result<i32, DecErr> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    /// Length-prefixed bytes of at most `cap` bytes.
    pub fn bytes(&mut self, cap: usize, what: &str) -> Result<&'a [u8], DecErr> {
        let len = self.u32()? as usize;
        if len > cap {
            return Err(self.err(format!("{what} of {len} bytes exceeds the cap of {cap}")));
        }
        self.take(len)
    }
    pub fn str(&mut self, cap: usize, what: &str) -> Result<String, DecErr> {
        let b = self.bytes(cap, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
}
