//! The AF_PACKET backend: receive rings joined in one fanout group, and `sendmmsg` transmit
//! sockets that bypass the qdisc. The rings are TPACKET_V2 (per-frame hand-over, the default;
//! see [`v2`]) or TPACKET_V3 (per-block, below), chosen by [`PacketBackend::ring`].
//!
//! API: [`PacketBackend`] (config + [`Backend`] impl), [`PacketRxQueue`], [`PacketTxQueue`],
//! [`PacketRxStats`], [`PacketTxStats`].
//!
//! Receive: `rx_sockets` packet sockets bound to the NIC with `ETH_P_ALL`, each with a mmapped
//! TPACKET_V3 block ring, all in one `PACKET_FANOUT_HASH` group with a kernel-chosen unique id,
//! so every flow lands on one socket like RSS spreads flows over NIC queues. (IPv4 fragments
//! carry no ports, so the kernel hashes all fragments of a datagram by addresses alone: they
//! land on one socket together.) [`RxQueue::recv`] lends the frames of retired blocks straight
//! from the ring and gives a block back to the kernel on the next `recv` after its last frame
//! was lent. Outgoing frames are ignored (`PACKET_IGNORE_OUTGOING`, and the packet type is
//! checked again per frame); truncated frames are counted and skipped.
//!
//! Transmit: one socket per transmit queue, bound to the NIC with protocol 0 (so it receives
//! nothing), `PACKET_QDISC_BYPASS`, one non-blocking `sendmmsg` per batch; when the kernel is
//! full (`EAGAIN`/`ENOBUFS`) `send` returns fewer.
//!
//! Frames that arrive while a second or later socket is bound but not yet in the fanout group
//! (a few microseconds in `open`) can be received twice.
//!
//! Claiming: packet sockets only copy frames, so while the queues live a
//! [`KernelIngressBlock`] drops every frame of the NIC at the kernel's ingress hook, which
//! runs after the packet taps. Every queue holds it through an `Arc`; it goes when the last
//! queue is dropped.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use usnetd_shards::offload::{VnetHdr, VNET_HDR_LEN};
use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

use super::sysutil::{
    cvt, ethtool_value, getsockopt_u32, if_nametoindex, invalid, last_error, nic_rx_queue_count,
    setsockopt, socket, KernelIngressBlock, Mmap, ETHTOOL_GTSO, ETHTOOL_GTXCSUM,
};
use super::{Backend, NicPorts};

pub mod v2;
pub use v2::PacketV2RxQueue;

/// Which receive ring the AF_PACKET backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketRing {
    /// TPACKET_V2: one status word per frame; each frame is handed over as soon as it is
    /// written (lowest latency).
    Frames,
    /// TPACKET_V3: frames are handed over in blocks, when a block is full or its timeout
    /// (`block_timeout_ms`) passed (fewer wake-ups at high rates, up to the timeout of
    /// extra latency at low rates).
    Blocks,
}

/// Configuration of the AF_PACKET backend.
#[derive(Clone, Debug)]
pub struct PacketBackend {
    /// Number of receive sockets (fanout members, one per worker receive queue); 0 = as many
    /// as the NIC has receive queues (1 when that cannot be read).
    pub rx_sockets: usize,
    /// Size of one ring block in bytes (a multiple of the page size; power of two pages is
    /// best). Also the largest frame that can be received.
    pub block_size: u32,
    /// Number of blocks per receive ring.
    pub block_count: u32,
    /// Milliseconds after which the kernel hands over a block that is not full (latency bound
    /// at low rates).
    pub block_timeout_ms: u32,
    /// Puts the NIC into promiscuous mode while the backend is open (for extra MACs).
    pub promiscuous: bool,
    /// Adds `PACKET_FANOUT_FLAG_DEFRAG`: the kernel then reassembles IPv4 fragments and the
    /// rings receive whole datagrams, possibly larger than the MTU. Off by default: without it
    /// the fragments of one datagram already hash to the same socket (by addresses only).
    pub defrag: bool,
    /// Keeps the kernel off the NIC while open (see [`KernelIngressBlock`]). Only tests turn
    /// this off.
    pub block_kernel: bool,
    /// Receives with `PACKET_VNET_HDR`: frames the kernel aggregated (GRO on a NIC, TSO of a
    /// veth peer) arrive whole with their offload metadata, as do partial checksums, and
    /// travel through the data plane that way (see `usnetd_shards::offload`). Without it such
    /// frames arrive as oversized frames without a way to tell. On by default.
    pub vnet_hdr: bool,
    /// The receive ring: per-frame (V2, the default) or per-block (V3). A V2 ring holds
    /// about as many bytes as a V3 ring (`block_size` * `block_count`) in slots sized for the
    /// NIC's MTU.
    pub ring: PacketRing,
}

impl Default for PacketBackend {
    fn default() -> Self {
        PacketBackend {
            rx_sockets: 0,
            block_size: 1 << 18,
            block_count: 64,
            block_timeout_ms: 1,
            promiscuous: false,
            defrag: false,
            block_kernel: true,
            vnet_hdr: true,
            ring: PacketRing::Frames,
        }
    }
}

/// TPACKET_V3 frame slots are checked against this size by the kernel only.
const FRAME_SIZE: u32 = 2048;

/// Offsets inside `struct tpacket_block_desc` (version, offset_to_priv, then `tpacket_hdr_v1`).
const BLOCK_STATUS_OFFSET: usize = 8;
const BLOCK_NUM_PKTS_OFFSET: usize = 12;
const BLOCK_FIRST_PKT_OFFSET: usize = 16;

/// Where `struct sockaddr_ll` follows a `tpacket3_hdr`, and its `sll_pkttype` byte in it.
const SLL_OFFSET: usize = (mem::size_of::<libc::tpacket3_hdr>() + libc::TPACKET_ALIGNMENT - 1)
    & !(libc::TPACKET_ALIGNMENT - 1);
const SLL_PKTTYPE_OFFSET: usize = 10;

fn eth_p_all_be() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

fn sockaddr_ll(ifindex: u32, protocol_be: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol_be;
    sll.sll_ifindex = ifindex as i32;
    sll
}

fn bind_ll(fd: BorrowedFd<'_>, ifindex: u32, protocol_be: u16) -> io::Result<()> {
    let sll = sockaddr_ll(ifindex, protocol_be);
    // SAFETY: `sll` is a valid sockaddr_ll of the given length.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    cvt(ret, "bind(AF_PACKET)").map(drop)
}

impl PacketBackend {
    /// Opens one receive socket with its ring, bound to `ifindex` (not yet in the fanout).
    fn open_rx_socket(&self, ifindex: u32, claim: &Arc<Claim>) -> io::Result<PacketRxQueue> {
        // SAFETY: plain libc call without pointers.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as u32,
            _ => 4096,
        };
        if self.block_size < FRAME_SIZE
            || !self.block_size.is_multiple_of(page)
            || self.block_count == 0
        {
            return Err(invalid(format!(
                "packet ring: block size {} must be a multiple of {page} and count {} > 0",
                self.block_size, self.block_count
            )));
        }
        let fd = rx_socket(libc::tpacket_versions::TPACKET_V3, self.vnet_hdr)?;
        let req = libc::tpacket_req3 {
            tp_block_size: self.block_size,
            tp_block_nr: self.block_count,
            tp_frame_size: FRAME_SIZE,
            tp_frame_nr: self.block_size / FRAME_SIZE * self.block_count,
            tp_retire_blk_tov: self.block_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            &req,
            "setsockopt(PACKET_RX_RING)",
        )?;
        let ring = Mmap::new(
            fd.as_fd(),
            self.block_size as usize * self.block_count as usize,
        )?;
        bind_ll(fd.as_fd(), ifindex, eth_p_all_be())?;
        Ok(PacketRxQueue {
            fd,
            ring,
            block_size: self.block_size as usize,
            block_count: self.block_count as usize,
            current: 0,
            cursor: None,
            release_from: 0,
            release_count: 0,
            vnet_hdr: self.vnet_hdr,
            stats: PacketRxStats::default(),
            _claim: Arc::clone(claim),
        })
    }

    /// Opens the receive sockets and joins them into a fresh fanout group.
    fn open_rx(
        &self,
        ifname: &str,
        ifindex: u32,
        claim: &Arc<Claim>,
    ) -> io::Result<Vec<Box<dyn RxQueue>>> {
        // SAFETY: plain libc call without pointers.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as u32,
            _ => 4096,
        };
        if self.block_size < FRAME_SIZE
            || !self.block_size.is_multiple_of(page)
            || self.block_count == 0
        {
            return Err(invalid(format!(
                "packet ring: block size {} must be a multiple of {page} and count {} > 0",
                self.block_size, self.block_count
            )));
        }
        let count = match self.rx_sockets {
            0 => nic_rx_queue_count(ifname),
            n => n,
        };
        let mut mode = libc::PACKET_FANOUT_HASH;
        if self.defrag {
            mode |= libc::PACKET_FANOUT_FLAG_DEFRAG;
        }
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1500);
        let ring_bytes = self.block_size as usize * self.block_count as usize;
        let mut queues: Vec<(OwnedFd, Box<dyn RxQueue>)> = Vec::with_capacity(count);
        let mut group_id: Option<u32> = None;
        for _ in 0..count {
            let (fd, queue): (OwnedFd, Box<dyn RxQueue>) = match self.ring {
                PacketRing::Blocks => {
                    let q = self.open_rx_socket(ifindex, claim)?;
                    (q.fd.try_clone()?, Box::new(q))
                }
                PacketRing::Frames => {
                    let q = PacketV2RxQueue::open(ifindex, mtu, ring_bytes, self.vnet_hdr, claim)?;
                    (q.fd.try_clone()?, Box::new(q))
                }
            };
            let arg: u32 = match group_id {
                // The first member asks the kernel for an unused group id.
                None => (mode | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16,
                Some(id) => id | (mode << 16),
            };
            setsockopt(
                fd.as_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                &arg,
                "setsockopt(PACKET_FANOUT)",
            )?;
            if group_id.is_none() {
                let value = getsockopt_u32(
                    fd.as_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_FANOUT,
                    "getsockopt(PACKET_FANOUT)",
                )?;
                group_id = Some(value & 0xffff);
            }
            queues.push((fd, queue));
        }
        if self.promiscuous {
            if let Some((first, _)) = queues.first() {
                // SAFETY: packet_mreq is plain data; all-zero is valid.
                let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
                mreq.mr_ifindex = ifindex as i32;
                mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
                setsockopt(
                    first.as_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_ADD_MEMBERSHIP,
                    &mreq,
                    "setsockopt(PACKET_ADD_MEMBERSHIP PROMISC)",
                )?;
            }
        }
        Ok(queues.into_iter().map(|(_, q)| q).collect())
    }
}

/// A packet socket for a receive ring of `version` (not yet bound): outgoing frames ignored
/// where the kernel can, and with `PACKET_VNET_HDR` when asked (both must come before the
/// ring: the kernel refuses `PACKET_VNET_HDR` on a socket with one).
pub(super) fn rx_socket(version: libc::tpacket_versions, vnet_hdr: bool) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    let v = version as libc::c_int;
    setsockopt(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &v,
        "setsockopt(PACKET_VERSION)",
    )?;
    let one: libc::c_int = 1;
    if let Err(e) = setsockopt(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        &one,
        "setsockopt(PACKET_IGNORE_OUTGOING)",
    ) {
        log::debug!("{e}; filtering outgoing frames per frame");
    }
    if vnet_hdr {
        setsockopt(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &one,
            "setsockopt(PACKET_VNET_HDR)",
        )?;
    }
    Ok(fd)
}

/// Reads and resets the kernel's counters of a packet socket with a ring (V2 or V3): (frames
/// received, frames dropped because the ring was full).
pub(crate) fn take_kernel_stats(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut st = libc::tpacket_stats_v3 {
        tp_packets: 0,
        tp_drops: 0,
        tp_freeze_q_cnt: 0,
    };
    let mut len = mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
    // SAFETY: `st` and `len` are valid for writes; `len` holds the size of `st` (a V2
    // socket's `struct tpacket_stats` is its first two fields, and the kernel writes no more
    // than the smaller size).
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats_v3).cast(),
            &mut len,
        )
    };
    cvt(ret, "getsockopt(PACKET_STATISTICS)")?;
    Ok((st.tp_packets, st.tp_drops))
}

/// Opens one transmit socket bound to `ifindex`.
fn open_tx_socket(
    ifname: &str,
    ifindex: u32,
    claim: &Arc<Claim>,
    vnet_hdr: bool,
) -> io::Result<PacketTxQueue> {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    let one: libc::c_int = 1;
    if vnet_hdr {
        setsockopt(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &one,
            "setsockopt(PACKET_VNET_HDR)",
        )?;
    }
    setsockopt(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_QDISC_BYPASS,
        &one,
        "setsockopt(PACKET_QDISC_BYPASS)",
    )?;
    // Protocol 0: bound to the device for sending, never hooked in for receiving.
    bind_ll(fd.as_fd(), ifindex, 0)?;
    Ok(PacketTxQueue {
        fd,
        ifname: ifname.to_string(),
        vnet_hdr,
        stats: PacketTxStats::default(),
        _claim: Arc::clone(claim),
    })
}

/// What the queues of one open NIC share: the kernel's exclusion from it.
struct Claim {
    _ingress_block: Option<KernelIngressBlock>,
}

impl Backend for PacketBackend {
    fn name(&self) -> &'static str {
        "packet"
    }

    fn open(&self, ifname: &str, tx_queues: usize) -> io::Result<NicPorts> {
        let ifindex = if_nametoindex(ifname)?;
        // Block the kernel first so no frame reaches it between the calls below; the rings
        // see frames from their bind on.
        let claim = Arc::new(Claim {
            _ingress_block: if self.block_kernel {
                Some(KernelIngressBlock::install(ifname, ifindex)?)
            } else {
                None
            },
        });
        let rx = self.open_rx(ifname, ifindex, &claim)?;
        let tx = (0..tx_queues)
            .map(|_| {
                open_tx_socket(ifname, ifindex, &claim, self.vnet_hdr)
                    .map(|q| Box::new(q) as Box<dyn TxQueue>)
            })
            .collect::<io::Result<_>>()?;
        Ok(NicPorts {
            rx,
            tx,
            kernel_pass: None,
        })
    }
}

/// Counters of one receive queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketRxStats {
    /// Frames lent to the data plane.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// Ring blocks given back to the kernel.
    pub blocks: u64,
    /// Frames skipped because the ring truncated them (larger than a block).
    pub truncated: u64,
    /// Outgoing frames skipped (only when `PACKET_IGNORE_OUTGOING` is unavailable).
    pub outgoing: u64,
    /// Blocks whose frame headers did not fit the block (skipped; never seen in practice).
    pub bad_blocks: u64,
}

/// One TPACKET_V3 receive ring (a fanout member).
pub struct PacketRxQueue {
    fd: OwnedFd,
    ring: Mmap,
    block_size: usize,
    block_count: usize,
    /// The block being read or waited for.
    current: usize,
    /// Offset of the next frame in `current` and frames left in it, once it was handed over.
    cursor: Option<(usize, u32)>,
    /// Blocks whose last frame was lent by the previous `recv`: given back at the next one.
    release_from: usize,
    release_count: usize,
    /// Whether frames are preceded by a `virtio_net_hdr` (`PACKET_VNET_HDR`).
    vnet_hdr: bool,
    stats: PacketRxStats,
    _claim: Arc<Claim>,
}

impl PacketRxQueue {
    /// The socket, to wait for frames with `poll` (readable when a block is ready).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// This queue's counters.
    pub fn stats(&self) -> PacketRxStats {
        self.stats
    }

    /// Reads and resets the kernel's counters of this socket: (frames received, frames
    /// dropped because the ring was full).
    pub fn take_kernel_stats(&self) -> io::Result<(u32, u32)> {
        take_kernel_stats(self.fd.as_fd())
    }

    fn block_word(&self, block: usize, offset: usize) -> &AtomicU32 {
        debug_assert!(block < self.block_count && offset + 4 <= self.block_size);
        // SAFETY: the word lies inside the ring mapping (block < block_count, offset within
        // the block header), is 4-aligned (blocks are page-aligned, offsets multiples of 4)
        // and is shared with the kernel, hence accessed atomically. The reference borrows
        // `self`, which owns the mapping.
        unsafe {
            AtomicU32::from_ptr(
                self.ring
                    .as_ptr()
                    .add(block * self.block_size + offset)
                    .cast(),
            )
        }
    }

    /// Reads a plain `u32` of a block the user owns.
    fn read_u32(&self, at: usize) -> u32 {
        debug_assert!(at + 4 <= self.ring.len());
        // SAFETY: `at + 4` is inside the mapping (checked by the callers against block
        // bounds), and the kernel does not write to a block while the user owns it.
        unsafe { self.ring.as_ptr().add(at).cast::<u32>().read_unaligned() }
    }

    fn read_u16(&self, at: usize) -> u16 {
        debug_assert!(at + 2 <= self.ring.len());
        // SAFETY: as in `read_u32`.
        unsafe { self.ring.as_ptr().add(at).cast::<u16>().read_unaligned() }
    }

    /// Marks the current block as fully lent and moves to the next one.
    fn finish_block(&mut self) {
        if self.release_count == 0 {
            self.release_from = self.current;
        }
        self.release_count += 1;
        self.current = (self.current + 1) % self.block_count;
        self.cursor = None;
    }
}

impl PacketRxQueue {
    /// Gives the blocks whose last frame was lent by an earlier `recv` back to the kernel.
    fn release_blocks(&mut self) {
        for k in 0..self.release_count {
            let block = (self.release_from + k) % self.block_count;
            self.block_word(block, BLOCK_STATUS_OFFSET)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        }
        self.stats.blocks += self.release_count as u64;
        self.release_count = 0;
    }
}

impl RxQueue for PacketRxQueue {
    fn take_ring_drops(&mut self) -> u64 {
        self.take_kernel_stats()
            .map_or(0, |(_, drops)| u64::from(drops))
    }

    fn prepare_wait(&mut self) -> Option<i32> {
        // The kernel reports the socket readable while a finished block is still ours: give
        // them back first (nothing lent from them is borrowed any more).
        self.release_blocks();
        Some(self.fd().as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        // Give back the blocks whose frames the caller is now done with.
        self.release_blocks();

        let hdr_len = mem::size_of::<libc::tpacket3_hdr>();
        let mut pushed = 0;
        // At most one lap over the ring, so a ring of empty blocks cannot spin.
        let mut blocks_seen = 0;
        while !batch.is_full() && blocks_seen <= self.block_count {
            let (offset, left) = match self.cursor {
                Some(c) => c,
                None => {
                    let status = self
                        .block_word(self.current, BLOCK_STATUS_OFFSET)
                        .load(Ordering::Acquire);
                    if status & libc::TP_STATUS_USER == 0 {
                        break;
                    }
                    blocks_seen += 1;
                    let base = self.current * self.block_size;
                    let num = self.read_u32(base + BLOCK_NUM_PKTS_OFFSET);
                    let first = self.read_u32(base + BLOCK_FIRST_PKT_OFFSET) as usize;
                    if num == 0 {
                        self.finish_block();
                        continue;
                    }
                    (first, num)
                }
            };
            let base = self.current * self.block_size;
            if offset + SLL_OFFSET + SLL_PKTTYPE_OFFSET + 1 > self.block_size {
                self.stats.bad_blocks += 1;
                self.finish_block();
                continue;
            }
            // Fields of `tpacket3_hdr`: next_offset @0, snaplen @12, len @16, mac @24.
            let next = self.read_u32(base + offset) as usize;
            let snaplen = self.read_u32(base + offset + 12) as usize;
            let len = self.read_u32(base + offset + 16) as usize;
            let mac = self.read_u16(base + offset + 24) as usize;
            let pkttype = {
                let at = base + offset + SLL_OFFSET + SLL_PKTTYPE_OFFSET;
                // SAFETY: checked above to lie inside this block, which the user owns.
                unsafe { *self.ring.as_ptr().add(at) }
            };
            let meta_len = if self.vnet_hdr { VNET_HDR_LEN } else { 0 };
            if mac < hdr_len + meta_len || offset + mac + snaplen > self.block_size {
                self.stats.bad_blocks += 1;
                self.finish_block();
                continue;
            }
            if pkttype == libc::PACKET_OUTGOING {
                self.stats.outgoing += 1;
            } else if snaplen < len {
                self.stats.truncated += 1;
            } else {
                // SAFETY: the frame lies inside this block (checked above). The block belongs
                // to the user (status TP_STATUS_USER) until it is given back, which happens at
                // the earliest in the next `recv`, which needs `&mut self` and so ends the
                // borrow `'a` of every slice lent here. The mapping lives as long as `self`.
                let frame: &'a [u8] = unsafe {
                    std::slice::from_raw_parts(self.ring.as_ptr().add(base + offset + mac), snaplen)
                };
                if self.vnet_hdr {
                    let at = base + offset + mac - VNET_HDR_LEN;
                    // SAFETY: the header lies between the tpacket3_hdr and the frame (checked
                    // above: `mac >= hdr_len + VNET_HDR_LEN`), in this user-owned block.
                    let raw: &[u8] = unsafe {
                        std::slice::from_raw_parts(self.ring.as_ptr().add(at), VNET_HDR_LEN)
                    };
                    match VnetHdr::parse(raw) {
                        Some(hdr) => batch.push_offloaded(frame, hdr),
                        None => batch.push(frame),
                    };
                } else {
                    batch.push(frame);
                }
                pushed += 1;
                self.stats.frames += 1;
                self.stats.bytes += snaplen as u64;
            }
            if left <= 1 || next == 0 {
                self.finish_block();
            } else {
                self.cursor = Some((offset + next, left - 1));
            }
        }
        pushed
    }
}

/// Counters of one transmit queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketTxStats {
    /// Frames handed to the driver.
    pub frames: u64,
    /// Frames the kernel refused as malformed (too large, too short): skipped and counted
    /// here, not returned to the caller.
    pub rejected: u64,
    /// Calls that stopped early because the kernel was full.
    pub full: u64,
}

/// One transmit socket (qdisc bypassed, one `sendmmsg` per batch). With `PACKET_VNET_HDR`
/// every frame goes out after a `virtio_net_hdr`, so TCP super-segments (from the kernel's
/// TAP) leave whole and the NIC (or the kernel's software GSO) cuts them.
pub struct PacketTxQueue {
    fd: OwnedFd,
    ifname: String,
    vnet_hdr: bool,
    stats: PacketTxStats,
    _claim: Arc<Claim>,
}

impl PacketTxQueue {
    /// The socket (writable when the kernel has room again).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// This queue's counters.
    pub fn stats(&self) -> PacketTxStats {
        self.stats
    }

    /// Sends up to [`MAX_BATCH`] frames with one `sendmmsg`; the count sent or the error of
    /// the first frame.
    fn sendmmsg(&self, frames: &[&[u8]], offloads: Option<&[VnetHdr]>) -> io::Result<usize> {
        let n = frames.len().min(MAX_BATCH);
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
        let mut iov: [[libc::iovec; 2]; MAX_BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
        let mut hdrs = [[0u8; VNET_HDR_LEN]; MAX_BATCH];
        for (i, frame) in frames[..n].iter().enumerate() {
            let mut parts = 0;
            if self.vnet_hdr {
                if let Some(hdr) = offloads.and_then(|o| o.get(i)) {
                    hdrs[i] = hdr.to_bytes();
                }
                iov[i][0].iov_base = hdrs[i].as_ptr() as *mut libc::c_void;
                iov[i][0].iov_len = VNET_HDR_LEN;
                parts = 1;
            }
            iov[i][parts].iov_base = frame.as_ptr() as *mut libc::c_void;
            iov[i][parts].iov_len = frame.len();
            msgs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
            msgs[i].msg_hdr.msg_iovlen = parts + 1;
        }
        // SAFETY: `msgs[..n]` point to `iov[..n]`, which point to `hdrs` and the caller's
        // frames; all live across the call, and the kernel only reads them (it copies them).
        let ret = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if ret < 0 {
            Err(last_error("sendmmsg"))
        } else {
            Ok(ret as usize)
        }
    }
}

impl TxQueue for PacketTxQueue {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.send_with(frames, None)
    }

    /// Asked only for batches that hold offloaded frames, so the two ioctls are cheap next to
    /// the 64 KiB super-segments they let pass. The NIC must do TSO and transmit checksums
    /// itself right now: with the qdisc bypassed, the kernel drops (rather than segments) a
    /// frame the device cannot take as it is.
    fn accepts_offloads(&self) -> bool {
        let on = |cmd| ethtool_value(self.fd.as_fd(), &self.ifname, cmd).is_ok_and(|v| v != 0);
        self.vnet_hdr && on(ETHTOOL_GTSO) && on(ETHTOOL_GTXCSUM)
    }

    fn send_offloaded(&mut self, frames: &[&[u8]], offloads: &[VnetHdr]) -> usize {
        self.send_with(frames, Some(offloads))
    }
}

impl PacketTxQueue {
    /// Sends `frames` (with their offload metadata, if any), as many as the kernel takes.
    fn send_with(&mut self, frames: &[&[u8]], offloads: Option<&[VnetHdr]>) -> usize {
        let mut done = 0;
        while done < frames.len() {
            match self.sendmmsg(&frames[done..], offloads.and_then(|o| o.get(done..))) {
                Ok(0) => break,
                Ok(sent) => {
                    done += sent;
                    self.stats.frames += sent as u64;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::ENOBUFS | libc::ENETDOWN | libc::ENXIO) | None => {
                        self.stats.full += 1;
                        break;
                    }
                    Some(_) => {
                        // This frame is bad (EMSGSIZE, EINVAL): skip it, keep the rest.
                        self.stats.rejected += 1;
                        done += 1;
                    }
                },
            }
        }
        done
    }
}
