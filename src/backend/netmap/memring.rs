//! In-memory netmap regions for tests and benchmarks: rings laid out exactly like netmap's
//! (`struct netmap_ring` header of 256 bytes, 16-byte `struct netmap_slot`s, buffers of
//! `nr_buf_size` bytes found at `ring + buf_ofs + idx * nr_buf_size`), so the ring code runs
//! unchanged over them. [`MemRing`] plays the kernel's part: it moves `tail`, fills rx slots
//! and reads what was transmitted, and can write corrupt values on purpose.
//!
//! API: [`MemRegion::new`] (geometry in [`MemRegionSpec`]), [`MemRegion::ring`],
//! [`TestSync`] (a [`RingSync`] that counts calls and can run a "kernel" action).

use std::alloc::{self, Layout};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::ring::{field, Region, RingSync, RING_HEADER_SIZE, SLOT_SIZE};

/// The page size the region is aligned to (netmap's mapping is page aligned).
const ALIGN: usize = 4096;

/// Geometry of an in-memory region.
#[derive(Clone, Debug)]
pub struct MemRegionSpec {
    /// Slots of each ring, in order.
    pub ring_slots: Vec<u32>,
    /// `nr_buf_size`.
    pub buf_size: u32,
    /// Buffers after the rings. Indices 0 and 1 are reserved (as in netmap); slot `s` of ring
    /// `r` starts with buffer `2 + (slots of rings before r) + s`; the rest are spare.
    pub num_bufs: u32,
    /// The allocator id.
    pub mem_id: u16,
}

/// Owns the aligned allocation behind an in-memory region.
struct Allocation {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the allocation is plain memory owned by this value; it is only freed in Drop.
unsafe impl Send for Allocation {}
// SAFETY: Allocation exposes nothing; accesses go through Region's volatile accessors.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with this layout and is freed only here.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

/// An in-memory netmap region with its rings.
pub struct MemRegion {
    region: Arc<Region>,
    ring_offs: Vec<usize>,
    bufs_off: usize,
    spec: MemRegionSpec,
}

impl MemRegion {
    /// Allocates a zeroed, page-aligned region and lays out the rings: header fields
    /// `num_slots`, `nr_buf_size`, `buf_ofs`, `head = cur = tail = 0` (an empty rx ring;
    /// call [`MemRing::set_tail`] to give a tx ring free slots), and slot buffer indices.
    pub fn new(spec: MemRegionSpec) -> io::Result<MemRegion> {
        let mut ring_offs = Vec::new();
        let mut off = 0usize;
        for &slots in &spec.ring_slots {
            ring_offs.push(off);
            let size = RING_HEADER_SIZE + slots as usize * SLOT_SIZE;
            off += size.div_ceil(256) * 256;
        }
        let bufs_off = off.div_ceil(ALIGN) * ALIGN;
        let len = bufs_off + spec.num_bufs as usize * spec.buf_size as usize;
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "in-memory region",
            ));
        }
        let owner = Box::new(Allocation { ptr, layout });
        // SAFETY: ptr..ptr+len is a fresh allocation owned by `owner`, which the region keeps.
        let region = unsafe { Region::from_raw(ptr, len, spec.mem_id, owner)? };
        let mem = MemRegion {
            region,
            ring_offs,
            bufs_off,
            spec,
        };
        let mut next_buf = 2u32;
        for r in 0..mem.ring_offs.len() {
            let ring = mem.ring(r);
            let ro = mem.ring_offs[r];
            ring.region
                .store_i64(ro + field::BUF_OFS, mem.bufs_off as i64 - ro as i64);
            ring.region
                .store_u32(ro + field::NUM_SLOTS, mem.spec.ring_slots[r]);
            ring.region
                .store_u32(ro + field::NR_BUF_SIZE, mem.spec.buf_size);
            for s in 0..mem.spec.ring_slots[r] {
                ring.set_slot(s, next_buf, 0, 0);
                next_buf += 1;
            }
        }
        Ok(mem)
    }

    /// The region, to attach [`super::ring::NetmapRx`] / [`super::ring::NetmapTx`] to.
    pub fn region(&self) -> Arc<Region> {
        self.region.clone()
    }

    /// Offset of ring `r` in the region.
    pub fn ring_off(&self, r: usize) -> usize {
        self.ring_offs[r]
    }

    /// The kernel's view of ring `r`.
    pub fn ring(&self, r: usize) -> MemRing {
        MemRing {
            region: self.region.clone(),
            ring_off: self.ring_offs[r],
            num_slots: self.spec.ring_slots[r],
            bufs_off: self.bufs_off,
            buf_size: self.spec.buf_size,
            num_bufs: self.spec.num_bufs,
        }
    }
}

/// The kernel's side of one in-memory ring. Panics on out-of-range arguments (test tooling).
#[derive(Clone)]
pub struct MemRing {
    region: Arc<Region>,
    ring_off: usize,
    num_slots: u32,
    bufs_off: usize,
    buf_size: u32,
    num_bufs: u32,
}

impl MemRing {
    /// `num_slots`.
    pub fn num_slots(&self) -> u32 {
        self.num_slots
    }

    fn load(&self, f: usize) -> u32 {
        self.region.load_u32(self.ring_off + f).expect("in range")
    }

    fn store(&self, f: usize, v: u32) {
        assert!(self.region.store_u32(self.ring_off + f, v));
    }

    /// `head`.
    pub fn head(&self) -> u32 {
        self.load(field::HEAD)
    }
    /// `cur`.
    pub fn cur(&self) -> u32 {
        self.load(field::CUR)
    }
    /// `tail`.
    pub fn tail(&self) -> u32 {
        self.load(field::TAIL)
    }
    /// Sets `tail` (any value, also out of range).
    pub fn set_tail(&self, v: u32) {
        self.store(field::TAIL, v)
    }
    /// Sets `head` and `cur` (as a fresh registration would).
    pub fn set_head_cur(&self, v: u32) {
        self.store(field::HEAD, v);
        self.store(field::CUR, v);
    }
    /// Overwrites `num_slots` in the shared header (a hostile peer).
    pub fn set_num_slots_raw(&self, v: u32) {
        self.store(field::NUM_SLOTS, v)
    }

    /// Overwrites `buf_ofs` in the shared header (a hostile peer).
    pub fn set_buf_ofs_raw(&self, v: i64) {
        assert!(self.region.store_i64(self.ring_off + field::BUF_OFS, v));
    }

    fn slot_off(&self, i: u32) -> usize {
        assert!(i < self.num_slots);
        self.ring_off + RING_HEADER_SIZE + i as usize * SLOT_SIZE
    }

    /// `(buf_idx, len, flags)` of slot `i`.
    pub fn slot(&self, i: u32) -> (u32, u16, u16) {
        let s = self.slot_off(i);
        (
            self.region.load_u32(s + field::SLOT_BUF_IDX).unwrap(),
            self.region.load_u16(s + field::SLOT_LEN).unwrap(),
            self.region.load_u16(s + field::SLOT_FLAGS).unwrap(),
        )
    }

    /// Writes slot `i` (any values, also corrupt ones).
    pub fn set_slot(&self, i: u32, buf_idx: u32, len: u16, flags: u16) {
        let s = self.slot_off(i);
        assert!(self.region.store_u32(s + field::SLOT_BUF_IDX, buf_idx));
        assert!(self.region.store_u16(s + field::SLOT_LEN, len));
        assert!(self.region.store_u16(s + field::SLOT_FLAGS, flags));
    }

    /// Copy of buffer `idx`'s first `len` bytes.
    pub fn buf(&self, idx: u32, len: usize) -> Vec<u8> {
        assert!(idx < self.num_bufs && len <= self.buf_size as usize);
        let off = self.bufs_off + idx as usize * self.buf_size as usize;
        self.region.bytes(off, len).expect("in range").to_vec()
    }

    /// Writes `data` to the start of buffer `idx`.
    pub fn write_buf(&self, idx: u32, data: &[u8]) {
        assert!(idx < self.num_bufs && data.len() <= self.buf_size as usize);
        let off = self.bufs_off + idx as usize * self.buf_size as usize;
        assert!(self.region.write_bytes(off, data));
    }

    /// Receives `frame` as the kernel would: writes it into the buffer of slot `tail`, sets
    /// its length and flags 0, advances `tail`. Returns false (nothing written) when the ring
    /// is full (the next tail would reach `head`).
    pub fn push_rx(&self, frame: &[u8]) -> bool {
        let tail = self.tail();
        let next = if tail + 1 == self.num_slots {
            0
        } else {
            tail + 1
        };
        if next == self.head() {
            return false;
        }
        let (idx, _, _) = self.slot(tail);
        self.write_buf(idx, frame);
        self.set_slot(tail, idx, frame.len() as u16, 0);
        self.set_tail(next);
        true
    }

    /// Transmits as the kernel would: returns the frames (with their slot flags) of the
    /// slots from `from` up to `head` (exclusive), clears their flags, and moves `tail` to
    /// just before `head` (every slot free again).
    pub fn drain_tx(&self, from: u32) -> Vec<(Vec<u8>, u16)> {
        let head = self.head();
        let mut out = Vec::new();
        let mut i = from;
        while i != head {
            let (idx, len, flags) = self.slot(i);
            // A corrupt slot (index outside the region) is reported with no bytes.
            let data = if idx < self.num_bufs && u32::from(len) <= self.buf_size {
                self.buf(idx, len as usize)
            } else {
                Vec::new()
            };
            out.push((data, flags));
            self.set_slot(i, idx, len, 0);
            i = if i + 1 == self.num_slots { 0 } else { i + 1 };
        }
        self.set_tail(if head == 0 {
            self.num_slots - 1
        } else {
            head - 1
        });
        out
    }
}

/// A [`RingSync`] for tests: counts calls and runs an optional action on each `rxsync` (to
/// play the kernel delivering frames).
#[derive(Default)]
pub struct TestSync {
    /// `txsync` calls.
    pub txsyncs: AtomicUsize,
    /// `rxsync` calls.
    pub rxsyncs: AtomicUsize,
    /// Make every sync fail.
    pub fail: std::sync::atomic::AtomicBool,
    on_rxsync: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl TestSync {
    /// A shared, counting sync.
    pub fn new() -> Arc<TestSync> {
        Arc::new(TestSync::default())
    }

    /// Runs `action` on every `rxsync`.
    pub fn on_rxsync(&self, action: impl FnMut() + Send + 'static) {
        *self.on_rxsync.lock().unwrap() = Some(Box::new(action));
    }
}

impl RingSync for TestSync {
    fn txsync(&self) -> io::Result<()> {
        self.txsyncs.fetch_add(1, Ordering::Relaxed);
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::other("test sync failure"));
        }
        Ok(())
    }
    fn rxsync(&self) -> io::Result<()> {
        self.rxsyncs.fetch_add(1, Ordering::Relaxed);
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::other("test sync failure"));
        }
        if let Some(action) = self.on_rxsync.lock().unwrap().as_mut() {
            action();
        }
        Ok(())
    }
    fn poll(&self, _events: i16, _timeout_ms: i32) -> io::Result<bool> {
        Ok(true)
    }
}
