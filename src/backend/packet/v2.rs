//! TPACKET_V2 receive rings: one status word per frame, so a frame is handed to user space
//! (and a sleeping worker woken) as soon as the kernel wrote it. TPACKET_V3 hands over whole
//! blocks, which at low rates wait for the block timeout (at least a millisecond); V2 trades
//! that for one status check per frame.
//!
//! API: [`PacketV2RxQueue`] (opened by [`super::PacketBackend`] when its `ring` is
//! [`super::PacketRing::Frames`]). Frames are lent straight from the ring and given back to
//! the kernel on the next `recv` (or before a sleep).
//!
//! With vnet headers (`PACKET_VNET_HDR`) each frame comes with its offload metadata. A TCP
//! super-segment (GRO, a veth peer's TSO) does not fit a slot sized for the MTU: with
//! `PACKET_COPY_THRESH` the kernel then puts a cut copy in the slot, marks it
//! `TP_STATUS_COPY` and queues the whole frame on the socket, where `recv` reads it (in ring
//! order) into one of a few 64 KiB buffers and lends it from there.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use usnetd_shards::offload::{VnetHdr, VNET_HDR_LEN};
use usnetd_shards::port::{FrameBatch, RxQueue, MAX_BATCH};

use super::super::sysutil::{invalid, setsockopt, Mmap};
use super::{bind_ll, eth_p_all_be, Claim, PacketRxStats};

/// Size of `struct tpacket2_hdr`; `struct sockaddr_ll` follows it (16-aligned).
const HDR_LEN: usize = 32;
/// Where `sll_pkttype` lies in a frame slot: after the header, 10 bytes into `sockaddr_ll`.
const PKTTYPE_OFFSET: usize = HDR_LEN + 10;
/// Fields of `tpacket2_hdr`: status @0, len @4, snaplen @8, mac @12.
const LEN_OFFSET: usize = 4;
const SNAPLEN_OFFSET: usize = 8;
const MAC_OFFSET: usize = 12;
/// Bytes of a slot before the frame: header, `sockaddr_ll`, alignment of the network header.
const SLOT_OVERHEAD: u32 = 128;
/// Ethernet header plus one VLAN tag.
const LINK_OVERHEAD: u32 = 18;
/// Bytes per ring block (several slots; slots never cross blocks).
const BLOCK_SIZE: u32 = 1 << 16;
/// Buffers for whole frames that did not fit a slot (one per such frame in a batch).
const COPY_BUFFERS: usize = 8;
/// A copy buffer: vnet header, 64 KiB IP packet, Ethernet and VLAN headers.
const COPY_BUFFER_SIZE: usize = VNET_HDR_LEN + 65535 + LINK_OVERHEAD as usize;
/// Receive buffer for the whole frames queued on the socket (SO_RCVBUFFORCE, root).
const COPY_QUEUE_BYTES: libc::c_int = 8 << 20;

/// The slot size for frames of an MTU: a power of two of at least 2048 bytes that holds the
/// slot overhead, the link header and `mtu` bytes.
pub(super) fn slot_size(mtu: u32) -> u32 {
    (mtu.min(1 << 20) + LINK_OVERHEAD + SLOT_OVERHEAD)
        .max(2048)
        .next_power_of_two()
}

/// One TPACKET_V2 receive ring (a fanout member).
pub struct PacketV2RxQueue {
    pub(super) fd: OwnedFd,
    ring: Mmap,
    slot_size: usize,
    slots_per_block: usize,
    slot_count: usize,
    /// The slot read next.
    current: usize,
    /// Slots lent (or skipped) since the last give-back: the `lent` slots before `current`.
    lent: usize,
    /// Whether frames come with a `virtio_net_hdr` (just before the frame in a slot, first in
    /// a copied frame).
    vnet_hdr: bool,
    /// With vnet headers: buffers for whole frames read from the socket (allocated on the
    /// first one), and how many of them the current batch uses.
    copies: Vec<Box<[u8]>>,
    stats: PacketRxStats,
    _claim: Arc<Claim>,
}

impl PacketV2RxQueue {
    /// Opens a socket with a V2 ring of about `ring_bytes` bytes whose slots hold frames of
    /// `mtu` bytes, bound to `ifindex` (not yet in the fanout).
    pub(super) fn open(
        ifindex: u32,
        mtu: u32,
        ring_bytes: usize,
        vnet_hdr: bool,
        claim: &Arc<Claim>,
    ) -> io::Result<PacketV2RxQueue> {
        let slot = slot_size(mtu);
        if slot > BLOCK_SIZE {
            return Err(invalid(format!(
                "packet ring: MTU {mtu} is too large for frame slots"
            )));
        }
        let block_count = (ring_bytes / BLOCK_SIZE as usize).max(1) as u32;
        let fd = super::rx_socket(libc::tpacket_versions::TPACKET_V2, vnet_hdr)?;
        let one: libc::c_int = 1;
        if vnet_hdr {
            // Before the ring: frames too large for a slot are queued whole on the socket.
            setsockopt(
                fd.as_fd(),
                libc::SOL_PACKET,
                libc::PACKET_COPY_THRESH,
                &one,
                "setsockopt(PACKET_COPY_THRESH)",
            )?;
            if let Err(e) = setsockopt(
                fd.as_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &COPY_QUEUE_BYTES,
                "setsockopt(SO_RCVBUFFORCE)",
            ) {
                log::debug!("{e}; large frames queue in the default receive buffer");
            }
        }
        let slots_per_block = BLOCK_SIZE / slot;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE,
            tp_block_nr: block_count,
            tp_frame_size: slot,
            tp_frame_nr: slots_per_block * block_count,
        };
        setsockopt(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            &req,
            "setsockopt(PACKET_RX_RING V2)",
        )?;
        let ring = Mmap::new(fd.as_fd(), BLOCK_SIZE as usize * block_count as usize)?;
        bind_ll(fd.as_fd(), ifindex, eth_p_all_be())?;
        Ok(PacketV2RxQueue {
            fd,
            ring,
            slot_size: slot as usize,
            slots_per_block: slots_per_block as usize,
            slot_count: (slots_per_block * block_count) as usize,
            current: 0,
            lent: 0,
            vnet_hdr,
            copies: Vec::new(),
            stats: PacketRxStats::default(),
            _claim: Arc::clone(claim),
        })
    }

    /// This queue's counters (`blocks` counts slots given back).
    pub fn stats(&self) -> PacketRxStats {
        self.stats
    }

    /// Where slot `i` starts in the mapping.
    fn slot_at(&self, i: usize) -> usize {
        (i / self.slots_per_block) * BLOCK_SIZE as usize
            + (i % self.slots_per_block) * self.slot_size
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        let at = self.slot_at(i);
        debug_assert!(at + self.slot_size <= self.ring.len());
        // SAFETY: the word lies inside the mapping (slot `i` < slot_count lies inside it),
        // is 4-aligned (slots are 16-aligned) and is shared with the kernel, hence accessed
        // atomically. The reference borrows `self`, which owns the mapping.
        unsafe { AtomicU32::from_ptr(self.ring.as_ptr().add(at).cast()) }
    }

    /// Reads a plain `u32` of a slot the user owns.
    fn read_u32(&self, at: usize) -> u32 {
        debug_assert!(at + 4 <= self.ring.len());
        // SAFETY: `at + 4` is inside the mapping (a header field of a slot), and the kernel
        // does not write to a slot while the user owns it.
        unsafe { self.ring.as_ptr().add(at).cast::<u32>().read_unaligned() }
    }

    fn read_u16(&self, at: usize) -> u16 {
        debug_assert!(at + 2 <= self.ring.len());
        // SAFETY: as in `read_u32`.
        unsafe { self.ring.as_ptr().add(at).cast::<u16>().read_unaligned() }
    }

    /// Reads the whole frames waiting on the socket for the `TP_STATUS_COPY` slots among the
    /// next `room` ready slots (at most [`COPY_BUFFERS`]) into the copy buffers; `lens[i]`
    /// gets buffer `i`'s length. Returns how many were read. `recv` consumes at least those
    /// `room` slots (each lends at most one frame), so no frame read here is left unused.
    ///
    /// The flag is true when the socket had no frame for a copy slot.
    fn read_copies(&mut self, lens: &mut [usize; COPY_BUFFERS], room: usize) -> (usize, bool) {
        let mut wanted = 0;
        let mut i = self.current;
        for _ in 0..self.slot_count.min(room) {
            let status = self.status(i).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 || wanted == COPY_BUFFERS {
                break;
            }
            if status & libc::TP_STATUS_COPY != 0 {
                wanted += 1;
            }
            i = (i + 1) % self.slot_count;
        }
        let mut n = 0;
        while n < wanted {
            if self.copies.len() == n {
                self.copies
                    .push(vec![0u8; COPY_BUFFER_SIZE].into_boxed_slice());
            }
            let buf = &mut self.copies[n];
            // SAFETY: `buf` is valid for writes of its length; MSG_DONTWAIT never blocks.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return (n, true);
            }
            let got = got as usize;
            if got > buf.len() {
                // Larger than any IP packet with its headers: cannot be real. The slot it
                // belongs to is dropped (an empty copy does not parse).
                self.stats.truncated += 1;
                lens[n] = 0;
                n += 1;
                continue;
            }
            lens[n] = got;
            n += 1;
        }
        (n, false)
    }

    /// Gives the slots lent by the previous `recv` back to the kernel.
    fn give_back(&mut self) {
        let first = (self.current + self.slot_count - self.lent) % self.slot_count;
        for k in 0..self.lent {
            self.status((first + k) % self.slot_count)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        }
        self.stats.blocks += self.lent as u64;
        self.lent = 0;
    }
}

impl RxQueue for PacketV2RxQueue {
    fn take_ring_drops(&mut self) -> u64 {
        super::take_kernel_stats(self.fd.as_fd()).map_or(0, |(_, drops)| u64::from(drops))
    }

    fn prepare_wait(&mut self) -> Option<i32> {
        // The kernel reports the socket readable while the slot before its next one is ours.
        self.give_back();
        Some(self.fd.as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        self.give_back();
        // The whole frames of `TP_STATUS_COPY` slots first, into the copy buffers (nothing
        // of this queue is lent at this point).
        let mut copied = [0usize; COPY_BUFFERS];
        let (ncopied, mut missing) = if self.vnet_hdr {
            self.read_copies(&mut copied, MAX_BATCH - batch.len())
        } else {
            (0, false)
        };
        let mut next_copy = 0;
        let meta = if self.vnet_hdr { VNET_HDR_LEN } else { 0 };
        let mut pushed = 0;
        while !batch.is_full() && self.lent < self.slot_count {
            let status = self.status(self.current).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            let is_copy = self.vnet_hdr && status & libc::TP_STATUS_COPY != 0;
            if is_copy && next_copy == ncopied {
                if !missing {
                    // The copy buffers are used up: the next `recv` continues here.
                    break;
                }
                // The socket had no whole frame for this slot (the kernel queues it before it
                // hands over the slot, so this should not happen): drop the slot rather than
                // wait for it forever.
                missing = false;
                self.current = (self.current + 1) % self.slot_count;
                self.lent += 1;
                self.stats.bad_blocks += 1;
                continue;
            }
            let base = self.slot_at(self.current);
            self.current = (self.current + 1) % self.slot_count;
            self.lent += 1;
            let len = self.read_u32(base + LEN_OFFSET) as usize;
            let snaplen = self.read_u32(base + SNAPLEN_OFFSET) as usize;
            let mac = self.read_u16(base + MAC_OFFSET) as usize;
            // SAFETY: inside this slot (PKTTYPE_OFFSET < SLOT_OVERHEAD <= slot size), which
            // the user owns.
            let pkttype = unsafe { *self.ring.as_ptr().add(base + PKTTYPE_OFFSET) };
            if is_copy {
                let n = copied[next_copy];
                let buf = self.copies[next_copy].as_ptr();
                next_copy += 1;
                // SAFETY: `read_copies` wrote `n` bytes into copy buffer `next_copy - 1`. Its
                // heap block stays in place and unwritten until the next `recv` (which needs
                // `&mut self` and so ends the borrow `'a`).
                let whole: &'a [u8] = unsafe { std::slice::from_raw_parts(buf, n) };
                match VnetHdr::parse(whole) {
                    Some(_) if pkttype == libc::PACKET_OUTGOING => self.stats.outgoing += 1,
                    Some(hdr) if n - VNET_HDR_LEN == len => {
                        batch.push_offloaded(&whole[VNET_HDR_LEN..], hdr);
                        pushed += 1;
                        self.stats.frames += 1;
                        self.stats.bytes += len as u64;
                    }
                    // Not the frame the slot announced: the queue and the ring disagree.
                    _ => self.stats.bad_blocks += 1,
                }
            } else if mac < HDR_LEN + meta || mac + snaplen > self.slot_size {
                self.stats.bad_blocks += 1;
            } else if pkttype == libc::PACKET_OUTGOING {
                self.stats.outgoing += 1;
            } else if snaplen < len {
                self.stats.truncated += 1;
            } else if self.vnet_hdr {
                // SAFETY: the header and the frame lie inside this slot (checked above:
                // `mac >= HDR_LEN + VNET_HDR_LEN`, `mac + snaplen <= slot_size`), which the user
                // owns until the next `recv` or `prepare_wait` (see below).
                let (raw, frame): (&'a [u8], &'a [u8]) = unsafe {
                    (
                        std::slice::from_raw_parts(
                            self.ring.as_ptr().add(base + mac - VNET_HDR_LEN),
                            VNET_HDR_LEN,
                        ),
                        std::slice::from_raw_parts(self.ring.as_ptr().add(base + mac), snaplen),
                    )
                };
                match VnetHdr::parse(raw) {
                    Some(hdr) => batch.push_offloaded(frame, hdr),
                    None => batch.push(frame),
                };
                pushed += 1;
                self.stats.frames += 1;
                self.stats.bytes += snaplen as u64;
            } else {
                // SAFETY: the frame lies inside this slot (checked above). The slot belongs
                // to the user (TP_STATUS_USER) until it is given back, at the earliest in
                // the next `recv` or `prepare_wait`, which need `&mut self` and so end the
                // borrow `'a` of every slice lent here. The mapping lives as long as `self`.
                let frame: &'a [u8] = unsafe {
                    std::slice::from_raw_parts(self.ring.as_ptr().add(base + mac), snaplen)
                };
                batch.push(frame);
                pushed += 1;
                self.stats.frames += 1;
                self.stats.bytes += snaplen as u64;
            }
        }
        pushed
    }
}

impl std::fmt::Debug for PacketV2RxQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketV2RxQueue")
            .field("slots", &self.slot_count)
            .field("slot_size", &self.slot_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem;

    #[test]
    fn slots_hold_the_mtu() {
        assert_eq!(slot_size(1500), 2048);
        assert_eq!(slot_size(2000), 4096);
        assert_eq!(slot_size(9000), 16384);
        assert!(slot_size(9000) >= 9000 + LINK_OVERHEAD + SLOT_OVERHEAD);
        assert_eq!(slot_size(u32::MAX), 1 << 21);
    }

    #[test]
    fn header_offsets_match_the_kernel() {
        assert_eq!(mem::size_of::<libc::tpacket2_hdr>(), HDR_LEN);
        assert_eq!(mem::offset_of!(libc::tpacket2_hdr, tp_len), LEN_OFFSET);
        assert_eq!(
            mem::offset_of!(libc::tpacket2_hdr, tp_snaplen),
            SNAPLEN_OFFSET
        );
        assert_eq!(mem::offset_of!(libc::tpacket2_hdr, tp_mac), MAC_OFFSET);
    }
}
