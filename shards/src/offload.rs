//! Offload metadata (`virtio_net_hdr`) and the software fallbacks for it: checksum completion
//! and TCP segmentation.
//!
//! Frames may come with offload metadata from two places: the kernel's side (a TAP with
//! `IFF_VNET_HDR` + `TUNSETOFFLOAD`) and a NIC backend that passes large receive aggregates
//! whole (AF_PACKET with `PACKET_VNET_HDR`, where GRO or a veth peer's TSO made them). The
//! metadata travels with the frame through the data plane ([`crate::port::FrameBatch`]); an
//! endpoint that understands it (the kernel's TAP) gets the frame whole, any other gets wire
//! frames made here.
//!
//! With offloads the kernel skips its own segmentation and checksumming: a read returns a
//! `virtio_net_hdr` followed by a frame that may be a TCP "super-segment" of up to 64 KiB
//! (gso_type TCPV4/TCPV6) and whose L4 checksum may be left partial (flag NEEDS_CSUM). One
//! read then carries what would otherwise be dozens of reads. This module turns such a frame
//! into wire frames: [`VnetHdr::parse`], [`complete_checksum`] and [`TcpSplit`].
//! Pure code, no I/O; malformed input gives a [`GsoError`], never a panic.

/// Length of `struct virtio_net_hdr` (the TAP's default vnet header size).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (a flag on the gso type).
pub const GSO_ECN: u8 = 0x80;

/// Why a frame could not be completed or segmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoError {
    /// Shorter than its headers claim.
    Truncated,
    /// A GSO type or network protocol this module does not segment.
    Unsupported,
    /// Inconsistent header fields (checksum offsets, header lengths, zero segment size).
    BadHeader,
}

/// The fields of a `virtio_net_hdr` (native byte order, as the TAP writes it by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` and others.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (hint only; the kernel may put the linear part's length here).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// No offload: the frame is a complete wire frame.
    pub const PLAIN: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Whether the frame needs nothing done (no partial checksum, no segmentation).
    #[inline]
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type == GSO_NONE
    }

    /// Parses the first [`VNET_HDR_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Option<VnetHdr> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header's bytes.
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Adds `data` to a one's complement sum (big-endian 16-bit words, odd byte padded).
pub fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        // Fold early enough that the u32 never overflows (64 KiB frames at most add 2^31).
        if sum >= 0x8000_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = words.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a sum to 16 bits and complements it: the value to store in a checksum field.
pub fn checksum_finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Completes a partial checksum in place: the field at `csum_start + csum_offset` holds the
/// pseudo-header sum; the result covers everything from `csum_start` to the end.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), GsoError> {
    let field = csum_start
        .checked_add(csum_offset)
        .filter(|&f| f + 2 <= frame.len())
        .ok_or(GsoError::BadHeader)?;
    let sum = checksum_finish(checksum_add(0, &frame[csum_start..]));
    // UDP sends a computed zero as 0xffff; for TCP both mean the same to a receiver.
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Offset of the IP header after the Ethernet header (and up to two VLAN tags), and the
/// ethertype found there.
fn l3_offset(frame: &[u8]) -> Result<(usize, u16), GsoError> {
    let mut offset = 12;
    for _ in 0..3 {
        let ethertype = frame
            .get(offset..offset + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(GsoError::Truncated)?;
        if ethertype == 0x8100 || ethertype == 0x88a8 {
            offset += 4;
        } else {
            return Ok((offset + 2, ethertype));
        }
    }
    Err(GsoError::Unsupported)
}

/// How to cut one TCP super-segment into wire segments of at most `mss` payload bytes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSplit {
    l3: usize,
    l4: usize,
    headers: usize,
    mss: usize,
    total: usize,
    v4: bool,
}

impl TcpSplit {
    /// Checks `frame` (without the vnet header) against `hdr` (a TCPV4/TCPV6 GSO header).
    pub fn new(frame: &[u8], hdr: &VnetHdr) -> Result<TcpSplit, GsoError> {
        let v4 = match hdr.gso_type & !GSO_ECN {
            GSO_TCPV4 => true,
            GSO_TCPV6 => false,
            _ => return Err(GsoError::Unsupported),
        };
        let (l3, ethertype) = l3_offset(frame)?;
        let l4 = match (v4, ethertype) {
            (true, 0x0800) => {
                let ihl = usize::from(*frame.get(l3).ok_or(GsoError::Truncated)? & 0x0f) * 4;
                if ihl < 20 || frame.get(l3 + 9) != Some(&6) {
                    return Err(GsoError::BadHeader);
                }
                l3 + ihl
            }
            // Extension headers: trust csum_start, which points at the TCP header.
            (false, 0x86dd) => usize::from(hdr.csum_start),
            _ => return Err(GsoError::BadHeader),
        };
        if l4 < l3 + 20 || (!v4 && l4 != usize::from(hdr.csum_start)) {
            return Err(GsoError::BadHeader);
        }
        let doff = usize::from(*frame.get(l4 + 12).ok_or(GsoError::Truncated)? >> 4) * 4;
        let headers = l4 + doff;
        if doff < 20 || headers > frame.len() {
            return Err(GsoError::Truncated);
        }
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(GsoError::BadHeader);
        }
        Ok(TcpSplit {
            l3,
            l4,
            headers,
            mss,
            total: frame.len(),
            v4,
        })
    }

    /// Number of segments.
    pub fn count(&self) -> usize {
        (self.total - self.headers).div_ceil(self.mss).max(1)
    }

    /// Length of segment `index` (headers included).
    pub fn segment_len(&self, index: usize) -> usize {
        let start = self.headers + index * self.mss;
        self.headers + (self.total - start).min(self.mss)
    }

    /// Writes segment `index` of `frame` into `out`; returns its length. `out` must hold
    /// [`TcpSplit::segment_len`] bytes and `frame` must be the frame given to `new`.
    pub fn write_segment(
        &self,
        frame: &[u8],
        index: usize,
        out: &mut [u8],
    ) -> Result<usize, GsoError> {
        if frame.len() != self.total || index >= self.count() {
            return Err(GsoError::BadHeader);
        }
        let len = self.segment_len(index);
        let out = out.get_mut(..len).ok_or(GsoError::Truncated)?;
        let start = self.headers + index * self.mss;
        out[..self.headers].copy_from_slice(&frame[..self.headers]);
        out[self.headers..].copy_from_slice(&frame[start..start + (len - self.headers)]);

        let (l3, l4) = (self.l3, self.l4);
        if self.v4 {
            let total = (len - l3) as u16;
            out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]).wrapping_add(index as u16);
            out[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let sum = checksum_finish(checksum_add(0, &out[l3..l4]));
            out[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        } else {
            let payload = (len - l3 - 40) as u16;
            out[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
        }
        let seq = u32::from_be_bytes([out[l4 + 4], out[l4 + 5], out[l4 + 6], out[l4 + 7]])
            .wrapping_add((index * self.mss) as u32);
        out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        if index + 1 != self.count() {
            out[l4 + 13] &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if index != 0 {
            out[l4 + 13] &= !0x80; // CWR only on the first
        }
        // Full TCP checksum: pseudo header + segment.
        let tcp_len = len - l4;
        let mut sum = if self.v4 {
            checksum_add(0, &out[l3 + 12..l3 + 20])
        } else {
            checksum_add(0, &out[l3 + 8..l3 + 40])
        };
        sum = sum.wrapping_add(6).wrapping_add(tcp_len as u32);
        out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let sum = checksum_finish(checksum_add(sum, &out[l4..]));
        out[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        Ok(len)
    }
}

/// Bytes of wire frames [`SoftwareOffload`] builds before handing them on.
const SOFTWARE_BUFFER: usize = 256 * 1024;

/// Makes wire frames from frames with offload metadata, for endpoints that cannot take the
/// metadata (userspace clients): completes a partial checksum, or cuts a TCP super-segment
/// into segments. Owns one buffer (allocated on first use, then reused), so a worker's steady
/// state stays allocation-free.
#[derive(Debug, Default)]
pub struct SoftwareOffload {
    buf: Vec<u8>,
}

impl SoftwareOffload {
    /// A converter with no buffer yet.
    pub fn new() -> SoftwareOffload {
        SoftwareOffload::default()
    }

    /// Hands the wire frames that make up `frame` (with metadata `hdr`) to `emit`, in order,
    /// at most [`crate::port::MAX_BATCH`] at a time; `emit` returns how many it accepted.
    /// Returns `Ok(true)` when every wire frame was accepted, `Ok(false)` when `emit` refused
    /// some (the rest is not offered), and an error for metadata that does not fit the frame
    /// or a segmentation type this module does not do (nothing is offered then).
    pub fn wire_frames(
        &mut self,
        frame: &[u8],
        hdr: &VnetHdr,
        mut emit: impl FnMut(&[&[u8]]) -> usize,
    ) -> Result<bool, GsoError> {
        if hdr.is_plain() {
            return Ok(emit(&[frame]) == 1);
        }
        if self.buf.len() < SOFTWARE_BUFFER {
            self.buf.resize(SOFTWARE_BUFFER, 0);
        }
        if hdr.gso_type == GSO_NONE {
            let copy = self
                .buf
                .get_mut(..frame.len())
                .ok_or(GsoError::Unsupported)?;
            copy.copy_from_slice(frame);
            complete_checksum(
                copy,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )?;
            return Ok(emit(&[&self.buf[..frame.len()]]) == 1);
        }
        let split = TcpSplit::new(frame, hdr)?;
        let count = split.count();
        let mut index = 0;
        while index < count {
            // Fill the buffer with as many segments as fit (at least one: a segment is never
            // longer than the frame, and frames are at most 64 KiB + headers).
            let mut ends = [0usize; crate::port::MAX_BATCH];
            let mut n = 0;
            let mut used = 0;
            while index < count && n < ends.len() {
                let len = split.segment_len(index);
                if used + len > self.buf.len() {
                    if n == 0 {
                        return Err(GsoError::Unsupported);
                    }
                    break;
                }
                split.write_segment(frame, index, &mut self.buf[used..used + len])?;
                used += len;
                ends[n] = used;
                n += 1;
                index += 1;
            }
            let mut list: [&[u8]; crate::port::MAX_BATCH] = [&[]; crate::port::MAX_BATCH];
            let mut start = 0;
            for (slot, &end) in list.iter_mut().zip(&ends[..n]) {
                *slot = &self.buf[start..end];
                start = end;
            }
            if emit(&list[..n]) < n {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// What became of the frames [`SoftwareOffload::send_as_wire_frames`] handed on.
#[derive(Debug)]
pub enum Sent<'f> {
    /// A run of plain frames, handed on as they are; the first `accepted` were taken.
    Plain {
        /// The run.
        frames: &'f [&'f [u8]],
        /// How many of them the receiver took.
        accepted: usize,
    },
    /// One frame with offload metadata, handed on as wire frames: `Ok(true)` when all were
    /// taken, `Ok(false)` when some were refused, an error when it could not be converted.
    Offloaded {
        /// The frame as received.
        frame: &'f [u8],
        /// The outcome.
        result: Result<bool, GsoError>,
    },
}

impl SoftwareOffload {
    /// Hands `frames` (with `offloads[i]` belonging to `frames[i]`) to `send` in order, for a
    /// receiver that cannot take offload metadata: runs of plain frames as they are, each
    /// other frame as its wire frames ([`SoftwareOffload::wire_frames`]). `send` returns how
    /// many frames of a call it took; `outcome` hears about each run and each offloaded frame.
    pub fn send_as_wire_frames<'f>(
        &mut self,
        frames: &'f [&'f [u8]],
        offloads: &[VnetHdr],
        mut send: impl FnMut(&[&[u8]]) -> usize,
        mut outcome: impl FnMut(Sent<'f>),
    ) {
        let mut start = 0;
        for i in 0..=frames.len() {
            if i < frames.len() && offloads.get(i).is_none_or(VnetHdr::is_plain) {
                continue;
            }
            if start < i {
                let run = &frames[start..i];
                let accepted = send(run).min(run.len());
                outcome(Sent::Plain {
                    frames: run,
                    accepted,
                });
            }
            start = i + 1;
            let Some(&frame) = frames.get(i) else { break };
            let result = self.wire_frames(frame, &offloads[i], &mut send);
            outcome(Sent::Offloaded { frame, result });
        }
    }
}

/// Frames for tests of this module and of the worker.
#[cfg(test)]
pub(crate) mod test_frames {
    use super::*;

    /// A TCP/IPv4 or IPv6 frame with `payload`; checksums valid when `partial` is false,
    /// the pseudo-header sum in the TCP checksum field when it is true.
    pub(crate) fn tcp_frame(v4: bool, payload: &[u8], flags: u8, partial: bool) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        let tcp_len = 20 + payload.len();
        if v4 {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&[10, 77, 0, 2]);
            ip[16..20].copy_from_slice(&[10, 77, 0, 1]);
            let sum = checksum_finish(checksum_add(0, &ip));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&ip);
        } else {
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8] = 0xfd;
            ip[9] = 0x77;
            ip[23] = 2;
            ip[24] = 0xfd;
            ip[25] = 0x77;
            ip[39] = 1;
            f.extend_from_slice(&ip);
        }
        let l4 = f.len();
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes()); // wraps while segmenting
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&1000u16.to_be_bytes());
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        let pseudo = if v4 {
            checksum_add(0, &f[14 + 12..14 + 20])
        } else {
            checksum_add(0, &f[14 + 8..14 + 40])
        } + 6
            + tcp_len as u32;
        let sum = if partial {
            let mut s = pseudo;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            s as u16
        } else {
            checksum_finish(checksum_add(pseudo, &f[l4..]))
        };
        f[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

#[cfg(test)]
mod tests {
    use super::test_frames::tcp_frame;
    use super::*;

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 74,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn completes_partial_checksums() {
        for v4 in [true, false] {
            let full = tcp_frame(v4, b"some payload, odd length", 0x18, false);
            let mut partial = tcp_frame(v4, b"some payload, odd length", 0x18, true);
            assert_ne!(full, partial);
            let l4 = if v4 { 34 } else { 54 };
            complete_checksum(&mut partial, l4, 16).unwrap();
            assert_eq!(full, partial);
        }
        let mut short = vec![0u8; 40];
        assert_eq!(
            complete_checksum(&mut short, 34, 16),
            Err(GsoError::BadHeader)
        );
    }

    #[test]
    fn splits_tcp_super_segments() {
        let payload: Vec<u8> = (0..3500u32).map(|i| (i * 7) as u8).collect();
        for v4 in [true, false] {
            // FIN|PSH|ACK|CWR on the super-segment.
            let big = tcp_frame(v4, &payload, 0x01 | 0x08 | 0x10 | 0x80, true);
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
                hdr_len: 0,
                gso_size: 1448,
                csum_start: if v4 { 34 } else { 54 },
                csum_offset: 16,
            };
            let split = TcpSplit::new(&big, &hdr).unwrap();
            assert_eq!(split.count(), 3);
            let mut out = [0u8; 2000];
            let mut offset = 0;
            for i in 0..3 {
                let len = split.write_segment(&big, i, &mut out).unwrap();
                let chunk = &payload[offset..(offset + 1448).min(payload.len())];
                // Each segment equals a directly built frame with the right sequence number,
                // IP id and flags, checksums included.
                let flags = match i {
                    0 => 0x10 | 0x80,
                    2 => 0x01 | 0x08 | 0x10,
                    _ => 0x10,
                };
                let mut want = tcp_frame(v4, chunk, flags, false);
                let l4 = if v4 { 34 } else { 54 };
                let seq = 0xffff_fff0u32.wrapping_add(offset as u32);
                want[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                if v4 {
                    let id = 0xfffeu16.wrapping_add(i as u16);
                    want[18..20].copy_from_slice(&id.to_be_bytes());
                    want[24..26].copy_from_slice(&[0, 0]);
                    let sum = checksum_finish(checksum_add(0, &want[14..34]));
                    want[24..26].copy_from_slice(&sum.to_be_bytes());
                }
                // Recompute the TCP checksum of `want` after the edits.
                want[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
                let mut pseudo = if v4 {
                    checksum_add(0, &want[26..34])
                } else {
                    checksum_add(0, &want[22..54])
                };
                pseudo += 6 + (want.len() - l4) as u32;
                let sum = checksum_finish(checksum_add(pseudo, &want[l4..]));
                want[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
                assert_eq!(&out[..len], &want[..], "segment {i} v4={v4}");
                offset += chunk.len();
            }
            assert_eq!(offset, payload.len());
            assert_eq!(
                split.write_segment(&big, 3, &mut out),
                Err(GsoError::BadHeader)
            );
            assert_eq!(
                split.write_segment(&big, 0, &mut [0u8; 100]),
                Err(GsoError::Truncated)
            );
        }
    }

    #[test]
    fn rejects_bad_gso_frames() {
        let big = tcp_frame(true, &[0u8; 3000], 0x10, true);
        let hdr = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert_eq!(
            TcpSplit::new(&big, &VnetHdr { gso_size: 0, ..hdr }),
            Err(GsoError::BadHeader)
        );
        assert_eq!(
            TcpSplit::new(&big, &VnetHdr { gso_type: 3, ..hdr }),
            Err(GsoError::Unsupported)
        );
        assert_eq!(
            TcpSplit::new(
                &big,
                &VnetHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                }
            ),
            Err(GsoError::BadHeader)
        );
        assert_eq!(TcpSplit::new(&big[..40], &hdr), Err(GsoError::Truncated));
        assert_eq!(TcpSplit::new(&big[..10], &hdr), Err(GsoError::Truncated));
        // Every prefix of a frame fails cleanly or splits; nothing panics.
        for cut in 0..big.len() {
            if let Ok(split) = TcpSplit::new(&big[..cut], &hdr) {
                let mut out = vec![0u8; 2000];
                for i in 0..split.count() {
                    split.write_segment(&big[..cut], i, &mut out).unwrap();
                }
            }
        }
    }

    fn gso_hdr(v4: bool, mss: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
            hdr_len: 0,
            gso_size: mss,
            csum_start: if v4 { 34 } else { 54 },
            csum_offset: 16,
        }
    }

    #[test]
    fn software_offload_hands_on_the_segments_in_batches() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
        let payload = &payload[..65_000];
        for v4 in [true, false] {
            let big = tcp_frame(v4, payload, 0x10, true);
            let hdr = gso_hdr(v4, 1000);
            let split = TcpSplit::new(&big, &hdr).unwrap();
            let mut want = Vec::new();
            let mut buf = vec![0u8; 2000];
            for i in 0..split.count() {
                let len = split.write_segment(&big, i, &mut buf).unwrap();
                want.push(buf[..len].to_vec());
            }
            let mut got = Vec::new();
            let mut calls = 0;
            let mut soft = SoftwareOffload::new();
            let ok = soft
                .wire_frames(&big, &hdr, |frames| {
                    calls += 1;
                    assert!(frames.len() <= crate::port::MAX_BATCH);
                    got.extend(frames.iter().map(|f| f.to_vec()));
                    frames.len()
                })
                .unwrap();
            assert!(ok);
            assert_eq!(got, want, "v4={v4}");
            assert_eq!(calls, want.len().div_ceil(crate::port::MAX_BATCH));
        }
    }

    #[test]
    fn software_offload_stops_when_refused_and_completes_checksums() {
        let big = tcp_frame(true, &[7u8; 10_000], 0x10, true);
        let mut soft = SoftwareOffload::new();
        let mut offered = 0;
        let ok = soft
            .wire_frames(&big, &gso_hdr(true, 1000), |frames| {
                offered += frames.len();
                frames.len() / 2
            })
            .unwrap();
        assert!(!ok);
        assert_eq!(offered, 10, "one batch offered, none after the refusal");

        let full = tcp_frame(true, b"odd-length payload!", 0x18, false);
        let partial = tcp_frame(true, b"odd-length payload!", 0x18, true);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::PLAIN
        };
        let mut got = Vec::new();
        assert_eq!(
            soft.wire_frames(&partial, &hdr, |f| {
                got.push(f[0].to_vec());
                1
            }),
            Ok(true)
        );
        assert_eq!(got, vec![full.clone()]);
        // Plain frames pass as they are; bad metadata offers nothing.
        let mut n = 0;
        assert_eq!(
            soft.wire_frames(&full, &VnetHdr::PLAIN, |f| {
                n += f.len();
                1
            }),
            Ok(true)
        );
        let bad = VnetHdr {
            csum_start: 60000,
            ..hdr
        };
        assert_eq!(
            soft.wire_frames(&partial, &bad, |f| {
                n += f.len();
                1
            }),
            Err(GsoError::BadHeader)
        );
        assert_eq!(
            soft.wire_frames(&big, &gso_hdr(true, 0), |f| {
                n += f.len();
                1
            }),
            Err(GsoError::BadHeader)
        );
        assert_eq!(n, 1);
    }
}
