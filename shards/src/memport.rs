//! In-memory implementations of the port traits, for tests and benchmarks.
//!
//! - [`LoopRx`]: serves a pre-generated [`FrameSet`] over and over (benchmarks).
//! - [`ChannelRx`]: serves frames that a test pushes through a channel ([`channel_rx`]).
//! - [`MemTx`]: a NIC transmit queue that records or only counts frames, optionally with a
//!   capacity (to provoke `TxFull`) and a hook that sees each batch as it is sent.
//! - [`MemSink`]: an endpoint channel with one fixed-slot ring per worker that really copies
//!   each frame into a slot and refuses when the ring is full; tests and benchmarks drain it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};

use crate::endpoint::EndpointSink;
use crate::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

/// Many frames in one contiguous buffer (cheap to share between benchmark workers).
#[derive(Clone, Debug, Default)]
pub struct FrameSet {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl FrameSet {
    /// An empty set.
    pub fn new() -> FrameSet {
        FrameSet::default()
    }

    /// Appends a copy of `frame`.
    pub fn push(&mut self, frame: &[u8]) {
        self.spans.push((self.bytes.len(), frame.len()));
        self.bytes.extend_from_slice(frame);
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the set holds no frame.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Frame number `i`.
    #[inline]
    pub fn get(&self, i: usize) -> &[u8] {
        let (start, len) = self.spans[i];
        &self.bytes[start..start + len]
    }

    /// All frames in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|&(s, l)| &self.bytes[s..s + l])
    }
}

impl<'a> FromIterator<&'a [u8]> for FrameSet {
    fn from_iter<I: IntoIterator<Item = &'a [u8]>>(iter: I) -> FrameSet {
        let mut set = FrameSet::new();
        for f in iter {
            set.push(f);
        }
        set
    }
}

/// A receive queue that serves a [`FrameSet`] in a loop, `MAX_BATCH` frames per call.
pub struct LoopRx {
    frames: Arc<FrameSet>,
    next: usize,
    remaining: Option<u64>,
}

impl LoopRx {
    /// Serves `frames` forever, starting with frame `start` (modulo the set's length).
    pub fn new(frames: Arc<FrameSet>, start: usize) -> LoopRx {
        let next = if frames.is_empty() {
            0
        } else {
            start % frames.len()
        };
        LoopRx {
            frames,
            next,
            remaining: None,
        }
    }

    /// Stops after `total` frames (then serves nothing).
    pub fn with_limit(mut self, total: u64) -> LoopRx {
        self.remaining = Some(total);
        self
    }
}

impl RxQueue for LoopRx {
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let n_frames = self.frames.len();
        if n_frames == 0 {
            return 0;
        }
        let mut want = MAX_BATCH - batch.len();
        if let Some(rem) = self.remaining.as_mut() {
            want = want.min(usize::try_from(*rem).unwrap_or(usize::MAX));
            *rem -= want as u64;
        }
        let start = self.next;
        self.next = (start + want) % n_frames;
        let frames: &'a FrameSet = &self.frames;
        // The spans from `start` to the end, then from the beginning again, as often as
        // `want` needs.
        let mut left = want;
        let mut from = start;
        while left > 0 {
            let spans = &frames.spans[from..];
            let take = left.min(spans.len());
            for &(s, l) in &spans[..take] {
                batch.push(frames.bytes.get(s..s + l).unwrap_or_default());
            }
            left -= take;
            from = 0;
        }
        want
    }
}

/// The sending side of a [`ChannelRx`]: push frames with `send(vec)`.
pub type FrameSender = Sender<Vec<u8>>;

/// A receive queue fed through a channel (tests): each `recv` takes up to `MAX_BATCH` frames
/// that are waiting, without blocking.
pub struct ChannelRx {
    rx: Receiver<Vec<u8>>,
    held: Vec<Vec<u8>>,
}

/// A channel-fed receive queue and the sender that feeds it.
pub fn channel_rx() -> (FrameSender, ChannelRx) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (
        tx,
        ChannelRx {
            rx,
            held: Vec::with_capacity(MAX_BATCH),
        },
    )
}

impl RxQueue for ChannelRx {
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        self.held.clear();
        let room = MAX_BATCH - batch.len();
        while self.held.len() < room {
            match self.rx.try_recv() {
                Ok(f) => self.held.push(f),
                Err(_) => break,
            }
        }
        let held: &'a Vec<Vec<u8>> = &self.held;
        for f in held {
            batch.push(f);
        }
        held.len()
    }
}

/// Called with each batch a [`MemTx`] is asked to send, before it accepts any of it.
pub type TxHook = Box<dyn FnMut(&[&[u8]]) + Send>;

/// What a [`MemTx`] has seen; shared with the test that made it.
#[derive(Default)]
pub struct TxLog {
    frames: Mutex<Vec<Vec<u8>>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    calls: AtomicU64,
}

impl TxLog {
    /// Copies of the recorded frames, in order (empty for a counting-only queue).
    pub fn frames(&self) -> Vec<Vec<u8>> {
        lock(&self.frames).clone()
    }

    /// Frames accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Frames refused (capacity exhausted) so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Number of `send` calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Relaxed)
    }
}

/// A NIC transmit queue in memory.
pub struct MemTx {
    log: Arc<TxLog>,
    record: bool,
    capacity: Option<u64>,
    hook: Option<TxHook>,
}

impl MemTx {
    /// A queue that keeps a copy of every accepted frame.
    pub fn recording() -> (MemTx, Arc<TxLog>) {
        let log = Arc::new(TxLog::default());
        (
            MemTx {
                log: log.clone(),
                record: true,
                capacity: None,
                hook: None,
            },
            log,
        )
    }

    /// A queue that only counts (benchmarks).
    pub fn counting() -> (MemTx, Arc<TxLog>) {
        let (mut tx, log) = MemTx::recording();
        tx.record = false;
        (tx, log)
    }

    /// Accepts at most `total` frames over its lifetime, refusing the rest.
    pub fn with_capacity(mut self, total: u64) -> MemTx {
        self.capacity = Some(total);
        self
    }

    /// Calls `hook` with every batch before accepting it.
    pub fn with_hook(mut self, hook: TxHook) -> MemTx {
        self.hook = Some(hook);
        self
    }
}

impl TxQueue for MemTx {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.log.calls.fetch_add(1, Relaxed);
        if let Some(hook) = self.hook.as_mut() {
            hook(frames);
        }
        let mut n = frames.len();
        if let Some(cap) = self.capacity.as_mut() {
            n = n.min(usize::try_from(*cap).unwrap_or(usize::MAX));
            *cap -= n as u64;
        }
        if self.record {
            lock(&self.log.frames).extend(frames[..n].iter().map(|f| f.to_vec()));
        }
        self.log.accepted.fetch_add(n as u64, Relaxed);
        self.log
            .refused
            .fetch_add((frames.len() - n) as u64, Relaxed);
        n
    }
}

/// Locks a mutex, also after another thread panicked while holding it (the data is plain
/// bytes and counts, always consistent between calls).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One worker's ring in a [`MemSink`]: fixed slots, each holding one copied frame.
struct SlotRing {
    slots: Vec<u8>,
    lens: Vec<u16>,
    head: usize,
    len: usize,
    /// Frames taken out: popped, or overwritten under [`WhenFull::ConsumeOldest`].
    consumed: u64,
}

/// A ring plus its counters, on cache lines of its own.
#[repr(align(128))]
struct WorkerRing {
    ring: Mutex<SlotRing>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// What a full [`MemSink`] ring does with a new frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse it (like a real channel whose reader is behind); the worker counts
    /// `ChannelFull`.
    Refuse,
    /// Count the oldest frame as consumed and overwrite its slot (benchmarks without a
    /// draining thread: every accepted frame was really copied into the ring).
    ConsumeOldest,
}

/// An endpoint channel in memory: one ring of fixed-size slots per worker, so workers never
/// share a lock (each ring's mutex is only shared between its worker and the consumer).
/// Frames longer than a slot are refused.
pub struct MemSink {
    rings: Box<[WorkerRing]>,
    slot_size: usize,
    slots: usize,
    when_full: WhenFull,
}

impl MemSink {
    /// A sink with `workers` rings of `slots` slots of `slot_size` bytes each.
    pub fn new(workers: usize, slots: usize, slot_size: usize, when_full: WhenFull) -> MemSink {
        let slot_size = slot_size.min(usize::from(u16::MAX));
        MemSink {
            rings: (0..workers.max(1))
                .map(|_| WorkerRing {
                    ring: Mutex::new(SlotRing {
                        slots: vec![0; slots * slot_size],
                        lens: vec![0; slots],
                        head: 0,
                        len: 0,
                        consumed: 0,
                    }),
                    accepted: AtomicU64::new(0),
                    refused: AtomicU64::new(0),
                })
                .collect(),
            slot_size,
            slots,
            when_full,
        }
    }

    /// A refusing sink with 2048-byte slots (tests).
    pub fn for_tests(workers: usize, slots: usize) -> Arc<MemSink> {
        Arc::new(MemSink::new(workers, slots, 2048, WhenFull::Refuse))
    }

    /// Takes the oldest frame from worker `worker`'s ring.
    pub fn pop(&self, worker: usize) -> Option<Vec<u8>> {
        let r = self.rings.get(worker)?;
        let mut ring = lock(&r.ring);
        if ring.len == 0 {
            return None;
        }
        let head = ring.head;
        let start = head * self.slot_size;
        let frame = ring.slots[start..start + usize::from(ring.lens[head])].to_vec();
        ring.head = if head + 1 == self.slots { 0 } else { head + 1 };
        ring.len -= 1;
        ring.consumed += 1;
        Some(frame)
    }

    /// Takes every waiting frame, worker 0's ring first.
    pub fn drain_all(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for w in 0..self.rings.len() {
            while let Some(f) = self.pop(w) {
                out.push(f);
            }
        }
        out
    }

    /// Frames accepted (copied into a ring) so far, all rings together.
    pub fn accepted(&self) -> u64 {
        self.rings.iter().map(|r| r.accepted.load(Relaxed)).sum()
    }

    /// Frames refused so far, all rings together.
    pub fn refused(&self) -> u64 {
        self.rings.iter().map(|r| r.refused.load(Relaxed)).sum()
    }

    /// Frames consumed (popped, or overwritten under [`WhenFull::ConsumeOldest`]) so far.
    pub fn consumed(&self) -> u64 {
        self.rings.iter().map(|r| lock(&r.ring).consumed).sum()
    }
}

impl EndpointSink for MemSink {
    fn deliver(&self, worker: usize, frames: &[&[u8]]) -> usize {
        let Some(r) = self.rings.get(worker) else {
            refuse_unknown_worker(self, frames.len());
            return 0;
        };
        let mut guard = lock(&r.ring);
        let ring = &mut *guard;
        let mut accepted = 0;
        if self.slots != 0 {
            // The ring's state in locals for the loop; written back after it. The oldest
            // frame is at `tail - len` (mod slots), so a full ring's oldest slot is `tail`.
            let (mut len, mut consumed) = (ring.len, ring.consumed);
            let mut tail = ring.head + len;
            if tail >= self.slots {
                tail -= self.slots;
            }
            let refuse = self.when_full == WhenFull::Refuse;
            for f in frames {
                if f.len() > self.slot_size {
                    break;
                }
                if len < self.slots {
                    len += 1;
                } else if refuse {
                    break;
                } else {
                    // WhenFull::ConsumeOldest: the oldest frame (in slot `tail`) is
                    // overwritten.
                    consumed += 1;
                }
                let start = tail * self.slot_size;
                ring.slots[start..start + f.len()].copy_from_slice(f);
                // f.len() <= slot_size <= u16::MAX
                ring.lens[tail] = f.len() as u16;
                tail = if tail + 1 == self.slots { 0 } else { tail + 1 };
                accepted += 1;
            }
            ring.head = if tail >= len {
                tail - len
            } else {
                tail + self.slots - len
            };
            (ring.len, ring.consumed) = (len, consumed);
        }
        drop(guard);
        // Only this worker writes these two counters: load + store, no read-modify-write.
        r.accepted
            .store(r.accepted.load(Relaxed) + accepted as u64, Relaxed);
        if accepted < frames.len() {
            r.refused.store(
                r.refused.load(Relaxed) + (frames.len() - accepted) as u64,
                Relaxed,
            );
        }
        accepted
    }
}

/// Counts frames refused because the worker index has no ring (a configuration error).
fn refuse_unknown_worker(sink: &MemSink, n: usize) {
    if let Some(r) = sink.rings.last() {
        r.refused.fetch_add(n as u64, Relaxed);
    }
}

/// A simple queue-backed receive queue for tests that want to push frames from the same
/// thread without a channel.
#[derive(Default)]
pub struct QueueRx {
    /// Frames waiting to be received, oldest first.
    pub waiting: VecDeque<Vec<u8>>,
    held: Vec<Vec<u8>>,
}

impl RxQueue for QueueRx {
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        self.held.clear();
        let room = MAX_BATCH - batch.len();
        while self.held.len() < room {
            match self.waiting.pop_front() {
                Some(f) => self.held.push(f),
                None => break,
            }
        }
        let held: &'a Vec<Vec<u8>> = &self.held;
        for f in held {
            batch.push(f);
        }
        held.len()
    }
}

/// Builders of well-formed Ethernet frames for tests and benchmarks.
pub mod frames {
    use crate::key::proto;

    /// The broadcast MAC address.
    pub const BROADCAST: [u8; 6] = [0xff; 6];

    /// An IPv4 packet in an Ethernet frame.
    #[derive(Clone, Copy, Debug)]
    pub struct Ipv4Frame {
        /// Destination MAC.
        pub dst_mac: [u8; 6],
        /// Source MAC.
        pub src_mac: [u8; 6],
        /// Source address.
        pub src_ip: [u8; 4],
        /// Destination address.
        pub dst_ip: [u8; 4],
        /// IP protocol.
        pub proto: u8,
        /// Source port (written only for protocols with ports, and only in first fragments).
        pub src_port: u16,
        /// Destination port.
        pub dst_port: u16,
        /// IP identification.
        pub id: u16,
        /// The more-fragments flag.
        pub more_fragments: bool,
        /// Fragment offset in 8-byte units (0: first fragment or unfragmented).
        pub frag_offset: u16,
        /// Total frame length (at least the headers; padded with zero payload).
        pub frame_len: usize,
    }

    impl Default for Ipv4Frame {
        fn default() -> Self {
            Ipv4Frame {
                dst_mac: [2, 0, 0, 0, 0, 1],
                src_mac: [2, 0, 0, 0, 0, 2],
                src_ip: [192, 0, 2, 1],
                dst_ip: [10, 0, 0, 2],
                proto: proto::UDP,
                src_port: 40000,
                dst_port: 80,
                id: 1,
                more_fragments: false,
                frag_offset: 0,
                frame_len: 64,
            }
        }
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in bytes.chunks(2) {
            let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    impl Ipv4Frame {
        /// The frame's bytes.
        pub fn build(&self) -> Vec<u8> {
            let l4_header = if self.frag_offset != 0 {
                0
            } else {
                match self.proto {
                    proto::TCP => 20,
                    p if proto::has_ports(p) => 8,
                    proto::ICMP => 8,
                    _ => 0,
                }
            };
            let len = self.frame_len.max(14 + 20 + l4_header);
            let mut f = vec![0u8; len];
            f[0..6].copy_from_slice(&self.dst_mac);
            f[6..12].copy_from_slice(&self.src_mac);
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip_len = (len - 14).min(usize::from(u16::MAX)) as u16;
            let ip = &mut f[14..34];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
            ip[4..6].copy_from_slice(&self.id.to_be_bytes());
            let flags = (u16::from(self.more_fragments) << 13) | (self.frag_offset & 0x1fff);
            ip[6..8].copy_from_slice(&flags.to_be_bytes());
            ip[8] = 64;
            ip[9] = self.proto;
            ip[12..16].copy_from_slice(&self.src_ip);
            ip[16..20].copy_from_slice(&self.dst_ip);
            let sum = checksum(&f[14..34]);
            f[24..26].copy_from_slice(&sum.to_be_bytes());
            if l4_header != 0 && proto::has_ports(self.proto) {
                f[34..36].copy_from_slice(&self.src_port.to_be_bytes());
                f[36..38].copy_from_slice(&self.dst_port.to_be_bytes());
                if self.proto == proto::TCP {
                    f[46] = 5 << 4;
                    f[47] = 0x10; // ACK
                } else {
                    let udp_len = ip_len.saturating_sub(20);
                    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
                }
            } else if l4_header != 0 && self.proto == proto::ICMP {
                f[34] = 8; // echo request
            }
            f
        }
    }

    /// An ARP request (`who has target_ip, tell sender_ip`), broadcast.
    pub fn arp_request(src_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&BROADCAST);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let a = &mut f[14..42];
        a[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        a[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        a[4] = 6;
        a[5] = 4;
        a[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
        a[8..14].copy_from_slice(&src_mac);
        a[14..18].copy_from_slice(&sender_ip);
        a[24..28].copy_from_slice(&target_ip);
        f
    }

    /// A DHCPv4 message: a request (`answer == false`, UDP 68 -> 67 from 0.0.0.0 to
    /// broadcast) or an answer (UDP 67 -> 68 from `server_ip`).
    pub fn dhcp(answer: bool, src_mac: [u8; 6], server_ip: [u8; 4]) -> Vec<u8> {
        let spec = Ipv4Frame {
            dst_mac: BROADCAST,
            src_mac,
            src_ip: if answer { server_ip } else { [0; 4] },
            dst_ip: [255; 4],
            proto: proto::UDP,
            src_port: if answer { 67 } else { 68 },
            dst_port: if answer { 68 } else { 67 },
            frame_len: 14 + 20 + 8 + 244,
            ..Ipv4Frame::default()
        };
        let mut f = spec.build();
        let bootp = &mut f[42..];
        bootp[0] = if answer { 2 } else { 1 }; // op
        bootp[1] = 1; // htype Ethernet
        bootp[2] = 6; // hlen
        bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // xid
        bootp[28..34].copy_from_slice(&src_mac); // chaddr
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
        bootp[240..244].copy_from_slice(&[53, 1, if answer { 2 } else { 1 }, 255]);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_rx_cycles_and_respects_limit() {
        let set: FrameSet = [&[1u8][..], &[2], &[3]].into_iter().collect();
        let mut rx = LoopRx::new(Arc::new(set), 1).with_limit(70);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), MAX_BATCH);
        let firsts: Vec<u8> = batch.as_slice()[..4].iter().map(|f| f[0]).collect();
        assert_eq!(firsts, vec![2, 3, 1, 2]);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 6);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 0);
    }

    #[test]
    fn channel_rx_lends_waiting_frames() {
        let (tx, mut rx) = channel_rx();
        for i in 0..100u8 {
            tx.send(vec![i; 3]).unwrap();
        }
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), MAX_BATCH);
        assert_eq!(batch.as_slice()[63], &[63, 63, 63]);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 36);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 0);
    }

    #[test]
    fn mem_tx_records_counts_and_refuses_beyond_capacity() {
        let (tx, log) = MemTx::recording();
        let mut tx = tx.with_capacity(3);
        assert_eq!(tx.send(&[&[1], &[2]]), 2);
        assert_eq!(tx.send(&[&[3], &[4]]), 1);
        assert_eq!(log.frames(), vec![vec![1], vec![2], vec![3]]);
        assert_eq!((log.accepted(), log.refused(), log.calls()), (3, 1, 2));
    }

    #[test]
    fn mem_sink_copies_refuses_when_full_and_drains() {
        let sink = MemSink::new(2, 2, 8, WhenFull::Refuse);
        assert_eq!(sink.deliver(0, &[&[1, 1], &[2], &[3]]), 2);
        assert_eq!(sink.deliver(1, &[&[9; 9]]), 0, "longer than a slot");
        assert_eq!(sink.deliver(1, &[&[4]]), 1);
        assert_eq!(sink.deliver(7, &[&[4]]), 0, "no such worker ring");
        assert_eq!(sink.accepted(), 3);
        assert_eq!(sink.refused(), 3);
        assert_eq!(sink.pop(0), Some(vec![1, 1]));
        assert_eq!(sink.deliver(0, &[&[5]]), 1, "room again after a pop");
        assert_eq!(sink.drain_all(), vec![vec![2], vec![5], vec![4]]);
        assert_eq!(sink.consumed(), 4);
    }

    #[test]
    fn mem_sink_consume_oldest_never_refuses() {
        let sink = MemSink::new(1, 2, 8, WhenFull::ConsumeOldest);
        assert_eq!(sink.deliver(0, &[&[1], &[2], &[3]]), 3);
        assert_eq!(sink.consumed(), 1);
        assert_eq!(sink.drain_all(), vec![vec![2], vec![3]]);
    }

    #[test]
    fn queue_rx_serves_in_order() {
        let mut rx = QueueRx::default();
        rx.waiting.push_back(vec![1]);
        rx.waiting.push_back(vec![2]);
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 2);
        assert_eq!(batch.as_slice(), &[&[1u8][..], &[2]]);
    }
}
