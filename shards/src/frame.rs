//! Frame classification: what a frame is and which 5-tuple it carries, read in place from the
//! frame's bytes (no copy, no allocation). Malformed or truncated frames give a
//! [`DropReason`], never a panic.
//!
//! [`classify`] understands:
//!
//! - Ethernet II, with up to [`MAX_VLAN_TAGS`] VLAN tags (802.1Q `0x8100`, 802.1ad QinQ
//!   `0x88a8`, and the pre-standard `0x9100`);
//! - ARP (`0x0806`) and EAPOL (`0x888e`), which are flooded to the NIC's endpoints;
//! - IPv4: version, header length, total length (bytes beyond it are Ethernet padding),
//!   fragments (see [`FragInfo`]), TCP/UDP/DCCP/SCTP/UDP-Lite ports, and DHCPv4
//!   (UDP 68 -> 67 is [`FrameKind::DhcpRequest`], 67 -> 68 is [`FrameKind::DhcpAnswer`]);
//! - IPv6: version, payload length, up to [`MAX_IPV6_EXT_HEADERS`] extension headers
//!   (hop-by-hop, routing, destination options, fragment, AH), the same ports, and ICMPv6
//!   neighbour discovery (types 133-137).
//!
//! Every other IP protocol is [`FrameKind::L4`] with ports 0; every other EtherType is
//! [`DropReason::Unsupported`].
//!
//! Errors: a header that does not fit in the frame is [`DropReason::Truncated`]; header
//! values that cannot be right (wrong IP version, IPv4 header length below 5 words or above
//! the total length, hop-by-hop header not first, two IPv6 fragment headers, IPv4-mapped
//! addresses inside an IPv6 header, a TCP fragment at offset 8 (RFC 1858 overlap attack)) are
//! [`DropReason::Malformed`]; a loopback source or destination (127.0.0.0/8, `::1`) is
//! [`DropReason::Loopback`]; more VLAN tags or IPv6 extension headers than the bounds above
//! are [`DropReason::Unsupported`].
//!
//! The hot path (untagged IPv4) is straight-line: one length check for the Ethernet header,
//! one for the IPv4 header, one for the total length and one for the L4 header.

use crate::counters::DropReason;
use crate::key::{proto, FlowKey, Ip};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of an 802.1Q VLAN tag (customer tag).
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Pre-standard QinQ service tag EtherType, still sent by some switches.
pub const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of EAPOL (802.1X).
pub const ETHERTYPE_EAPOL: u16 = 0x888e;

/// Length of an Ethernet II header without VLAN tags.
pub const ETH_HDR: usize = 14;
/// The most VLAN tags [`classify`] walks (QinQ: service tag plus customer tag).
pub const MAX_VLAN_TAGS: usize = 2;
/// The most IPv6 extension headers [`classify`] walks before giving up with
/// [`DropReason::Unsupported`].
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// What kind of frame this is; decides how the switch treats it (see SEMANTICS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// ARP: copied to every other endpoint of the NIC.
    Arp,
    /// EAPOL (802.1X, WiFi authentication): copied to every other endpoint of the NIC.
    Eapol,
    /// ICMPv6 neighbour discovery (router/neighbour solicitation and advertisement, redirect):
    /// IPv6's ARP, copied to every other endpoint of the NIC.
    NeighborDiscovery,
    /// A DHCPv4 request (UDP 68 -> 67).
    DhcpRequest,
    /// A DHCPv4 answer (UDP 67 -> 68).
    DhcpAnswer,
    /// An IPv4 or IPv6 packet matched on its 5-tuple (ports are 0 for portless protocols).
    L4,
    /// A non-first IPv4/IPv6 fragment: no L4 header, follows its first fragment's decision.
    Fragment,
}

/// Fragmentation details of an IPv4 or IPv6 packet.
///
/// Only set when the packet really is a fragment (more fragments follow, or the offset is not
/// 0); an unfragmented packet, and an IPv6 "atomic fragment" (fragment header with offset 0
/// and no more fragments, RFC 6946), have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragInfo {
    /// The IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset 0: the fragment that carries the L4 header.
    pub first: bool,
    /// More fragments follow.
    pub more: bool,
}

/// A classified frame: the fields the switch decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What kind of frame this is.
    pub kind: FrameKind,
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// The VLAN id of the outermost VLAN tag, if the frame is tagged (0: priority tag only).
    pub vlan: Option<u16>,
    /// The VLAN id of the inner (customer) tag of a double-tagged (QinQ) frame.
    pub inner_vlan: Option<u16>,
    /// Offset of the L3 header (ARP, EAPOL, IPv4, IPv6) in the frame: 14 plus 4 per VLAN tag.
    pub l3_offset: u16,
    /// Source IP (unspecified for ARP/EAPOL).
    pub src_ip: Ip,
    /// Destination IP (unspecified for ARP/EAPOL).
    pub dst_ip: Ip,
    /// Source port (0 without ports).
    pub src_port: u16,
    /// Destination port (0 without ports).
    pub dst_port: u16,
    /// IP protocol number of the L4 payload (0 for ARP/EAPOL). For IPv6 this is the upper
    /// layer protocol after the extension headers; for a non-first IPv6 fragment it is the
    /// fragment header's next header.
    pub proto: u8,
    /// Set for fragments (first or later).
    pub frag: Option<FragInfo>,
}

impl Frame {
    /// The key of a frame arriving from the NIC: the local side is the destination.
    #[inline]
    pub fn incoming_key(&self) -> FlowKey {
        FlowKey {
            local_ip: self.dst_ip,
            remote_ip: self.src_ip,
            local_port: self.dst_port,
            remote_port: self.src_port,
            proto: self.proto,
        }
    }

    /// The key of a frame an endpoint sends: the local side is the source.
    #[inline]
    pub fn outgoing_key(&self) -> FlowKey {
        FlowKey {
            local_ip: self.src_ip,
            remote_ip: self.dst_ip,
            local_port: self.src_port,
            remote_port: self.dst_port,
            proto: self.proto,
        }
    }

    /// Whether the destination MAC is the broadcast address `ff:ff:ff:ff:ff:ff`.
    #[inline]
    pub fn is_broadcast(&self) -> bool {
        self.dst_mac == [0xff; 6]
    }

    /// Whether the destination MAC is a group address (multicast, including broadcast).
    #[inline]
    pub fn is_multicast(&self) -> bool {
        self.dst_mac[0] & 1 != 0
    }
}

/// The Ethernet part of a frame, carried into the L3 parsers.
#[derive(Clone, Copy)]
struct L2 {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    inner_vlan: Option<u16>,
    l3_offset: usize,
}

impl L2 {
    /// A frame with this Ethernet part and everything else empty.
    #[inline(always)]
    fn frame(self, kind: FrameKind) -> Frame {
        Frame {
            kind,
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
            vlan: self.vlan,
            inner_vlan: self.inner_vlan,
            // At most ETH_HDR + 4 * MAX_VLAN_TAGS.
            l3_offset: self.l3_offset as u16,
            src_ip: Ip::UNSPECIFIED,
            dst_ip: Ip::UNSPECIFIED,
            src_port: 0,
            dst_port: 0,
            proto: 0,
            frag: None,
        }
    }
}

/// `N` bytes at `at`, if the slice has them.
#[inline(always)]
fn chunk<const N: usize>(bytes: &[u8], at: usize) -> Option<&[u8; N]> {
    bytes.get(at..)?.first_chunk::<N>()
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Classifies one Ethernet frame (see the module docs for what is understood and which
/// errors mean what).
#[inline]
pub fn classify(frame: &[u8]) -> Result<Frame, DropReason> {
    let Some(eth) = frame.first_chunk::<ETH_HDR>() else {
        return Err(DropReason::Truncated);
    };
    let l2 = L2 {
        dst_mac: [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
        src_mac: [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
        vlan: None,
        inner_vlan: None,
        l3_offset: ETH_HDR,
    };
    let ethertype = be16([eth[12], eth[13]]);
    if ethertype == ETHERTYPE_IPV4 {
        ipv4(frame, l2)
    } else {
        classify_other(frame, ethertype, l2)
    }
}

/// Everything but untagged IPv4: VLAN tags, IPv6, ARP, EAPOL.
#[inline(never)]
fn classify_other(frame: &[u8], mut ethertype: u16, mut l2: L2) -> Result<Frame, DropReason> {
    let mut tags = 0;
    while matches!(
        ethertype,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD
    ) {
        if tags == MAX_VLAN_TAGS {
            return Err(DropReason::Unsupported);
        }
        let tag = chunk::<4>(frame, l2.l3_offset).ok_or(DropReason::Truncated)?;
        let vid = be16([tag[0], tag[1]]) & 0x0fff;
        if tags == 0 {
            l2.vlan = Some(vid);
        } else {
            l2.inner_vlan = Some(vid);
        }
        ethertype = be16([tag[2], tag[3]]);
        l2.l3_offset += 4;
        tags += 1;
    }
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(frame, l2),
        ETHERTYPE_IPV6 => ipv6(frame, l2),
        ETHERTYPE_ARP => arp(frame, l2),
        ETHERTYPE_EAPOL => eapol(frame, l2),
        _ => Err(DropReason::Unsupported),
    }
}

/// ARP: the fixed 8-byte header plus sender and target addresses must be present.
fn arp(frame: &[u8], l2: L2) -> Result<Frame, DropReason> {
    let hdr = chunk::<8>(frame, l2.l3_offset).ok_or(DropReason::Truncated)?;
    let addrs = 2 * (usize::from(hdr[4]) + usize::from(hdr[5]));
    if frame.len() < l2.l3_offset + 8 + addrs {
        return Err(DropReason::Truncated);
    }
    Ok(l2.frame(FrameKind::Arp))
}

/// EAPOL: version, type, body length, and the body must be present.
fn eapol(frame: &[u8], l2: L2) -> Result<Frame, DropReason> {
    let hdr = chunk::<4>(frame, l2.l3_offset).ok_or(DropReason::Truncated)?;
    let body = usize::from(be16([hdr[2], hdr[3]]));
    if frame.len() < l2.l3_offset + 4 + body {
        return Err(DropReason::Truncated);
    }
    Ok(l2.frame(FrameKind::Eapol))
}

/// An IPv4 address as IPv4-mapped [`Ip`], built in registers (one load, one byte swap).
#[inline(always)]
fn ipv4_mapped(a: [u8; 4]) -> Ip {
    Ip(((0xffff_u128 << 32) | u128::from(u32::from_be_bytes(a))).to_be_bytes())
}

/// Fills in the L4 part of a whole packet or first fragment whose L4 header starts at `l4`
/// in `packet` (which ends where the IP length says). `V4` selects DHCPv4 (IPv4) or
/// neighbour discovery (IPv6).
#[inline(always)]
fn l4<const V4: bool>(mut f: Frame, packet: &[u8], l4: usize) -> Result<Frame, DropReason> {
    let Some(hdr) = packet.get(l4..) else {
        return Err(DropReason::Truncated);
    };
    // The smallest header of each protocol: a first fragment that cuts it is truncated (and
    // could hide its ports or TCP flags, RFC 1858/3128).
    let (min, ports) = match f.proto {
        proto::UDP | proto::UDPLITE => (8, true),
        proto::TCP => (20, true),
        proto::DCCP | proto::SCTP => (12, true),
        proto::ICMP | proto::ICMPV6 => (4, false),
        _ => return Ok(f),
    };
    if hdr.len() < min {
        return Err(DropReason::Truncated);
    }
    let Some(&[b0, b1, b2, b3]) = hdr.first_chunk::<4>() else {
        return Err(DropReason::Truncated);
    };
    if ports {
        f.src_port = be16([b0, b1]);
        f.dst_port = be16([b2, b3]);
        if V4 && f.proto == proto::UDP {
            // Source and destination port in one word: 68 -> 67 or 67 -> 68.
            match u32::from_be_bytes([b0, b1, b2, b3]) {
                0x0044_0043 => f.kind = FrameKind::DhcpRequest,
                0x0043_0044 => f.kind = FrameKind::DhcpAnswer,
                _ => {}
            }
        }
    } else if !V4 && f.proto == proto::ICMPV6 && (133..=137).contains(&b0) {
        f.kind = FrameKind::NeighborDiscovery;
    }
    Ok(f)
}

/// IPv4 at `l2.l3_offset`.
#[inline(always)]
fn ipv4(frame: &[u8], l2: L2) -> Result<Frame, DropReason> {
    let Some(rest) = frame.get(l2.l3_offset..) else {
        return Err(DropReason::Truncated);
    };
    let Some(&hdr) = rest.first_chunk::<20>() else {
        return Err(DropReason::Truncated);
    };
    let [vihl, _tos, tl0, tl1, id0, id1, fo0, fo1, _ttl, protocol, _c0, _c1, s0, s1, s2, s3, d0, d1, d2, d3] =
        hdr;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16([tl0, tl1]));
    if vihl >> 4 != 4 || ihl < 20 || total < ihl {
        return Err(DropReason::Malformed);
    }
    // Bytes beyond the total length are Ethernet padding.
    let Some(packet) = rest.get(..total) else {
        return Err(DropReason::Truncated);
    };
    if (s0 == 127) | (d0 == 127) {
        return Err(DropReason::Loopback);
    }
    let mut f = Frame {
        kind: FrameKind::L4,
        dst_mac: l2.dst_mac,
        src_mac: l2.src_mac,
        vlan: l2.vlan,
        inner_vlan: l2.inner_vlan,
        l3_offset: l2.l3_offset as u16,
        src_ip: ipv4_mapped([s0, s1, s2, s3]),
        dst_ip: ipv4_mapped([d0, d1, d2, d3]),
        src_port: 0,
        dst_port: 0,
        proto: protocol,
        frag: None,
    };
    let flags_offset = be16([fo0, fo1]);
    if flags_offset & 0x3fff != 0 {
        let offset = flags_offset & 0x1fff;
        let more = flags_offset & 0x2000 != 0;
        f.frag = Some(FragInfo {
            id: u32::from(be16([id0, id1])),
            first: offset == 0,
            more,
        });
        if offset != 0 {
            if offset == 1 && protocol == proto::TCP {
                // RFC 1858: would overwrite the first fragment's TCP ports and flags.
                return Err(DropReason::Malformed);
            }
            f.kind = FrameKind::Fragment;
            return Ok(f);
        }
    }
    l4::<true>(f, packet, ihl)
}

/// The incoming key of the commonest frame, read straight into `key`: untagged IPv4 without
/// options, not a fragment, TCP/UDP/DCCP/SCTP/UDP-Lite with its whole minimum header, neither address in
/// 127.0.0.0/8. Returns the frame's kind ([`FrameKind::L4`], [`FrameKind::DhcpRequest`] or
/// [`FrameKind::DhcpAnswer`]), or `None` for every other frame, which [`classify`] then handles
/// (`key` may have been written to). Where it returns `Some`, [`classify`] gives `Ok` with the
/// same kind, no fragment information and [`Frame::incoming_key`] equal to `key`.
#[inline(always)]
pub(crate) fn incoming_fast(frame: &[u8], key: &mut FlowKey) -> Option<FrameKind> {
    let (eth, rest) = frame.split_first_chunk::<ETH_HDR>()?;
    // A 20-byte IPv4 header without options and the four port bytes after it.
    let ip = rest.first_chunk::<24>()?;
    let min = match ip[9] {
        proto::UDP | proto::UDPLITE => 8,
        proto::TCP => 20,
        proto::DCCP | proto::SCTP => 12,
        _ => return None,
    };
    let total = usize::from(be16([ip[2], ip[3]]));
    // EtherType and fragment bits compared in memory order (no byte swaps).
    let ne16 = |a: u8, b: u8| u16::from_ne_bytes([a, b]);
    if (ne16(eth[12], eth[13]) != ETHERTYPE_IPV4.to_be())
        | (ip[0] != 0x45)
        | (total < 20 + min)
        | (rest.len() < total)
        | (ip[12] == 127)
        | (ip[16] == 127)
        | (ne16(ip[6], ip[7]) & 0x3fff_u16.to_be() != 0)
    {
        return None;
    }
    let protocol = ip[9];
    let ports = u32::from_be_bytes([ip[20], ip[21], ip[22], ip[23]]);
    // IPv4-mapped in memory order: bytes 10 and 11 are 0xff, 12..16 the address.
    let mapped = |a: [u8; 4]| {
        Ip(((u128::from(u32::from_le_bytes(a)) << 96) | (0xffff_u128 << 80)).to_le_bytes())
    };
    *key = FlowKey {
        local_ip: mapped([ip[16], ip[17], ip[18], ip[19]]),
        remote_ip: mapped([ip[12], ip[13], ip[14], ip[15]]),
        local_port: ports as u16,
        remote_port: (ports >> 16) as u16,
        proto: protocol,
    };
    if protocol == proto::UDP {
        // Source and destination port in one word: 68 -> 67 or 67 -> 68.
        match ports {
            0x0044_0043 => return Some(FrameKind::DhcpRequest),
            0x0043_0044 => return Some(FrameKind::DhcpAnswer),
            _ => {}
        }
    }
    Some(FrameKind::L4)
}

const IPV6_HDR: usize = 40;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AH: u8 = 51;
const NEXT_DEST_OPTIONS: u8 = 60;

/// IPv6 at `l2.l3_offset`.
fn ipv6(frame: &[u8], l2: L2) -> Result<Frame, DropReason> {
    let Some(rest) = frame.get(l2.l3_offset..) else {
        return Err(DropReason::Truncated);
    };
    let Some(hdr) = rest.first_chunk::<IPV6_HDR>() else {
        return Err(DropReason::Truncated);
    };
    if hdr[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let payload = usize::from(be16([hdr[4], hdr[5]]));
    let Some(packet) = rest.get(..IPV6_HDR + payload) else {
        return Err(DropReason::Truncated);
    };
    let (Some(src), Some(dst)) = (chunk::<16>(hdr, 8), chunk::<16>(hdr, 24)) else {
        return Err(DropReason::Truncated);
    };
    let (src, dst) = (Ip::v6(*src), Ip::v6(*dst));
    if src.is_v4() || dst.is_v4() {
        // IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2); letting them
        // through would make an IPv6 packet match IPv4 rules.
        return Err(DropReason::Malformed);
    }
    if src.is_loopback() || dst.is_loopback() {
        return Err(DropReason::Loopback);
    }
    let mut f = l2.frame(FrameKind::L4);
    f.src_ip = src;
    f.dst_ip = dst;
    let mut next = hdr[6];
    let mut at = IPV6_HDR;
    let mut seen_fragment = false;
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        let len = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTIONS | NEXT_AH => {
                if next == NEXT_HOP_BY_HOP && at != IPV6_HDR {
                    // RFC 8200 4.1: only directly after the IPv6 header.
                    return Err(DropReason::Malformed);
                }
                let ext = chunk::<2>(packet, at).ok_or(DropReason::Truncated)?;
                let len = if next == NEXT_AH {
                    (usize::from(ext[1]) + 2) * 4
                } else {
                    (usize::from(ext[1]) + 1) * 8
                };
                next = ext[0];
                len
            }
            NEXT_FRAGMENT => {
                let ext = chunk::<8>(packet, at).ok_or(DropReason::Truncated)?;
                if seen_fragment {
                    return Err(DropReason::Malformed);
                }
                seen_fragment = true;
                let offset_flags = be16([ext[2], ext[3]]);
                let offset = offset_flags >> 3;
                let more = offset_flags & 1 != 0;
                if offset != 0 || more {
                    f.frag = Some(FragInfo {
                        id: u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]),
                        first: offset == 0,
                        more,
                    });
                }
                if offset != 0 {
                    f.kind = FrameKind::Fragment;
                    f.proto = ext[0];
                    return Ok(f);
                }
                next = ext[0];
                8
            }
            upper => {
                f.proto = upper;
                return l4::<false>(f, packet, at);
            }
        };
        at += len;
        if at > packet.len() {
            return Err(DropReason::Truncated);
        }
    }
    Err(DropReason::Unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_frames_are_truncated() {
        for len in 0..ETH_HDR {
            assert_eq!(classify(&vec![0u8; len]), Err(DropReason::Truncated));
        }
    }

    #[test]
    fn unknown_ethertype_is_unsupported() {
        let mut f = [0u8; 60];
        f[12] = 0x88;
        f[13] = 0xcc; // LLDP
        assert_eq!(classify(&f), Err(DropReason::Unsupported));
    }

    /// `incoming_fast` agrees with `classify` wherever it answers, on mutations of plain
    /// IPv4 frames (every byte of the headers, and every length).
    #[test]
    fn incoming_fast_agrees_with_classify() {
        let mut base = [0u8; 74];
        base[12..14].copy_from_slice(&[0x08, 0x00]);
        base[14..34].copy_from_slice(&[
            0x45, 0, 0, 60, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        base[34..38].copy_from_slice(&[0x13, 0x88, 0, 80]);
        let mut checked = 0;
        let mut answered = 0;
        let mut check = |f: &[u8]| {
            let mut key = FlowKey::default();
            checked += 1;
            if let Some(kind) = incoming_fast(f, &mut key) {
                answered += 1;
                let c = classify(f).expect("fast path accepted a frame classify drops");
                assert_eq!(c.kind, kind);
                assert_eq!(c.frag, None);
                assert_eq!(c.incoming_key(), key);
            }
        };
        let values = [
            0u8, 1, 4, 5, 6, 8, 12, 17, 20, 0x20, 0x3f, 0x40, 0x43, 0x44, 0x45, 0x46, 0x4f, 0x55,
            0x7f, 0x80, 0x84, 0x88, 0xff,
        ];
        for proto in [1u8, 6, 17, 33, 132, 136, 50] {
            let mut f = base;
            f[23] = proto;
            for len in 0..=f.len() {
                check(&f[..len]);
            }
            for at in 12..42 {
                for &v in &values {
                    let mut g = f;
                    g[at] = v;
                    check(&g);
                    for total in [0u8, 19, 20, 27, 28, 39, 40, 59, 60] {
                        g[17] = total;
                        check(&g);
                    }
                }
            }
        }
        assert!(
            answered > 100 && answered < checked,
            "{answered} of {checked}"
        );
    }

    #[test]
    fn mac_group_bits() {
        let mut f = [0u8; 60];
        f[12] = 0x08;
        f[13] = 0x06;
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[..6].copy_from_slice(&[0xff; 6]);
        let c = classify(&f).unwrap();
        assert_eq!(c.kind, FrameKind::Arp);
        assert!(c.is_broadcast() && c.is_multicast());
        f[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        let c = classify(&f).unwrap();
        assert!(!c.is_broadcast() && c.is_multicast());
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        assert!(!classify(&f).unwrap().is_multicast());
    }
}
