//! PCI addresses (`DDDD:BB:DD.F`).

use std::fmt;
use std::str::FromStr;

use super::PciError;

/// A PCI function address: domain, bus, device (0..=31), function (0..=7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..=31).
    pub dev: u8,
    /// Function (0..=7).
    pub func: u8,
}

impl FromStr for Bdf {
    type Err = PciError;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), hexadecimal.
    fn from_str(s: &str) -> Result<Bdf, PciError> {
        let bad = || PciError::BadAddress(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] => (*d, *b, *r),
            [b, r] => ("0", *b, *r),
            _ => return Err(bad()),
        };
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max_len: usize| -> Result<u32, PciError> {
            if t.is_empty() || t.len() > max_len || !t.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let domain = hex(domain, 4)?;
        let bus = hex(bus, 2)?;
        let dev = hex(dev, 2)?;
        let func = hex(func, 1)?;
        if dev > 31 || func > 7 {
            return Err(bad());
        }
        Ok(Bdf {
            domain: domain as u16,
            bus: bus as u8,
            dev: dev as u8,
            func: func as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.dev, self.func
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let b: Bdf = "0000:03:00.1".parse().unwrap();
        assert_eq!((b.domain, b.bus, b.dev, b.func), (0, 3, 0, 1));
        assert_eq!(b.to_string(), "0000:03:00.1");
        let b: Bdf = "af:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:af:1f.7");
    }

    #[test]
    fn rejects_bad() {
        for s in [
            "",
            "00:00",
            "0000:00:20.0",
            "0000:00:00.8",
            "g0:00.0",
            "0:0:0:0.0",
            "12345:00:00.0",
            "00:00.",
            "00:000.0",
        ] {
            let e = s.parse::<Bdf>().unwrap_err().to_string();
            assert!(e.contains(&format!("'{s}'")), "{s}: {e}");
        }
    }
}
