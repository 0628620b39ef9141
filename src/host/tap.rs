//! The TAP device through which the host kernel reaches the switch.
//!
//! API: [`Tap::open`] creates (or attaches to) a TAP interface with `IFF_TAP | IFF_NO_PI`,
//! non-blocking, with one file descriptor per queue (`IFF_MULTI_QUEUE` when more than one).
//! [`Tap::sink`] gives the data plane an [`EndpointSink`] ([`TapSink`]: frames the switch
//! delivers to the kernel are written to the TAP, worker `w` using queue `w % queues`), and
//! [`Tap::rx_queues`] one [`RxQueue`] per queue ([`TapRxQueue`]: frames the kernel sends,
//! read into a fixed pool of buffers and lent to the caller).
//!
//! With [`TapConfig::offload`], the TAP is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD`
//! (checksum, TSO4, TSO6): the kernel then hands TCP super-segments of up to 64 KiB with
//! partial checksums in one read, and the receive queue segments them and completes
//! checksums in software ([`super::gso`]), so the switch still sees wire frames. Frames
//! written get an all-zero vnet header (nothing to offload).
//!
//! The TAP is not persistent: it disappears when the last of its file descriptors is closed
//! (the [`Tap`], its sink and its receive queues share them), also when the process is killed.
//! All `unsafe` of this module is in the four small syscall wrappers at the bottom.

use std::ffi::CString;
use std::io;
use std::io::IoSlice;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use usnetd_shards::coalesce::{self, CoalescePlan};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue, MAX_BATCH};

use super::gso::{self, TcpSplit, VnetHdr, VNET_HDR_LEN};
use super::uring;

/// The longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// The suffix of the TAP's name: `<IF>usnetd`.
pub const TAP_SUFFIX: &str = "usnetd";

/// Ethernet header plus one VLAN tag: what a frame holds beyond the MTU.
pub const FRAME_OVERHEAD: usize = 14 + 4;

/// The TAP name for NIC `ifname`: `<IF>usnetd`, with `<IF>` cut to its first 9 bytes when the
/// whole would exceed 15 bytes (IFNAMSIZ). Two NICs whose names share their first 9 bytes
/// would get the same TAP name; the takeover refuses to start the second one (the TAP exists).
pub fn tap_name_for(ifname: &str) -> String {
    let room = MAX_IFNAME_LEN - TAP_SUFFIX.len();
    let mut cut = ifname.len().min(room);
    while !ifname.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{}", &ifname[..cut], TAP_SUFFIX)
}

/// How to open the TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// Number of queues (file descriptors); more than one sets `IFF_MULTI_QUEUE`.
    pub queues: usize,
    /// Let the kernel hand over unsegmented TCP and partial checksums (see the module docs).
    pub offload: bool,
}

/// The largest frame a read can return with offloads on: 64 KiB of IP plus link headers.
const MAX_OFFLOAD_FRAME: usize = 65535 + FRAME_OVERHEAD;

/// An open TAP device: its name and one non-blocking file descriptor per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<Arc<OwnedFd>>,
    offload: bool,
}

impl Tap {
    /// Creates the TAP `config.name` (or attaches to it if it exists with matching flags) with
    /// `config.queues` queues. Errors name the failing step.
    pub fn open(config: &TapConfig) -> io::Result<Tap> {
        if config.name.is_empty() || config.name.len() > MAX_IFNAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "TAP name {:?} must have 1 to {MAX_IFNAME_LEN} bytes",
                    config.name
                ),
            ));
        }
        if config.queues == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TAP needs at least one queue",
            ));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if config.queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        if config.offload {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut queues = Vec::with_capacity(config.queues);
        let mut name = config.name.clone();
        for queue in 0..config.queues {
            let fd = open_tun()?;
            name = tun_set_iff(&fd, &config.name, flags).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("TUNSETIFF {} (queue {queue}): {e}", config.name),
                )
            })?;
            if config.offload {
                let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
                tun_set_offload(&fd, features)
                    .map_err(|e| io::Error::new(e.kind(), format!("TUNSETOFFLOAD {name}: {e}")))?;
            }
            queues.push(Arc::new(fd));
        }
        Ok(Tap {
            name,
            queues,
            offload: config.offload,
        })
    }

    /// The interface name the kernel gave the TAP.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether offloads (vnet headers) are on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// The endpoint sink that writes frames for the kernel into the TAP. With offloads and
    /// `coalesce`, consecutive UDP datagrams of a flow in a batch are written as one UDP GSO
    /// super-packet ([`usnetd_shards::coalesce`]). With `io_uring`, the writes of a batch
    /// are submitted with one system call ([`super::uring`]) where the kernel allows it.
    pub fn sink(&self, coalesce: bool, io_uring: bool) -> Arc<TapSink> {
        Arc::new(TapSink {
            queues: self.queues.clone(),
            offload: self.offload,
            coalesce: AtomicBool::new(coalesce && self.offload),
            io_uring: AtomicBool::new(io_uring),
            refused: AtomicU64::new(0),
            super_packets: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            ring_writes: AtomicU64::new(0),
        })
    }

    /// One receive queue per TAP queue, each with [`MAX_BATCH`] buffers big enough for a
    /// frame of `mtu` bytes of payload (plus Ethernet and VLAN headers). Longer frames (only
    /// if the TAP's MTU is raised later) are dropped and counted in
    /// [`TapRxQueue::read_errors`].
    pub fn rx_queues(&self, mtu: usize) -> Vec<TapRxQueue> {
        self.queues
            .iter()
            .map(|fd| TapRxQueue::new(fd.clone(), mtu + FRAME_OVERHEAD, self.offload))
            .collect()
    }

    /// Like [`Tap::rx_queues`], but with offloads the queues lend the kernel's TCP
    /// super-segments (and partial checksums) whole, with their metadata
    /// ([`FrameBatch::push_offloaded`]), for a NIC transmit queue that takes them; each
    /// queue then holds [`MAX_BATCH`] buffers of 64 KiB (backed only as far as frames use
    /// them). Without offloads the same as [`Tap::rx_queues`].
    pub fn rx_queues_whole(&self, mtu: usize) -> Vec<TapRxQueue> {
        let mut queues = self.rx_queues(mtu);
        if self.offload {
            for q in &mut queues {
                q.lend_whole();
            }
        }
        queues
    }
}

/// Delivers frames to the kernel by writing them into the TAP. Never blocks.
///
/// A batch becomes a list of writes (one per frame, or per super-packet when coalescing),
/// each a run of slices (vnet header, headers, payloads) pointing into the batch; the list
/// is made with one io_uring submission where possible, else with one writev(2) a write.
#[derive(Debug)]
pub struct TapSink {
    queues: Vec<Arc<OwnedFd>>,
    offload: bool,
    /// Whether plain UDP datagrams are coalesced (turned off for good if the kernel refuses a
    /// super-packet).
    coalesce: AtomicBool,
    /// Whether writes go through io_uring (turned off for good if the kernel refuses it for
    /// the TAP).
    io_uring: AtomicBool,
    refused: AtomicU64,
    super_packets: AtomicU64,
    coalesced: AtomicU64,
    ring_writes: AtomicU64,
}

/// Slices the writes of one batch may use: a vnet header and a frame each, or a vnet header,
/// the super-packet's headers and one payload per member.
const MAX_IOVS: usize = 3 * MAX_BATCH;

/// The writes of one batch, before they are made: each a range of `iovs`.
struct WriteList<'a> {
    iovs: [IoSlice<'a>; MAX_IOVS],
    iov_count: usize,
    writes: [Range<usize>; MAX_BATCH],
    count: usize,
}

impl<'a> WriteList<'a> {
    fn new() -> WriteList<'a> {
        WriteList {
            iovs: [IoSlice::new(&[]); MAX_IOVS],
            iov_count: 0,
            writes: std::array::from_fn(|_| 0..0),
            count: 0,
        }
    }

    /// Adds one write made of `parts`.
    fn push(&mut self, parts: impl IntoIterator<Item = &'a [u8]>) {
        let start = self.iov_count;
        for part in parts {
            self.iovs[self.iov_count] = IoSlice::new(part);
            self.iov_count += 1;
        }
        self.writes[self.count] = start..self.iov_count;
        self.count += 1;
    }

    fn writes(&self) -> &[Range<usize>] {
        &self.writes[..self.count]
    }
}

/// What became of one write.
enum Written {
    Accepted,
    /// The TAP is full: the rest of the batch would not fit either.
    Full,
    /// This frame was refused (malformed, too large, no memory); the next may be fine.
    Refused,
}

impl Written {
    /// From a write's result: bytes written, or a negative errno.
    fn from_result(result: i32) -> Written {
        match result {
            r if r >= 0 => Written::Accepted,
            r if r == -libc::EAGAIN => Written::Full,
            _ => Written::Refused,
        }
    }
}

impl TapSink {
    /// Frames the TAP refused (malformed or too large, or no memory), over its lifetime.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// UDP GSO super-packets written, over the sink's lifetime.
    pub fn super_packets(&self) -> u64 {
        self.super_packets.load(Ordering::Relaxed)
    }

    /// Datagrams that travelled inside super-packets, over the sink's lifetime.
    pub fn coalesced_frames(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Whether coalescing is on (it turns itself off if the kernel refuses super-packets).
    pub fn coalescing(&self) -> bool {
        self.coalesce.load(Ordering::Relaxed)
    }

    /// Writes made through io_uring (a frame or a super-packet each), over the sink's
    /// lifetime.
    pub fn ring_writes(&self) -> u64 {
        self.ring_writes.load(Ordering::Relaxed)
    }

    /// Whether writes go through io_uring where a worker could make a ring (turned off if
    /// the kernel refuses io_uring writes to the TAP).
    pub fn io_uring(&self) -> bool {
        self.io_uring.load(Ordering::Relaxed)
    }
}

impl EndpointSink for TapSink {
    fn deliver(&self, worker: usize, frames: &[&[u8]]) -> usize {
        frames
            .chunks(MAX_BATCH)
            .map(|chunk| {
                if self.coalesce.load(Ordering::Relaxed) {
                    self.write_coalesced(worker, chunk)
                } else {
                    self.write_all(worker, chunk, None)
                }
            })
            .sum()
    }

    fn accepts_offloads(&self) -> bool {
        self.offload
    }

    fn deliver_offloaded(&self, worker: usize, frames: &[&[u8]], offloads: &[VnetHdr]) -> usize {
        frames
            .chunks(MAX_BATCH)
            .zip(offloads.chunks(MAX_BATCH).chain(std::iter::repeat(&[][..])))
            .map(|(chunk, hdrs)| self.write_all(worker, chunk, Some(hdrs)))
            .sum()
    }
}

impl TapSink {
    fn fd(&self, worker: usize) -> RawFd {
        self.queues[worker % self.queues.len()].as_raw_fd()
    }

    /// Writes one frame (after its vnet header, when given), retrying once if interrupted.
    fn write_one(fd: RawFd, hdr: Option<VnetHdr>, frame: &[u8]) -> Written {
        let mut result = write_frame(fd, hdr, frame);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::Interrupted) {
            result = write_frame(fd, hdr, frame);
        }
        match result {
            Ok(_) => Written::Accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Written::Full,
            Err(_) => Written::Refused,
        }
    }

    /// Makes the writes of `list` to `fd` in order and stores each one's result (bytes, or a
    /// negative errno) in `results`: through the worker thread's io_uring when it is on, works
    /// and there is more than one write, else (and for any write the ring did not make) one
    /// writev(2) each, where the first `EAGAIN` (a full TAP) ends the batch.
    fn make_writes(&self, fd: RawFd, list: &WriteList<'_>, results: &mut [i32]) {
        let writes = list.writes();
        let results = &mut results[..writes.len()];
        results.fill(-libc::ECANCELED);
        // A lone write costs no less through the ring than on its own.
        if writes.len() > 1 && self.io_uring.load(Ordering::Relaxed) {
            let iovs = &list.iovs[..list.iov_count];
            let made = uring::with_thread_ring(|ring| ring.writev_batch(fd, iovs, writes, results));
            if made.is_some() {
                if results.contains(&-libc::EOPNOTSUPP) {
                    // A kernel whose TAP does not take non-blocking io_uring writes: none of
                    // them was made; writev from now on.
                    if self.io_uring.swap(false, Ordering::Relaxed) {
                        log::warn!(
                            "the kernel refused io_uring writes to its TAP; writing with writev"
                        );
                    }
                    results.fill(-libc::ECANCELED);
                } else {
                    self.ring_writes
                        .fetch_add(writes.len() as u64, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut full = false;
        for (range, result) in writes.iter().zip(results.iter_mut()) {
            if *result != -libc::ECANCELED {
                continue;
            }
            if full {
                *result = -libc::EAGAIN;
                continue;
            }
            *result = writev_fd(fd, &list.iovs[range.clone()]);
            if *result == -libc::EINTR {
                *result = writev_fd(fd, &list.iovs[range.clone()]);
            }
            full = *result == -libc::EAGAIN;
        }
    }

    /// Writes `frames` (at most [`MAX_BATCH`]; with their vnet headers, when given and
    /// offloads are on) to the calling worker's queue; returns how many the TAP accepted.
    fn write_all(&self, worker: usize, frames: &[&[u8]], offloads: Option<&[VnetHdr]>) -> usize {
        let frames = &frames[..frames.len().min(MAX_BATCH)];
        let mut vnets = [[0u8; VNET_HDR_LEN]; MAX_BATCH];
        if self.offload {
            for (i, v) in vnets.iter_mut().enumerate().take(frames.len()) {
                let hdr = offloads
                    .and_then(|all| all.get(i).copied())
                    .unwrap_or(VnetHdr::PLAIN);
                *v = hdr.to_bytes();
            }
        }
        let mut list = WriteList::new();
        for (frame, vnet) in frames.iter().zip(&vnets) {
            if self.offload {
                list.push([&vnet[..], frame]);
            } else {
                list.push([*frame]);
            }
        }
        let mut results = [0i32; MAX_BATCH];
        self.make_writes(self.fd(worker), &list, &mut results);
        let mut accepted = 0;
        for &r in &results[..frames.len()] {
            match Written::from_result(r) {
                Written::Accepted => accepted += 1,
                Written::Full | Written::Refused => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        accepted
    }

    /// Like [`TapSink::write_all`] for plain frames (offloads on), but the UDP datagrams of
    /// one flow go out as one super-packet per group of the batch's [`CoalescePlan`].
    fn write_coalesced(&self, worker: usize, frames: &[&[u8]]) -> usize {
        let fd = self.fd(worker);
        let mut plan = CoalescePlan::new();
        let groups = plan.plan(frames);
        let frames = &frames[..frames.len().min(MAX_BATCH)];
        // First every group's headers, then the slices that point to them.
        let mut vnets = [[0u8; VNET_HDR_LEN]; MAX_BATCH];
        let mut headers = [[0u8; coalesce::MAX_HEADER]; MAX_BATCH];
        let mut header_lens = [0usize; MAX_BATCH];
        for ((group, header), (vnet, header_len)) in plan
            .groups()
            .zip(headers.iter_mut())
            .zip(vnets.iter_mut().zip(header_lens.iter_mut()))
        {
            *vnet = match group.super_header(frames, header) {
                None => VnetHdr::PLAIN.to_bytes(),
                Some((hdr, bytes)) => {
                    *header_len = bytes.len();
                    hdr.to_bytes()
                }
            };
        }
        let mut list = WriteList::new();
        for (g, group) in plan.groups().enumerate() {
            if header_lens[g] == 0 {
                list.push([&vnets[g][..], frames[group.first()]]);
            } else {
                let parts = [&vnets[g][..], &headers[g][..header_lens[g]]];
                list.push(
                    parts
                        .into_iter()
                        .chain(group.members().map(|m| group.payload(frames, m))),
                );
            }
        }
        let mut results = [0i32; MAX_BATCH];
        self.make_writes(fd, &list, &mut results);
        let mut accepted = 0;
        for (g, group) in plan.groups().enumerate().take(groups) {
            match Written::from_result(results[g]) {
                Written::Accepted => {
                    accepted += group.len();
                    if header_lens[g] > 0 {
                        self.super_packets.fetch_add(1, Ordering::Relaxed);
                        self.coalesced
                            .fetch_add(group.len() as u64, Ordering::Relaxed);
                    }
                }
                Written::Refused if header_lens[g] > 0 => {
                    // A kernel without UDP GSO on TAPs: write frames one by one from now on,
                    // these too (after the rest of this batch: only this one time can a
                    // flow's frames change order).
                    if self.coalesce.swap(false, Ordering::Relaxed) {
                        log::warn!(
                            "the kernel refused a UDP GSO write to its TAP (errno {}); writing frames one by one",
                            -results[g]
                        );
                    }
                    for m in group.members() {
                        match Self::write_one(fd, Some(VnetHdr::PLAIN), frames[m]) {
                            Written::Accepted => accepted += 1,
                            _ => {
                                self.refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Written::Full | Written::Refused => {
                    self.refused
                        .fetch_add(group.len() as u64, Ordering::Relaxed);
                }
            }
        }
        accepted
    }
}

/// Reads the frames the kernel sends through one TAP queue, into a fixed pool of
/// [`MAX_BATCH`] buffers, and lends them. With offloads, each read goes to a 64 KiB scratch
/// buffer first and is segmented (or its checksum completed) into the pool; a super-segment
/// that does not fit the batch is continued by the next call.
#[derive(Debug)]
pub struct TapRxQueue {
    fd: Arc<OwnedFd>,
    slot_size: usize,
    pool: Box<[u8]>,
    lens: [usize; MAX_BATCH],
    read_errors: u64,
    super_segments: u64,
    /// With offloads: the scratch buffer (vnet header + frame) and the length read into it.
    scratch: Option<Box<[u8]>>,
    scratch_len: usize,
    /// A super-segment in `scratch` whose segments from the index on are still to be lent.
    pending: Option<(TcpSplit, usize)>,
    /// Lends frames whole with their vnet headers (each slot starts with the header).
    whole: bool,
    hdrs: [VnetHdr; MAX_BATCH],
}

impl TapRxQueue {
    fn new(fd: Arc<OwnedFd>, slot_size: usize, offload: bool) -> TapRxQueue {
        TapRxQueue {
            fd,
            slot_size,
            pool: vec![0u8; slot_size * MAX_BATCH].into_boxed_slice(),
            lens: [0; MAX_BATCH],
            read_errors: 0,
            super_segments: 0,
            scratch: offload
                .then(|| vec![0u8; VNET_HDR_LEN + MAX_OFFLOAD_FRAME].into_boxed_slice()),
            scratch_len: 0,
            pending: None,
            whole: false,
            hdrs: [VnetHdr::PLAIN; MAX_BATCH],
        }
    }

    /// Switches to lending frames whole with their metadata (offloads only): slots big
    /// enough for a vnet header and a 64 KiB super-segment, no scratch buffer.
    fn lend_whole(&mut self) {
        self.slot_size = VNET_HDR_LEN + MAX_OFFLOAD_FRAME;
        self.pool = vec![0u8; self.slot_size * MAX_BATCH].into_boxed_slice();
        self.scratch = None;
        self.whole = true;
    }

    /// Reads with vnet headers straight into slots (the header first).
    fn read_whole(&mut self, room: usize) -> usize {
        let fd = self.fd.as_raw_fd();
        let mut filled = 0;
        for _ in 0..2 * MAX_BATCH {
            if filled == room {
                break;
            }
            let slot = &mut self.pool[filled * self.slot_size..(filled + 1) * self.slot_size];
            match read_fd(fd, slot) {
                Ok(len) => match VnetHdr::parse(&slot[..len]) {
                    Some(hdr) if len > VNET_HDR_LEN => {
                        if hdr.gso_type != gso::GSO_NONE {
                            self.super_segments += 1;
                        }
                        self.hdrs[filled] = hdr;
                        self.lens[filled] = len;
                        filled += 1;
                    }
                    _ => self.read_errors += 1,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.read_errors += 1,
            }
        }
        filled
    }

    /// Frames lost: read errors (a frame longer than a buffer) and, with offloads, frames
    /// that could not be segmented or checksummed. Over this queue's lifetime.
    pub fn read_errors(&self) -> u64 {
        self.read_errors
    }

    /// TCP super-segments the kernel handed over and this queue segmented (offloads only).
    pub fn super_segments(&self) -> u64 {
        self.super_segments
    }

    /// Plain reads, one frame per slot, from slot `filled` up to `room`.
    fn read_plain(&mut self, mut filled: usize, room: usize) -> usize {
        let fd = self.fd.as_raw_fd();
        // Each read either fills a slot, or ends the loop, or loses one frame (counted); the
        // attempts are bounded so a stream of bad frames cannot keep the caller here.
        for _ in 0..2 * MAX_BATCH {
            if filled == room {
                break;
            }
            let slot = &mut self.pool[filled * self.slot_size..(filled + 1) * self.slot_size];
            match read_fd(fd, slot) {
                Ok(len) => {
                    self.lens[filled] = len;
                    filled += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.read_errors += 1,
            }
        }
        filled
    }

    /// Copies segments of the pending super-segment into slots from `filled` up to `room`.
    fn drain_pending(&mut self, mut filled: usize, room: usize) -> usize {
        let Some((split, mut next)) = self.pending.take() else {
            return filled;
        };
        let Some(scratch) = self.scratch.as_deref() else {
            return filled;
        };
        let frame = &scratch[VNET_HDR_LEN..self.scratch_len];
        while next < split.count() && filled < room {
            let slot = &mut self.pool[filled * self.slot_size..(filled + 1) * self.slot_size];
            match split.write_segment(frame, next, slot) {
                Ok(len) => {
                    self.lens[filled] = len;
                    filled += 1;
                }
                // A segment larger than a slot (MSS above the MTU): lost, counted.
                Err(_) => self.read_errors += 1,
            }
            next += 1;
        }
        if next < split.count() {
            self.pending = Some((split, next));
        }
        filled
    }

    /// Reads with vnet headers into the scratch buffer, then into slots.
    fn read_offloaded(&mut self, mut filled: usize, room: usize) -> usize {
        let fd = self.fd.as_raw_fd();
        filled = self.drain_pending(filled, room);
        for _ in 0..2 * MAX_BATCH {
            if filled == room || self.pending.is_some() {
                break;
            }
            let Some(scratch) = self.scratch.as_deref_mut() else {
                break;
            };
            let len = match read_fd(fd, scratch) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.read_errors += 1;
                    continue;
                }
            };
            let Some(hdr) = VnetHdr::parse(&scratch[..len]) else {
                self.read_errors += 1;
                continue;
            };
            let frame = &mut scratch[VNET_HDR_LEN..len];
            if hdr.gso_type == gso::GSO_NONE {
                let slot = &mut self.pool[filled * self.slot_size..(filled + 1) * self.slot_size];
                let ok = frame.len() <= slot.len()
                    && (hdr.flags & gso::F_NEEDS_CSUM == 0
                        || gso::complete_checksum(
                            frame,
                            usize::from(hdr.csum_start),
                            usize::from(hdr.csum_offset),
                        )
                        .is_ok());
                if ok {
                    slot[..frame.len()].copy_from_slice(frame);
                    self.lens[filled] = frame.len();
                    filled += 1;
                } else {
                    self.read_errors += 1;
                }
                continue;
            }
            match TcpSplit::new(frame, &hdr) {
                Ok(split) => {
                    self.scratch_len = len;
                    self.super_segments += 1;
                    self.pending = Some((split, 0));
                    filled = self.drain_pending(filled, room);
                }
                Err(_) => self.read_errors += 1,
            }
        }
        filled
    }
}

impl RxQueue for TapRxQueue {
    fn prepare_wait(&mut self) -> Option<i32> {
        Some(self.fd.as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let room = MAX_BATCH - batch.len();
        if self.whole {
            let filled = self.read_whole(room);
            let this: &'a Self = self;
            for ((slot, &len), &hdr) in this
                .pool
                .chunks_exact(this.slot_size)
                .zip(&this.lens)
                .zip(&this.hdrs)
                .take(filled)
            {
                batch.push_offloaded(&slot[VNET_HDR_LEN..len], hdr);
            }
            return filled;
        }
        let filled = if self.scratch.is_some() {
            self.read_offloaded(0, room)
        } else {
            self.read_plain(0, room)
        };
        for (slot, &len) in self
            .pool
            .chunks_exact(self.slot_size)
            .zip(&self.lens)
            .take(filled)
        {
            batch.push(&slot[..len]);
        }
        filled
    }
}

/// Opens `/dev/net/tun` non-blocking and close-on-exec.
fn open_tun() -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").expect("no NUL in a literal");
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call; open(2) has no
    // other memory effects.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")));
    }
    // SAFETY: `fd` was just returned by open(2), is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// TUNSETIFF: attaches `fd` to TAP `name` with `flags`; returns the name the kernel chose.
fn tun_set_iff(fd: &OwnedFd, name: &str, flags: libc::c_int) -> io::Result<String> {
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags are a short in the ifreq union; all IFF_* values used fit.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: `fd` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes a `struct
    // ifreq`, and `req` is one, valid and exclusively borrowed for the call. The name is
    // NUL-terminated because at most 15 of its 16 bytes were written.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// TUNSETOFFLOAD: the offloads the kernel may leave to us (also used on macvtap queues).
pub(crate) fn tun_set_offload(fd: &OwnedFd, features: libc::c_uint) -> io::Result<()> {
    // SAFETY: `fd` is an open, attached TAP descriptor; TUNSETOFFLOAD takes its argument by
    // value (an unsigned long) and touches no memory of ours.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(features),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes one frame, after its vnet header when offloads are on (`Some`).
fn write_frame(fd: RawFd, hdr: Option<VnetHdr>, frame: &[u8]) -> io::Result<usize> {
    let Some(hdr) = hdr else {
        return write_fd(fd, frame);
    };
    let hdr = hdr.to_bytes();
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ];
    // SAFETY: both iovecs point to valid readable memory of their lengths for the call (the
    // kernel only reads through them despite the `*mut`); `fd` is kept open by the caller.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// writev(2) of one write's slices: bytes written, or a negative errno.
fn writev_fd(fd: RawFd, iovs: &[IoSlice<'_>]) -> i32 {
    // SAFETY: IoSlice is ABI-compatible with iovec; every slice is valid readable memory for
    // the call (the kernel only reads through them); `fd` is kept open by the caller.
    let n = unsafe { libc::writev(fd, iovs.as_ptr().cast(), iovs.len() as libc::c_int) };
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        n.min(i32::MAX as isize) as i32
    }
}

/// write(2) of one whole frame.
fn write_fd(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `frame` is a valid readable slice for its length during the call; `fd` is kept
    // open by the caller's `Arc<OwnedFd>`.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// read(2) of one frame into `buf`.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable slice for its length during the call; `fd` is kept
    // open by the caller's `Arc<OwnedFd>`.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name_for("eth0"), "eth0usnetd");
        assert_eq!(tap_name_for("enp1s0f0"), "enp1s0f0usnetd");
        assert_eq!(tap_name_for("enp1s0f0np0"), "enp1s0f0nusnetd");
        assert_eq!(tap_name_for("wlp0s20f3abcdef"), "wlp0s20f3usnetd");
        for name in ["a", "eth0", "enp1s0f0np0", "wlp0s20f3abcdef"] {
            assert!(tap_name_for(name).len() <= MAX_IFNAME_LEN);
        }
    }

    #[test]
    fn open_rejects_bad_config() {
        let long = TapConfig {
            name: "a-name-that-is-too-long".into(),
            queues: 1,
            offload: false,
        };
        assert_eq!(
            Tap::open(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let none = TapConfig {
            name: "tapx".into(),
            queues: 0,
            offload: false,
        };
        assert_eq!(
            Tap::open(&none).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
