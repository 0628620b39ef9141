//! The generator's frames: Ethernet + IPv4/IPv6 + UDP or TCP SYN with correct checksums, and a
//! payload that starts with a signature (magic, sequence number, send timestamp) so sinks can
//! count exactly the generator's frames and measure one-way delay.
//!
//! [`FrameTemplate`] builds one flow's frame once; [`FrameTemplate::stamp`] copies it into a
//! buffer and writes the sequence number and timestamp, updating the L4 checksum from a
//! precomputed partial sum. [`parse_frame`] and [`parse_payload`] read the signature back.

use std::net::IpAddr;

/// First bytes of every generator payload ("USNB").
pub const MAGIC: u32 = 0x5553_4e42;
/// Bytes of the signature at the start of the payload: magic (4), sequence (4), time (8).
pub const SIGNATURE_LEN: usize = 16;

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const TCP_LEN: usize = 20;

/// What to put into the frames of one flow.
#[derive(Clone, Debug)]
pub struct FlowSpec {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source address (IPv4 or IPv6, same family as `dst_ip`).
    pub src_ip: IpAddr,
    /// Destination address.
    pub dst_ip: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// TCP SYN instead of UDP.
    pub tcp_syn: bool,
    /// Frame length handed to the NIC (without FCS).
    pub frame_size: usize,
}

/// The headers' length for a family and protocol (Ethernet up to the end of L4).
pub fn header_len(ipv6: bool, tcp: bool) -> usize {
    ETH_LEN + if ipv6 { IPV6_LEN } else { IPV4_LEN } + if tcp { TCP_LEN } else { UDP_LEN }
}

/// The smallest frame that carries the signature.
pub fn min_frame_size(ipv6: bool, tcp: bool) -> usize {
    (header_len(ipv6, tcp) + SIGNATURE_LEN).max(60)
}

/// One flow's prebuilt frame.
#[derive(Clone, Debug)]
pub struct FrameTemplate {
    frame: Vec<u8>,
    /// Offset of the L4 checksum field.
    csum_at: usize,
    /// Offset of the signature.
    payload: usize,
    /// Ones' complement sum (unfolded) of everything the L4 checksum covers, with the
    /// checksum field, the sequence number and the timestamp zero.
    base_sum: u32,
    udp: bool,
}

/// Adds big-endian 16-bit words of `data` (odd tail padded with zero) to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a sum to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

impl FrameTemplate {
    /// Builds the frame; an error when the addresses' families differ or the frame is too
    /// small for headers and signature (or larger than 9000 bytes).
    pub fn new(spec: &FlowSpec) -> Result<FrameTemplate, String> {
        let ipv6 = match (spec.src_ip, spec.dst_ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) => false,
            (IpAddr::V6(_), IpAddr::V6(_)) => true,
            _ => return Err("source and destination addresses are of different families".into()),
        };
        let min = min_frame_size(ipv6, spec.tcp_syn);
        if spec.frame_size < min || spec.frame_size > 9000 {
            return Err(format!(
                "frame size {} out of range: {min}..=9000 for {} {}",
                spec.frame_size,
                if ipv6 { "IPv6" } else { "IPv4" },
                if spec.tcp_syn { "TCP" } else { "UDP" }
            ));
        }
        let mut f = vec![0u8; spec.frame_size];
        f[0..6].copy_from_slice(&spec.dst_mac);
        f[6..12].copy_from_slice(&spec.src_mac);
        let l3 = ETH_LEN;
        let proto: u8 = if spec.tcp_syn { 6 } else { 17 };
        let l4_len_hdr = if spec.tcp_syn { TCP_LEN } else { UDP_LEN };
        let mut pseudo = 0u32;
        let l4 = match (spec.src_ip, spec.dst_ip) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let total = spec.frame_size - ETH_LEN;
                let ip = &mut f[l3..l3 + IPV4_LEN];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ip[6] = 0x40; // don't fragment
                ip[8] = 64;
                ip[9] = proto;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let c = checksum(ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                pseudo = sum16(pseudo, &s.octets());
                pseudo = sum16(pseudo, &d.octets());
                pseudo = sum16(pseudo, &[0, proto]);
                pseudo = sum16(pseudo, &((total - IPV4_LEN) as u16).to_be_bytes());
                l3 + IPV4_LEN
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let plen = spec.frame_size - ETH_LEN - IPV6_LEN;
                let ip = &mut f[l3..l3 + IPV6_LEN];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
                ip[6] = proto;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                pseudo = sum16(pseudo, &s.octets());
                pseudo = sum16(pseudo, &d.octets());
                pseudo = sum16(pseudo, &(plen as u32).to_be_bytes());
                pseudo = sum16(pseudo, &[0, 0, 0, proto]);
                l3 + IPV6_LEN
            }
            _ => unreachable!("families checked above"),
        };
        let l4_total = spec.frame_size - l4;
        let h = &mut f[l4..l4 + l4_len_hdr];
        h[0..2].copy_from_slice(&spec.src_port.to_be_bytes());
        h[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
        let csum_at = if spec.tcp_syn {
            // seq 1, ack 0, data offset 5, SYN, window 64240.
            h[4..8].copy_from_slice(&1u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = 0x02;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            l4 + 16
        } else {
            h[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
            l4 + 6
        };
        let payload = l4 + l4_len_hdr;
        f[payload..payload + 4].copy_from_slice(&MAGIC.to_be_bytes());
        // Padding after the signature: a recognisable byte pattern.
        for (i, b) in f[payload + SIGNATURE_LEN..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let base_sum = sum16(pseudo, &f[l4..]);
        Ok(FrameTemplate {
            frame: f,
            csum_at,
            payload,
            base_sum,
            udp: !spec.tcp_syn,
        })
    }

    /// The frame's length.
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// Copies the frame into `buf` (which must be [`Self::frame_len`] bytes) with sequence number
    /// `seq` and timestamp `time_ns`, and the matching L4 checksum.
    pub fn stamp(&self, buf: &mut [u8], seq: u32, time_ns: u64) {
        buf.copy_from_slice(&self.frame);
        let p = self.payload;
        buf[p + 4..p + 8].copy_from_slice(&seq.to_be_bytes());
        buf[p + 8..p + 16].copy_from_slice(&time_ns.to_be_bytes());
        let sum = sum16(self.base_sum, &buf[p + 4..p + 16]);
        let mut c = !fold(sum);
        if self.udp && c == 0 {
            c = 0xffff;
        }
        buf[self.csum_at..self.csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// The signature read back from a frame or a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Sequence number (per generator thread).
    pub seq: u32,
    /// CLOCK_MONOTONIC nanoseconds when the frame was sent.
    pub time_ns: u64,
    /// L4 source port (0 for a bare datagram payload).
    pub src_port: u16,
    /// L4 destination port (0 for a bare datagram payload).
    pub dst_port: u16,
}

/// Reads the signature at the start of a datagram's payload.
pub fn parse_payload(payload: &[u8]) -> Option<Probe> {
    if payload.len() < SIGNATURE_LEN || payload[0..4] != MAGIC.to_be_bytes() {
        return None;
    }
    Some(Probe {
        seq: u32::from_be_bytes(payload[4..8].try_into().ok()?),
        time_ns: u64::from_be_bytes(payload[8..16].try_into().ok()?),
        src_port: 0,
        dst_port: 0,
    })
}

/// Reads the signature of a generator frame (Ethernet, optional 802.1Q tag, IPv4 without
/// options or IPv6 without extension headers, UDP or TCP); `None` for any other frame.
pub fn parse_frame(frame: &[u8]) -> Option<Probe> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    off += 2;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes(frame.get(off + 2..off + 4)?.try_into().ok()?);
        off += 4;
    }
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ip = frame.get(off..off + IPV4_LEN)?;
            if ip[0] != 0x45 {
                return None;
            }
            (ip[9], off + IPV4_LEN)
        }
        0x86dd => {
            let ip = frame.get(off..off + IPV6_LEN)?;
            (ip[6], off + IPV6_LEN)
        }
        _ => return None,
    };
    let hdr = match proto {
        17 => UDP_LEN,
        6 => usize::from(*frame.get(l4 + 12)? >> 4) * 4,
        _ => return None,
    };
    if hdr < UDP_LEN {
        return None;
    }
    let ports = frame.get(l4..l4 + 4)?;
    let mut probe = parse_payload(frame.get(l4 + hdr..)?)?;
    probe.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    probe.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    Some(probe)
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every namespace of this machine).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC address {s:?}"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(src: &str, dst: &str, tcp: bool, size: usize) -> FlowSpec {
        FlowSpec {
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_mac: [2, 0, 0, 0, 0, 1],
            src_ip: src.parse().unwrap(),
            dst_ip: dst.parse().unwrap(),
            src_port: 40000,
            dst_port: 9000,
            tcp_syn: tcp,
            frame_size: size,
        }
    }

    /// Verifies the L4 checksum from scratch (pseudo header + segment sums to 0xffff).
    fn l4_ok(f: &[u8]) -> bool {
        let (pseudo, l4) = if f[12..14] == [0x08, 0x00] {
            let mut p = sum16(0, &f[26..34]);
            p = sum16(p, &[0, f[23]]);
            p = sum16(p, &((f.len() - 34) as u16).to_be_bytes());
            (p, 34)
        } else {
            let mut p = sum16(0, &f[22..54]);
            p = sum16(p, &((f.len() - 54) as u32).to_be_bytes());
            p = sum16(p, &[0, 0, 0, f[20]]);
            (p, 54)
        };
        fold(sum16(pseudo, &f[l4..])) == 0xffff
    }

    #[test]
    fn frames_carry_valid_checksums_and_signature() {
        for (src, dst) in [("10.77.0.1", "10.77.0.2"), ("fd77::1", "fd77::2")] {
            for tcp in [false, true] {
                let v6 = src.contains(':');
                for size in [
                    min_frame_size(v6, tcp),
                    64.max(min_frame_size(v6, tcp)),
                    min_frame_size(v6, tcp) + 1,
                    1500,
                ] {
                    let t = FrameTemplate::new(&spec(src, dst, tcp, size)).unwrap();
                    let mut buf = vec![0u8; t.frame_len()];
                    for (seq, ts) in [
                        (0u32, 0u64),
                        (1, 12345),
                        (u32::MAX, u64::MAX),
                        (77, 1 << 40),
                    ] {
                        t.stamp(&mut buf, seq, ts);
                        assert_eq!(buf.len(), size);
                        assert!(
                            l4_ok(&buf),
                            "bad L4 checksum {src} tcp={tcp} size={size} seq={seq}"
                        );
                        if !v6 {
                            assert_eq!(checksum(&buf[14..34]), 0, "bad IPv4 header checksum");
                        }
                        let p = parse_frame(&buf).unwrap();
                        assert_eq!(
                            (p.seq, p.time_ns, p.src_port, p.dst_port),
                            (seq, ts, 40000, 9000)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(FrameTemplate::new(&spec("10.0.0.1", "10.0.0.2", false, 57)).is_err());
        assert!(FrameTemplate::new(&spec("10.0.0.1", "10.0.0.2", false, 60)).is_ok());
        assert!(FrameTemplate::new(&spec("10.0.0.1", "fd77::2", false, 100)).is_err());
        assert!(FrameTemplate::new(&spec("fd77::1", "fd77::2", false, 64)).is_err());
    }

    #[test]
    fn other_frames_are_not_counted() {
        let t = FrameTemplate::new(&spec("10.0.0.1", "10.0.0.2", false, 100)).unwrap();
        let mut buf = vec![0u8; t.frame_len()];
        t.stamp(&mut buf, 5, 6);
        let mut bad = buf.clone();
        bad[42] ^= 1; // magic
        assert_eq!(parse_frame(&bad), None);
        assert_eq!(parse_frame(&buf[..50]), None);
        assert_eq!(parse_frame(&[0u8; 10]), None);
        let mut arp = buf.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse_frame(&arp), None);
        assert_eq!(parse_payload(&buf[42..]).map(|p| p.seq), Some(5));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        assert!(parse_mac("02:00:0a:ff:00").is_err());
        assert!(parse_mac("zz:00:0a:ff:00:01").is_err());
    }
}
