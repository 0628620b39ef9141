//! One netmap ring, safely.
//!
//! API:
//! - [`Region`]: a netmap memory region (the `mmap` of `/dev/netmap`, or an in-memory copy for
//!   tests, see [`super::memring`]) with its allocator id (`nr_arg2`).
//! - [`NetmapRx`]: a receive ring as an [`RxQueue`]: lends frames, gives their slots back on
//!   the next `recv`; [`NetmapRx::forward_lent`] moves lent frames to a [`NetmapTx`] by buffer
//!   swap (zero copy) or by copy.
//! - [`NetmapTx`]: a transmit ring as a [`TxQueue`]: copies frames into slots, except
//!   frames lent by an rx ring of the same [`Region`] (recognized by address), which it takes
//!   by buffer swap when zero copy is allowed (see "Zero copy" below).
//! - [`RingSync`]: the syscalls (`NIOCTXSYNC`, `NIOCRXSYNC`, `poll`), replaceable in tests.
//! - [`RingCounters`]: what each ring skipped and why.
//!
//! The layout is netmap's `struct netmap_ring` and `struct netmap_slot` as in `netmap_sys`
//! (checked at compile time below). Everything the ring reads from shared memory is treated
//! as untrusted: a netmap pipe shares its memory allocator with the client process, so a buggy
//! or hostile peer (or kernel) may write any value into any ring header or slot. Ring geometry
//! (`num_slots`, `nr_buf_size`, `buf_ofs`) is read once when the ring is attached and checked
//! against the region; `head`/`cur`/`tail`, buffer indices and lengths are checked on every
//! read. A bad value is counted and skipped, never followed.
//!
//! Zero copy on the generic data path: the worker hands lent frames as `&[u8]` to
//! `TxQueue::send` / `EndpointSink::deliver`. A zero-copy [`NetmapTx`] whose region contains
//! the slice, starting exactly at a buffer, puts that buffer's index into its slot
//! (`NS_BUF_CHANGED`) and records (taken buffer -> the slot's previous buffer) in the region's
//! swap ledger. The lending [`NetmapRx`], before giving its slots back (next `recv`, or drop),
//! puts the recorded replacement into each slot whose buffer was taken (`NS_BUF_CHANGED`).
//! Until then a taken buffer is neither swapped again (a second delivery copies it) nor
//! written (a tx slot holding it counts as not free). Rings of a region must agree on the
//! buffer pool (`ring + buf_ofs`, `nr_buf_size`), as netmap guarantees; others are refused.

use std::any::Any;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use netmap_sys::netmap::{netmap_ring, netmap_slot, NS_BUF_CHANGED, NS_MOREFRAG};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

/// Size of the ring header: slots start here (`offsetof(struct netmap_ring, slot)`).
pub const RING_HEADER_SIZE: usize = offset_of!(netmap_ring, slot);
/// Size of one `struct netmap_slot`.
pub const SLOT_SIZE: usize = size_of::<netmap_slot>();

/// Offsets of the `struct netmap_ring` fields this module uses.
pub(crate) mod field {
    use super::*;
    /// `int64_t buf_ofs`.
    pub const BUF_OFS: usize = offset_of!(netmap_ring, buf_ofs);
    /// `uint32_t num_slots`.
    pub const NUM_SLOTS: usize = offset_of!(netmap_ring, num_slots);
    /// `uint32_t nr_buf_size`.
    pub const NR_BUF_SIZE: usize = offset_of!(netmap_ring, nr_buf_size);
    /// `uint32_t head`.
    pub const HEAD: usize = offset_of!(netmap_ring, head);
    /// `uint32_t cur`.
    pub const CUR: usize = offset_of!(netmap_ring, cur);
    /// `uint32_t tail`.
    pub const TAIL: usize = offset_of!(netmap_ring, tail);
    /// `netmap_slot.buf_idx`.
    pub const SLOT_BUF_IDX: usize = offset_of!(netmap_slot, buf_idx);
    /// `netmap_slot.len`.
    pub const SLOT_LEN: usize = offset_of!(netmap_slot, len);
    /// `netmap_slot.flags`.
    pub const SLOT_FLAGS: usize = offset_of!(netmap_slot, flags);
}

// netmap's ABI (net/netmap.h): the slot array starts at 256 (sem[128] is aligned to 128), a
// slot is 16 bytes. netmap_sys models the alignment with padding; make sure it did.
const _: () = assert!(RING_HEADER_SIZE == 256);
const _: () = assert!(SLOT_SIZE == 16);
const _: () = assert!(field::HEAD == 20 && field::CUR == 24 && field::TAIL == 28);
const _: () = assert!(field::BUF_OFS == 0 && field::NUM_SLOTS == 8 && field::NR_BUF_SIZE == 12);
const _: () = assert!(field::SLOT_BUF_IDX == 0 && field::SLOT_LEN == 4 && field::SLOT_FLAGS == 6);

/// The most slots a ring may have (netmap's own limit is far lower); bounds the geometry.
const MAX_SLOTS: u32 = 1 << 16;

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A netmap memory region: rings and buffers of one memory allocator, mapped into this
/// process. Kept alive (by `Arc`) by every ring that points into it.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    mem_id: u16,
    /// Where the buffers are: set by the first ring attached, every other ring must agree
    /// (netmap gives all rings of an allocator one buffer pool: `ring + buf_ofs` and
    /// `nr_buf_size` are the same for all). Lets a transmit ring name a lent frame's buffer
    /// by its address.
    buffers: OnceLock<BufferGeometry>,
    /// Buffers taken from lent rx slots by transmit rings of this region (zero copy).
    swaps: SwapLedger,
    _owner: Box<dyn Any + Send + Sync>,
}

/// The buffer pool of a region: buffer `i` starts at `bufs_off + i * buf_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BufferGeometry {
    bufs_off: usize,
    buf_size: u32,
    num_bufs: u32,
}

/// One buffer swap not yet settled: a transmit ring put the buffer `taken` (lent by an rx
/// ring of the region) into one of its slots and handed over its slot's previous buffer,
/// `replacement`, which the rx ring puts into the lent slot before giving it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BufSwap {
    taken: u32,
    replacement: u32,
}

/// The most unsettled swaps a region keeps (64 lent frames of 64 rx rings); beyond that,
/// frames are copied. Never reached by the data plane (each rx ring settles its swaps on its
/// next `recv`); it bounds the ledger should a ring misbehave.
const MAX_PENDING_SWAPS: usize = MAX_BATCH * 64;

/// The swap ledger of a region: shared by its rx and tx rings (which may belong to different
/// workers: a pipe's or host ring's sink is shared), so a lock; taken once per transmitted
/// batch that contains a frame lying on one of the region's buffers, and once per `recv` of
/// an rx ring when swaps are pending (`pending` is read without the lock first).
struct SwapLedger {
    swaps: Mutex<Vec<BufSwap>>,
    /// `swaps.len()`, written under the lock.
    pending: AtomicUsize,
}

// SAFETY: a Region is a pointer to shared memory that lives as long as `_owner` (which is Send
// + Sync); the Region itself never creates references to that memory, only volatile accesses
// and short-lived byte slices under the ring ownership protocol (see NetmapRx / NetmapTx), so
// sharing the pointer between threads is no different from sharing the mapping.
unsafe impl Send for Region {}
// SAFETY: see Send; all accesses through &Region are volatile reads/writes of plain integers.
unsafe impl Sync for Region {}

impl Region {
    /// Wraps memory at `base..base + len`, kept alive by `owner`, as the region of allocator
    /// `mem_id`.
    ///
    /// # Safety
    /// `base..base + len` must be readable and writable (and not be accessed through Rust
    /// references elsewhere) for as long as `owner` lives; `owner` is dropped with the region.
    pub unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        mem_id: u16,
        owner: Box<dyn Any + Send + Sync>,
    ) -> io::Result<Arc<Region>> {
        let base = NonNull::new(base).ok_or_else(|| invalid("null netmap region"))?;
        if !(base.as_ptr() as usize).is_multiple_of(8) || len > isize::MAX as usize {
            return Err(invalid("misaligned or oversized netmap region"));
        }
        Ok(Arc::new(Region {
            base,
            len,
            mem_id,
            buffers: OnceLock::new(),
            swaps: SwapLedger {
                swaps: Mutex::new(Vec::with_capacity(MAX_BATCH)),
                pending: AtomicUsize::new(0),
            },
            _owner: owner,
        }))
    }

    /// Records the buffer geometry of a ring being attached; false when it differs from that
    /// of the rings attached before.
    fn agree_on_buffers(&self, geometry: BufferGeometry) -> bool {
        *self.buffers.get_or_init(|| geometry) == geometry
    }

    /// The index of the buffer `frame` starts at, if `frame` lies in this region's memory,
    /// starts exactly at a buffer and fits in it. Compares addresses only: nothing is
    /// dereferenced, so any slice may be asked about.
    pub(crate) fn buffer_index_of(&self, frame: &[u8]) -> Option<u32> {
        let g = self.buffers.get()?;
        let off = (frame.as_ptr() as usize).checked_sub(self.base.as_ptr() as usize)?;
        let rel = off.checked_sub(g.bufs_off)?;
        let size = g.buf_size as usize;
        if !rel.is_multiple_of(size) || frame.len() > size {
            return None;
        }
        let idx = u32::try_from(rel / size).ok()?;
        (idx < g.num_bufs).then_some(idx)
    }

    /// Whether swaps may be pending (a hint read without the lock; exact for the swaps of the
    /// calling thread's own rings, whose entries only that thread adds and removes).
    fn swaps_pending(&self) -> bool {
        self.swaps.pending.load(Ordering::Relaxed) != 0
    }

    /// Locks the swap ledger (a poisoned lock is taken over: the ledger is a plain list that
    /// no panic can leave half-written).
    fn ledger(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            swaps: self
                .swaps
                .swaps
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            pending: &self.swaps.pending,
        }
    }
}

/// The locked ledger; publishes its length to `pending` when unlocked.
struct LedgerGuard<'a> {
    swaps: MutexGuard<'a, Vec<BufSwap>>,
    pending: &'a AtomicUsize,
}

impl LedgerGuard<'_> {
    fn is_taken(&self, idx: u32) -> bool {
        self.swaps.iter().any(|s| s.taken == idx)
    }
}

impl Drop for LedgerGuard<'_> {
    fn drop(&mut self) {
        self.pending.store(self.swaps.len(), Ordering::Relaxed);
    }
}

impl Region {
    /// The memory allocator id (`nr_arg2` of the registration): buffer indices of regions with
    /// the same id name the same buffers, so slots may swap them.
    pub fn mem_id(&self) -> u16 {
        self.mem_id
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer to `size` bytes at `off`, aligned to `align`, if they lie inside the region.
    fn ptr_at(&self, off: usize, size: usize, align: usize) -> Option<*mut u8> {
        let end = off.checked_add(size)?;
        if end > self.len || !off.is_multiple_of(align) {
            return None;
        }
        // SAFETY: off + size <= len, so the pointer stays inside the allocation (the region is
        // at most isize::MAX bytes, checked in from_raw).
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    /// Reads the u32 at `off` (volatile: the memory is shared with the kernel and peers).
    pub(crate) fn load_u32(&self, off: usize) -> Option<u32> {
        let p = self.ptr_at(off, 4, 4)?;
        // SAFETY: p is in bounds and 4-aligned (ptr_at); u32 has no invalid bit patterns.
        Some(unsafe { (p as *const u32).read_volatile() })
    }

    /// Writes the u32 at `off`; returns false when out of bounds.
    pub(crate) fn store_u32(&self, off: usize, v: u32) -> bool {
        match self.ptr_at(off, 4, 4) {
            // SAFETY: in bounds and aligned (ptr_at); the region is writable (from_raw contract).
            Some(p) => unsafe {
                (p as *mut u32).write_volatile(v);
                true
            },
            None => false,
        }
    }

    /// Reads the u16 at `off`.
    pub(crate) fn load_u16(&self, off: usize) -> Option<u16> {
        let p = self.ptr_at(off, 2, 2)?;
        // SAFETY: in bounds and aligned (ptr_at).
        Some(unsafe { (p as *const u16).read_volatile() })
    }

    /// Writes the u16 at `off`; returns false when out of bounds.
    pub(crate) fn store_u16(&self, off: usize, v: u16) -> bool {
        match self.ptr_at(off, 2, 2) {
            // SAFETY: in bounds and aligned (ptr_at); the region is writable.
            Some(p) => unsafe {
                (p as *mut u16).write_volatile(v);
                true
            },
            None => false,
        }
    }

    /// Reads the i64 at `off`.
    pub(crate) fn load_i64(&self, off: usize) -> Option<i64> {
        let p = self.ptr_at(off, 8, 8)?;
        // SAFETY: in bounds and aligned (ptr_at).
        Some(unsafe { (p as *const i64).read_volatile() })
    }

    /// Writes the i64 at `off`; returns false when out of bounds.
    pub(crate) fn store_i64(&self, off: usize, v: i64) -> bool {
        match self.ptr_at(off, 8, 8) {
            // SAFETY: in bounds and aligned (ptr_at); the region is writable.
            Some(p) => unsafe {
                (p as *mut i64).write_volatile(v);
                true
            },
            None => false,
        }
    }

    /// Copies `data` into the region at `off`; false when out of bounds.
    pub(crate) fn write_bytes(&self, off: usize, data: &[u8]) -> bool {
        match self.ptr_at(off, data.len(), 1) {
            // SAFETY: the destination range is inside the region (ptr_at) and writable (from_raw
            // contract); `data` may itself lie in this region (a lent frame), so copy with
            // memmove semantics (ptr::copy), which allows overlap.
            Some(p) => unsafe {
                std::ptr::copy(data.as_ptr(), p, data.len());
                true
            },
            None => false,
        }
    }

    /// Borrows `len` bytes at `off` as a slice, if in bounds.
    ///
    /// The bytes are shared memory: the ring protocol gives them to us (the kernel does not
    /// write a buffer while userspace owns its slot), but a hostile peer mapping the same
    /// allocator could; `u8` has no invalid values, so the worst it can do is change frame
    /// contents under us, which the data plane treats as untrusted input anyway.
    pub(crate) fn bytes(&self, off: usize, len: usize) -> Option<&[u8]> {
        let p = self.ptr_at(off, len, 1)?;
        // SAFETY: in bounds (ptr_at), lives as long as &self (the region keeps the mapping).
        Some(unsafe { std::slice::from_raw_parts(p, len) })
    }
}

/// The syscalls a ring needs. The real one is [`FdSync`]; tests substitute their own.
pub trait RingSync: Send {
    /// `ioctl(NIOCTXSYNC)`: publishes the tx slots up to `head`, reclaims sent ones.
    fn txsync(&self) -> io::Result<()>;
    /// `ioctl(NIOCRXSYNC)`: returns rx slots before `head`, fetches new frames.
    fn rxsync(&self) -> io::Result<()>;
    /// `poll` for `events` (`POLLIN`/`POLLOUT`) up to `timeout_ms`; true when ready.
    fn poll(&self, events: i16, timeout_ms: i32) -> io::Result<bool>;
    /// The file descriptor an idle worker may `poll(2)` for `POLLIN` (netmap runs `rxsync`
    /// in poll), if there is one. The default: none.
    fn wait_fd(&self) -> Option<i32> {
        None
    }
}

impl<T: RingSync + Sync> RingSync for Arc<T> {
    fn txsync(&self) -> io::Result<()> {
        (**self).txsync()
    }
    fn rxsync(&self) -> io::Result<()> {
        (**self).rxsync()
    }
    fn poll(&self, events: i16, timeout_ms: i32) -> io::Result<bool> {
        (**self).poll(events, timeout_ms)
    }
    fn wait_fd(&self) -> Option<i32> {
        (**self).wait_fd()
    }
}

/// [`RingSync`] on a registered `/dev/netmap` file descriptor.
#[derive(Clone)]
pub struct FdSync(pub Arc<OwnedFd>);

impl FdSync {
    fn ioctl(&self, request: libc::c_uint, name: &str) -> io::Result<()> {
        // SAFETY: NIOCTXSYNC/NIOCRXSYNC take no argument; the fd is open (owned by self).
        let ret = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("ioctl({name}): {e}")));
        }
        Ok(())
    }
}

impl RingSync for FdSync {
    fn wait_fd(&self) -> Option<i32> {
        Some(self.0.as_raw_fd())
    }
    fn txsync(&self) -> io::Result<()> {
        self.ioctl(netmap_sys::netmap::NIOCTXSYNC, "NIOCTXSYNC")
    }
    fn rxsync(&self) -> io::Result<()> {
        self.ioctl(netmap_sys::netmap::NIOCRXSYNC, "NIOCRXSYNC")
    }
    fn poll(&self, events: i16, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(io::Error::new(e.kind(), format!("poll(netmap): {e}")));
        }
        Ok(ret > 0 && pfd.revents & events != 0)
    }
}

/// What a ring skipped or did, per reason. Plain counters: a ring has one owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// Frames received (rx) or queued for transmission (tx).
    pub frames: u64,
    /// Slots with a buffer index outside the region or a length above the buffer size
    /// (or zero on rx): skipped.
    pub corrupt_slots: u64,
    /// Times `head`/`cur`/`tail` read from the ring was out of range: nothing moved.
    pub bad_ring_state: u64,
    /// Frames spanning several slots (`NS_MOREFRAG`): dropped (we send and accept only
    /// single-slot frames).
    pub multi_slot_frames: u64,
    /// Frames too large for a buffer: dropped (tx).
    pub oversize: u64,
    /// Failed `NIOCTXSYNC`/`NIOCRXSYNC` calls.
    pub sync_errors: u64,
    /// Frames moved by buffer swap: rx, lent buffers given away (`forward_lent`, or taken
    /// by a transmit ring and settled); tx, frames sent by swap.
    pub swapped: u64,
    /// Frames moved by copy: rx, by `forward_lent`; tx, frames copied by `send`.
    pub copied: u64,
}

/// The checked geometry of one ring in a region.
struct RingView {
    region: Arc<Region>,
    /// Offset of the `struct netmap_ring` in the region.
    ring_off: usize,
    num_slots: u32,
    buf_size: u32,
    /// Offset of buffer 0 in the region (ring + buf_ofs).
    bufs_off: usize,
    /// Buffers with index below this lie entirely inside the region.
    num_bufs: u32,
}

impl RingView {
    /// Reads the geometry of the ring at `ring_off` once, and checks it against the region.
    fn new(region: Arc<Region>, ring_off: usize) -> io::Result<RingView> {
        if !ring_off.is_multiple_of(8) {
            return Err(invalid("misaligned netmap ring"));
        }
        let header = |f| {
            ring_off
                .checked_add(f)
                .ok_or_else(|| invalid("netmap ring outside region"))
        };
        let buf_ofs = region
            .load_i64(header(field::BUF_OFS)?)
            .ok_or_else(|| invalid("netmap ring outside region"))?;
        let num_slots = region
            .load_u32(header(field::NUM_SLOTS)?)
            .ok_or_else(|| invalid("netmap ring outside region"))?;
        let buf_size = region
            .load_u32(header(field::NR_BUF_SIZE)?)
            .ok_or_else(|| invalid("netmap ring outside region"))?;
        if num_slots == 0 || num_slots > MAX_SLOTS {
            return Err(invalid("netmap ring with bad num_slots"));
        }
        let slots_end = ring_off
            .checked_add(RING_HEADER_SIZE + num_slots as usize * SLOT_SIZE)
            .filter(|&e| e <= region.len())
            .ok_or_else(|| invalid("netmap ring slots outside region"))?;
        let _ = slots_end;
        if buf_size == 0 || buf_size > u16::MAX as u32 + 1 {
            return Err(invalid("netmap ring with bad nr_buf_size"));
        }
        let bufs_off = i128::from(ring_off as u64) + i128::from(buf_ofs);
        if bufs_off < 0 || bufs_off > region.len() as i128 {
            return Err(invalid("netmap buffers outside region"));
        }
        let bufs_off = bufs_off as usize;
        let num_bufs = ((region.len() - bufs_off) / buf_size as usize).min(u32::MAX as usize);
        let geometry = BufferGeometry {
            bufs_off,
            buf_size,
            num_bufs: num_bufs as u32,
        };
        if !region.agree_on_buffers(geometry) {
            return Err(invalid(
                "netmap ring whose buffers differ from the other rings of its region",
            ));
        }
        let view = RingView {
            region,
            ring_off,
            num_slots,
            buf_size,
            bufs_off,
            num_bufs: num_bufs as u32,
        };
        for f in [field::HEAD, field::CUR, field::TAIL] {
            if view.load(f) >= num_slots {
                return Err(invalid("netmap ring with head/cur/tail out of range"));
            }
        }
        Ok(view)
    }

    /// Reads a u32 header field; out-of-range reads (impossible after `new`) give u32::MAX,
    /// which every caller rejects as an index.
    fn load(&self, f: usize) -> u32 {
        self.region.load_u32(self.ring_off + f).unwrap_or(u32::MAX)
    }

    fn store(&self, f: usize, v: u32) {
        let stored = self.region.store_u32(self.ring_off + f, v);
        debug_assert!(stored);
    }

    fn slot_off(&self, i: u32) -> usize {
        debug_assert!(i < self.num_slots);
        self.ring_off + RING_HEADER_SIZE + i as usize * SLOT_SIZE
    }

    /// `(buf_idx, len, flags)` of slot `i` (`i < num_slots`).
    fn slot(&self, i: u32) -> (u32, u16, u16) {
        let s = self.slot_off(i);
        let r = &self.region;
        (
            r.load_u32(s + field::SLOT_BUF_IDX).unwrap_or(u32::MAX),
            r.load_u16(s + field::SLOT_LEN).unwrap_or(u16::MAX),
            r.load_u16(s + field::SLOT_FLAGS).unwrap_or(0),
        )
    }

    fn set_slot(&self, i: u32, buf_idx: u32, len: u16, flags: u16) {
        let s = self.slot_off(i);
        let r = &self.region;
        let ok = r.store_u32(s + field::SLOT_BUF_IDX, buf_idx)
            & r.store_u16(s + field::SLOT_LEN, len)
            & r.store_u16(s + field::SLOT_FLAGS, flags);
        debug_assert!(ok);
    }

    /// Offset of buffer `idx` in the region, if the whole buffer lies inside it.
    fn buf_off(&self, idx: u32) -> Option<usize> {
        (idx < self.num_bufs).then(|| self.bufs_off + idx as usize * self.buf_size as usize)
    }

    fn next(&self, i: u32) -> u32 {
        if i + 1 == self.num_slots {
            0
        } else {
            i + 1
        }
    }

    /// Slots from `from` to `to` going forward (the netmap "tail - head" with wrap).
    fn distance(&self, from: u32, to: u32) -> u32 {
        if to >= from {
            to - from
        } else {
            to + self.num_slots - from
        }
    }

    /// Gives slots before `head` to the kernel: `cur = head = head`.
    fn publish(&self, head: u32) {
        // Slot writes must be visible before the new head (the kernel may run on another CPU
        // in busy-poll modes; for the ioctl path the syscall orders them anyway).
        fence(Ordering::Release);
        self.store(field::CUR, head);
        self.store(field::HEAD, head);
    }

    /// The ring's `tail`, if in range.
    fn tail(&self) -> Option<u32> {
        let t = self.load(field::TAIL);
        fence(Ordering::Acquire);
        (t < self.num_slots).then_some(t)
    }
}

/// Marks a lent frame that was already forwarded (its slot holds another buffer now).
const FORWARDED: u32 = u32::MAX;

/// A netmap receive ring as an [`RxQueue`].
pub struct NetmapRx<S: RingSync> {
    ring: RingView,
    sync: S,
    /// Our `head`: the first slot not yet lent (we do not trust the shared copy).
    head: u32,
    /// The first slot after the frames lent by the last `recv`; given back on the next one.
    lent_end: Option<u32>,
    /// Slot index of each frame lent by the last `recv`, in batch order.
    lent_slots: [u32; MAX_BATCH],
    /// Buffer index of each frame lent by the last `recv` (as it was when lent: the shared
    /// slot may be rewritten by a peer since), to settle swaps ([`Region::buffer_index_of`]).
    lent_bufs: [u32; MAX_BATCH],
    lent_count: usize,
    /// Inside a multi-slot frame being dropped.
    in_fragment: bool,
    counters: RingCounters,
    /// Keeps resources alive as long as the ring (netmap pipe id lease...).
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl<S: RingSync> NetmapRx<S> {
    /// Attaches to the receive ring at `ring_off` of `region`, synchronized through `sync`.
    pub fn new(region: Arc<Region>, ring_off: usize, sync: S) -> io::Result<Self> {
        let ring = RingView::new(region, ring_off)?;
        let head = ring.load(field::HEAD);
        Ok(NetmapRx {
            ring,
            sync,
            head,
            lent_end: None,
            lent_slots: [FORWARDED; MAX_BATCH],
            lent_bufs: [FORWARDED; MAX_BATCH],
            lent_count: 0,
            in_fragment: false,
            counters: RingCounters::default(),
            _keep: None,
        })
    }

    /// Keeps `keep` alive as long as this ring.
    pub fn keep(mut self, keep: Arc<dyn Any + Send + Sync>) -> Self {
        self._keep = Some(keep);
        self
    }

    /// The counters.
    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    /// The region this ring lives in.
    pub fn region(&self) -> &Arc<Region> {
        &self.ring.region
    }

    /// Waits up to `timeout_ms` for frames (`poll` with `POLLIN`).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        self.sync.poll(libc::POLLIN, timeout_ms)
    }

    /// Gives the frames lent by the last `recv` back to the kernel. A lent buffer that a
    /// transmit ring of this region took (zero copy, see [`NetmapTx`]'s `send`) is replaced
    /// in its slot by the buffer the transmit ring gave for it (`NS_BUF_CHANGED`).
    fn release(&mut self) {
        if self.lent_count > 0 && self.ring.region.swaps_pending() {
            self.settle_swaps();
        }
        if let Some(end) = self.lent_end.take() {
            self.ring.publish(end);
        }
        self.lent_count = 0;
    }

    /// Puts the replacement buffer into each lent slot whose buffer was taken, and removes
    /// those swaps from the ledger (one lock; `lent_count` x pending swaps comparisons).
    fn settle_swaps(&mut self) {
        let region = self.ring.region.clone();
        let mut ledger = region.ledger();
        for i in 0..self.lent_count.min(MAX_BATCH) {
            let slot = self.lent_slots[i];
            if slot == FORWARDED {
                continue;
            }
            let lent = self.lent_bufs[i];
            let Some(pos) = ledger.swaps.iter().position(|s| s.taken == lent) else {
                continue;
            };
            let swap = ledger.swaps.swap_remove(pos);
            // The transmit ring checked the replacement against the same buffer geometry
            // (one per region): out of range cannot happen; count it should it anyway. The
            // slot gets it regardless: the taken buffer belongs to the tx ring now.
            if self.ring.buf_off(swap.replacement).is_none() {
                self.counters.corrupt_slots += 1;
            }
            self.ring
                .set_slot(slot, swap.replacement, 0, NS_BUF_CHANGED);
            self.counters.swapped += 1;
        }
    }

    /// Number of frames the kernel has handed us beyond `self.head`, syncing once if none.
    fn available(&mut self) -> u32 {
        let mut tail = match self.ring.tail() {
            Some(t) => t,
            None => {
                self.counters.bad_ring_state += 1;
                return 0;
            }
        };
        if tail == self.head {
            if self.sync.rxsync().is_err() {
                self.counters.sync_errors += 1;
                return 0;
            }
            tail = match self.ring.tail() {
                Some(t) => t,
                None => {
                    self.counters.bad_ring_state += 1;
                    return 0;
                }
            };
        }
        self.ring.distance(self.head, tail)
    }

    /// Moves the `index`-th frame lent by the last `recv` to `tx`: by swapping buffer
    /// indices when both rings are in the same memory allocator and `tx` allows zero copy
    /// (both slots get `NS_BUF_CHANGED`), by copying otherwise. Publishes the tx slot (new
    /// `head`); call [`NetmapTx::flush`] after a batch of forwards to start transmission.
    pub fn forward_lent<T: RingSync>(&mut self, index: usize, tx: &mut NetmapTx<T>) -> Forwarded {
        if index >= self.lent_count || self.lent_slots[index] == FORWARDED {
            return Forwarded::NotLent;
        }
        let rx_slot = self.lent_slots[index];
        if tx.space() == 0 {
            return Forwarded::NoSpace;
        }
        let (rx_idx, rx_len, _) = self.ring.slot(rx_slot);
        // recv checked this slot, but the shared memory may have changed since: check again.
        let Some(rx_off) = self.ring.buf_off(rx_idx) else {
            self.counters.corrupt_slots += 1;
            return Forwarded::Dropped;
        };
        if rx_len == 0 || u32::from(rx_len) > self.ring.buf_size {
            self.counters.corrupt_slots += 1;
            return Forwarded::Dropped;
        }
        let same_allocator = Arc::ptr_eq(&self.ring.region, &tx.ring.region)
            || self.ring.region.mem_id() == tx.ring.region.mem_id();
        let tx_slot = tx.head;
        let (tx_idx, _, _) = tx.ring.slot(tx_slot);
        // A buffer taken by a transmit ring in this batch (or a tx slot holding one) must not
        // move again before the swap is settled.
        let is_taken =
            |region: &Region, idx| region.swaps_pending() && region.ledger().is_taken(idx);
        if is_taken(&tx.ring.region, tx_idx) {
            // The tx slot holds a buffer swapped in from an rx slot not given back yet (see
            // NetmapTx's send): not reusable until that swap is settled.
            return Forwarded::NoSpace;
        }
        let taken = is_taken(&self.ring.region, rx_idx);
        let zero_copy = tx.zero_copy
            && same_allocator
            && !taken
            && u32::from(rx_len) <= tx.ring.buf_size
            && tx.ring.buf_off(rx_idx).is_some()
            && self.ring.buf_off(tx_idx).is_some();
        let result = if zero_copy {
            tx.ring.set_slot(tx_slot, rx_idx, rx_len, NS_BUF_CHANGED);
            self.ring.set_slot(rx_slot, tx_idx, 0, NS_BUF_CHANGED);
            self.counters.swapped += 1;
            Forwarded::Swapped
        } else {
            let Some(frame) = self.ring.region.bytes(rx_off, usize::from(rx_len)) else {
                self.counters.corrupt_slots += 1;
                return Forwarded::Dropped;
            };
            match tx.fill_slot(tx_slot, frame) {
                FillResult::Filled => {
                    self.counters.copied += 1;
                    Forwarded::Copied
                }
                FillResult::Skipped => Forwarded::Dropped,
            }
        };
        self.lent_slots[index] = FORWARDED;
        tx.head = tx.ring.next(tx_slot);
        tx.counters.frames += 1;
        tx.ring.publish(tx.head);
        result
    }
}

impl<S: RingSync> Drop for NetmapRx<S> {
    /// Settles this ring's swaps (a taken buffer must not stay in two rings) and gives the
    /// lent slots back.
    fn drop(&mut self) {
        self.release();
    }
}

/// What [`NetmapRx::forward_lent`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// Moved by swapping buffer indices (zero copy).
    Swapped,
    /// Copied into a tx buffer.
    Copied,
    /// The tx ring is full; the frame stays lent (try again or drop it).
    NoSpace,
    /// The rx or tx slot was corrupt: counted and skipped.
    Dropped,
    /// No such lent frame (index out of range, or already forwarded).
    NotLent,
}

impl<S: RingSync> RxQueue for NetmapRx<S> {
    fn prepare_wait(&mut self) -> Option<i32> {
        self.sync.wait_fd()
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        self.release();
        let avail = self.available();
        let mut slot = self.head;
        let mut taken = 0;
        let mut pushed = 0;
        while taken < avail && !batch.is_full() {
            let (idx, len, flags) = self.ring.slot(slot);
            let this = slot;
            slot = self.ring.next(slot);
            taken += 1;
            let more = flags & NS_MOREFRAG != 0;
            if self.in_fragment || more {
                // Drop every slot of a multi-slot frame; count the frame once, at its end.
                self.in_fragment = more;
                if !more {
                    self.counters.multi_slot_frames += 1;
                }
                continue;
            }
            let off = match self.ring.buf_off(idx) {
                Some(off) if len != 0 && u32::from(len) <= self.ring.buf_size => off,
                _ => {
                    self.counters.corrupt_slots += 1;
                    continue;
                }
            };
            let Some(frame) = self.ring.region.bytes(off, usize::from(len)) else {
                self.counters.corrupt_slots += 1;
                continue;
            };
            self.lent_slots[pushed] = this;
            self.lent_bufs[pushed] = idx;
            batch.push(frame);
            pushed += 1;
        }
        if taken > 0 {
            self.head = slot;
            self.lent_end = Some(slot);
        }
        self.lent_count = pushed;
        self.counters.frames += pushed as u64;
        pushed
    }
}

enum FillResult {
    Filled,
    Skipped,
}

/// A netmap transmit ring as a [`TxQueue`].
pub struct NetmapTx<S: RingSync> {
    ring: RingView,
    sync: S,
    /// Our `head`: the next slot to fill.
    head: u32,
    zero_copy: bool,
    counters: RingCounters,
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl<S: RingSync> NetmapTx<S> {
    /// Attaches to the transmit ring at `ring_off` of `region`. `zero_copy` allows
    /// [`NetmapRx::forward_lent`] to swap buffers into this ring (`NO_ZERO_COPY=true` turns
    /// it off).
    pub fn new(region: Arc<Region>, ring_off: usize, sync: S, zero_copy: bool) -> io::Result<Self> {
        let ring = RingView::new(region, ring_off)?;
        let head = ring.load(field::HEAD);
        Ok(NetmapTx {
            ring,
            sync,
            head,
            zero_copy,
            counters: RingCounters::default(),
            _keep: None,
        })
    }

    /// Keeps `keep` alive as long as this ring.
    pub fn keep(mut self, keep: Arc<dyn Any + Send + Sync>) -> Self {
        self._keep = Some(keep);
        self
    }

    /// The counters.
    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    /// The region this ring lives in.
    pub fn region(&self) -> &Arc<Region> {
        &self.ring.region
    }

    /// Whether buffer swaps into this ring are allowed.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Free slots (without syncing); 0 when the ring's `tail` is out of range.
    pub fn space(&mut self) -> u32 {
        match self.ring.tail() {
            Some(tail) => self.ring.distance(self.head, tail),
            None => {
                self.counters.bad_ring_state += 1;
                0
            }
        }
    }

    /// `NIOCTXSYNC`: starts transmission of published slots and reclaims sent ones.
    pub fn flush(&mut self) {
        if self.sync.txsync().is_err() {
            self.counters.sync_errors += 1;
        }
    }

    /// Waits up to `timeout_ms` for free slots (`poll` with `POLLOUT`).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        self.sync.poll(libc::POLLOUT, timeout_ms)
    }

    /// Puts buffer `idx` (a frame of `len` bytes lent by an rx ring of this region) into slot
    /// `i` with `NS_BUF_CHANGED` and records the slot's previous buffer as its replacement.
    /// Refused (the caller copies) when the buffer was already taken in this batch (a frame
    /// delivered twice), when the slot's own buffer is corrupt or still lent (taken from an rx
    /// slot not yet given back), or when the ledger is full.
    fn swap_into_slot(
        &mut self,
        i: u32,
        idx: u32,
        len: usize,
        ledger: &mut LedgerGuard<'_>,
    ) -> bool {
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        let (old, _, _) = self.ring.slot(i);
        if self.ring.buf_off(idx).is_none()
            || self.ring.buf_off(old).is_none()
            || ledger.swaps.len() >= MAX_PENDING_SWAPS
            || ledger.is_taken(idx)
            || ledger.is_taken(old)
        {
            return false;
        }
        self.ring.set_slot(i, idx, len, NS_BUF_CHANGED);
        ledger.swaps.push(BufSwap {
            taken: idx,
            replacement: old,
        });
        true
    }

    /// Copies `frame` into slot `i`'s buffer. A slot whose buffer index is corrupt is
    /// consumed with length 0 (netmap drops empty tx slots) and counted.
    fn fill_slot(&mut self, i: u32, frame: &[u8]) -> FillResult {
        let (idx, _, _) = self.ring.slot(i);
        match self.ring.buf_off(idx) {
            Some(off) if self.ring.region.write_bytes(off, frame) => {
                self.ring.set_slot(i, idx, frame.len() as u16, 0);
                FillResult::Filled
            }
            _ => {
                self.counters.corrupt_slots += 1;
                self.ring.set_slot(i, idx, 0, 0);
                FillResult::Skipped
            }
        }
    }
}

impl<S: RingSync> TxQueue for NetmapTx<S> {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let mut space = self.space();
        if (space as usize) < frames.len() {
            // Reclaim slots the NIC has sent.
            self.flush();
            space = self.space();
        }
        // Zero copy: frames lent by an rx ring of this region are recognized by address and
        // moved by buffer swap. The ledger is locked once per batch: at the first such frame,
        // or at once when swaps are pending (a slot of this ring may hold a taken buffer).
        let region = self.zero_copy.then(|| self.ring.region.clone());
        let mut ledger = region
            .as_deref()
            .filter(|r| r.swaps_pending())
            .map(Region::ledger);
        let mut accepted = 0;
        for frame in frames {
            if space == 0 {
                break;
            }
            if frame.len() > self.ring.buf_size as usize || frame.is_empty() {
                // Dropped here (counted), but consumed: the caller must not count it again.
                self.counters.oversize += 1;
                accepted += 1;
                continue;
            }
            let slot = self.head;
            if let Some(ledger) = &ledger {
                // This slot's buffer was swapped in from an rx slot not given back yet (the
                // ring went round within one batch): it is still lent, so it must be neither
                // written nor swapped out. The ring counts as full until the swap is settled.
                if ledger.is_taken(self.ring.slot(slot).0) {
                    break;
                }
            }
            accepted += 1;
            let lent = region
                .as_deref()
                .and_then(|r| Some((r, r.buffer_index_of(frame)?)));
            if let Some((region, idx)) = lent {
                let ledger = ledger.get_or_insert_with(|| region.ledger());
                if self.swap_into_slot(slot, idx, frame.len(), ledger) {
                    self.counters.frames += 1;
                    self.counters.swapped += 1;
                    self.head = self.ring.next(slot);
                    space -= 1;
                    continue;
                }
            }
            if let FillResult::Filled = self.fill_slot(slot, frame) {
                self.counters.frames += 1;
                self.counters.copied += 1;
            }
            self.head = self.ring.next(slot);
            space -= 1;
        }
        drop(ledger);
        if accepted > 0 {
            self.ring.publish(self.head);
            self.flush();
        }
        accepted
    }
}

/// A transmit ring shared by several threads (a lock around [`NetmapTx`]): the sink of an
/// endpoint whose channel has one ring (host rings, netmap pipes), or a NIC transmit queue
/// when more queues than hardware rings were asked for. Uncontended in the common case.
pub struct SharedTx<S: RingSync>(pub Arc<Mutex<NetmapTx<S>>>);

impl<S: RingSync> SharedTx<S> {
    /// Shares `tx`.
    pub fn new(tx: NetmapTx<S>) -> Self {
        SharedTx(Arc::new(Mutex::new(tx)))
    }

    fn send_locked(&self, frames: &[&[u8]]) -> usize {
        let mut tx = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tx.send(frames)
    }
}

impl<S: RingSync> Clone for SharedTx<S> {
    fn clone(&self) -> Self {
        SharedTx(self.0.clone())
    }
}

impl<S: RingSync> TxQueue for SharedTx<S> {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.send_locked(frames)
    }
}

impl<S: RingSync + Sync> EndpointSink for SharedTx<S> {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        self.send_locked(frames)
    }
}
