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

/// Writes a broadcast RARP request announcing `mac` (what a back end sends for a migrated guest)
/// into `frame` (at least 60 bytes; the rest is zero padding).
pub fn build_rarp(frame: &mut [u8], mac: [u8; 6]) {
    if frame.len() < 60 {
        return;
    }
    frame[..60].fill(0);
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
}

/// Turns an ARP request or an ICMPv4 echo request into its reply, in place (testpmd's
/// `icmpecho`): ARP requests for any address are answered with `mac`; echo requests get MACs and
/// IPs swapped, type 0 and the checksum adjusted. Returns false (frame untouched) for anything else.
pub fn icmpecho(frame: &mut [u8], mac: [u8; 6]) -> bool {
    if frame.len() < 14 {
        return false;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match ethertype {
        0x0806 if frame.len() >= 42 => {
            let a = &frame[14..42];
            // Ethernet/IPv4 ARP request.
            if a[0..2] != [0, 1] || a[2..4] != [8, 0] || a[4] != 6 || a[5] != 4 || a[6..8] != [0, 1]
            {
                return false;
            }
            let (sha, spa, tpa) = {
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&a[8..14]);
                let mut spa = [0u8; 4];
                spa.copy_from_slice(&a[14..18]);
                let mut tpa = [0u8; 4];
                tpa.copy_from_slice(&a[24..28]);
                (sha, spa, tpa)
            };
            set_macs(frame, sha, mac);
            let a = &mut frame[14..42];
            a[6..8].copy_from_slice(&[0, 2]);
            a[8..14].copy_from_slice(&mac);
            a[14..18].copy_from_slice(&tpa);
            a[18..24].copy_from_slice(&sha);
            a[24..28].copy_from_slice(&spa);
            true
        }
        0x0800 if frame.len() >= 34 => {
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            if frame[14] >> 4 != 4 || ihl < 20 || frame.len() < 14 + ihl + 8 || frame[23] != 1 {
                return false;
            }
            let icmp = 14 + ihl;
            if frame[icmp] != 8 || frame[icmp + 1] != 0 {
                return false;
            }
            swap_macs(frame);
            let (src, dst) = frame[26..34].split_at_mut(4);
            src.swap_with_slice(dst);
            frame[icmp] = 0;
            // RFC 1624 incremental update: the type word went from 0x0800 to 0x0000.
            let old = u16::from_be_bytes([frame[icmp + 2], frame[icmp + 3]]);
            let mut sum = (!old as u32) + (!0x0800u16 as u32);
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            frame[icmp + 2..icmp + 4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            true
        }
        _ => false,
    }
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

    fn inet_sum(b: &[u8]) -> u16 {
        ipv4_checksum(b)
    }

    #[test]
    fn icmpecho_answers_arp_and_ping() {
        let me = [2, 0, 0, 0, 0, 9];
        let peer = [2, 0, 0, 0, 0, 1];
        let mut arp = vec![0u8; 60];
        arp[0..6].copy_from_slice(&[0xff; 6]);
        arp[6..12].copy_from_slice(&peer);
        arp[12..14].copy_from_slice(&[8, 6]);
        arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp[22..28].copy_from_slice(&peer);
        arp[28..32].copy_from_slice(&[192, 0, 2, 2]);
        arp[38..42].copy_from_slice(&[192, 0, 2, 1]);
        assert!(icmpecho(&mut arp, me));
        assert_eq!(&arp[0..6], &peer);
        assert_eq!(&arp[6..12], &me);
        assert_eq!(&arp[20..22], &[0, 2], "ARP reply");
        assert_eq!(&arp[22..28], &me);
        assert_eq!(&arp[28..32], &[192, 0, 2, 1]);
        assert_eq!(&arp[32..38], &peer);
        assert_eq!(&arp[38..42], &[192, 0, 2, 2]);

        // An echo request with a correct checksum.
        let mut f = udp_template(peer, me, 98);
        f.resize(98, 0);
        f[23] = 1; // ICMP
        f[24..26].copy_from_slice(&[0, 0]);
        let c = ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34] = 8;
        f[35] = 0;
        for (i, b) in f[38..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f[36..38].copy_from_slice(&[0, 0]); // the checksum field is zero while summing
        let c = inet_sum(&f[34..]);
        f[36..38].copy_from_slice(&c.to_be_bytes());
        assert!(icmpecho(&mut f, me));
        assert_eq!(f[34], 0, "echo reply");
        assert_eq!(inet_sum(&f[34..]), 0, "ICMP checksum still verifies");
        assert_eq!(&f[0..6], &peer);
        assert_eq!(&f[26..30], &[198, 18, 0, 2], "IPs swapped");
        assert_eq!(
            ipv4_checksum(&f[14..34]),
            0,
            "IP checksum unchanged by the swap"
        );

        let mut udp = udp_template(peer, me, 64);
        udp.resize(64, 0);
        let before = udp.clone();
        assert!(!icmpecho(&mut udp, me));
        assert_eq!(udp, before);
        assert!(!icmpecho(&mut [0u8; 10], me));
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
