//! The shared-memory packet channel: its binary layout, its rings, and the client's side.
//!
//! A faster alternative to the one-datagram-per-frame Unix socket channel when netmap is not
//! available. The switch creates a `memfd`, maps it, writes the [`ShmHeader`] and hands the
//! memfd plus two eventfds to the client, which maps the same memory with
//! [`ShmClient::from_fds`].
//!
//! # Binary layout (version 1, native byte order, all offsets in bytes)
//!
//! ```text
//! 0                  ShmHeader (64 bytes, #[repr(C)], see the field docs)
//! rings_offset       ring 0 .. ring R-1, each ring_stride bytes:
//!   +0                 producer index (u32, atomic; written only by the ring's producer)
//!   +128               consumer index (u32, atomic; written only by the ring's consumer)
//!   +132               need-wakeup flag (u32, atomic; written only by the consumer)
//!   +ring_ctrl_size    slot_count slots of slot_size bytes each:
//!                        +0 frame length (u32), +4 reserved (0), +8 frame bytes
//! ```
//!
//! Rings `0 .. to_client_rings` carry frames from the switch to the client, one ring per switch
//! worker (each worker is the only producer of its ring, so workers share nothing). The next
//! `to_switch_rings` (always 1 in version 1) carry frames from the client to the switch.
//!
//! Indices are free-running `u32` counters; slot `i` of a ring is `index & (slot_count - 1)`.
//! A ring is empty when `producer == consumer` and full when `producer - consumer ==
//! slot_count` (wrapping). The producer fills slots, then publishes them with one release store
//! of its index per batch; the consumer reads them after an acquire load and gives them back
//! with one release store of its index.
//!
//! # Wake-ups
//! Like AF_XDP's `need_wakeup`: a consumer that wants to sleep sets its ring's need-wakeup flag,
//! issues a full fence, checks the ring once more, and only then blocks on the eventfd. A
//! producer, after publishing, issues a full fence and writes the eventfd only when the flag is
//! set. Busy consumers therefore cost the producer no syscall at all. The first eventfd of the
//! handover wakes the client (all switch-to-client rings), the second wakes the switch.
//!
//! # Trust
//! Either side can write anything into the shared memory. Both sides keep their own copy of the
//! geometry (the header is only read once, at attach time), treat every index and length read
//! from the mapping as untrusted (bounds-checked, errors counted in [`RingErrors`], never a
//! panic), and access the mapping only through atomics and volatile copies: no Rust reference
//! ever points at bytes the other process may write. The switch seals the memfd against
//! shrinking, so a client cannot make the switch fault by truncating it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use region::SharedRegion;

/// The magic at offset 0 of the mapping.
pub const SHM_MAGIC: [u8; 8] = *b"USNETSHM";
/// The layout version this code reads and writes.
pub const SHM_VERSION: u32 = 1;
/// Size of [`ShmHeader`].
pub const HEADER_SIZE: usize = std::mem::size_of::<ShmHeader>();
/// Where the first ring starts.
pub const RINGS_OFFSET: u64 = 256;
/// Size of a ring's control block (producer index, consumer index, need-wakeup flag).
pub const RING_CTRL_SIZE: u32 = 256;
/// Offset of the producer index in a ring's control block.
pub const PRODUCER_OFFSET: usize = 0;
/// Offset of the consumer index in a ring's control block (its own cache-line pair).
pub const CONSUMER_OFFSET: usize = 128;
/// Offset of the need-wakeup flag in a ring's control block (written by the consumer).
pub const NEED_WAKEUP_OFFSET: usize = 132;
/// Bytes before a frame in its slot: `u32` length, `u32` reserved.
pub const SLOT_HEADER_SIZE: u32 = 8;
/// The most rings of either direction a layout may have.
pub const MAX_RINGS: u32 = 256;
/// The most slots a ring may have.
pub const MAX_SLOTS: u32 = 1 << 16;
/// The largest slot.
pub const MAX_SLOT_SIZE: u32 = 1 << 16;
/// The smallest slot.
pub const MIN_SLOT_SIZE: u32 = 128;
/// The smallest frame a ring carries (an Ethernet header).
pub const MIN_FRAME: u32 = 14;

/// The header at offset 0 of the shared memory. Written once by the switch before handover.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmHeader {
    /// [`SHM_MAGIC`].
    pub magic: [u8; 8],
    /// [`SHM_VERSION`].
    pub version: u32,
    /// `size_of::<ShmHeader>()` (64).
    pub header_size: u32,
    /// Rings from the switch to the client: one per switch worker.
    pub to_client_rings: u32,
    /// Rings from the client to the switch (1).
    pub to_switch_rings: u32,
    /// Slots per ring, a power of two.
    pub slot_count: u32,
    /// Bytes per slot, a multiple of 64, including the 8-byte slot header.
    pub slot_size: u32,
    /// The largest frame either side may put into a slot (at most `slot_size - 8`).
    pub max_frame: u32,
    /// Bytes of each ring's control block before its slots ([`RING_CTRL_SIZE`]).
    pub ring_ctrl_size: u32,
    /// Offset of ring 0 ([`RINGS_OFFSET`]).
    pub rings_offset: u64,
    /// Bytes from one ring to the next: `ring_ctrl_size + slot_count * slot_size`.
    pub ring_stride: u64,
    /// Size of the whole mapping: `rings_offset + rings * ring_stride`.
    pub total_size: u64,
}

/// Why a header or a geometry is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The magic is not [`SHM_MAGIC`].
    BadMagic,
    /// A version this code does not speak.
    BadVersion(u32),
    /// A field is out of range or inconsistent with the others.
    BadField(&'static str),
    /// The memory is smaller than the header says.
    TooSmall,
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutError::BadMagic => write!(f, "shared memory: bad magic"),
            LayoutError::BadVersion(v) => write!(f, "shared memory: unsupported version {v}"),
            LayoutError::BadField(name) => write!(f, "shared memory: invalid header field {name}"),
            LayoutError::TooSmall => write!(f, "shared memory: smaller than its header says"),
        }
    }
}

impl std::error::Error for LayoutError {}

impl From<LayoutError> for io::Error {
    fn from(e: LayoutError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The shape of a shared-memory channel, validated. Each side keeps its own copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmGeometry {
    to_client_rings: u32,
    to_switch_rings: u32,
    slot_count: u32,
    slot_size: u32,
    max_frame: u32,
}

impl ShmGeometry {
    /// Validates a geometry: 1..=256 switch-to-client rings, exactly 1 client-to-switch ring,
    /// a power-of-two `slot_count` in 2..=65536, a `slot_size` that is a multiple of 64 in
    /// 128..=65536, and `14 <= max_frame <= slot_size - 8`.
    pub fn new(
        to_client_rings: u32,
        slot_count: u32,
        slot_size: u32,
        max_frame: u32,
    ) -> Result<Self, LayoutError> {
        let g = ShmGeometry {
            to_client_rings,
            to_switch_rings: 1,
            slot_count,
            slot_size,
            max_frame,
        };
        g.check()?;
        Ok(g)
    }

    fn check(&self) -> Result<(), LayoutError> {
        if self.to_client_rings == 0 || self.to_client_rings > MAX_RINGS {
            return Err(LayoutError::BadField("to_client_rings"));
        }
        if self.to_switch_rings != 1 {
            return Err(LayoutError::BadField("to_switch_rings"));
        }
        if !self.slot_count.is_power_of_two() || self.slot_count < 2 || self.slot_count > MAX_SLOTS
        {
            return Err(LayoutError::BadField("slot_count"));
        }
        if !(MIN_SLOT_SIZE..=MAX_SLOT_SIZE).contains(&self.slot_size)
            || !self.slot_size.is_multiple_of(64)
        {
            return Err(LayoutError::BadField("slot_size"));
        }
        if self.max_frame < MIN_FRAME || self.max_frame > self.slot_size - SLOT_HEADER_SIZE {
            return Err(LayoutError::BadField("max_frame"));
        }
        Ok(())
    }

    /// Switch-to-client rings (one per switch worker).
    pub fn to_client_rings(&self) -> u32 {
        self.to_client_rings
    }

    /// Slots per ring.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// The largest frame a slot carries.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// All rings, both directions.
    pub fn ring_count(&self) -> u32 {
        self.to_client_rings + self.to_switch_rings
    }

    /// Bytes from one ring to the next. Cannot overflow: bounded by the limits in [`Self::new`].
    pub fn ring_stride(&self) -> u64 {
        RING_CTRL_SIZE as u64 + self.slot_count as u64 * self.slot_size as u64
    }

    /// Size of the whole mapping.
    pub fn total_size(&self) -> u64 {
        RINGS_OFFSET + self.ring_count() as u64 * self.ring_stride()
    }

    /// Offset of ring `ring` (switch-to-client rings first, then the client-to-switch ring).
    pub fn ring_offset(&self, ring: u32) -> u64 {
        RINGS_OFFSET + ring as u64 * self.ring_stride()
    }

    /// Index of the (single) client-to-switch ring.
    pub fn to_switch_ring(&self) -> u32 {
        self.to_client_rings
    }

    /// The header that describes this geometry.
    pub fn header(&self) -> ShmHeader {
        ShmHeader {
            magic: SHM_MAGIC,
            version: SHM_VERSION,
            header_size: HEADER_SIZE as u32,
            to_client_rings: self.to_client_rings,
            to_switch_rings: self.to_switch_rings,
            slot_count: self.slot_count,
            slot_size: self.slot_size,
            max_frame: self.max_frame,
            ring_ctrl_size: RING_CTRL_SIZE,
            rings_offset: RINGS_OFFSET,
            ring_stride: self.ring_stride(),
            total_size: self.total_size(),
        }
    }

    /// Validates a header read from a mapping of `mapped_len` bytes: every field must match the
    /// geometry it describes.
    pub fn from_header(h: &ShmHeader, mapped_len: u64) -> Result<Self, LayoutError> {
        if h.magic != SHM_MAGIC {
            return Err(LayoutError::BadMagic);
        }
        if h.version != SHM_VERSION {
            return Err(LayoutError::BadVersion(h.version));
        }
        if h.header_size as usize != HEADER_SIZE {
            return Err(LayoutError::BadField("header_size"));
        }
        let g = ShmGeometry {
            to_client_rings: h.to_client_rings,
            to_switch_rings: h.to_switch_rings,
            slot_count: h.slot_count,
            slot_size: h.slot_size,
            max_frame: h.max_frame,
        };
        g.check()?;
        if h.ring_ctrl_size != RING_CTRL_SIZE {
            return Err(LayoutError::BadField("ring_ctrl_size"));
        }
        if h.rings_offset != RINGS_OFFSET {
            return Err(LayoutError::BadField("rings_offset"));
        }
        if h.ring_stride != g.ring_stride() {
            return Err(LayoutError::BadField("ring_stride"));
        }
        if h.total_size != g.total_size() {
            return Err(LayoutError::BadField("total_size"));
        }
        if mapped_len < h.total_size {
            return Err(LayoutError::TooSmall);
        }
        Ok(g)
    }
}

/// The only module with `unsafe` for shared memory: a mapping accessed through atomics and
/// bounds-checked volatile copies.
mod region {
    use super::*;
    use std::ptr::NonNull;

    /// A `MAP_SHARED` read-write mapping of a file (the channel's memfd).
    ///
    /// The other process may write any byte at any time, so this type never hands out a Rust
    /// reference to the bytes: reads and writes are volatile copies, and control words are
    /// accessed as atomics. Every access is bounds-checked and returns `None`/`false` when out
    /// of range.
    pub struct SharedRegion {
        base: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the mapping is plain memory owned by this value until `Drop`; every access goes
    // through atomics or volatile copies that tolerate concurrent writers, so sharing the
    // pointer between threads adds no data race beyond what another process can do anyway.
    unsafe impl Send for SharedRegion {}
    // SAFETY: as for `Send`: `&SharedRegion` only allows atomic and volatile accesses.
    unsafe impl Sync for SharedRegion {}

    impl SharedRegion {
        /// Maps `len` bytes of `fd` from offset 0, shared and read-write.
        pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedRegion> {
            if len == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
            }
            // SAFETY: a fresh mapping at an address of the kernel's choice; it aliases no Rust
            // object. Failure is reported as MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let base = NonNull::new(p.cast::<u8>())
                .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
            Ok(SharedRegion { base, len })
        }

        /// Length of the mapping in bytes.
        pub fn len(&self) -> usize {
            self.len
        }

        /// Whether the mapping is empty (never: [`Self::map`] refuses that).
        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        fn range_ok(&self, off: usize, n: usize) -> bool {
            off.checked_add(n).is_some_and(|end| end <= self.len)
        }

        /// The `u32` at `off` as an atomic; `None` when out of range or misaligned.
        pub fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
            if !self.range_ok(off, 4) || !off.is_multiple_of(4) {
                return None;
            }
            // SAFETY: in bounds and 4-aligned (mmap returns page-aligned memory); an AtomicU32
            // has the layout of a u32 and is made for concurrent access, also across processes
            // sharing the page. The reference lives no longer than `&self`, i.e. the mapping.
            Some(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast::<u32>()) })
        }

        /// Volatile read of the `u32` at `off` (4-aligned).
        pub fn read_u32(&self, off: usize) -> Option<u32> {
            if !self.range_ok(off, 4) || !off.is_multiple_of(4) {
                return None;
            }
            // SAFETY: in bounds and aligned; volatile, so no reference to the shared bytes.
            Some(unsafe { self.base.as_ptr().add(off).cast::<u32>().read_volatile() })
        }

        /// Volatile write of the `u32` at `off` (4-aligned); `false` when out of range.
        pub fn write_u32(&self, off: usize, v: u32) -> bool {
            if !self.range_ok(off, 4) || !off.is_multiple_of(4) {
                return false;
            }
            // SAFETY: in bounds and aligned; volatile write into the mapping.
            unsafe { self.base.as_ptr().add(off).cast::<u32>().write_volatile(v) };
            true
        }

        /// Volatile copy of `dst.len()` bytes from `off` into private memory; `false` (and
        /// nothing copied) when out of range.
        pub fn copy_out(&self, off: usize, dst: &mut [u8]) -> bool {
            if !self.range_ok(off, dst.len()) {
                return false;
            }
            let src = self.base.as_ptr().wrapping_add(off);
            let mut i = 0;
            let n = dst.len();
            // Word-wise where the shared side is 8-aligned (slot data is), then byte-wise.
            if (src as usize).is_multiple_of(8) {
                while i + 8 <= n {
                    // SAFETY: `src + i .. + 8` is in bounds (checked above) and 8-aligned;
                    // `dst[i..i + 8]` is in bounds, written unaligned.
                    unsafe {
                        let w = src.add(i).cast::<u64>().read_volatile();
                        dst.as_mut_ptr().add(i).cast::<u64>().write_unaligned(w);
                    }
                    i += 8;
                }
            }
            while i < n {
                // SAFETY: `src + i` is in bounds (checked above).
                dst[i] = unsafe { src.add(i).read_volatile() };
                i += 1;
            }
            true
        }

        /// Volatile copy of `src` into the mapping at `off`; `false` (and nothing written) when
        /// out of range.
        pub fn copy_in(&self, off: usize, src: &[u8]) -> bool {
            if !self.range_ok(off, src.len()) {
                return false;
            }
            let dst = self.base.as_ptr().wrapping_add(off);
            let mut i = 0;
            let n = src.len();
            if (dst as usize).is_multiple_of(8) {
                while i + 8 <= n {
                    // SAFETY: `dst + i .. + 8` is in bounds and 8-aligned; `src[i..i + 8]` is
                    // in bounds, read unaligned.
                    unsafe {
                        let w = src.as_ptr().add(i).cast::<u64>().read_unaligned();
                        dst.add(i).cast::<u64>().write_volatile(w);
                    }
                    i += 8;
                }
            }
            while i < n {
                // SAFETY: `dst + i` is in bounds (checked above).
                unsafe { dst.add(i).write_volatile(src[i]) };
                i += 1;
            }
            true
        }

        /// Volatile read of the header at offset 0.
        pub fn read_header(&self) -> Option<ShmHeader> {
            if !self.range_ok(0, HEADER_SIZE) {
                return None;
            }
            // SAFETY: in bounds; the mapping is page-aligned, so aligned for ShmHeader, and
            // every bit pattern is a valid ShmHeader (integers and a byte array).
            Some(unsafe { self.base.as_ptr().cast::<ShmHeader>().read_volatile() })
        }

        /// Volatile write of the header at offset 0; `false` when the mapping is too small.
        pub fn write_header(&self, h: &ShmHeader) -> bool {
            if !self.range_ok(0, HEADER_SIZE) {
                return false;
            }
            // SAFETY: in bounds and aligned, as in `read_header`.
            unsafe { self.base.as_ptr().cast::<ShmHeader>().write_volatile(*h) };
            true
        }
    }

    impl Drop for SharedRegion {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `map`; no reference into it can
            // outlive `self` (atomics borrow `&self`).
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

/// Errors one ring end found in what the other side wrote. Counted, never fatal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingErrors {
    /// The other side's index was impossible (more than `slot_count` away from ours).
    pub bad_index: u64,
    /// A slot held a length of 0, below 14 or above `max_frame`: the slot was skipped.
    pub bad_length: u64,
    /// Frames this side refused to enqueue because they exceed `max_frame` (or are shorter
    /// than an Ethernet header).
    pub oversize: u64,
}

impl RingErrors {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &RingErrors) {
        self.bad_index += o.bad_index;
        self.bad_length += o.bad_length;
        self.oversize += o.oversize;
    }
}

/// Offsets of one ring, computed from a trusted geometry.
#[derive(Clone, Copy, Debug)]
struct RingPlace {
    prod: usize,
    cons: usize,
    need_wakeup: usize,
    slots: usize,
    mask: u32,
    slot_count: u32,
    slot_size: usize,
    max_frame: usize,
}

impl RingPlace {
    fn new(g: &ShmGeometry, ring: u32) -> RingPlace {
        // total_size fits the mapping (checked at map time) and is far below usize::MAX.
        let base = g.ring_offset(ring) as usize;
        RingPlace {
            prod: base + PRODUCER_OFFSET,
            cons: base + CONSUMER_OFFSET,
            need_wakeup: base + NEED_WAKEUP_OFFSET,
            slots: base + RING_CTRL_SIZE as usize,
            mask: g.slot_count - 1,
            slot_count: g.slot_count,
            slot_size: g.slot_size as usize,
            max_frame: g.max_frame as usize,
        }
    }

    fn slot(&self, index: u32) -> usize {
        self.slots + (index & self.mask) as usize * self.slot_size
    }
}

/// The producer end of one ring. Holds the true producer index privately and only ever
/// *writes* it to the mapping; the consumer index it reads is validated.
pub struct RingProducer {
    region: Arc<SharedRegion>,
    place: RingPlace,
    prod: u32,
    cons_cache: u32,
    errors: RingErrors,
}

impl RingProducer {
    /// The producer of ring `ring` of `geometry` in `region`. `region` must be at least
    /// `geometry.total_size()` long (checked: `None` otherwise).
    pub fn new(region: Arc<SharedRegion>, geometry: &ShmGeometry, ring: u32) -> Option<Self> {
        if (region.len() as u64) < geometry.total_size() || ring >= geometry.ring_count() {
            return None;
        }
        let place = RingPlace::new(geometry, ring);
        // Start from whatever the producer index says now (0 on a fresh memfd) so a producer
        // recreated on a live channel continues; the consumer index is validated on use.
        let prod = region.atomic_u32(place.prod)?.load(Ordering::Relaxed);
        let cons = region.atomic_u32(place.cons)?.load(Ordering::Acquire);
        let cons_cache = if prod.wrapping_sub(cons) <= place.slot_count {
            cons
        } else {
            prod.wrapping_sub(place.slot_count)
        };
        Some(RingProducer {
            region,
            place,
            prod,
            cons_cache,
            errors: RingErrors::default(),
        })
    }

    /// Free slots, refreshing the consumer index from the mapping when needed. An impossible
    /// consumer index counts as an error and leaves the ring full.
    fn free(&mut self, want: u32) -> u32 {
        let used = self.prod.wrapping_sub(self.cons_cache);
        if used <= self.place.slot_count && self.place.slot_count - used >= want {
            return self.place.slot_count - used;
        }
        let Some(cons_atomic) = self.region.atomic_u32(self.place.cons) else {
            return 0;
        };
        let cons = cons_atomic.load(Ordering::Acquire);
        let used = self.prod.wrapping_sub(cons);
        if used > self.place.slot_count {
            self.errors.bad_index += 1;
            return 0;
        }
        self.cons_cache = cons;
        self.place.slot_count - used
    }

    /// Copies as many `frames` as fit into the ring, in order, and publishes them with one
    /// store. Frames longer than `max_frame` or shorter than 14 bytes are skipped and counted
    /// in [`RingErrors::oversize`]. Returns how many frames were enqueued.
    pub fn push_batch(&mut self, frames: &[&[u8]]) -> usize {
        let mut free = self.free(frames.len().min(u32::MAX as usize) as u32);
        let mut pushed = 0;
        for frame in frames {
            if frame.len() > self.place.max_frame || frame.len() < MIN_FRAME as usize {
                self.errors.oversize += 1;
                continue;
            }
            if free == 0 {
                break;
            }
            let slot = self.place.slot(self.prod);
            let ok = self.region.write_u32(slot, frame.len() as u32)
                && self.region.write_u32(slot + 4, 0)
                && self.region.copy_in(slot + SLOT_HEADER_SIZE as usize, frame);
            if !ok {
                // Unreachable with a validated geometry; refuse rather than publish garbage.
                break;
            }
            self.prod = self.prod.wrapping_add(1);
            free -= 1;
            pushed += 1;
        }
        if pushed > 0 {
            if let Some(p) = self.region.atomic_u32(self.place.prod) {
                p.store(self.prod, Ordering::Release);
            }
        }
        pushed
    }

    /// Whether the consumer asked to be woken: call after [`Self::push_batch`] returned > 0 and
    /// signal the consumer's eventfd when `true`. Issues the full fence the protocol needs.
    pub fn needs_wakeup(&self) -> bool {
        fence(Ordering::SeqCst);
        self.region
            .atomic_u32(self.place.need_wakeup)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    }

    /// Errors seen so far.
    pub fn errors(&self) -> RingErrors {
        self.errors
    }
}

/// Why [`RingConsumer::read_next`] returned no frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// No frame is available.
    Empty,
    /// The slot held an invalid length; it was consumed and counted.
    BadLength,
}

/// The consumer end of one ring. Holds the true consumer index privately; the producer index
/// it reads is validated, and so is every slot length.
pub struct RingConsumer {
    region: Arc<SharedRegion>,
    place: RingPlace,
    cons: u32,
    prod_cache: u32,
    published: u32,
    errors: RingErrors,
}

impl RingConsumer {
    /// The consumer of ring `ring` of `geometry` in `region` (`None` when `region` is smaller
    /// than the geometry or `ring` is out of range).
    pub fn new(region: Arc<SharedRegion>, geometry: &ShmGeometry, ring: u32) -> Option<Self> {
        if (region.len() as u64) < geometry.total_size() || ring >= geometry.ring_count() {
            return None;
        }
        let place = RingPlace::new(geometry, ring);
        let cons = region.atomic_u32(place.cons)?.load(Ordering::Relaxed);
        Some(RingConsumer {
            region,
            place,
            cons,
            prod_cache: cons,
            published: cons,
            errors: RingErrors::default(),
        })
    }

    /// Frames ready to read. Reloads the producer index when the cached one is used up; an
    /// impossible producer index counts as an error and reads as empty.
    pub fn available(&mut self) -> u32 {
        let ready = self.prod_cache.wrapping_sub(self.cons);
        if ready != 0 && ready <= self.place.slot_count {
            return ready;
        }
        let Some(prod_atomic) = self.region.atomic_u32(self.place.prod) else {
            return 0;
        };
        let prod = prod_atomic.load(Ordering::Acquire);
        let ready = prod.wrapping_sub(self.cons);
        if ready > self.place.slot_count {
            self.errors.bad_index += 1;
            self.prod_cache = self.cons;
            return 0;
        }
        self.prod_cache = prod;
        ready
    }

    /// Copies the next frame into `dst` (truncated to `dst.len()`) and consumes its slot
    /// locally (published by [`Self::release`]). Returns the number of bytes copied.
    pub fn read_next(&mut self, dst: &mut [u8]) -> Result<usize, ReadError> {
        if self.available() == 0 {
            return Err(ReadError::Empty);
        }
        let slot = self.place.slot(self.cons);
        self.cons = self.cons.wrapping_add(1);
        let len = self.region.read_u32(slot).unwrap_or(0) as usize;
        if len < MIN_FRAME as usize || len > self.place.max_frame {
            self.errors.bad_length += 1;
            return Err(ReadError::BadLength);
        }
        let n = len.min(dst.len());
        if !self
            .region
            .copy_out(slot + SLOT_HEADER_SIZE as usize, &mut dst[..n])
        {
            self.errors.bad_length += 1;
            return Err(ReadError::BadLength);
        }
        Ok(n)
    }

    /// Gives the slots read so far back to the producer (one release store).
    pub fn release(&mut self) {
        if self.published != self.cons {
            if let Some(c) = self.region.atomic_u32(self.place.cons) {
                c.store(self.cons, Ordering::Release);
            }
            self.published = self.cons;
        }
    }

    /// Asks the producer for a wake-up and returns whether the ring is (still) empty, i.e.
    /// whether it is safe to sleep on the eventfd now. Issues the full fence the protocol needs.
    pub fn arm_wakeup(&mut self) -> bool {
        if let Some(f) = self.region.atomic_u32(self.place.need_wakeup) {
            f.store(1, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.available() == 0
    }

    /// Withdraws the wake-up request (the consumer is busy again).
    pub fn disarm_wakeup(&mut self) {
        if let Some(f) = self.region.atomic_u32(self.place.need_wakeup) {
            f.store(0, Ordering::Relaxed);
        }
    }

    /// Errors seen so far.
    pub fn errors(&self) -> RingErrors {
        self.errors
    }
}

/// Writes 1 to an eventfd (a wake-up). Errors (a full counter) are harmless: the reader is
/// already due to wake.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local into an fd we borrow.
    unsafe {
        libc::write(
            fd.as_raw_fd(),
            (&one as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Resets an eventfd (non-blocking read of its counter); returns whether it was signalled.
pub fn eventfd_drain(fd: BorrowedFd<'_>) -> bool {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local. The fd is non-blocking (if it is not,
    // the caller only calls this after poll said it is readable).
    let r = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut v as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
    r == 8 && v > 0
}

/// Creates a non-blocking, close-on-exec eventfd.
pub fn eventfd_new() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned fd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Waits until `fd` is readable or `timeout` passes (`None`: forever). Returns whether it is
/// readable. EINTR counts as a timeout.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_millis().min(i32::MAX as u128) as i32,
    };
    // SAFETY: one valid pollfd on the stack.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0 && pfd.revents & libc::POLLIN != 0)
}

fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: fstat writes into a zeroed local stat struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a live stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size.max(0) as u64)
}

/// The client's side of a shared-memory channel.
pub struct ShmClient {
    geometry: ShmGeometry,
    rx: Vec<RingConsumer>,
    tx: RingProducer,
    rx_event: OwnedFd,
    tx_event: OwnedFd,
    next_rx: usize,
    scratch: Box<[u8]>,
    _memfd: OwnedFd,
}

impl ShmClient {
    /// Attaches to a channel from the fds the switch handed over: the memfd and the eventfds
    /// `[to_client, to_switch]` (the first wakes this client, the second the switch). Validates
    /// the header against the memfd's size.
    pub fn from_fds(memfd: OwnedFd, eventfds: [OwnedFd; 2]) -> io::Result<ShmClient> {
        let size = file_size(memfd.as_fd())?;
        if size < HEADER_SIZE as u64 || size > isize::MAX as u64 {
            return Err(LayoutError::TooSmall.into());
        }
        let region = SharedRegion::map(memfd.as_fd(), size as usize)?;
        let header = region.read_header().ok_or(LayoutError::TooSmall)?;
        let geometry = ShmGeometry::from_header(&header, size)?;
        let region = Arc::new(region);
        let rx = (0..geometry.to_client_rings())
            .map(|r| RingConsumer::new(region.clone(), &geometry, r))
            .collect::<Option<Vec<_>>>()
            .ok_or(LayoutError::TooSmall)?;
        let tx = RingProducer::new(region, &geometry, geometry.to_switch_ring())
            .ok_or(LayoutError::TooSmall)?;
        let [rx_event, tx_event] = eventfds;
        for fd in [&rx_event, &tx_event] {
            // SAFETY: F_GETFL/F_SETFL on an fd we own.
            unsafe {
                let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
        }
        Ok(ShmClient {
            scratch: vec![0u8; geometry.max_frame() as usize].into_boxed_slice(),
            geometry,
            rx,
            tx,
            rx_event,
            tx_event,
            next_rx: 0,
            _memfd: memfd,
        })
    }

    /// The channel's geometry as read from its header.
    pub fn geometry(&self) -> &ShmGeometry {
        &self.geometry
    }

    /// Calls `f` with every frame that is ready, from all switch-to-client rings (starting at a
    /// different ring each call, so no ring starves). Returns how many frames were passed.
    pub fn recv_batch(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let rings = self.rx.len();
        let mut count = 0;
        for k in 0..rings {
            let ring = &mut self.rx[(self.next_rx + k) % rings];
            loop {
                match ring.read_next(&mut self.scratch) {
                    Ok(n) => {
                        f(&self.scratch[..n]);
                        count += 1;
                    }
                    Err(ReadError::BadLength) => continue,
                    Err(ReadError::Empty) => break,
                }
            }
            ring.release();
        }
        self.next_rx = (self.next_rx + 1) % rings.max(1);
        count
    }

    /// Copies one ready frame into `buf` (truncated to its length); `None` when none is ready.
    pub fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        let rings = self.rx.len();
        for k in 0..rings {
            let i = (self.next_rx + k) % rings;
            let ring = &mut self.rx[i];
            loop {
                match ring.read_next(buf) {
                    Ok(n) => {
                        ring.release();
                        self.next_rx = (i + 1) % rings;
                        return Some(n);
                    }
                    Err(ReadError::BadLength) => continue,
                    Err(ReadError::Empty) => break,
                }
            }
            ring.release();
        }
        None
    }

    /// Enqueues one frame to the switch (waking it if it sleeps). `false` when the ring is full
    /// or the frame is longer than `max_frame`.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.send_batch(&[frame]) == 1
    }

    /// Enqueues frames to the switch in order with one publish; returns how many were taken.
    pub fn send_batch(&mut self, frames: &[&[u8]]) -> usize {
        let n = self.tx.push_batch(frames);
        if n > 0 && self.tx.needs_wakeup() {
            eventfd_signal(self.tx_event.as_fd());
        }
        n
    }

    /// Arms the wake-up on every switch-to-client ring; returns whether it is safe to sleep on
    /// [`Self::event_fd`] (no frame is pending). Use with an external poll loop, then call
    /// [`Self::finish_wait`].
    pub fn prepare_wait(&mut self) -> bool {
        let mut empty = true;
        for r in &mut self.rx {
            empty &= r.arm_wakeup();
        }
        if !empty {
            self.finish_wait();
        }
        empty
    }

    /// Disarms the wake-ups and resets the eventfd after a wait.
    pub fn finish_wait(&mut self) {
        for r in &mut self.rx {
            r.disarm_wakeup();
        }
        eventfd_drain(self.rx_event.as_fd());
    }

    /// Sleeps until a frame arrives or `timeout` passes (`None`: forever); returns whether a
    /// frame is ready.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        if !self.prepare_wait() {
            return Ok(true);
        }
        let r = poll_readable(self.rx_event.as_fd(), timeout);
        self.finish_wait();
        r?;
        Ok(self.rx.iter_mut().any(|r| r.available() > 0))
    }

    /// The eventfd that becomes readable when the switch wakes this client (only after
    /// [`Self::prepare_wait`]).
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.rx_event.as_fd()
    }

    /// Errors found in what the switch wrote (should stay zero).
    pub fn errors(&self) -> RingErrors {
        let mut e = self.tx.errors();
        for r in &self.rx {
            e.add(&r.errors());
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn header_layout_is_fixed() {
        assert_eq!(HEADER_SIZE, 64);
        assert_eq!(offset_of!(ShmHeader, version), 8);
        assert_eq!(offset_of!(ShmHeader, to_client_rings), 16);
        assert_eq!(offset_of!(ShmHeader, slot_count), 24);
        assert_eq!(offset_of!(ShmHeader, slot_size), 28);
        assert_eq!(offset_of!(ShmHeader, max_frame), 32);
        assert_eq!(offset_of!(ShmHeader, rings_offset), 40);
        assert_eq!(offset_of!(ShmHeader, total_size), 56);
    }

    #[test]
    fn header_round_trips_and_rejects_inconsistency() {
        let g = ShmGeometry::new(4, 256, 2048, 1514).unwrap();
        let h = g.header();
        assert_eq!(ShmGeometry::from_header(&h, h.total_size), Ok(g));
        assert_eq!(
            ShmGeometry::from_header(&h, h.total_size - 1),
            Err(LayoutError::TooSmall)
        );
        let mut bad = h;
        bad.ring_stride += 64;
        assert!(ShmGeometry::from_header(&bad, u64::MAX).is_err());
        let mut bad = h;
        bad.max_frame = 2041;
        assert!(ShmGeometry::from_header(&bad, u64::MAX).is_err());
        let mut bad = h;
        bad.magic[0] ^= 1;
        assert_eq!(
            ShmGeometry::from_header(&bad, u64::MAX),
            Err(LayoutError::BadMagic)
        );
        // The largest geometry stays far from overflow.
        let g = ShmGeometry::new(MAX_RINGS, MAX_SLOTS, MAX_SLOT_SIZE, 1514).unwrap();
        assert!(g.total_size() < 1 << 43);
    }
}
