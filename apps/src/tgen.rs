//! Traffic generation and measurement for `vdpakit fwd`: packet sizes (fixed, uniform range,
//! IMIX), flows (source IPv4 address and UDP source port cycling), a token-bucket rate limiter on
//! the cycle clock, and latency stamps with per-stream sequence tracking on the receive side.
//!
//! Everything a poll loop calls here is allocation-free and lock-free: generators and recorders
//! are built (and their histograms allocated) before the loops start; recorders hand interval
//! histograms to the main thread through two lock-free queues of preallocated boxes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use vdpakit_core::mbuf::Mbuf;
use vdpakit_core::packet::{UDP_HDR_LEN, udp_template};

/// Smallest frame generated (no FCS).
pub const FRAME_MIN: usize = 60;
/// Largest frame generated (no FCS; jumbo).
pub const FRAME_MAX: usize = 9000;
/// The classic 7:4:1 IMIX as a fixed 12-packet pattern (64-byte frames spread out).
pub const IMIX: [u16; 12] = [64, 594, 64, 64, 594, 64, 1518, 64, 594, 64, 64, 594];

/// Where the latency stamp starts: right after the Ethernet/IPv4/UDP headers.
pub const STAMP_OFF: usize = UDP_HDR_LEN;
/// Stamp layout (little endian): magic u32, source stream u32 (tx port << 16 | tx queue),
/// sequence u32, cycle-clock ticks u64.
pub const STAMP_LEN: usize = 20;
/// The smallest frame that carries a stamp.
pub const STAMP_MIN_FRAME: usize = STAMP_OFF + STAMP_LEN;
/// "vdpk" in ASCII, little endian.
pub const STAMP_MAGIC: u32 = u32::from_le_bytes(*b"vdpk");
/// "vdpE": an end marker. Same layout as a stamp; the sequence field is the number of packets
/// the stream stamped (its next sequence number), so a receiver in another process can count
/// those sent after the last one it got as lost. Not a data packet: no latency, size or flow.
pub const END_MAGIC: u32 = u32::from_le_bytes(*b"vdpE");
/// End markers each stamping stream sends when it stops generating (several, in case one is
/// dropped on the way; receivers count a stream's end once).
pub const END_COPIES: u8 = 4;

/// Source IPv4 address of flow 0 (198.18.0.1, RFC 2544 range); flow f uses this + f.
const SRC_IP_BASE: u32 = u32::from_be_bytes([198, 18, 0, 1]);
/// Source UDP port of flow 0; flow f uses 1024 + f % 64512.
const SRC_PORT_BASE: u32 = 1024;

/// Most flows `--flows` accepts.
pub const MAX_FLOWS: u32 = 65536;

/// What `--pkt-size` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// Every packet this size.
    Fixed(usize),
    /// Uniform in `min..=max` per packet.
    Range(usize, usize),
    /// The IMIX pattern.
    Imix,
}

const SIZE_ACCEPTED: &str = "a size in 60..=9000, a range MIN-MAX within it (MIN <= MAX), or imix";

impl SizeSpec {
    /// Parses `N`, `MIN-MAX` or `imix`.
    pub fn parse(s: &str) -> Result<SizeSpec, String> {
        let bad = || format!("accepted is {SIZE_ACCEPTED}");
        let num = |t: &str| match t.trim().parse::<usize>() {
            Ok(v) if (FRAME_MIN..=FRAME_MAX).contains(&v) => Ok(v),
            _ => Err(bad()),
        };
        if s.eq_ignore_ascii_case("imix") {
            return Ok(SizeSpec::Imix);
        }
        match s.split_once('-') {
            Some((a, b)) => {
                let (lo, hi) = (num(a)?, num(b)?);
                if lo > hi {
                    return Err(format!("the range runs backwards; {}", bad()));
                }
                Ok(if lo == hi {
                    SizeSpec::Fixed(lo)
                } else {
                    SizeSpec::Range(lo, hi)
                })
            }
            None => Ok(SizeSpec::Fixed(num(s)?)),
        }
    }

    /// The smallest size generated.
    pub fn min(&self) -> usize {
        match *self {
            SizeSpec::Fixed(n) | SizeSpec::Range(n, _) => n,
            SizeSpec::Imix => 64,
        }
    }

    /// The largest size generated.
    pub fn max(&self) -> usize {
        match *self {
            SizeSpec::Fixed(n) | SizeSpec::Range(_, n) => n,
            SizeSpec::Imix => 1518,
        }
    }

    /// As given on the command line (normalised).
    pub fn label(&self) -> String {
        match *self {
            SizeSpec::Fixed(n) => n.to_string(),
            SizeSpec::Range(a, b) => format!("{a}-{b}"),
            SizeSpec::Imix => "imix".into(),
        }
    }
}

/// Per-packet sizes for one stream: no allocation, a xorshift64 step per packet for ranges.
#[derive(Debug, Clone)]
pub struct SizeGen {
    spec: SizeSpec,
    rng: u64,
    i: usize,
}

impl SizeGen {
    /// A generator; `seed` differs per stream so streams do not move in lockstep.
    pub fn new(spec: SizeSpec, seed: u64) -> SizeGen {
        // splitmix64 of the seed: never zero for xorshift's sake.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        SizeGen {
            spec,
            rng: z | 1,
            i: 0,
        }
    }

    /// The next packet's size.
    #[inline(always)]
    pub fn next_size(&mut self) -> usize {
        match self.spec {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Range(lo, hi) => {
                let mut x = self.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.rng = x;
                let span = (hi - lo + 1) as u64;
                lo + (((x >> 32) * span) >> 32) as usize
            }
            SizeSpec::Imix => {
                let n = IMIX[self.i];
                self.i = if self.i + 1 == IMIX.len() {
                    0
                } else {
                    self.i + 1
                };
                n as usize
            }
        }
    }
}

/// Writes Ethernet/IPv4/UDP headers for a cycle of flows. The IPv4 checksum is finished per
/// packet from a precomputed sum of the constant header words (a few adds), the UDP checksum is 0.
#[derive(Debug, Clone)]
pub struct UdpGen {
    hdr: [u8; UDP_HDR_LEN],
    base_sum: u32,
    flows: u32,
    next: u32,
}

impl UdpGen {
    /// Headers from `src` to `dst` cycling over `flows` flows (1..=65536).
    pub fn new(src: [u8; 6], dst: [u8; 6], flows: u32) -> UdpGen {
        let mut hdr = [0u8; UDP_HDR_LEN];
        hdr.copy_from_slice(&udp_template(src, dst, UDP_HDR_LEN));
        // The constant part of the IPv4 header: length, checksum and source address zeroed.
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&hdr[14..34]);
        ip[2..4].fill(0);
        ip[10..12].fill(0);
        ip[12..16].fill(0);
        let base_sum = ip
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        UdpGen {
            hdr,
            base_sum,
            flows: flows.clamp(1, MAX_FLOWS),
            next: 0,
        }
    }

    /// The flow a source address belongs to, if it is one of ours.
    #[inline(always)]
    pub fn flow_of(frame: &[u8]) -> Option<u32> {
        let ip = u32::from_be_bytes([frame[26], frame[27], frame[28], frame[29]]);
        let f = ip.wrapping_sub(SRC_IP_BASE);
        (f < MAX_FLOWS).then_some(f)
    }

    /// Fills the headers of `frame` (its whole length is the packet: at least 60 bytes) for the
    /// next flow.
    #[inline(always)]
    pub fn write(&mut self, frame: &mut [u8]) {
        let flow = self.next;
        self.next = if flow + 1 == self.flows { 0 } else { flow + 1 };
        let len = frame.len();
        let h = &mut frame[..UDP_HDR_LEN];
        h.copy_from_slice(&self.hdr);
        let ip_len = (len - 14) as u16;
        let src = SRC_IP_BASE.wrapping_add(flow);
        h[16..18].copy_from_slice(&ip_len.to_be_bytes());
        h[26..30].copy_from_slice(&src.to_be_bytes());
        let mut sum = self.base_sum + ip_len as u32 + (src >> 16) + (src & 0xffff);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        h[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let sport = (SRC_PORT_BASE + flow % (65536 - SRC_PORT_BASE)) as u16;
        h[34..36].copy_from_slice(&sport.to_be_bytes());
        h[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    }
}

/// A token bucket on the cycle clock: `rate` packets per tick refill it, at most `depth` tokens
/// (one burst) accumulate, and a burst sends only the whole tokens available.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_tick: f64,
    depth: f64,
    tokens: f64,
    last: u64,
}

impl TokenBucket {
    /// `pps` packets per second on a clock of `hz` ticks per second, `depth` tokens at most,
    /// starting empty at tick `now`.
    pub fn new(pps: f64, hz: f64, depth: usize, now: u64) -> TokenBucket {
        TokenBucket {
            per_tick: pps / hz,
            depth: depth.max(1) as f64,
            tokens: 0.0,
            last: now,
        }
    }

    /// Refills for the ticks since the last call; returns the whole tokens available.
    #[inline(always)]
    pub fn available(&mut self, now: u64) -> usize {
        let dt = now.wrapping_sub(self.last);
        self.last = now;
        self.tokens = (self.tokens + dt as f64 * self.per_tick).min(self.depth);
        self.tokens as usize
    }

    /// Spends `n` tokens (at most what [`available`](Self::available) returned).
    #[inline(always)]
    pub fn consume(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Everything a `txonly` stream generates with.
#[derive(Debug, Clone)]
pub struct TxGen {
    /// Sizes.
    pub sizes: SizeGen,
    /// Headers and flows.
    pub udp: UdpGen,
    /// Rate limit, if any.
    pub bucket: Option<TokenBucket>,
    /// Stamp identity (tx port << 16 | tx queue) when stamping.
    pub stamp: Option<u32>,
    /// The next sequence number stamped.
    pub seq: u32,
    /// End markers still to send (set when generation stops, see [`END_MAGIC`]).
    pub end_left: u8,
    /// End markers the port took, and of those the ones it dropped (counted in its drops).
    pub end_sent: u32,
    /// See `end_sent`.
    pub end_dropped: u32,
}

impl TxGen {
    /// Builds one packet of the next size into `m`.
    #[inline(always)]
    pub fn build(&mut self, m: &mut Mbuf, now: u64) {
        let len = self.sizes.next_size();
        m.set_data_len(len);
        let d = m.data_mut();
        self.udp.write(d);
        if let Some(id) = self.stamp {
            let s = &mut d[STAMP_OFF..STAMP_OFF + STAMP_LEN];
            s[0..4].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
            s[4..8].copy_from_slice(&id.to_le_bytes());
            s[8..12].copy_from_slice(&self.seq.to_le_bytes());
            s[12..20].copy_from_slice(&now.to_le_bytes());
            self.seq = self.seq.wrapping_add(1);
        }
    }

    /// Builds an end marker into `m`: a packet of the next size whose stamp has the
    /// [`END_MAGIC`] and the stream's next sequence number (nothing is consumed from it).
    pub fn build_end(&mut self, m: &mut Mbuf, now: u64) {
        let Some(id) = self.stamp else { return };
        let len = self.sizes.next_size().max(STAMP_MIN_FRAME);
        m.set_data_len(len);
        let d = m.data_mut();
        self.udp.write(d);
        let s = &mut d[STAMP_OFF..STAMP_OFF + STAMP_LEN];
        s[0..4].copy_from_slice(&END_MAGIC.to_le_bytes());
        s[4..8].copy_from_slice(&id.to_le_bytes());
        s[8..12].copy_from_slice(&self.seq.to_le_bytes());
        s[12..20].copy_from_slice(&now.to_le_bytes());
    }
}

/// Sequence state of one source stream as seen by one receiver.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqTrack {
    /// The sequence number expected next.
    pub next: u32,
    /// Whether anything arrived yet.
    pub seen: bool,
    /// Packets skipped by forward jumps.
    pub lost: u64,
    /// Packets that arrived behind one already seen.
    pub reordered: u64,
    /// The stream's end as its end marker told (the number of packets it stamped).
    pub end: Option<u32>,
}

impl SeqTrack {
    /// Accounts for sequence number `s`.
    #[inline(always)]
    pub fn on_seq(&mut self, s: u32) {
        if !self.seen {
            // Streams start at 0: a first packet further on means the ones before were lost.
            self.seen = true;
            self.lost += s as u64;
            self.next = s.wrapping_add(1);
            return;
        }
        let d = s.wrapping_sub(self.next) as i32;
        if d >= 0 {
            self.lost += d as u64;
            self.next = s.wrapping_add(1);
        } else {
            self.reordered += 1;
        }
    }

    /// Accounts for the end of the stream: `total` packets were stamped, so those after the
    /// last one that arrived were lost. Returns how many that adds (call once, at the end).
    pub fn finish(&mut self, total: u32) -> u64 {
        let tail = if self.seen {
            (total.wrapping_sub(self.next) as i32).max(0) as u64
        } else {
            u64::from(total)
        };
        self.lost += tail;
        tail
    }
}

/// The histogram every recorder and aggregate uses: 1 ns .. 60 s, 3 significant digits.
pub fn new_histogram() -> Box<Histogram<u64>> {
    Box::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"))
}

/// Counters a recorder publishes for live lines (single writer, relaxed stores).
#[derive(Debug, Default)]
pub struct LiveLat {
    /// Lost so far.
    pub lost: AtomicU64,
    /// Reordered so far.
    pub reordered: AtomicU64,
    /// Stamped packets received so far.
    pub stamped: AtomicU64,
}

/// Hands interval histograms from one lcore to the main thread without locks: the lcore swaps
/// its filled histogram for a spare and pushes the filled one; the main thread merges, clears
/// and returns it as a spare.
#[derive(Debug)]
pub struct HistExchange {
    /// Filled histograms, tagged with their receive port.
    pub full: ArrayQueue<(u16, Box<Histogram<u64>>)>,
    /// Cleared histograms for the lcore to swap in.
    pub spare: ArrayQueue<Box<Histogram<u64>>>,
}

impl HistExchange {
    /// An exchange for `recorders` recorders, with as many spares.
    pub fn new(recorders: usize) -> Arc<HistExchange> {
        let cap = (2 * recorders).max(1);
        let ex = HistExchange {
            full: ArrayQueue::new(cap),
            spare: ArrayQueue::new(cap),
        };
        for _ in 0..recorders {
            let _ = ex.spare.push(new_histogram());
        }
        Arc::new(ex)
    }
}

/// The receive-side recorder of one (port, queue): latencies of stamped packets, sequence gaps
/// per source stream, flows and sizes seen.
#[derive(Debug)]
pub struct LatRx {
    /// Receive port.
    pub port: u16,
    /// Latencies (ns) since the last publish.
    pub hist: Box<Histogram<u64>>,
    ns_per_tick: f64,
    /// Indexed by source port * queues + source queue.
    pub seqs: Box<[SeqTrack]>,
    queues: u32,
    /// Bitmap of the flows seen (65536 bits).
    pub flows: Box<[u64]>,
    /// Stamped packets received.
    pub stamped: u64,
    /// Stamped packets from a source stream outside the table (no sequence tracking).
    pub foreign: u64,
    /// Smallest and largest stamped frame seen.
    pub min_size: usize,
    /// See `min_size`.
    pub max_size: usize,
    /// What live lines read.
    pub live: Arc<LiveLat>,
}

impl LatRx {
    /// A recorder for receive port `port`, tracking source streams of up to `ports` ports with
    /// `queues` queues each.
    pub fn new(port: u16, ports: usize, queues: usize, ns_per_tick: f64) -> LatRx {
        LatRx {
            port,
            hist: new_histogram(),
            ns_per_tick,
            seqs: vec![SeqTrack::default(); ports * queues].into_boxed_slice(),
            queues: queues as u32,
            flows: vec![0u64; MAX_FLOWS as usize / 64].into_boxed_slice(),
            stamped: 0,
            foreign: 0,
            min_size: usize::MAX,
            max_size: 0,
            live: Arc::new(LiveLat::default()),
        }
    }

    /// Reads the stamps of a received burst; `now` is the clock when it arrived.
    #[inline]
    pub fn on_burst(&mut self, pkts: &[Mbuf], now: u64) {
        for m in pkts {
            let d = m.data();
            if d.len() < STAMP_MIN_FRAME || d[12..14] != [8, 0] || d[23] != 17 {
                continue;
            }
            let s = &d[STAMP_OFF..STAMP_OFF + STAMP_LEN];
            let magic = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            let id = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
            let seq = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
            if magic == END_MAGIC {
                let (sp, sq) = (id >> 16, id & 0xffff);
                if let Some(t) = self.seqs.get_mut((sp * self.queues + sq) as usize)
                    && sq < self.queues
                {
                    t.end = Some(seq);
                }
                continue;
            }
            if magic != STAMP_MAGIC {
                continue;
            }
            let sent = u64::from_le_bytes([s[12], s[13], s[14], s[15], s[16], s[17], s[18], s[19]]);
            let ns = (now.saturating_sub(sent) as f64 * self.ns_per_tick) as u64;
            self.hist.saturating_record(ns.max(1));
            self.stamped += 1;
            // Sizes of whole packets (a chain's stamp is in its head segment).
            self.min_size = self.min_size.min(m.pkt_len());
            self.max_size = self.max_size.max(m.pkt_len());
            if let Some(f) = UdpGen::flow_of(d) {
                self.flows[(f / 64) as usize] |= 1 << (f % 64);
            }
            let (sp, sq) = (id >> 16, id & 0xffff);
            match self.seqs.get_mut((sp * self.queues + sq) as usize) {
                Some(t) if sq < self.queues => t.on_seq(seq),
                _ => self.foreign += 1,
            }
        }
    }

    /// Lost packets so far over all source streams.
    pub fn lost(&self) -> u64 {
        self.seqs.iter().map(|t| t.lost).sum()
    }

    /// Hands the interval histogram to the main thread (if a spare is there) and publishes the
    /// live counters. No allocation: boxes only change hands.
    #[inline]
    pub fn publish(&mut self, ex: &HistExchange) {
        self.live.lost.store(self.lost(), Ordering::Relaxed);
        let reordered = self.seqs.iter().map(|t| t.reordered).sum();
        self.live.reordered.store(reordered, Ordering::Relaxed);
        self.live.stamped.store(self.stamped, Ordering::Relaxed);
        if self.hist.is_empty() {
            return;
        }
        if let Some(spare) = ex.spare.pop() {
            let full = std::mem::replace(&mut self.hist, spare);
            if let Err((_, full)) = ex.full.push((self.port, full)) {
                // Cannot happen (the queue holds every box there is); keep recording into it.
                let spare = std::mem::replace(&mut self.hist, full);
                let _ = ex.spare.push(spare);
            }
        }
    }
}

/// Per-port latency results, merged on the main thread.
#[derive(Debug)]
pub struct LatAgg {
    /// All latencies.
    pub hist: Box<Histogram<u64>>,
    /// Lost and reordered over the port's receivers and source streams.
    pub lost: u64,
    /// Of `lost`: packets stamped after the last one that arrived (known from the streams' end
    /// markers, or from this process's own generators).
    pub lost_tail: u64,
    /// Source streams whose end marker arrived.
    pub ended: u64,
    /// See `lost`.
    pub reordered: u64,
    /// Stamped packets received.
    pub stamped: u64,
    /// Of which from streams outside the table.
    pub foreign: u64,
    /// Flows seen.
    pub flows: Box<[u64]>,
    /// Sizes seen.
    pub min_size: usize,
    /// See `min_size`.
    pub max_size: usize,
}

impl Default for LatAgg {
    fn default() -> Self {
        LatAgg {
            hist: new_histogram(),
            lost: 0,
            lost_tail: 0,
            ended: 0,
            reordered: 0,
            stamped: 0,
            foreign: 0,
            flows: vec![0u64; MAX_FLOWS as usize / 64].into_boxed_slice(),
            min_size: usize::MAX,
            max_size: 0,
        }
    }
}

impl LatAgg {
    /// Folds a finished recorder in (its histogram is added, not swapped).
    pub fn absorb(&mut self, r: &LatRx) {
        let _ = self.hist.add(&*r.hist);
        self.lost += r.lost();
        self.ended += r.seqs.iter().filter(|t| t.end.is_some()).count() as u64;
        self.reordered += r.seqs.iter().map(|t| t.reordered).sum::<u64>();
        self.stamped += r.stamped;
        self.foreign += r.foreign;
        for (a, b) in self.flows.iter_mut().zip(r.flows.iter()) {
            *a |= *b;
        }
        self.min_size = self.min_size.min(r.min_size);
        self.max_size = self.max_size.max(r.max_size);
    }

    /// Distinct flows seen.
    pub fn flow_count(&self) -> u32 {
        self.flows.iter().map(|w| w.count_ones()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdpakit_core::packet::ipv4_checksum;

    fn ipv4_ok(frame: &[u8]) -> bool {
        frame.len() >= 34 && ipv4_checksum(&frame[14..34]) == 0
    }

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(SizeSpec::parse("64"), Ok(SizeSpec::Fixed(64)));
        assert_eq!(SizeSpec::parse("64-128"), Ok(SizeSpec::Range(64, 128)));
        assert_eq!(SizeSpec::parse("100-100"), Ok(SizeSpec::Fixed(100)));
        assert_eq!(SizeSpec::parse("IMIX"), Ok(SizeSpec::Imix));
        for bad in [
            "59", "9001", "128-64", "50-100", "64-9001", "x", "64-", "-64", "imx",
        ] {
            let e = SizeSpec::parse(bad).unwrap_err();
            assert!(e.contains("60..=9000") && e.contains("imix"), "{bad}: {e}");
        }
        assert!(SizeSpec::parse("128-64").unwrap_err().contains("backwards"));
        assert_eq!(SizeSpec::Imix.max(), 1518);
        assert_eq!(SizeSpec::Range(70, 80).label(), "70-80");
    }

    #[test]
    fn imix_is_the_7_4_1_pattern_repeated() {
        let mut g = SizeGen::new(SizeSpec::Imix, 1);
        let sizes: Vec<usize> = (0..1200).map(|_| g.next_size()).collect();
        let count = |n| sizes.iter().filter(|&&s| s == n).count();
        assert_eq!((count(64), count(594), count(1518)), (700, 400, 100));
        assert_eq!(sizes[..12], sizes[12..24], "deterministic");
        let avg = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!((avg - 4342.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn ranges_are_uniform_and_inclusive() {
        let mut g = SizeGen::new(SizeSpec::Range(64, 127), 7);
        let mut hist = [0u32; 64];
        for _ in 0..640_000 {
            let s = g.next_size();
            assert!((64..=127).contains(&s));
            hist[s - 64] += 1;
        }
        // 10,000 expected per size; 5 % is > 10 standard deviations.
        for (i, &h) in hist.iter().enumerate() {
            assert!((9_500..=10_500).contains(&h), "size {}: {h}", i + 64);
        }
        let mut a = SizeGen::new(SizeSpec::Range(60, 9000), 1);
        let mut b = SizeGen::new(SizeSpec::Range(60, 9000), 2);
        let same = (0..100).filter(|_| a.next_size() == b.next_size()).count();
        assert!(same < 10, "different seeds give different sequences");
    }

    #[test]
    fn flows_cycle_with_valid_checksums() {
        let mut g = UdpGen::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 4);
        let mut seen = Vec::new();
        for (i, len) in [64usize, 100, 1518, 60, 9000, 77, 64, 65]
            .into_iter()
            .enumerate()
        {
            let mut f = vec![0xa5u8; len];
            g.write(&mut f);
            assert!(ipv4_ok(&f), "packet {i} of {len} bytes: bad IPv4 checksum");
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, len - 14);
            assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, len - 34);
            assert_eq!(&f[40..42], &[0, 0], "UDP checksum 0");
            let flow = UdpGen::flow_of(&f).unwrap();
            let sport = u16::from_be_bytes([f[34], f[35]]);
            assert_eq!(sport as u32, 1024 + flow);
            seen.push(flow);
        }
        assert_eq!(seen, [0, 1, 2, 3, 0, 1, 2, 3]);
        // The largest flow count: the last flow's address and port stay valid.
        let mut g = UdpGen::new([0; 6], [0; 6], MAX_FLOWS);
        let mut f = vec![0u8; 64];
        for flow in 0..MAX_FLOWS {
            g.write(&mut f);
            if flow % 4099 == 0 || flow == MAX_FLOWS - 1 {
                assert!(ipv4_ok(&f), "flow {flow}");
                assert_eq!(UdpGen::flow_of(&f), Some(flow));
            }
        }
        assert_eq!(&f[26..30], &[198, 19, 0, 0]);
    }

    #[test]
    fn token_bucket_arithmetic() {
        // 1 Mpps on a 1 GHz clock: one token per 1000 ticks, depth 32.
        let mut b = TokenBucket::new(1e6, 1e9, 32, 0);
        assert_eq!(b.available(0), 0, "starts empty");
        assert_eq!(b.available(999), 0);
        assert_eq!(b.available(1000), 1);
        b.consume(1);
        assert_eq!(b.available(1500), 0);
        assert_eq!(b.available(2500), 1, "fractions carry over");
        b.consume(1);
        assert_eq!(b.available(1_000_000), 32, "capped at one burst");
        b.consume(10);
        assert_eq!(b.available(1_000_000), 22);
        // Over a simulated second with polls every 333 ticks, exactly the rate is spent.
        let mut b = TokenBucket::new(1e6, 1e9, 32, 0);
        let mut sent = 0;
        let mut t = 0;
        while t < 1_000_000_000 {
            t += 333;
            let n = b.available(t);
            b.consume(n);
            sent += n;
        }
        assert!((999_990..=1_000_000).contains(&sent), "{sent}");
    }

    #[test]
    fn sequence_tracking_counts_gaps_and_reorders() {
        let mut t = SeqTrack::default();
        for s in [0, 1, 2, 5, 6, 4, 7, 10] {
            t.on_seq(s);
        }
        assert_eq!((t.lost, t.reordered, t.next), (2 + 2, 1, 11));
        let mut t = SeqTrack::default();
        t.on_seq(3);
        assert_eq!(t.lost, 3, "a stream starts at 0");
        let mut t = SeqTrack {
            next: u32::MAX,
            seen: true,
            ..Default::default()
        };
        t.on_seq(u32::MAX);
        t.on_seq(1);
        assert_eq!((t.lost, t.reordered), (1, 0), "wraps");
    }

    #[test]
    fn the_end_counts_the_tail_once_per_stream() {
        let mut t = SeqTrack::default();
        for s in [0, 1, 3] {
            t.on_seq(s);
        }
        assert_eq!(t.finish(10), 6, "4..=9 came after the last arrival");
        assert_eq!(t.lost, 1 + 6);
        let mut t = SeqTrack::default();
        assert_eq!(t.finish(5), 5, "nothing arrived: all lost");
        let mut t = SeqTrack::default();
        t.on_seq(0);
        t.on_seq(1);
        assert_eq!(t.finish(2), 0, "all arrived");
        assert_eq!(
            t.finish(1),
            0,
            "an end behind the last arrival adds nothing"
        );
    }

    /// A generator's end marker, read by a receiver: it names the stream and how many packets
    /// it stamped, and is neither a latency sample nor a size.
    #[test]
    fn end_markers_tell_the_receiver_the_stream_total() {
        let pool = vdpakit_core::Mempool::new(
            "tgen-end",
            vdpakit_core::MempoolConfig {
                count: 64,
                cache_size: 0,
                mem: vdpakit_core::mem::MemMode::NoHuge,
                ..Default::default()
            },
        )
        .unwrap();
        let mut g = TxGen {
            sizes: SizeGen::new(SizeSpec::Fixed(100), 1),
            udp: UdpGen::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 1),
            bucket: None,
            stamp: Some(1 << 16),
            seq: 0,
            end_left: 0,
            end_sent: 0,
            end_dropped: 0,
        };
        let mut pkts = Vec::new();
        for _ in 0..5 {
            let mut m = pool.alloc().unwrap();
            g.build(&mut m, 10);
            pkts.push(m);
        }
        let mut end = pool.alloc().unwrap();
        g.build_end(&mut end, 20);
        assert_eq!(g.seq, 5, "an end marker stamps no sequence number");
        // Packets 0, 1 and 2 arrive, then the end marker (twice); 3 and 4 were lost.
        let mut rx = LatRx::new(0, 2, 1, 1.0);
        let arrived: Vec<Mbuf> = pkts.drain(..3).collect();
        rx.on_burst(&arrived, 15);
        rx.on_burst(std::slice::from_ref(&end), 25);
        rx.on_burst(std::slice::from_ref(&end), 26);
        let t = &mut rx.seqs[1];
        assert_eq!((t.end, t.next, t.lost), (Some(5), 3, 0));
        assert_eq!(t.finish(5), 2);
        assert_eq!(
            (rx.stamped, rx.max_size),
            (3, 100),
            "the marker is no sample"
        );
    }
}
