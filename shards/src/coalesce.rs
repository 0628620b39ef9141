//! Receive coalescing for the kernel's TAP: consecutive UDP datagrams or TCP segments of one
//! flow in a batch become one super-packet, written to the kernel with one system call.
//!
//! Every write(2) to a TAP runs the kernel's receive path for one frame (allocate a socket
//! buffer, copy, dissect the flow, steer, IP, UDP or TCP) and pays a system call,
//! microseconds per frame on a VM. A super-packet with a `virtio_net_hdr` (NEEDS_CSUM, a
//! gso_type of `UDP_L4`, `TCPV4` or `TCPV6`, gso_size = the frames' payload length) goes
//! through that path once, like the aggregates that the kernel's own GRO builds from a NIC's
//! frames (or that a hypervisor hands a virtio guest): UDP cuts it back into the same
//! datagrams at the UDP layer (`udp_rcv_segment`, or hands it whole to a socket with
//! `UDP_GRO`), TCP takes it as the run of segments it is.
//!
//! A frame joins the group of the previous frame of its flow only when nothing about it
//! would change by the round trip:
//! - untagged Ethernet, IPv4 without options and not a fragment, or IPv6 with UDP or TCP as
//!   the first next header; the frame's headers are consistent (lengths) and its checksums
//!   valid (IPv4 header, UDP or TCP; a UDP checksum of zero is allowed on IPv4), so that the
//!   kernel, which trusts a super-packet's partial checksum, drops nothing it would have
//!   dropped otherwise;
//! - the same Ethernet header, IP header (TOS/traffic class, flow label, DF, TTL/hop limit,
//!   addresses) and ports as the group's first frame. The IPv4 ID is the one field that
//!   changes: the kernel numbers the datagrams it cuts consecutively from the first one's ID.
//!   For a packet that is not a fragment the ID is invisible to sockets (it only matters to
//!   reassembly; a host that forwards the packets sends them with fresh, distinct IDs);
//! - TCP, as GRO demands: the sequence number follows on from the previous segment, the same
//!   acknowledgment number, window and options (timestamps included) as the first segment,
//!   only the ACK flag set (PSH allowed on the last segment of a group), no urgent pointer;
//! - the same payload length as the group's first frame; a shorter one ends the group;
//! - the super-packet stays within 65,535 bytes of IP.
//!
//! Any other frame is written as it is, and closes every open group, so that frames of one
//! flow are never reordered; frames of different flows may be. Pure code, no I/O, no
//! allocation: a [`CoalescePlan`] has fixed arrays sized [`MAX_BATCH`].

use crate::offload::{checksum_add, checksum_finish, VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use crate::port::MAX_BATCH;

/// `VIRTIO_NET_HDR_GSO_UDP_L4`: UDP segmentation (`SKB_GSO_UDP_L4`).
pub const GSO_UDP_L4: u8 = 5;

/// The longest header a super-packet has: Ethernet, IPv6, TCP with 40 bytes of options.
pub const MAX_HEADER: usize = 14 + 40 + 60;

/// Buckets of the index from a flow's hash to its groups (a power of two, at least twice
/// [`MAX_BATCH`], so that chains stay short whatever the number of flows).
const BUCKETS: usize = 2 * MAX_BATCH;
/// No group (end of a bucket's chain).
const NONE: u8 = u8::MAX;

/// TCP flags.
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// IP protocol numbers.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// What a frame is, for coalescing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Segment {
    /// Whether the frame may join a group at all.
    mergeable: bool,
    v6: bool,
    /// `PROTO_UDP` or `PROTO_TCP`.
    proto: u8,
    /// Ethernet + IP + UDP/TCP header length (where the payload starts).
    header_len: u16,
    /// The payload's end (the IP packet's end: padding excluded).
    payload_end: u32,
    /// TCP: sequence number and flags.
    seq: u32,
    tcp_flags: u8,
    /// A cheap digest of the flow's identity, checked before comparing bytes.
    flow_hash: u32,
}

impl Segment {
    fn payload_len(&self) -> usize {
        self.payload_end as usize - usize::from(self.header_len)
    }

    /// The offset of the UDP/TCP header.
    fn l4(&self) -> usize {
        if self.v6 {
            14 + 40
        } else {
            14 + 20
        }
    }
}

/// One group: frames written together (a super-packet when it has two or more).
#[derive(Clone, Copy, Debug, Default)]
struct Group {
    first: u8,
    last: u8,
    count: u8,
    /// A shorter frame (or a TCP PSH) joined: nothing may follow it.
    closed: bool,
    /// Payload bytes of all members.
    payload_total: u32,
    /// TCP: the flags of all members together.
    tcp_flags: u8,
}

/// The grouping of one batch of frames bound for the kernel's TAP.
///
/// [`CoalescePlan::plan`] groups the frames; [`CoalescePlan::groups`] then yields them in the
/// order to write.
#[derive(Clone, Debug)]
pub struct CoalescePlan {
    frames: [Segment; MAX_BATCH],
    /// The next member of the same group, per frame (`u8::MAX`: none).
    next: [u8; MAX_BATCH],
    groups: [Group; MAX_BATCH],
    group_count: usize,
    /// Groups below this index are closed (a frame that could not be merged came after them).
    open_from: usize,
    /// Per bucket of flow hashes, the newest group of a mergeable frame whose hash falls in it.
    heads: [u8; BUCKETS],
    /// Per group, the next older group of the same bucket.
    older: [u8; MAX_BATCH],
}

impl Default for CoalescePlan {
    fn default() -> Self {
        Self::new()
    }
}

/// One group of a plan: either a single frame, to be written as it is, or frames to be
/// written as one super-packet.
#[derive(Clone, Copy, Debug)]
pub struct PlannedGroup<'p> {
    plan: &'p CoalescePlan,
    group: Group,
}

impl CoalescePlan {
    /// An empty plan.
    pub const fn new() -> Self {
        const EMPTY: Segment = Segment {
            mergeable: false,
            v6: false,
            proto: 0,
            header_len: 0,
            payload_end: 0,
            seq: 0,
            tcp_flags: 0,
            flow_hash: 0,
        };
        const NO_GROUP: Group = Group {
            first: 0,
            last: 0,
            count: 0,
            closed: false,
            payload_total: 0,
            tcp_flags: 0,
        };
        CoalescePlan {
            frames: [EMPTY; MAX_BATCH],
            next: [u8::MAX; MAX_BATCH],
            groups: [NO_GROUP; MAX_BATCH],
            group_count: 0,
            open_from: 0,
            heads: [NONE; BUCKETS],
            older: [NONE; MAX_BATCH],
        }
    }

    /// Groups `frames` (at most [`MAX_BATCH`]; the rest are ignored, so callers pass one
    /// batch). Returns the number of groups.
    pub fn plan(&mut self, frames: &[&[u8]]) -> usize {
        self.group_count = 0;
        self.open_from = 0;
        self.heads = [NONE; BUCKETS];
        let n = frames.len().min(MAX_BATCH);
        for (i, frame) in frames.iter().enumerate().take(n) {
            let d = inspect(frame);
            self.frames[i] = d;
            self.next[i] = u8::MAX;
            if d.mergeable {
                if let Some(g) = self.find_group(frames, i, &d) {
                    self.append(g, i, &d);
                    continue;
                }
            } else {
                // Keep the order of everything before it.
                self.open_from = self.group_count + 1;
            }
            let g = self.group_count;
            self.groups[g] = Group {
                first: i as u8,
                last: i as u8,
                count: 1,
                closed: !d.mergeable || ends_group(&d),
                payload_total: d.payload_len() as u32,
                tcp_flags: d.tcp_flags,
            };
            if d.mergeable {
                let bucket = d.flow_hash as usize % BUCKETS;
                self.older[g] = self.heads[bucket];
                self.heads[bucket] = g as u8;
            }
            self.group_count += 1;
        }
        self.group_count
    }

    /// The groups of the last [`CoalescePlan::plan`], in the order to write them.
    pub fn groups(&self) -> impl Iterator<Item = PlannedGroup<'_>> + '_ {
        self.groups[..self.group_count]
            .iter()
            .map(move |&group| PlannedGroup { plan: self, group })
    }

    /// The open group of frame `i`'s flow that it may join: the newest group of its flow
    /// (found through the bucket of its hash), if that one is still open.
    fn find_group(&self, frames: &[&[u8]], i: usize, d: &Segment) -> Option<usize> {
        let mut next = self.heads[d.flow_hash as usize % BUCKETS];
        while next != NONE && usize::from(next) >= self.open_from {
            let g = usize::from(next);
            next = self.older[g];
            let group = &self.groups[g];
            let first = &self.frames[usize::from(group.first)];
            let (a, b) = (frames[usize::from(group.first)], frames[i]);
            if first.flow_hash != d.flow_hash
                || !first.mergeable
                || first.v6 != d.v6
                || first.proto != d.proto
                || !same_flow(a, b, d.v6)
            {
                continue;
            }
            // The newest group of this flow decides: joining an older one would reorder.
            let last = &self.frames[usize::from(group.last)];
            let fits = !group.closed
                && first.header_len == d.header_len
                && same_headers(a, b, d)
                && d.payload_len() <= first.payload_len()
                && (d.proto != PROTO_TCP
                    || d.seq == last.seq.wrapping_add(last.payload_len() as u32))
                && usize::from(d.header_len) - 14 + group.payload_total as usize + d.payload_len()
                    <= usize::from(u16::MAX)
                && usize::from(group.count) < MAX_BATCH;
            return fits.then_some(g);
        }
        None
    }

    fn append(&mut self, g: usize, i: usize, d: &Segment) {
        let first_len = self.frames[usize::from(self.groups[g].first)].payload_len();
        let group = &mut self.groups[g];
        self.next[usize::from(group.last)] = i as u8;
        group.last = i as u8;
        group.count += 1;
        group.payload_total += d.payload_len() as u32;
        group.tcp_flags |= d.tcp_flags;
        if d.payload_len() < first_len || ends_group(d) {
            group.closed = true;
        }
    }
}

/// Whether nothing may follow `d` in a group (a TCP segment with PSH).
fn ends_group(d: &Segment) -> bool {
    d.proto == PROTO_TCP && d.tcp_flags & TCP_PSH != 0
}

impl<'p> PlannedGroup<'p> {
    /// Index (in the planned batch) of the group's first frame.
    pub fn first(&self) -> usize {
        usize::from(self.group.first)
    }

    /// How many frames the group holds.
    pub fn len(&self) -> usize {
        usize::from(self.group.count)
    }

    /// Whether the group holds no frame (never, for a group of a plan).
    pub fn is_empty(&self) -> bool {
        self.group.count == 0
    }

    /// Whether the group is written as one super-packet (two or more frames).
    pub fn is_merged(&self) -> bool {
        self.group.count > 1
    }

    /// The indices of the group's frames, in order.
    pub fn members(&self) -> impl Iterator<Item = usize> + 'p {
        let next = &self.plan.next;
        let mut at = self.group.first;
        let mut left = self.group.count;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let here = at;
            at = next[usize::from(here)];
            left -= 1;
            Some(usize::from(here))
        })
    }

    /// The payload (after the UDP/TCP header) of member `index` (an index from
    /// [`PlannedGroup::members`]) of `frames`, the batch that was planned.
    pub fn payload<'f>(&self, frames: &[&'f [u8]], index: usize) -> &'f [u8] {
        let d = &self.plan.frames[index];
        &frames[index][usize::from(d.header_len)..d.payload_end as usize]
    }

    /// For a merged group: writes the super-packet's headers (Ethernet, IP, UDP/TCP) into
    /// `out` and returns them with their vnet header. For a single frame: `None`.
    pub fn super_header<'o>(
        &self,
        frames: &[&[u8]],
        out: &'o mut [u8; MAX_HEADER],
    ) -> Option<(VnetHdr, &'o [u8])> {
        if !self.is_merged() {
            return None;
        }
        let first = &self.plan.frames[self.first()];
        let v6 = first.v6;
        let hlen = usize::from(first.header_len);
        let l4 = first.l4();
        let header = &mut out[..hlen];
        header.copy_from_slice(&frames[self.first()][..hlen]);
        let l4_len = hlen - l4 + self.group.payload_total as usize;
        let (src, dst) = if v6 {
            header[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
            (22..38, 38..54)
        } else {
            let total = (20 + l4_len) as u16;
            header[16..18].copy_from_slice(&total.to_be_bytes());
            header[24..26].copy_from_slice(&[0, 0]);
            let csum = checksum_finish(checksum_add(0, &header[14..34]));
            header[24..26].copy_from_slice(&csum.to_be_bytes());
            (26..30, 30..34)
        };
        let (csum_offset, gso_type) = if first.proto == PROTO_TCP {
            // The flags of the whole run (PSH of its last segment).
            header[l4 + 13] = self.group.tcp_flags;
            (16, if v6 { GSO_TCPV6 } else { GSO_TCPV4 })
        } else {
            header[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            (6, GSO_UDP_L4)
        };
        // A partial checksum holds the pseudo-header sum (folded, not complemented).
        let mut sum = checksum_add(0, &header[src]);
        sum = checksum_add(sum, &header[dst]);
        sum = sum
            .wrapping_add(u32::from(first.proto))
            .wrapping_add(l4_len as u32);
        let pseudo = !checksum_finish(sum);
        header[l4 + csum_offset..l4 + csum_offset + 2].copy_from_slice(&pseudo.to_be_bytes());
        let vnet = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: hlen as u16,
            gso_size: first.payload_len() as u16,
            csum_start: l4 as u16,
            csum_offset: csum_offset as u16,
        };
        Some((vnet, &out[..hlen]))
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Whether `a` and `b` (both mergeable, of the same IP version and protocol) belong to one
/// flow: the same addresses and ports.
fn same_flow(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        a[22..58] == b[22..58]
    } else {
        a[26..38] == b[26..38]
    }
}

/// Whether `a` and `b` (of one flow, headers of the same length) have the same headers apart
/// from lengths, IDs, checksums and (TCP) sequence numbers and the PSH flag.
fn same_headers(a: &[u8], b: &[u8], d: &Segment) -> bool {
    let ip = if d.v6 {
        // Ethernet, version/traffic class/flow label; next header, hop limit.
        a[..18] == b[..18] && a[20..22] == b[20..22]
    } else {
        // Ethernet, version/IHL, TOS; flags/fragment, TTL, protocol.
        a[..16] == b[..16] && a[20..24] == b[20..24]
    };
    if !ip || d.proto != PROTO_TCP {
        return ip;
    }
    let l4 = d.l4();
    let end = usize::from(d.header_len);
    // Acknowledgment number, data offset, window; urgent pointer and options.
    a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
        && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
        && a[l4 + 18..end] == b[l4 + 18..end]
}

/// Looks at one frame: whether (and how) it may be merged.
fn inspect(frame: &[u8]) -> Segment {
    let not = Segment::default();
    if frame.len() < 14 + 20 + 8 {
        return not;
    }
    match be16(frame, 12) {
        0x0800 => inspect_v4(frame).unwrap_or(not),
        0x86dd => inspect_v6(frame).unwrap_or(not),
        _ => not,
    }
}

fn inspect_v4(frame: &[u8]) -> Option<Segment> {
    let ip = &frame[14..];
    if ip[0] != 0x45 || (ip[9] != PROTO_UDP && ip[9] != PROTO_TCP) {
        return None;
    }
    let total = usize::from(be16(ip, 2));
    let frag = be16(ip, 6);
    // No MF, no offset; the reserved bit is compared between members like the rest.
    if frag & 0x3fff != 0 || total < 28 || total > ip.len() {
        return None;
    }
    if checksum_finish(checksum_add(0, &ip[..20])) != 0 {
        return None;
    }
    let mut pseudo = checksum_add(0, &ip[12..20]);
    pseudo = pseudo
        .wrapping_add(u32::from(ip[9]))
        .wrapping_add((total - 20) as u32);
    inspect_l4(
        frame,
        14 + 20,
        14 + total,
        ip[9],
        pseudo,
        false,
        &ip[12..24],
    )
}

fn inspect_v6(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 14 + 40 + 8 {
        return None;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 6 || (ip[6] != PROTO_UDP && ip[6] != PROTO_TCP) {
        return None;
    }
    let payload = usize::from(be16(ip, 4));
    if payload < 8 || 40 + payload > ip.len() {
        return None;
    }
    let mut pseudo = checksum_add(0, &ip[8..40]);
    pseudo = pseudo
        .wrapping_add(u32::from(ip[6]))
        .wrapping_add(payload as u32);
    inspect_l4(
        frame,
        14 + 40,
        14 + 40 + payload,
        ip[6],
        pseudo,
        true,
        &ip[8..44],
    )
}

/// The UDP or TCP part of [`inspect`]: `l4` where its header starts, `end` where the IP
/// packet ends, `pseudo` the pseudo-header sum, `identity` the bytes hashed for the flow.
fn inspect_l4(
    frame: &[u8],
    l4: usize,
    end: usize,
    proto: u8,
    pseudo: u32,
    v6: bool,
    identity: &[u8],
) -> Option<Segment> {
    let seg = &frame[l4..end];
    let (header, seq, tcp_flags) = if proto == PROTO_UDP {
        // Checksum zero: none (IPv4 only; mandatory on IPv6).
        if usize::from(be16(seg, 4)) != seg.len() || (v6 && be16(seg, 6) == 0) {
            return None;
        }
        if be16(seg, 6) != 0 && checksum_finish(checksum_add(pseudo, seg)) != 0 {
            return None;
        }
        (8, 0, 0)
    } else {
        if seg.len() < 20 {
            return None;
        }
        let doff = usize::from(seg[12] >> 4) * 4;
        let flags = seg[13];
        // ACK, maybe PSH; nothing else (no SYN, FIN, RST, URG, ECE, CWR; no NS bit).
        if doff < 20
            || doff > seg.len()
            || seg[12] & 0x0f != 0
            || flags & !(TCP_ACK | TCP_PSH) != 0
            || flags & TCP_ACK == 0
            || be16(seg, 18) != 0
        {
            return None;
        }
        if checksum_finish(checksum_add(pseudo, seg)) != 0 {
            return None;
        }
        let seq = u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]);
        (doff, seq, flags)
    };
    // Nothing to merge without payload (a pure ACK, an empty datagram).
    if seg.len() == header {
        return None;
    }
    Some(Segment {
        mergeable: true,
        v6,
        proto,
        header_len: (l4 + header) as u16,
        payload_end: end as u32,
        seq,
        tcp_flags,
        flow_hash: flow_hash(identity),
    })
}

/// FNV-1a over the addresses and ports (not for security: only to skip byte comparisons).
fn flow_hash(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for chunk in bytes.chunks_exact(4) {
        h ^= u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP datagram in an Ethernet frame, with valid checksums.
    pub(crate) fn udp4(sport: u16, dport: u16, id: u16, df: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 42];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = (28 + payload.len()) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        if df {
            f[20] = 0x40;
        }
        f[22] = 64;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 1]);
        let c = checksum_finish(checksum_add(0, &f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[38..40].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        f.extend_from_slice(payload);
        let mut sum = checksum_add(0, &f[26..34]);
        sum = sum.wrapping_add(17 + 8 + payload.len() as u32);
        sum = checksum_add(sum, &f[34..]);
        let c = checksum_finish(sum);
        f[40..42].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
        f
    }

    pub(crate) fn udp6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 62];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        let plen = (8 + payload.len()) as u16;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f[20] = 17;
        f[21] = 64;
        f[22] = 0xfd;
        f[37] = 2;
        f[38] = 0xfd;
        f[53] = 1;
        f[54..56].copy_from_slice(&sport.to_be_bytes());
        f[56..58].copy_from_slice(&dport.to_be_bytes());
        f[58..60].copy_from_slice(&plen.to_be_bytes());
        f.extend_from_slice(payload);
        let mut sum = checksum_add(0, &f[22..54]);
        sum = sum.wrapping_add(17 + u32::from(plen));
        sum = checksum_add(sum, &f[54..]);
        let c = checksum_finish(sum);
        f[60..62].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
        f
    }

    /// What the kernel makes of a planned batch: the UDP datagrams (headers + payload) in the
    /// order it receives them, cutting super-packets the way `__udp_gso_segment` does.
    fn as_received(frames: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut plan = CoalescePlan::new();
        plan.plan(frames);
        let mut out = Vec::new();
        for g in plan.groups() {
            let mut buf = [0u8; MAX_HEADER];
            match g.super_header(frames, &mut buf) {
                None => out.push(frames[g.first()].to_vec()),
                Some((vnet, header)) => {
                    let payload: Vec<u8> = g
                        .members()
                        .flat_map(|m| g.payload(frames, m).to_vec())
                        .collect();
                    // The super-packet's own checksums must be right.
                    let hl = usize::from(vnet.hdr_len);
                    assert_eq!(hl, header.len());
                    let v6 = be16(header, 12) == 0x86dd;
                    if !v6 {
                        assert_eq!(checksum_finish(checksum_add(0, &header[14..34])), 0);
                        assert_eq!(
                            usize::from(be16(header, 16)),
                            20 + 8 + payload.len(),
                            "IPv4 total length"
                        );
                    } else {
                        assert_eq!(usize::from(be16(header, 18)), 8 + payload.len());
                    }
                    let mss = usize::from(vnet.gso_size);
                    for (k, seg) in payload.chunks(mss).enumerate() {
                        // Segment k: the first frame's headers with lengths, ID and checksums
                        // recomputed.
                        let mut f = header.to_vec();
                        let ulen = (8 + seg.len()) as u16;
                        let l4 = hl - 8;
                        f[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
                        if v6 {
                            f[18..20].copy_from_slice(&ulen.to_be_bytes());
                        } else {
                            f[16..18].copy_from_slice(&(20 + ulen).to_be_bytes());
                            let id = be16(&f, 18).wrapping_add(k as u16);
                            f[18..20].copy_from_slice(&id.to_be_bytes());
                            f[24..26].copy_from_slice(&[0, 0]);
                            let c = checksum_finish(checksum_add(0, &f[14..34]));
                            f[24..26].copy_from_slice(&c.to_be_bytes());
                        }
                        f.extend_from_slice(seg);
                        // The kernel trusts the partial checksum; complete it here so that
                        // segments compare with the originals byte for byte.
                        let (src, dst) = if v6 {
                            (22..38, 38..54)
                        } else {
                            (26..30, 30..34)
                        };
                        f[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
                        let mut sum = checksum_add(0, &f[src]);
                        sum = checksum_add(sum, &f[dst]);
                        sum = sum.wrapping_add(17 + u32::from(ulen));
                        sum = checksum_add(sum, &f[l4..]);
                        let c = checksum_finish(sum);
                        f[l4 + 6..l4 + 8]
                            .copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
                        out.push(f);
                    }
                }
            }
        }
        out
    }

    /// The fields a receiving socket sees of a datagram: addresses, ports, payload.
    fn socket_view(f: &[u8]) -> (Vec<u8>, Vec<u8>) {
        if be16(f, 12) == 0x86dd {
            let plen = usize::from(be16(f, 18));
            (f[22..58].to_vec(), f[62..54 + plen].to_vec())
        } else {
            let total = usize::from(be16(f, 16));
            (f[26..38].to_vec(), f[42..14 + total].to_vec())
        }
    }

    #[test]
    fn one_flow_becomes_one_super_packet() {
        let frames: Vec<Vec<u8>> = (0..10u16)
            .map(|i| udp4(5000, 9000, 100 + i, false, &[i as u8; 18]))
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        assert_eq!(plan.plan(&refs), 1);
        let g = plan.groups().next().unwrap();
        assert_eq!(g.len(), 10);
        assert_eq!(g.members().collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        let mut buf = [0u8; MAX_HEADER];
        let (vnet, header) = g.super_header(&refs, &mut buf).unwrap();
        assert_eq!(vnet.gso_type, GSO_UDP_L4);
        assert_eq!(vnet.gso_size, 18);
        assert_eq!(vnet.csum_start, 34);
        assert_eq!(vnet.csum_offset, 6);
        assert_eq!(header.len(), 42);
        // Cut back, the datagrams are the originals, byte for byte.
        assert_eq!(as_received(&refs), frames);
    }

    #[test]
    fn flows_interleaved_keep_their_order() {
        let mut frames = Vec::new();
        for i in 0..12u16 {
            let flow = i % 3;
            frames.push(udp4(5000 + flow, 9000, i, true, &[i as u8; 30]));
        }
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        assert_eq!(plan.plan(&refs), 3);
        for g in plan.groups() {
            let m: Vec<usize> = g.members().collect();
            assert!(m.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(m.len(), 4);
        }
        let mut got = as_received(&refs);
        let mut want: Vec<Vec<u8>> = frames.clone();
        // DF datagrams get consecutive IDs from the first; compare what a socket sees.
        let view = |v: &mut Vec<Vec<u8>>| v.iter().map(|f| socket_view(f)).collect::<Vec<_>>();
        let (mut g, mut w) = (view(&mut got), view(&mut want));
        // Per flow, the order is the same.
        for flow in 0..3u16 {
            let pick = |v: &Vec<(Vec<u8>, Vec<u8>)>| {
                v.iter()
                    .filter(|(a, _)| be16(a, 8) == 5000 + flow)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            assert_eq!(pick(&g), pick(&w));
        }
        g.sort();
        w.sort();
        assert_eq!(g, w);
        got.clear();
    }

    #[test]
    fn many_interleaved_flows_are_each_merged() {
        // A full batch of round-robin flows (as RSS queues of a busy NIC hold them): each
        // flow's frames form one group however many other flows lie between them.
        for flows in [16u16, 32, 64] {
            let frames: Vec<Vec<u8>> = (0..MAX_BATCH as u16)
                .map(|i| udp4(5000 + i % flows, 9000, i, true, &[i as u8; 18]))
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
            let mut plan = CoalescePlan::new();
            assert_eq!(plan.plan(&refs), usize::from(flows), "{flows} flows");
            for g in plan.groups() {
                let m: Vec<usize> = g.members().collect();
                assert_eq!(m.len(), MAX_BATCH / usize::from(flows));
                assert!(m
                    .windows(2)
                    .all(|w| w[0] < w[1] && be16(&frames[w[0]], 34) == be16(&frames[w[1]], 34)));
            }
        }
    }

    #[test]
    fn what_is_not_merged() {
        let good = |id| udp4(5000, 9000, id, false, &[7; 20]);
        let mut bad_csum = good(2);
        bad_csum[45] ^= 1;
        let mut bad_ip_csum = good(3);
        bad_ip_csum[24] ^= 1;
        let mut fragment = good(4);
        fragment[20] = 0x20; // MF
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("udp checksum", bad_csum),
            ("ip checksum", bad_ip_csum),
            ("fragment", fragment),
            ("other DF", udp4(5000, 9000, 2, true, &[7; 20])),
            ("longer payload", udp4(5000, 9000, 2, false, &[7; 21])),
            ("other port", udp4(5001, 9000, 2, false, &[7; 20])),
            ("empty payload", udp4(5000, 9000, 2, false, &[])),
        ];
        for (what, second) in cases {
            let frames = [good(1), second.clone()];
            let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
            let mut plan = CoalescePlan::new();
            assert_eq!(plan.plan(&refs), 2, "{what}");
            assert_eq!(as_received(&refs), frames.to_vec(), "{what}");
        }
        // Any IPv4 ID is fine (the kernel renumbers); so is a zero UDP checksum on IPv4, and
        // a shorter last datagram.
        let frames = [good(1), good(1), good(9)];
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        assert_eq!(CoalescePlan::new().plan(&refs), 1);
        let mut nocsum = good(2);
        nocsum[40..42].copy_from_slice(&[0, 0]);
        let short = udp4(5000, 9000, 3, false, &[7; 5]);
        let after = good(4);
        let frames = [good(1), nocsum, short, after];
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        assert_eq!(plan.plan(&refs), 2, "the short one ends the group");
        let sizes: Vec<usize> = plan.groups().map(|g| g.len()).collect();
        assert_eq!(sizes, vec![3, 1]);
    }

    #[test]
    fn an_unmergeable_frame_closes_open_groups() {
        let a1 = udp4(5000, 9000, 1, true, &[1; 10]);
        let arp = {
            let mut f = vec![0u8; 60];
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            f
        };
        let a2 = udp4(5000, 9000, 2, true, &[2; 10]);
        let frames = [a1, arp, a2];
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        assert_eq!(plan.plan(&refs), 3);
        let firsts: Vec<usize> = plan.groups().map(|g| g.first()).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }

    #[test]
    fn ipv6_and_padding() {
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| udp6(7, 9000, &[i; 33])).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        assert_eq!(as_received(&refs), frames);
        // Ethernet padding after tiny datagrams is not payload.
        let padded: Vec<Vec<u8>> = (0..4u16)
            .map(|i| {
                let mut f = udp4(1, 2, i, true, &[i as u8; 2]);
                f.resize(60, 0xee);
                f
            })
            .collect();
        let refs: Vec<&[u8]> = padded.iter().map(|f| f.as_slice()).collect();
        let got = as_received(&refs);
        assert_eq!(got.len(), 4);
        for (g, p) in got.iter().zip(&padded) {
            assert_eq!(socket_view(g), socket_view(p));
        }
    }

    #[test]
    fn super_packets_stay_under_64k() {
        let frames: Vec<Vec<u8>> = (0..MAX_BATCH as u16)
            .map(|i| udp4(1, 2, i, true, &[0; 1472]))
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        plan.plan(&refs);
        for g in plan.groups() {
            let total: usize = g.members().map(|m| g.payload(&refs, m).len()).sum();
            assert!(20 + 8 + total <= 65535);
        }
        assert_eq!(as_received(&refs).len(), MAX_BATCH);
    }

    /// A TCP segment (ACK plus `extra_flags`) with valid checksums and, when `ts` is given,
    /// a timestamp option.
    fn tcp4(seq: u32, ack: u32, extra_flags: u8, ts: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let opts: Vec<u8> = match ts {
            Some(t) => {
                let mut o = vec![1, 1, 8, 10];
                o.extend_from_slice(&t.to_be_bytes());
                o.extend_from_slice(&7u32.to_be_bytes());
                o
            }
            None => Vec::new(),
        };
        let tcp_len = 20 + opts.len() + payload.len();
        let mut f = udp4(0, 0, 0, true, &[]);
        f.truncate(34);
        f[23] = 6;
        f[16..18].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum_finish(checksum_add(0, &f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = (((20 + opts.len()) / 4) as u8) << 4;
        tcp[13] = TCP_ACK | extra_flags;
        tcp[14..16].copy_from_slice(&500u16.to_be_bytes());
        tcp.extend_from_slice(&opts);
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        let mut sum = checksum_add(0, &f[26..34]);
        sum = sum.wrapping_add(6 + tcp_len as u32);
        sum = checksum_add(sum, &f[34..]);
        let c = checksum_finish(sum);
        f[50..52].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn plan_sizes(frames: &[Vec<u8>]) -> Vec<usize> {
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        plan.plan(&refs);
        plan.groups().map(|g| g.len()).collect()
    }

    #[test]
    fn tcp_runs_become_one_super_segment() {
        let base = 0xffff_f000u32; // the sequence number wraps inside the run
        let mut frames: Vec<Vec<u8>> = (0..5u32)
            .map(|k| {
                tcp4(
                    base.wrapping_add(k * 1000),
                    77,
                    0,
                    Some(9),
                    &[k as u8; 1000],
                )
            })
            .collect();
        frames.push(tcp4(
            base.wrapping_add(5000),
            77,
            TCP_PSH,
            Some(9),
            &[5; 300],
        ));
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let mut plan = CoalescePlan::new();
        assert_eq!(plan.plan(&refs), 1);
        let g = plan.groups().next().unwrap();
        let mut buf = [0u8; MAX_HEADER];
        let (vnet, header) = g.super_header(&refs, &mut buf).unwrap();
        assert_eq!(vnet.gso_type, GSO_TCPV4);
        assert_eq!(vnet.gso_size, 1000);
        assert_eq!((vnet.csum_start, vnet.csum_offset), (34, 16));
        assert_eq!(usize::from(vnet.hdr_len), 14 + 20 + 32);
        assert_eq!(header.len(), 66);
        let payload: Vec<u8> = g
            .members()
            .flat_map(|m| g.payload(&refs, m).to_vec())
            .collect();
        assert_eq!(payload.len(), 5300);
        assert_eq!(usize::from(be16(header, 16)), 20 + 32 + 5300);
        assert_eq!(checksum_finish(checksum_add(0, &header[14..34])), 0);
        // The first segment's sequence number, the run's flags.
        assert_eq!(header[38..42], base.to_be_bytes());
        assert_eq!(header[47], TCP_ACK | TCP_PSH);
        // Completing the partial checksum over the whole gives a valid segment.
        let mut whole = header.to_vec();
        whole.extend_from_slice(&payload);
        crate::offload::complete_checksum(&mut whole, 34, 16).unwrap();
        let mut sum = checksum_add(0, &whole[26..34]);
        sum = sum.wrapping_add(6 + (whole.len() - 34) as u32);
        assert_eq!(checksum_finish(checksum_add(sum, &whole[34..])), 0);
    }

    #[test]
    fn what_tcp_does_not_merge() {
        let seg = |seq: u32, ack: u32, flags: u8, ts: u32, len: usize| {
            tcp4(seq, ack, flags, Some(ts), &vec![1; len])
        };
        // A gap, another ACK number, another timestamp, SYN/FIN/RST, a pure ACK: each
        // second frame starts a group of its own.
        for (what, second) in [
            ("gap", seg(1101, 5, 0, 1, 100)),
            ("ack", seg(1100, 6, 0, 1, 100)),
            ("timestamp", seg(1100, 5, 0, 2, 100)),
            ("fin", seg(1100, 5, 0x01, 1, 100)),
            ("rst", seg(1100, 5, 0x04, 1, 100)),
            ("pure ack", seg(1100, 5, 0, 1, 0)),
            ("longer", seg(1100, 5, 0, 1, 101)),
        ] {
            assert_eq!(
                plan_sizes(&[seg(1000, 5, 0, 1, 100), second]),
                vec![1, 1],
                "{what}"
            );
        }
        // A corrupted segment is written alone (the kernel drops it itself).
        let mut bad = seg(1100, 5, 0, 1, 100);
        bad[70] ^= 1;
        assert_eq!(plan_sizes(&[seg(1000, 5, 0, 1, 100), bad]), vec![1, 1]);
        // PSH ends a group; what follows starts the next.
        let frames = [
            seg(1000, 5, 0, 1, 100),
            seg(1100, 5, TCP_PSH, 1, 100),
            seg(1200, 5, 0, 1, 100),
            seg(1300, 5, 0, 1, 100),
        ];
        assert_eq!(plan_sizes(&frames), vec![2, 2]);
        // TCP and UDP between the same ports are different flows.
        let frames = [
            seg(1000, 5, 0, 1, 100),
            udp4(40000, 80, 1, true, &[1; 100]),
            seg(1100, 5, 0, 1, 100),
        ];
        assert_eq!(plan_sizes(&frames), vec![2, 1]);
    }

    proptest::proptest! {
        /// Whatever the batch, the kernel receives every frame exactly once, a flow's frames
        /// in order, each as a socket would see the original.
        #[test]
        fn plans_lose_and_reorder_nothing(
            spec in proptest::collection::vec((0u16..4, 0usize..40, proptest::bool::ANY, 0u8..8), 0..MAX_BATCH)
        ) {
            let mut frames = Vec::new();
            for (k, (flow, len, df, mangle)) in spec.iter().enumerate() {
                let mut f = udp4(5000 + flow, 9000, k as u16, *df, &vec![k as u8; *len]);
                match mangle {
                    0 => { let at = 44.min(f.len() - 1); f[at] ^= 0x55 } // payload or checksum corrupted
                    1 => f.resize(f.len().max(60) + 3, 0), // padding
                    2 => f.truncate(30),                   // runt
                    _ => {}
                }
                frames.push(f);
            }
            let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
            let got = as_received(&refs);
            proptest::prop_assert_eq!(got.len(), frames.len());
            let mut plan = CoalescePlan::new();
            plan.plan(&refs);
            let mut seen = vec![false; frames.len()];
            for g in plan.groups() {
                for m in g.members() {
                    proptest::prop_assert!(!seen[m]);
                    seen[m] = true;
                }
                // Members of a group are one flow, in batch order.
                let m: Vec<usize> = g.members().collect();
                proptest::prop_assert!(m.windows(2).all(|w| w[0] < w[1]));
            }
            proptest::prop_assert!(seen.iter().all(|s| *s));
            // Across groups too, each flow's frames come in batch order.
            let order: Vec<usize> = plan.groups().flat_map(|g| g.members().collect::<Vec<_>>()).collect();
            for flow in 0..4u16 {
                let of_flow: Vec<usize> = order.iter().copied()
                    .filter(|&m| spec[m].0 == flow).collect();
                proptest::prop_assert!(of_flow.windows(2).all(|w| w[0] < w[1]), "flow {} reordered: {:?}", flow, of_flow);
            }
            // Merged datagrams arrive as the originals would (for a socket).
            for (g, f) in got.iter().zip(plan.groups().flat_map(|g| g.members().collect::<Vec<_>>())
                .map(|m| &frames[m])) {
                if g.len() >= 42 && f.len() >= 42 {
                    proptest::prop_assert_eq!(socket_view(g), socket_view(f));
                }
            }
        }
    }
}
