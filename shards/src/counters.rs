//! Counters: every frame a worker handles ends up in exactly one of them, so "where did my
//! packet go" is always answerable.
//!
//! Each worker owns one [`WorkerCounters`] (shared as `Arc` with whoever reports). Only that
//! worker writes it; anybody reads it at any time without a lock. The worker adds up a batch
//! in a plain [`CounterBatch`] and [`CounterBatch::flush`]es it once per batch, so the hot path
//! does no atomic read-modify-write per frame: a flush is a relaxed load plus a relaxed store
//! per touched counter (correct because there is a single writer).
//!
//! Accounting: every frame a worker takes from a queue (the NIC's, or an endpoint's source)
//! ends in exactly one of: delivered to an endpoint, sent to the NIC, dropped with a reason.
//! A frame copied to several places (ARP, EAPOL, neighbour discovery) counts once per place and
//! adds the extra places to `copies`, so for any set of workers
//! `frames_in + sent_by_endpoints + copies == delivered + frames_out + drops`
//! (see [`CounterSnapshot::balance`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::endpoint::EndpointId;

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than the headers it announces.
    Truncated = 0,
    /// Header fields that cannot be right (bad IHL, bad version, bad length).
    Malformed,
    /// An EtherType or IP protocol the switch does not forward.
    Unsupported,
    /// Destination (or source) is a loopback address.
    Loopback,
    /// No rule matches (for the kernel: the firewall).
    NoRule,
    /// A non-first IPv4/IPv6 fragment whose first fragment was not seen (or has expired).
    FragmentWithoutFirst,
    /// The fragment table was full when a first fragment arrived.
    FragmentTableFull,
    /// The destination endpoint's channel had no room.
    ChannelFull,
    /// The NIC transmit queue had no room.
    TxFull,
    /// The rule points back to the endpoint the frame came from.
    Bounce,
    /// An endpoint sent a frame whose source (IP, protocol, port) belongs to another endpoint.
    SpoofedSource,
    /// The rule names an endpoint that no longer exists.
    NoEndpoint,
}

impl DropReason {
    /// Number of reasons (array size for per-reason counters).
    pub const COUNT: usize = 12;

    /// All reasons, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::Loopback,
        DropReason::NoRule,
        DropReason::FragmentWithoutFirst,
        DropReason::FragmentTableFull,
        DropReason::ChannelFull,
        DropReason::TxFull,
        DropReason::Bounce,
        DropReason::SpoofedSource,
        DropReason::NoEndpoint,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::Loopback => "loopback",
            DropReason::NoRule => "no_rule",
            DropReason::FragmentWithoutFirst => "fragment_without_first",
            DropReason::FragmentTableFull => "fragment_table_full",
            DropReason::ChannelFull => "channel_full",
            DropReason::TxFull => "tx_full",
            DropReason::Bounce => "bounce",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoEndpoint => "no_endpoint",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Endpoints a worker counts individually (ids `0..MAX_ENDPOINTS`); higher ids share the
/// overflow slot at index `MAX_ENDPOINTS`.
pub const MAX_ENDPOINTS: usize = 1024;

/// Number of per-endpoint slots: one per counted endpoint plus the overflow slot.
pub const ENDPOINT_SLOTS: usize = MAX_ENDPOINTS + 1;

/// The per-endpoint slot of an endpoint id (the overflow slot for ids beyond capacity).
#[inline]
pub fn endpoint_slot(id: EndpointId) -> usize {
    id.index().min(MAX_ENDPOINTS)
}

/// Plain per-endpoint figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    /// Frames delivered into this endpoint's channel.
    pub delivered_frames: u64,
    /// Bytes of those frames.
    pub delivered_bytes: u64,
    /// Frames this endpoint sent (taken from its source by a worker).
    pub sent_frames: u64,
    /// Bytes of those frames.
    pub sent_bytes: u64,
}

impl EndpointCounts {
    fn add(&mut self, o: &EndpointCounts) {
        self.delivered_frames += o.delivered_frames;
        self.delivered_bytes += o.delivered_bytes;
        self.sent_frames += o.sent_frames;
        self.sent_bytes += o.sent_bytes;
    }

    fn is_zero(&self) -> bool {
        *self == EndpointCounts::default()
    }
}

#[derive(Default)]
struct EndpointAtomics {
    delivered_frames: AtomicU64,
    delivered_bytes: AtomicU64,
    sent_frames: AtomicU64,
    sent_bytes: AtomicU64,
}

/// Keeps what it holds on cache lines of its own (no false sharing between workers).
#[derive(Default)]
#[repr(align(128))]
struct CacheAligned<T>(T);

#[derive(Default)]
struct NicAtomics {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    copies: AtomicU64,
    batches: AtomicU64,
    ring_drops: AtomicU64,
}

/// Adds `delta` to a counter that only the calling thread writes (no read-modify-write).
#[inline]
fn bump(counter: &AtomicU64, delta: u64) {
    if delta != 0 {
        counter.store(counter.load(Relaxed).wrapping_add(delta), Relaxed);
    }
}

/// One worker's counters: written by that worker only (through [`CounterBatch::flush`]), read
/// lock-free by anyone ([`WorkerCounters::snapshot`]).
pub struct WorkerCounters {
    nic: CacheAligned<NicAtomics>,
    drops: CacheAligned<[AtomicU64; DropReason::COUNT]>,
    endpoints: Box<[EndpointAtomics]>,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerCounters {
    /// All counters at zero.
    pub fn new() -> WorkerCounters {
        WorkerCounters {
            nic: CacheAligned::default(),
            drops: CacheAligned::default(),
            endpoints: (0..ENDPOINT_SLOTS)
                .map(|_| EndpointAtomics::default())
                .collect(),
        }
    }

    /// Reads all counters (each one atomically; the set is not one atomic picture, but every
    /// counter only grows).
    pub fn snapshot(&self) -> CounterSnapshot {
        let n = &self.nic.0;
        let mut snap = CounterSnapshot {
            frames_in: n.frames_in.load(Relaxed),
            bytes_in: n.bytes_in.load(Relaxed),
            frames_out: n.frames_out.load(Relaxed),
            bytes_out: n.bytes_out.load(Relaxed),
            copies: n.copies.load(Relaxed),
            batches: n.batches.load(Relaxed),
            ring_drops: n.ring_drops.load(Relaxed),
            drops: [0; DropReason::COUNT],
            endpoints: vec![EndpointCounts::default(); ENDPOINT_SLOTS],
        };
        for (d, a) in snap.drops.iter_mut().zip(self.drops.0.iter()) {
            *d = a.load(Relaxed);
        }
        for (e, a) in snap.endpoints.iter_mut().zip(self.endpoints.iter()) {
            *e = EndpointCounts {
                delivered_frames: a.delivered_frames.load(Relaxed),
                delivered_bytes: a.delivered_bytes.load(Relaxed),
                sent_frames: a.sent_frames.load(Relaxed),
                sent_bytes: a.sent_bytes.load(Relaxed),
            };
        }
        snap
    }

    /// Frames delivered to endpoint channels so far, all endpoints together (cheap enough to
    /// poll from a reporting thread).
    pub fn delivered_frames(&self) -> u64 {
        self.endpoints
            .iter()
            .map(|e| e.delivered_frames.load(Relaxed))
            .sum()
    }

    /// Frames taken from NIC queues so far.
    pub fn frames_in(&self) -> u64 {
        self.nic.0.frames_in.load(Relaxed)
    }

    /// Adds frames the kernel dropped because one of the worker's NIC receive rings was full
    /// ([`crate::port::RxQueue::take_ring_drops`]). Called by the worker only.
    pub fn add_ring_drops(&self, frames: u64) {
        bump(&self.nic.0.ring_drops, frames);
    }
}

/// A worker's counts for the batch in progress, in plain integers; added to its
/// [`WorkerCounters`] by [`CounterBatch::flush`]. Allocated once, never allocates afterwards.
pub struct CounterBatch {
    frames_in: u64,
    bytes_in: u64,
    frames_out: u64,
    bytes_out: u64,
    copies: u64,
    drops: [u64; DropReason::COUNT],
    any_drop: bool,
    endpoints: Box<[EndpointCounts]>,
    touched: Vec<u16>,
}

impl Default for CounterBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl CounterBatch {
    /// An empty batch.
    pub fn new() -> CounterBatch {
        CounterBatch {
            frames_in: 0,
            bytes_in: 0,
            frames_out: 0,
            bytes_out: 0,
            copies: 0,
            drops: [0; DropReason::COUNT],
            any_drop: false,
            endpoints: vec![EndpointCounts::default(); ENDPOINT_SLOTS].into_boxed_slice(),
            touched: Vec::with_capacity(ENDPOINT_SLOTS),
        }
    }

    /// A frame of `bytes` bytes taken from a NIC queue.
    #[inline]
    pub fn nic_in(&mut self, frames: u64, bytes: u64) {
        self.frames_in += frames;
        self.bytes_in += bytes;
    }

    /// Frames accepted by the NIC transmit queue.
    #[inline]
    pub fn nic_out(&mut self, frames: u64, bytes: u64) {
        self.frames_out += frames;
        self.bytes_out += bytes;
    }

    /// Extra places a frame was copied to (beyond its first).
    #[inline]
    pub fn copies(&mut self, extra: u64) {
        self.copies += extra;
    }

    /// Frames dropped for `reason`.
    #[inline]
    pub fn drop(&mut self, reason: DropReason, frames: u64) {
        self.drops[reason as usize] += frames;
        self.any_drop = true;
    }

    #[inline]
    fn endpoint(&mut self, id: EndpointId) -> &mut EndpointCounts {
        let slot = endpoint_slot(id);
        let e = &mut self.endpoints[slot];
        if e.is_zero() {
            // slot < ENDPOINT_SLOTS <= u16::MAX
            self.touched.push(slot as u16);
        }
        &mut self.endpoints[slot]
    }

    /// Frames delivered into an endpoint's channel.
    #[inline]
    pub fn delivered(&mut self, id: EndpointId, frames: u64, bytes: u64) {
        if frames != 0 {
            let e = self.endpoint(id);
            e.delivered_frames += frames;
            e.delivered_bytes += bytes;
        }
    }

    /// Frames an endpoint sent (taken from its source).
    #[inline]
    pub fn sent_by(&mut self, id: EndpointId, frames: u64, bytes: u64) {
        if frames != 0 {
            let e = self.endpoint(id);
            e.sent_frames += frames;
            e.sent_bytes += bytes;
        }
    }

    /// Adds this batch to `to` (the worker's own counters) and starts a new batch.
    pub fn flush(&mut self, to: &WorkerCounters) {
        let n = &to.nic.0;
        bump(&n.frames_in, self.frames_in);
        bump(&n.bytes_in, self.bytes_in);
        bump(&n.frames_out, self.frames_out);
        bump(&n.bytes_out, self.bytes_out);
        bump(&n.copies, self.copies);
        bump(&n.batches, 1);
        self.frames_in = 0;
        self.bytes_in = 0;
        self.frames_out = 0;
        self.bytes_out = 0;
        self.copies = 0;
        if self.any_drop {
            for (d, a) in self.drops.iter_mut().zip(to.drops.0.iter()) {
                bump(a, *d);
                *d = 0;
            }
            self.any_drop = false;
        }
        for slot in self.touched.drain(..) {
            let e = &mut self.endpoints[usize::from(slot)];
            let a = &to.endpoints[usize::from(slot)];
            bump(&a.delivered_frames, e.delivered_frames);
            bump(&a.delivered_bytes, e.delivered_bytes);
            bump(&a.sent_frames, e.sent_frames);
            bump(&a.sent_bytes, e.sent_bytes);
            *e = EndpointCounts::default();
        }
    }
}

/// A plain copy of counters, for reporting; [`CounterSnapshot::add`] sums workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Frames taken from NIC receive queues.
    pub frames_in: u64,
    /// Bytes of those frames.
    pub bytes_in: u64,
    /// Frames accepted by the NIC transmit queue.
    pub frames_out: u64,
    /// Bytes of those frames.
    pub bytes_out: u64,
    /// Extra places frames were copied to (ARP and the like go to several endpoints).
    pub copies: u64,
    /// Counter flushes (about one per non-empty batch).
    pub batches: u64,
    /// Frames the kernel dropped because a NIC receive ring of the worker was full: they
    /// never reached the switch, so they are outside [`CounterSnapshot::balance`].
    pub ring_drops: u64,
    /// Drops, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
    /// Per-endpoint figures, indexed by [`endpoint_slot`] (the last is the overflow slot).
    pub endpoints: Vec<EndpointCounts>,
}

impl Default for CounterSnapshot {
    fn default() -> Self {
        CounterSnapshot {
            frames_in: 0,
            bytes_in: 0,
            frames_out: 0,
            bytes_out: 0,
            copies: 0,
            batches: 0,
            ring_drops: 0,
            drops: [0; DropReason::COUNT],
            endpoints: vec![EndpointCounts::default(); ENDPOINT_SLOTS],
        }
    }
}

impl CounterSnapshot {
    /// Adds another snapshot (another worker's) to this one.
    pub fn add(&mut self, o: &CounterSnapshot) {
        self.frames_in += o.frames_in;
        self.bytes_in += o.bytes_in;
        self.frames_out += o.frames_out;
        self.bytes_out += o.bytes_out;
        self.copies += o.copies;
        self.batches += o.batches;
        self.ring_drops += o.ring_drops;
        for (d, od) in self.drops.iter_mut().zip(o.drops.iter()) {
            *d += od;
        }
        for (e, oe) in self.endpoints.iter_mut().zip(o.endpoints.iter()) {
            e.add(oe);
        }
    }

    /// The sum over several workers' counters.
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerCounters>) -> CounterSnapshot {
        let mut total = CounterSnapshot::default();
        for w in workers {
            total.add(&w.snapshot());
        }
        total
    }

    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// All drops together.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// The figures of one endpoint (of the overflow slot for ids beyond capacity).
    pub fn endpoint(&self, id: EndpointId) -> EndpointCounts {
        self.endpoints[endpoint_slot(id)]
    }

    /// Frames delivered to all endpoints together.
    pub fn total_delivered(&self) -> u64 {
        self.endpoints.iter().map(|e| e.delivered_frames).sum()
    }

    /// Frames sent by all endpoints together.
    pub fn total_sent_by_endpoints(&self) -> u64 {
        self.endpoints.iter().map(|e| e.sent_frames).sum()
    }

    /// `(taken, accounted)`: frames taken from queues plus extra copies, and frames delivered,
    /// transmitted or dropped. Equal once all batches are flushed.
    pub fn balance(&self) -> (u64, u64) {
        (
            self.frames_in + self.total_sent_by_endpoints() + self.copies,
            self.total_delivered() + self.frames_out + self.total_drops(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_drops_are_reported_but_outside_the_balance() {
        let a = WorkerCounters::new();
        let b = WorkerCounters::new();
        a.add_ring_drops(5);
        a.add_ring_drops(0);
        b.add_ring_drops(2);
        let sum = CounterSnapshot::sum([&a, &b]);
        assert_eq!(sum.ring_drops, 7);
        assert_eq!(sum.balance(), (0, 0));
    }

    #[test]
    fn batch_flushes_into_worker_counters_and_resets() {
        let w = WorkerCounters::new();
        let mut b = CounterBatch::new();
        b.nic_in(3, 300);
        b.delivered(EndpointId(2), 2, 200);
        b.drop(DropReason::NoRule, 1);
        b.flush(&w);
        // flushed once: a second flush adds nothing but the batch count
        b.flush(&w);
        let s = w.snapshot();
        assert_eq!((s.frames_in, s.bytes_in), (3, 300));
        assert_eq!(s.endpoint(EndpointId(2)).delivered_frames, 2);
        assert_eq!(s.endpoint(EndpointId(2)).delivered_bytes, 200);
        assert_eq!(s.dropped(DropReason::NoRule), 1);
        assert_eq!(s.batches, 2);
        assert_eq!(s.balance(), (3, 3));
        assert_eq!(w.delivered_frames(), 2);
    }

    #[test]
    fn endpoints_beyond_capacity_share_the_overflow_slot() {
        let w = WorkerCounters::new();
        let mut b = CounterBatch::new();
        b.sent_by(EndpointId(MAX_ENDPOINTS as u32), 1, 10);
        b.sent_by(EndpointId(u32::MAX), 2, 20);
        b.flush(&w);
        let s = w.snapshot();
        assert_eq!(s.endpoints[MAX_ENDPOINTS].sent_frames, 3);
        assert_eq!(s.endpoint(EndpointId(5000)).sent_bytes, 30);
        assert_eq!(s.total_sent_by_endpoints(), 3);
    }

    #[test]
    fn snapshots_sum_across_workers() {
        let a = WorkerCounters::new();
        let b = WorkerCounters::new();
        let mut batch = CounterBatch::new();
        batch.nic_in(1, 64);
        batch.nic_out(1, 64);
        batch.drop(DropReason::TxFull, 4);
        batch.flush(&a);
        batch.nic_in(2, 128);
        batch.copies(2);
        batch.delivered(EndpointId(0), 1, 60);
        batch.flush(&b);
        let total = CounterSnapshot::sum([&a, &b]);
        assert_eq!(total.frames_in, 3);
        assert_eq!(total.bytes_in, 192);
        assert_eq!(total.frames_out, 1);
        assert_eq!(total.copies, 2);
        assert_eq!(total.dropped(DropReason::TxFull), 4);
        assert_eq!(total.total_delivered(), 1);
    }

    #[test]
    fn counters_are_readable_from_another_thread() {
        let w = std::sync::Arc::new(WorkerCounters::new());
        let writer = {
            let w = w.clone();
            std::thread::spawn(move || {
                let mut b = CounterBatch::new();
                for _ in 0..1000 {
                    b.nic_in(1, 1);
                    b.flush(&w);
                }
            })
        };
        writer.join().unwrap();
        assert_eq!(w.frames_in(), 1000);
    }
}
