//! Small packet helpers: the UDP template generators use and MAC rewrites forwarders do.

/// Length of an Ethernet + IPv4 + UDP header.
pub const UDP_HDR_LEN: usize = 14 + 20 + 8;

/// Ethernet/IPv4/UDP headers for a frame of `frame_len` bytes (no FCS) from `src` to `dst`,
/// 198.18.0.1:9 → 198.18.0.2:9 (the RFC 2544 benchmarking range), IPv4 checksum filled in and
/// the UDP checksum left 0 (allowed for IPv4). Frames shorter than the headers get the headers
/// truncated to `frame_len`.
pub fn udp_template(src: [u8; 6], dst: [u8; 6], frame_len: usize) -> Vec<u8> {
    let ip_len = frame_len.saturating_sub(14).clamp(28, 65535) as u16;
    let udp_len = ip_len - 20;
    let mut h = Vec::with_capacity(UDP_HDR_LEN);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(&ip);
    h.extend_from_slice(&9u16.to_be_bytes());
    h.extend_from_slice(&9u16.to_be_bytes());
    h.extend_from_slice(&udp_len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.truncate(frame_len);
    h
}

/// The Internet checksum of an IPv4 header (whose checksum field is zero or is being verified:
/// a correct header sums to 0).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in hdr.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Swaps the destination and source MAC of an Ethernet frame (no-op on frames under 12 bytes).
#[inline(always)]
pub fn swap_macs(frame: &mut [u8]) {
    if frame.len() >= 12 {
        let (dst, rest) = frame.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
    }
}

/// Writes destination and source MACs (no-op on frames under 12 bytes).
#[inline(always)]
pub fn set_macs(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    if frame.len() >= 12 {
        frame[..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_a_valid_ipv4_udp_frame() {
        let t = udp_template([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 64);
        assert_eq!(t.len(), UDP_HDR_LEN);
        assert_eq!(&t[0..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&t[12..14], &[8, 0]);
        assert_eq!(
            u16::from_be_bytes([t[16], t[17]]),
            50,
            "IP total length = 64 - 14"
        );
        assert_eq!(u16::from_be_bytes([t[38], t[39]]), 30, "UDP length");
        assert_eq!(ipv4_checksum(&t[14..34]), 0, "checksum verifies");
        assert_eq!(udp_template([0; 6], [0; 6], 20).len(), 20);
    }

    #[test]
    fn mac_rewrites() {
        let mut f = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 9];
        swap_macs(&mut f);
        assert_eq!(f, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 9]);
        set_macs(&mut f, [7; 6], [8; 6]);
        assert_eq!(&f[..12], &[7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8]);
        let mut short = [1u8; 5];
        swap_macs(&mut short);
        assert_eq!(short, [1; 5]);
    }
}
