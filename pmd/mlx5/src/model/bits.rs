//! The model's field accessor: `(bit, width)` pairs, bit counted from the most significant bit
//! of the first big-endian dword. Written for the model alone (the driver has its own), and
//! total: reads outside the bytes read 0, writes outside are dropped, so nothing a driver sends
//! can make the model panic.

/// A field: absolute bit position from the start of the buffer, width in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fld(pub usize, pub usize);

impl Fld {
    /// The same field shifted by `bytes`.
    pub const fn plus(self, bytes: usize) -> Fld {
        Fld(self.0 + bytes * 8, self.1)
    }
}

/// Reads `f` from `b` (fields up to 64 bits; a 64-bit field is one big-endian qword).
pub fn rd(b: &[u8], f: Fld) -> u64 {
    let Fld(bit, width) = f;
    if width == 0 || width > 64 {
        return 0;
    }
    let mut v: u64 = 0;
    for i in 0..width {
        let pos = bit + i;
        let byte = b.get(pos / 8).copied().unwrap_or(0);
        let set = (byte >> (7 - pos % 8)) & 1;
        v = (v << 1) | u64::from(set);
    }
    v
}

/// Writes `v` into `f` of `b`.
pub fn wr(b: &mut [u8], f: Fld, v: u64) {
    let Fld(bit, width) = f;
    if width == 0 || width > 64 {
        return;
    }
    for i in 0..width {
        let pos = bit + i;
        let set = (v >> (width - 1 - i)) & 1;
        if let Some(byte) = b.get_mut(pos / 8) {
            let m = 1u8 << (7 - pos % 8);
            if set != 0 {
                *byte |= m;
            } else {
                *byte &= !m;
            }
        }
    }
}

/// Big-endian u32 at byte `off` (0 outside).
pub fn be32(b: &[u8], off: usize) -> u32 {
    let mut x = [0u8; 4];
    for (i, d) in x.iter_mut().enumerate() {
        *d = b.get(off + i).copied().unwrap_or(0);
    }
    u32::from_be_bytes(x)
}

/// Big-endian u64 at byte `off` (0 outside).
pub fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}

/// Writes a big-endian u64 at byte `off` (dropped outside).
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    for (i, x) in v.to_be_bytes().iter().enumerate() {
        if let Some(d) = b.get_mut(off + i) {
            *d = *x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_accessors() {
        let mut b = [0u8; 16];
        wr(&mut b, Fld(0, 16), 0xa00);
        assert_eq!(b[..2], [0x0a, 0x00]);
        wr(&mut b, Fld(0x48, 24), 0xabcdef);
        assert_eq!(b[8..12], [0, 0xab, 0xcd, 0xef]);
        assert_eq!(rd(&b, Fld(0x48, 24)), 0xabcdef);
        wr(&mut b, Fld(0x40, 64), 0x1122_3344_5566_7788);
        assert_eq!(be64(&b, 8), 0x1122_3344_5566_7788);
        assert_eq!(rd(&b, Fld(0x7c, 4)), 8);
        // Outside the buffer: reads 0, writes dropped.
        assert_eq!(rd(&b, Fld(0x200, 32)), 0);
        wr(&mut b, Fld(0x7c, 64), u64::MAX);
        assert_eq!(rd(&b, Fld(0x7c, 4)), 0xf);
    }
}
